"""The cluster's services for the benchmark: a PostgreSQL database of its own
and a Redis database number, and the CPU of the processes that serve them,
read from /proc.

What is counted (docs/performance.md, section Cluster):

- PostgreSQL: the backends whose ``pg_stat_activity.datname`` is the
  benchmark's own database (the nodes' connections), sampled before and
  after the run; a backend that ended during the run is not counted (the
  report says how many), one that started is counted whole.  The shared
  background processes (WAL writer, checkpointer, ...) are not: they also
  serve every other database on the server.
- Redis: the whole ``redis-server`` process (its ``INFO`` process id).  It is
  shared with anything else using that Redis at the time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..broker import resp
from ..config import parse_broker

TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER = "redis://127.0.0.1:6379/14"


def pid_cpu(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of process ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def children(parent: int) -> list[int]:
    """The pids whose parent is ``parent``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{name}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(name))
    return found


class Redis:
    """A minimal RESP client for the benchmark's own housekeeping."""

    def __init__(self, url: str) -> None:
        address = parse_broker(url)
        self.url = url
        self.host, self.port, self.db = address.host, address.port, address.db
        self.password = address.password

    def command(self, *args: str) -> Any:
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            reader = sock.makefile("rb")
            if self.password:
                resp.command(sock, reader, "AUTH", self.password)
            resp.command(sock, reader, "SELECT", str(self.db))
            return resp.command(sock, reader, *args)

    def pid(self) -> int | None:
        """The redis-server's process id, when it runs on this machine."""
        for line in self.command("INFO", "server").splitlines():
            if line.startswith("process_id:"):
                pid = int(line.split(":", 1)[1])
                return pid if os.path.exists(f"/proc/{pid}") else None
        return None

    def clear(self) -> int:
        """Delete the server's keys of this database number (``wsserver:<db>:*``,
        the only keys a node writes there); return how many."""
        cursor, deleted = "0", 0
        while True:
            cursor, keys = self.command("SCAN", cursor, "MATCH", f"wsserver:{self.db}:*")
            for key in keys:
                deleted += self.command("DEL", key)
            if cursor == "0":
                return deleted


class Postgres:
    """A database of the benchmark's own on a PostgreSQL server, created and dropped."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"wsserver_bench_{uuid.uuid4().hex[:12]}"

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.admin_url, connect_timeout=5, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def check(self) -> None:
        self._execute("SELECT 1")

    @property
    def url(self) -> str:
        """The URL of the benchmark's database (the admin URL, another dbname)."""
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{self.name}", parts.query, ""))

    def create(self) -> None:
        self._execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def activity(self) -> dict[str, int]:
        """The database's counters from ``pg_stat_database`` (transactions and
        rows): what the backends did, to explain their CPU.  PostgreSQL
        updates them about once a second, so a difference is approximate."""
        columns = ("xact_commit", "tup_inserted", "tup_updated", "tup_returned", "blks_hit")
        rows = self._execute(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_returned, blks_hit"
            " FROM pg_stat_database WHERE datname = %s",
            (self.name,),
        )
        return dict(zip(columns, rows[0], strict=True)) if rows else {}

    def backends(self) -> list[int]:
        """The pids of the backends connected to the benchmark's database."""
        rows = self._execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.name,),
        )
        return [pid for (pid,) in rows if os.path.exists(f"/proc/{pid}")]


def unavailable(database: str, broker: str) -> str | None:
    """Why the cluster workload cannot run against these services, or None."""
    try:
        Postgres(database).check()
    except Exception as exc:
        return f"PostgreSQL does not answer: {' '.join(str(exc).split()) or type(exc).__name__}"
    try:
        if Redis(broker).command("PING") != "PONG":
            return "Redis does not answer PING"
    except Exception as exc:
        return f"Redis does not answer: {exc or type(exc).__name__}"
    return None


def broker_unavailable(broker: str) -> str | None:
    """Why the workers workload cannot use this Redis, or None."""
    try:
        if Redis(broker).command("PING") != "PONG":
            return "Redis does not answer PING"
    except Exception as exc:
        return f"Redis does not answer: {exc or type(exc).__name__}"
    return None
