"""The ``history`` workload's database side: messages bulk-loaded straight into
SQLite or PostgreSQL (not timed), the ``since`` query timed on its own, and
its query plan.

The data (docs/performance.md, section History): ``USERS`` users ``u0``...
send messages; ``PROBES`` heavy users ``h0``... receive ``PROBE_SHARE`` of
them each, so that a 256-message replay exists for them at every size; 1% of
the messages are broadcasts; 1% of the other direct messages are still
pending.  A third of each probe's messages come from its friend ``u<i>``:
the dense conversation whose 50-message pages ``GET /messages`` is timed on
(``PAGE`` pages, each at a random depth with a full page older).  Ids are
consecutive from 1, in the order generated, so a smaller
database is a prefix of a larger one and both sizes are measured on the same
history.  A probe's replay starts from a ``since`` with 256 to 511 of its
messages after it: a client that missed a few hundred messages.
"""

from __future__ import annotations

import random
import sqlite3
import statistics
import time
from typing import Any

from ..auth import new_secret
from ..messages import conversation_of
from ..store import postgres as postgres_store
from ..store import prepare_database
from ..store import sqlite as sqlite_store

USERS = 10_000
PROBES = 5
PROBE_SHARE = 0.06  # of all messages, per probe user
BROADCAST_SHARE = 0.01
PENDING_SHARE = 0.01  # of the direct messages to users other than the probes
REPLAY = 256  # messages of one replay page (wsserver.broker.REPLAY_PAGE)
PAGE = 50  # messages of one GET /messages page
FRIEND_SHARE = 1 / 3  # of a probe's messages, from its friend
CHUNK = 20_000
CONTENT = "history " + "x" * 92  # ~100 bytes, as the other workloads
BROADCAST = "broadcast"


# The server's replay query, with the values a first page passes (after = 0).
def since_query(engine: str, probe: str, since: int) -> tuple[str, tuple]:
    """The server's own first-page replay query (SQL and arguments) for ``engine``."""
    module = sqlite_store if engine == "sqlite" else postgres_store
    return module.since_query(probe, since, 0, REPLAY)


def probe_name(i: int) -> str:
    return f"h{i}"


def friend_name(i: int) -> str:
    return f"u{i}"


class History:
    """The generator of the history, and what a replay needs from it: the ids
    each probe receives (its direct messages and every broadcast)."""

    def __init__(self, seed: int = 1) -> None:
        self.random = random.Random(seed)
        self.next_id = 1
        self.probe_ids: dict[str, list[int]] = {probe_name(i): [] for i in range(PROBES)}
        self.broadcast_ids: list[int] = []
        self.friend_ids: dict[str, list[int]] = {probe_name(i): [] for i in range(PROBES)}
        self.started_ms = int(time.time() * 1000) - 86_400_000

    def rows(self, upto: int) -> Any:
        """Rows (id, sender, recipient, content, status, created_ms, recipients,
        conv) until ``upto`` messages exist."""
        rnd = self.random
        while self.next_id <= upto:
            msg_id = self.next_id
            self.next_id += 1
            sender = f"u{rnd.randrange(USERS)}"
            draw = rnd.random()
            status, recipients = "delivered", None
            if draw < PROBES * PROBE_SHARE:
                probe = int(draw / PROBE_SHARE)
                recipient = probe_name(probe)
                self.probe_ids[recipient].append(msg_id)
                if rnd.random() < FRIEND_SHARE:
                    sender = friend_name(probe)
                    self.friend_ids[recipient].append(msg_id)
            elif draw < PROBES * PROBE_SHARE + BROADCAST_SHARE:
                recipient, recipients = BROADCAST, rnd.randrange(1, 100)
                self.broadcast_ids.append(msg_id)
            else:
                recipient = f"u{rnd.randrange(USERS)}"
                if rnd.random() < PENDING_SHARE:
                    status = "pending"
            created = self.started_ms + msg_id
            conv = None if recipient == BROADCAST else conversation_of(sender, recipient)
            yield (msg_id, sender, recipient, CONTENT, status, created, recipients, conv)

    def received(self, probe: str) -> list[int]:
        """The ids a replay of ``probe`` from 0 would hand out, in order."""
        return sorted(self.probe_ids[probe] + self.broadcast_ids)

    def replays(self, count: int, seed: int = 2) -> list[tuple[str, int, int]]:
        """``count`` (probe, since, messages after since) to replay, each with
        REPLAY to 2 x REPLAY - 1 messages after its since."""
        rnd = random.Random(seed)
        out = []
        for i in range(count):
            probe = probe_name(i % PROBES)
            ids = self.received(probe)
            if len(ids) <= REPLAY:
                raise ValueError(f"history: {probe} has only {len(ids)} messages; too few")
            extra = rnd.randrange(min(REPLAY, len(ids) - REPLAY))
            after = REPLAY + extra
            out.append((probe, ids[-after - 1] if after < len(ids) else 0, after))
        return out

    def pages(self, count: int, seed: int = 3) -> list[tuple[str, str, int | None]]:
        """``count`` (probe, friend, before) of their dense conversation: a
        tenth first pages (before None), the rest at a random depth with a
        full page older."""
        rnd = random.Random(seed)
        out = []
        for i in range(count):
            probe = probe_name(i % PROBES)
            ids = self.friend_ids[probe]
            if len(ids) <= PAGE:
                raise ValueError(f"history: {probe} has only {len(ids)} friend messages")
            before = None if i % 10 == 0 else ids[rnd.randrange(PAGE, len(ids))]
            out.append((probe, friend_name(i % PROBES), before))
        return out

    def far_replays(self, count: int) -> list[tuple[str, int, int]]:
        """``count`` (probe, since, messages after since) from the probe's
        first message: a client back after a long time, its whole history to
        come (only the first page is timed)."""
        out = []
        for i in range(count):
            probe = probe_name(i % PROBES)
            ids = self.received(probe)
            out.append((probe, ids[0], len(ids) - 1))
        return out


