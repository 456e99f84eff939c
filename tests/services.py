"""The machine's real services for tests: PostgreSQL databases made per test.

Tests that need PostgreSQL skip with the reason when it cannot be reached;
with ``WSSERVER_REQUIRE_SERVICES=1`` (as in CI) they fail instead.  The server
is ``WSSERVER_TEST_POSTGRES`` (a libpq URL of a role that may create
databases; default ``postgresql://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.trial import unittest

from wsserver.broker import resp

ADMIN_URL = os.environ.get(
    "WSSERVER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_why_not: list[str | None] = []


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used by the tests, or None when it can (checked once)."""
    if not _why_not:
        try:
            import psycopg

            with psycopg.connect(ADMIN_URL, connect_timeout=5, autocommit=True) as conn:
                conn.execute("SELECT 1")
            _why_not.append(None)
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            _why_not.append(f"PostgreSQL at {ADMIN_URL} is not reachable: {reason}")
    return _why_not[0]


def require_postgres() -> None:
    """Skip the calling test when PostgreSQL is absent, or fail when CI requires it."""
    why = postgres_unavailable()
    if why is None:
        return
    if os.environ.get("WSSERVER_REQUIRE_SERVICES") == "1":
        raise AssertionError(f"{why} (and WSSERVER_REQUIRE_SERVICES=1)")
    raise unittest.SkipTest(why)


def url_for(name: str) -> str:
    """The URL of database ``name`` on the test server."""
    import psycopg

    info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    info["dbname"] = name
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    port = info.get("port", "5432")
    return f"postgresql://{user}{password}@{host}:{port}/{name}"


def admin_execute(sql: str) -> None:
    """Run one statement on the test server's admin database (autocommit)."""
    import psycopg

    with psycopg.connect(ADMIN_URL, connect_timeout=10, autocommit=True) as conn:
        conn.execute(sql)


def fresh_postgres_database(testcase: Any) -> str:
    """Create an empty database of its own for ``testcase``; return its URL.

    It is dropped when the test ends (after the test's own clean-ups, which
    close its stores), connections and all.
    """
    require_postgres()
    name = f"wsserver_test_{uuid.uuid4().hex[:16]}"
    admin_execute(f'CREATE DATABASE "{name}"')
    testcase.addCleanup(admin_execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return url_for(name)


def database_for_test(testcase: Any) -> str:
    """A database for an end-to-end test: a SQLite file, or with
    ``WSSERVER_TEST_DATABASE=postgresql`` a fresh PostgreSQL database."""
    if os.environ.get("WSSERVER_TEST_DATABASE", "sqlite") == "postgresql":
        return fresh_postgres_database(testcase)
    return testcase.mktemp() + ".db"


# -- Redis -----------------------------------------------------------------------

REDIS_HOST = os.environ.get("WSSERVER_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("WSSERVER_TEST_REDIS_PORT", "6379"))
_redis_why_not: list[str | None] = []


def redis_command(*args: str, port: int | None = None) -> Any:
    """Send one command to the test Redis and return its reply."""
    import socket

    with socket.create_connection((REDIS_HOST, port or REDIS_PORT), timeout=10) as sock:
        return resp.command(sock, sock.makefile("rb"), *args)


def redis_unavailable() -> str | None:
    """Why Redis cannot be used by the tests, or None when it can (checked once)."""
    if not _redis_why_not:
        try:
            reply = redis_command("PING")
            _redis_why_not.append(None if reply == "PONG" else f"PING answered {reply!r}")
        except Exception as exc:
            _redis_why_not.append(
                f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable: {exc or type(exc).__name__}"
            )
    return _redis_why_not[0]


def require_redis() -> None:
    """Skip the calling test when Redis is absent, or fail when CI requires it."""
    why = redis_unavailable()
    if why is None:
        return
    if os.environ.get("WSSERVER_REQUIRE_SERVICES") == "1":
        raise AssertionError(f"{why} (and WSSERVER_REQUIRE_SERVICES=1)")
    raise unittest.SkipTest(why)


def redis_url(db: int = 0) -> str:
    """The BROKER URL of the test Redis."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def fresh_redis_prefix(testcase: Any) -> str:
    """A key and channel prefix of the calling test's own (use it with
    ``redis_url(0)``); its keys are deleted when the test ends."""
    require_redis()
    prefix = f"wstest:{uuid.uuid4().hex[:12]}:"

    def clean() -> None:
        keys = redis_command("KEYS", f"{prefix}*") or []
        for key in keys:
            redis_command("DEL", key)

    testcase.addCleanup(clean)
    return prefix
