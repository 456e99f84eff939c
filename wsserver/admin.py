"""``wsserver-admin``: the operator's command, on the server's own ``DATABASE``.

    wsserver-admin users
    wsserver-admin delete-user alice
    wsserver-admin backup /var/backups/wsserver-2026-12-07.db
    wsserver-admin stats --json

``DATABASE`` comes from ``--database`` or the environment (as for the
server; default ``wsserver.db``).  It works beside a running server: reads
never block it, each write is a short transaction, and what the servers must
act on (a deleted user's connections) is recorded as an account event that
every node polls each second (``events.py``).  Each command prints one line
per result, or with ``--json`` one JSON object per line; a failure is one
line on stderr and exit status 1 (2 for a bad command line).

There is no ``revoke-key``, by design (protocol section 14 lists one): an
operator holds none of a user's keys, so a key-log entry it wrote could not be
signed and would break the log every client checks (section 12).  A user
revokes a lost device from another of their devices; an account with no
device left, or one that must go, is removed with ``delete-user``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg

from .config import ConfigError, load
from .messages import is_user_id
from .store import DatabaseError, describe, is_postgres

EPILOG = """\
DATABASE: --database, else the DATABASE environment variable, else wsserver.db
(a SQLite file or a postgresql:// URL, as for the server).  The database must
be at this version's schema: start the server on it once to upgrade it.

There is no revoke-key, by design: an operator holds none of a user's keys, so
an entry it wrote would break the user's signed key log, which every client
checks (protocol section 12).  A user revokes a lost device from another of
their devices (wsserver-client revoke KEY_ID, or Devices in the web page); an
account with no device left, or one that must go, is removed with delete-user.
Exit status: 0 done, 1 failed (one line on stderr), 2 bad usage.
"""


class AdminError(Exception):
    """A failure to report on one line."""


def _safe(text: str) -> str:
    """``text`` with control and invisible characters escaped, for a terminal."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Admin:
    """The commands, on one database; each returns the lines to print."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.postgres = is_postgres(database)
        if self.postgres:
            from .store import postgres as engine
        else:
            from .store import sqlite as engine
        self._engine: Any = engine

    def _connect(self) -> Any:
        return self._engine.admin_connect(self.database)

    def users(self) -> list[dict[str, Any]]:
        conn = self._connect()
        try:
            rows = self._engine.admin_users(conn)
        finally:
            conn.close()
        return [
            {"user_id": user_id, "username": username, "created": _when(created_ms)}
            for user_id, username, created_ms in rows
        ]

    def delete_user(self, user_id: str) -> list[dict[str, Any]]:
        if not is_user_id(user_id):
            raise AdminError(f"delete-user: {_safe(user_id)!r} is not a user id")
        conn = self._connect()
        try:
            removed = self._engine.admin_delete_user(conn, user_id, int(time.time() * 1000))
        finally:
            conn.close()
        if removed is None:
            raise AdminError(f"delete-user: no such user: {user_id}")
        return [{"deleted": user_id, "messages_removed": removed}]

    def backup(self, target: str) -> list[dict[str, Any]]:
        if self.postgres:
            raise AdminError(
                f"backup: DATABASE is PostgreSQL ({describe(self.database)}): back it up with"
                " pg_dump, e.g. pg_dump --format=custom --file=FILE DBNAME"
                " (docs/operations.md, Backup and restore)"
            )
        if os.path.lexists(target):
            raise AdminError(f"backup: {target} exists; give a new file name")
        self._engine.backup(self.database, target)
        return [{"backup": os.path.abspath(target), "bytes": os.path.getsize(target)}]

    def stats(self) -> list[dict[str, Any]]:
        conn = self._connect()
        try:
            if self.postgres:
                found = self._engine.admin_stats(conn)
            else:
                found = self._engine.admin_stats(conn, self.database)
        finally:
            conn.close()
        return [found]


def _text(command: str, result: dict[str, Any]) -> str:
    if command == "users":
        return f"{result['user_id']}\t{_safe(result['username'])}\t{result['created']}"
    if command == "delete-user":
        return (
            f"deleted {result['deleted']}: {result['messages_removed']} messages removed;"
            " the id stays taken; their connections close (4003) within a second on"
            " every running node"
        )
    if command == "backup":
        return f"backup written and checked: {result['backup']} ({result['bytes']} bytes)"
    return " ".join(f"{key}={value}" for key, value in result.items())


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="wsserver-admin",
        description="Operate a wsserver database: list and delete users, back up, count.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--database", help="SQLite file or postgresql:// URL (default: $DATABASE)")
    top.add_argument("--json", action="store_true", help="one JSON object per line")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("users", help="list the users: id, name, registration time")
    delete = commands.add_parser(
        "delete-user",
        help="delete a user, their keys and key log, challenges, signed-out tokens"
        " and every message from or to them; the id stays taken; their"
        " connections close with 4003; run again after a failure, it finishes"
        " the job",
    )
    delete.add_argument("user_id", metavar="ID")
    backup = commands.add_parser(
        "backup", help="copy a SQLite database (online, while the server runs) to a new file"
    )
    backup.add_argument("file", metavar="FILE")
    commands.add_parser("stats", help="users, messages pending and delivered, database size")
    return top


def run(
    argv: Sequence[str],
    environ: dict[str, str],
    out: TextIO,
    err: TextIO,
) -> int:
    """Run one command; return the exit status."""
    args = parser().parse_args(argv)
    try:
        options = {"database": args.database}
        database = load(options, {k: v for k, v in environ.items() if k == "DATABASE"}).database
    except ConfigError as exc:
        print(f"wsserver-admin: {exc}", file=err)
        return 1
    admin = Admin(database)
    actions: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "users": admin.users,
        "delete-user": lambda: admin.delete_user(args.user_id),
        "backup": lambda: admin.backup(args.file),
        "stats": admin.stats,
    }
    try:
        results = actions[args.command]()
    except (AdminError, DatabaseError) as exc:
        print(f"wsserver-admin: {' '.join(str(exc).split())}", file=err)
        return 1
    except (sqlite3.Error, psycopg.Error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"wsserver-admin: {args.command}: database error: {reason}", file=err)
        return 1
    for result in results:
        line = json.dumps(result, ensure_ascii=True) if args.json else _text(args.command, result)
        print(line, file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """The ``wsserver-admin`` console script."""
    sys.exit(run(sys.argv[1:] if argv is None else argv, dict(os.environ), sys.stdout, sys.stderr))


__all__ = ["Admin", "AdminError", "main", "parser", "run"]