def user_rows(created_ms: int) -> list[tuple[str, str, bytes, int]]:
    """The senders as users (a key of 32 random bytes: never used to log in)."""
    rnd = random.Random(3)
    return [(f"u{i}", f"u{i}", rnd.randbytes(32), created_ms) for i in range(USERS)]


# -- loading -----------------------------------------------------------------


def load_sqlite(path: str, history: History, upto: int) -> float:
    """Create the database if needed and append messages until ``upto``;
    return the seconds it took (not part of any figure)."""
    started = time.monotonic()
    prepare_database(path, new_secret)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        if conn.execute("SELECT COUNT(*) FROM users WHERE user_id LIKE 'u%'").fetchone()[0] == 0:
            conn.executemany(
                "INSERT INTO users (user_id, username, public_key, created_ms) VALUES (?, ?, ?, ?)",
                user_rows(history.started_ms),
            )
        rows = history.rows(upto)
        while True:
            chunk = [row for _, row in zip(range(CHUNK), rows, strict=False)]
            if not chunk:
                break
            conn.executemany(
                "INSERT INTO messages (id, sender, recipient, content, verification, status,"
                " created_ms, recipients, conv) VALUES (?, ?, ?, ?, 'unsigned', ?, ?, ?, ?)",
                chunk,
            )
            conn.commit()
        conn.execute("ANALYZE")
        conn.commit()
    finally:
        conn.close()
    return time.monotonic() - started


def load_postgres(url: str, history: History, upto: int) -> float:
    """As ``load_sqlite`` (COPY), and move the stream head past the last id."""
    import psycopg

    started = time.monotonic()
    prepare_database(url, new_secret)
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM users WHERE user_id LIKE 'u%%'")
            if cur.fetchone()[0] == 0:
                with cur.copy(
                    "COPY users (user_id, username, public_key, created_ms) FROM STDIN"
                ) as copy:
                    for row in user_rows(history.started_ms):
                        copy.write_row(row)
            with cur.copy(
                "COPY messages (id, sender, recipient, content, status, created_ms,"
                " recipients, conv, verification) FROM STDIN"
            ) as copy:
                for row in history.rows(upto):
                    copy.write_row((*row, "unsigned"))
            cur.execute(
                "UPDATE stream_head SET last_id = GREATEST(last_id,"
                " (SELECT COALESCE(MAX(id), 0) FROM messages))"
            )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE messages")
    return time.monotonic() - started


# -- the query alone -----------------------------------------------------------


def _explain(prefix: str, engine: str, probe: str, since: int) -> tuple[str, tuple]:
    sql, args = since_query(engine, probe, since)
    return prefix + sql, args


def query_times(engine: str, database: str, replays: list[tuple[str, int, int]]) -> dict:
    """p50/p99 ms of the server's replay query (first page) alone, run here
    on a connection of its own, and its plan."""
    times: list[float] = []
    if engine == "sqlite":
        conn: Any = sqlite3.connect(database)
        execute = conn.execute
        plan_rows = conn.execute(
            *_explain("EXPLAIN QUERY PLAN ", engine, *replays[0][:2])
        ).fetchall()
        plan = [row[-1] for row in plan_rows]
    else:
        import psycopg

        conn = psycopg.connect(database, autocommit=True)
        execute = conn.execute
        plan_rows = conn.execute(*_explain("EXPLAIN ", engine, *replays[0][:2])).fetchall()
        plan = [row[0] for row in plan_rows]
    try:
        for probe, since, _after in replays:
            started = time.perf_counter()
            rows = execute(*since_query(engine, probe, since)).fetchall()
            times.append((time.perf_counter() - started) * 1000)
            if len(rows) != REPLAY:
                raise RuntimeError(f"history: the replay query gave {len(rows)} rows, not {REPLAY}")
    finally:
        conn.close()
    return {"query_p50_ms": percentile(times, 50), "query_p99_ms": percentile(times, 99)}, plan


def page_times(
    connect: Any, tokens: dict[str, str], pages: list[tuple[str, str, int | None]]
) -> dict:
    """p50/p99 ms of ``GET /messages`` pages of 50 (the whole request, on one
    keep-alive connection); fails unless every page is full."""
    import json

    conn = connect()
    times: list[float] = []
    try:
        for probe, friend, before in pages:
            path = f"/messages?with={friend}&limit={PAGE}"
            if before is not None:
                path += f"&before={before}"
            headers = {"Authorization": f"Bearer {tokens[probe]}"}
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            times.append((time.perf_counter() - started) * 1000)
            if resp.status != 200 or len(json.loads(body)["messages"]) != PAGE:
                raise RuntimeError(f"history: a page answered {resp.status}, not {PAGE} messages")
    finally:
        conn.close()
    return {"page_p50_ms": percentile(times, 50), "page_p99_ms": percentile(times, 99)}


class _Recording:
    """A cursor that remembers the last page query (for its plan): the last
    statement reading ``messages`` (after it, the page's receipts are read
    from ``message_reads``)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.last: tuple[str, tuple] = ("", ())

    def execute(self, sql: str, args: tuple = ()) -> Any:
        if " FROM messages " in sql:
            self.last = (sql, tuple(args))
        return self._cursor.execute(sql, args)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> Any:
        return self._cursor.fetchall()


def page_query_times(
    engine: str, database: str, pages: list[tuple[str, str, int | None]]
) -> tuple[dict, list[str]]:
    """p50/p99 ms of the store's own page reads (``History._history``: the
    peer's check, the page query and its receipts) for ``pages``, here on a connection of
    its own, and the page query's plan."""
    if engine == "sqlite":
        conn: Any = sqlite3.connect(database)
        store: Any = sqlite_store.Store.__new__(sqlite_store.Store)
    else:
        import psycopg

        conn = psycopg.connect(database, autocommit=True)
        store = postgres_store.PostgresStore.__new__(postgres_store.PostgresStore)
    times: list[float] = []
    try:
        cursor = _Recording(conn.cursor())
        for probe, friend, before in pages:
            started = time.perf_counter()
            page = store._history(cursor, probe, friend, before or 2**63 - 1, PAGE)
            times.append((time.perf_counter() - started) * 1000)
            if page is None or len(page[0]) != PAGE:
                raise RuntimeError("history: the page query did not give a full page")
        sql, args = cursor.last
        if engine == "sqlite":
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        else:
            plan = [row[0] for row in conn.execute(b"EXPLAIN " + sql.encode(), args)]
    finally:
        conn.close()
    p50, p99 = percentile(times, 50), percentile(times, 99)
    return {"page_query_p50_ms": p50, "page_query_p99_ms": p99}, plan


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def plan_uses_indexes(engine: str, plan: list[str]) -> bool:
    """True when no branch of the replay query scans the whole table or its
    primary key by id instead of a recipient index."""
    text = "\n".join(plan)
    if engine == "sqlite":
        return "SCAN messages" not in text and "USING INTEGER PRIMARY KEY" not in text
    return "Seq Scan" not in text and "messages_pkey" not in text


def plan_stops_early(engine: str, plan: list[str]) -> bool:
    """True when the plan merges the branches in id order and stops after
    the page (SQLite's MERGE of a compound query; PostgreSQL's Merge Append),
    instead of reading every row after ``since`` and sorting them: only then
    is a page's cost independent of how much there is to replay."""
    text = "\n".join(plan)
    if engine == "sqlite":
        return "MERGE (UNION ALL)" in text and "TEMP B-TREE" not in text
    return "Merge Append" in text and "Sort Key" not in text.split("Merge Append")[0]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
