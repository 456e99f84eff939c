"""Issue 13 groundwork: what each history data model costs on the store's
real insert path (add_message, group commit), SQLite and PostgreSQL.

Run from a checkout (its wsserver), e.g.
    python docs/bench/histmodel_insert.py sqlite B
The variant's schema is added after prepare_database and its insert is the
store's own, patched at run time (nothing in wsserver/ is changed):
  A   as main: no new index (history from messages_recipient + a filter)
  B   column conv (canonical pair / 'broadcast' / group id), index (conv, id)
  C   index (recipient, sender, id)
  D   table conversations (user_id, peer, last_id) upserted per message
  BD  B and D together;  CD  C and D together
  2   (with D: BD2) also an index conversations (user_id, last_id), so that
      the list is read in order instead of sorted
  i   (with B: Bi) conv as a 64-bit hash of the canonical text instead of
      the text (a smaller index key; the page query then also checks the
      pair, for collisions)
  x   (with any of the above: Ax, Bx) index messages_created dropped, as if
      retention found its range by id instead of by created_ms
  G10, G100  every message to a group of 10 / 100 members: stored once,
      plus one row (message_id, user_id) in group_pending per member but
      the sender (the members read from group_members in the same statement)
  K10, K100  the same groups without per-member rows: the message stored
      once and the group's head (groups.last_id) moved; a member's pending
      messages are the group's ids above that member's cursor
Prints one JSON line: variant, engine, us per message.
"""

import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid

from twisted.internet import defer, reactor

import wsserver.store as st
from wsserver.store import NewMessage, User
from wsserver.store import postgres as pg_store
from wsserver.store import sqlite as sq_store

ENGINE, VARIANT = sys.argv[1], sys.argv[2]
N, PREFILL, USERS = 30_000, 100_000, 1000
PG_BASE = os.environ.get("PG_BASE", "postgresql://postgres@127.0.0.1:5432/postgres")
GROUP_SIZE = int(VARIANT[1:]) if VARIANT[0] in "GK" else 0
GROUPS = 50
CONV_SQL = (
    "CASE WHEN {r} = 'broadcast' OR substr({r}, 1, 1) = '#' THEN {r}"
    " WHEN {s} < {r} THEN {s} || ' ' || {r} ELSE {r} || ' ' || {s} END"
)

HASHED = "i" in VARIANT


def conv_hash(text):
    """The 64-bit signed integer of a conversation's canonical text."""
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True
    )


SCHEMA = {
    "B": [
        f"ALTER TABLE messages ADD COLUMN conv {'BIGINT' if HASHED else 'TEXT'}",
        "CREATE INDEX messages_conv ON messages (conv, id)",
    ],
    "x": ["DROP INDEX messages_created"],
    "i": [],
    "2": ["CREATE INDEX conversations_latest ON conversations (user_id, last_id)"],
    "C": ["CREATE INDEX messages_pair ON messages (recipient, sender, id)"],
    "D": [
        "CREATE TABLE conversations (user_id TEXT NOT NULL, peer TEXT NOT NULL,"
        " last_id BIGINT NOT NULL, PRIMARY KEY (user_id, peer))"
    ],
    "K": [
        "CREATE TABLE group_members (group_id TEXT NOT NULL, user_id TEXT NOT NULL,"
        " delivered_id BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (group_id, user_id))",
        "CREATE TABLE groups (group_id TEXT PRIMARY KEY, last_id BIGINT NOT NULL)",
    ],
    "G": [
        "CREATE TABLE group_members (group_id TEXT NOT NULL, user_id TEXT NOT NULL,"
        " PRIMARY KEY (group_id, user_id))",
        "CREATE TABLE group_pending (message_id BIGINT NOT NULL, user_id TEXT NOT NULL,"
        " PRIMARY KEY (user_id, message_id))",
    ],
}


def parts():
    return [VARIANT[0]] if GROUP_SIZE else [p for p in VARIANT if p in "BCDx2i"]


def schema_sql():
    return [sql for p in parts() for sql in SCHEMA[p]]


def group_rows():
    for g in range(GROUPS):
        for k in range(GROUP_SIZE):
            yield (f"#g{g}", f"u{(g * 37 + k * 11) % USERS}")


# -- SQLite: the store's _insert_message with the variant's extra writes -------

_orig_sqlite_insert = sq_store._insert_message


class _Txn:
    """The store's cursor, passed through; with B the message INSERT also
    writes conv.  Every variant (A too) goes through it, so its own cost is
    the same in all of them."""

    def __init__(self, txn, new, with_conv):
        self._txn, self._new, self._with_conv = txn, new, with_conv

    def execute(self, sql, args=()):
        if self._with_conv and sql.startswith("INSERT INTO messages"):
            s, r = self._new.sender, self._new.recipient
            conv = (
                r
                if r == "broadcast" or r.startswith("#")
                else (f"{s} {r}" if s < r else f"{r} {s}")
            )
            sql = sql.replace("key_id) VALUES (", "key_id, conv) VALUES (").replace("?)", "?, ?)")
            args = (*args, conv_hash(conv) if HASHED else conv)
        return self._txn.execute(sql, args)

    def __getattr__(self, name):
        return getattr(self._txn, name)


def _sqlite_insert(txn, new, known_users):
    has = parts()
    result = _orig_sqlite_insert(_Txn(txn, new, "B" in has), new, known_users)
    msg_id = txn.lastrowid
    if "D" in has:
        up = (
            "INSERT INTO conversations (user_id, peer, last_id) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, peer) DO UPDATE SET last_id = excluded.last_id"
        )
        txn.execute(up, (new.sender, new.recipient, msg_id))
        if new.recipient != "broadcast" and new.recipient != new.sender:
            txn.execute(up, (new.recipient, new.sender, msg_id))
    if "G" in has:
        txn.execute(
            "INSERT INTO group_pending (message_id, user_id) SELECT ?, user_id"
            " FROM group_members WHERE group_id = ? AND user_id <> ?",
            (msg_id, new.recipient, new.sender),
        )
    if "K" in has:
        txn.execute("UPDATE groups SET last_id = ? WHERE group_id = ?", (msg_id, new.recipient))
    return result


# -- PostgreSQL: the store's one-statement batch insert, extended --------------


def _pg_insert_sql():
    has = parts()
    base = pg_store._SQL_INSERT
    if "B" in has:
        base = base.replace("created_ms, key_id)", "created_ms, key_id, conv)").replace(
            "'pending', t, k",
            "'pending', t, k, "
            + (
                f"hashtextextended({CONV_SQL.format(r='r', s='s')}, 0)"
                if HASHED
                else CONV_SQL.format(r="r", s="s")
            ),
        )
    if not ({"D", "G", "K"} & set(has)):
        return base
    base = base.replace("RETURNING id", "RETURNING id, sender, recipient")
    sql = f"WITH ins AS ({base})"
    if "D" in has:
        sql += (
            ", conv AS (INSERT INTO conversations (user_id, peer, last_id)"
            " SELECT u, p, MAX(id) FROM (SELECT sender u, recipient p, id FROM ins UNION ALL"
            " SELECT recipient, sender, id FROM ins WHERE recipient <> 'broadcast'"
            " AND recipient <> sender) x GROUP BY u, p"
            " ON CONFLICT (user_id, peer) DO UPDATE SET last_id ="
            " GREATEST(conversations.last_id, excluded.last_id))"
        )
    if "G" in has:
        sql += (
            ", pend AS (INSERT INTO group_pending (message_id, user_id)"
            " SELECT ins.id, m.user_id FROM ins JOIN group_members m"
            " ON m.group_id = ins.recipient AND m.user_id <> ins.sender)"
        )
    if "K" in has:
        sql += (
            ", head AS (UPDATE groups g SET last_id = h.last FROM (SELECT recipient, MAX(id) last"
            " FROM ins GROUP BY recipient) h WHERE g.group_id = h.recipient)"
        )
    return sql + " SELECT id FROM ins"  # noqa: S608 (our own constants)


def prepare():
    rows = (
        (f"u{i % USERS}", f"u{(i * 7) % USERS}", "x" * 100, "unsigned", "delivered", i)
        for i in range(PREFILL)
    )
    if ENGINE == "sqlite":
        p = os.path.join(tempfile.gettempdir(), f"histmodel_{uuid.uuid4().hex}.db")
        st.prepare_database(p, lambda: b"k" * 32)
        c = sqlite3.connect(p)
        for sql in schema_sql():
            c.execute(sql)
        c.executemany(
            "INSERT INTO messages (sender,recipient,content,verification,status,"
            "created_ms) VALUES (?,?,?,?,?,?)",
            rows,
        )
        if GROUP_SIZE:
            c.executemany(
                "INSERT INTO group_members (group_id, user_id) VALUES (?, ?)", group_rows()
            )
            if VARIANT[0] == "K":
                c.executemany(
                    "INSERT INTO groups VALUES (?, 0)", [(f"#g{g}",) for g in range(GROUPS)]
                )
            c.executemany(
                "INSERT INTO users (user_id, username, public_key, created_ms) VALUES (?, ?, ?, 0)",
                [(f"#g{g}", f"#g{g}", b"k") for g in range(GROUPS)],
            )
        c.commit()
        c.close()
        return p, lambda: [os.remove(p + s) for s in ("", "-wal", "-shm") if os.path.exists(p + s)]
    import psycopg

    name = "hm_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_BASE, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = PG_BASE.rsplit("/", 1)[0] + "/" + name
    st.prepare_database(url, lambda: b"k" * 32)
    with psycopg.connect(url) as c:
        for sql in schema_sql():
            c.execute(sql)
        with c.cursor().copy(
            "COPY messages (sender,recipient,content,verification,status,created_ms,id) FROM STDIN"
        ) as copy:
            for i, row in enumerate(rows, 1):
                copy.write_row((*row, i))
        c.execute("UPDATE stream_head SET last_id = %s", (PREFILL,))
        if GROUP_SIZE:
            c.cursor().executemany(
                "INSERT INTO group_members (group_id, user_id) VALUES (%s, %s)", list(group_rows())
            )
            if VARIANT[0] == "K":
                c.cursor().executemany(
                    "INSERT INTO groups VALUES (%s, 0)", [(f"#g{g}",) for g in range(GROUPS)]
                )
            c.cursor().executemany(
                "INSERT INTO users (user_id, username, public_key, created_ms)"
                " VALUES (%s, %s, %s, 0)",
                [(f"#g{g}", f"#g{g}", b"k") for g in range(GROUPS)],
            )
        c.commit()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")

    def drop():
        with psycopg.connect(PG_BASE, autocommit=True) as c:
            c.execute(f"DROP DATABASE {name}")

    return url, drop


def counts(db):
    """Rows written, to check the variant did what it says."""
    tables = ["messages"] + (["conversations"] if "D" in parts() else [])
    tables += ["group_pending"] if VARIANT[0] == "G" else ["groups"] if VARIANT[0] == "K" else []
    if ENGINE == "sqlite":
        c = sqlite3.connect(db)
    else:
        import psycopg

        c = psycopg.connect(db)
    try:
        out = {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}  # noqa: S608
        if VARIANT[0] == "K":
            out["groups_head_max"] = c.execute("SELECT MAX(last_id) FROM groups").fetchone()[0]
        if "B" in parts():
            out["conv_set"] = c.execute(
                "SELECT COUNT(*) FROM messages WHERE conv IS NOT NULL"
            ).fetchone()[0]
        return out
    finally:
        c.close()


def recipient(i):
    if GROUP_SIZE:
        return f"#g{i % GROUPS}"
    return "broadcast" if i % 100 == 0 else f"u{(i * 13) % USERS}"


def sender(i):
    if GROUP_SIZE:  # a member of the group
        g = i % GROUPS
        return f"u{(g * 37 + ((i // GROUPS) % GROUP_SIZE) * 11) % USERS}"
    return f"u{i % USERS}"


@defer.inlineCallbacks
def main():
    sq_store._insert_message = _sqlite_insert
    pg_store._SQL_INSERT = _pg_insert_sql()
    db, cleanup = prepare()
    s = st.open_store(db, reactor)
    if ENGINE == "sqlite":
        yield s._pool.runOperation("PRAGMA wal_autocheckpoint = 0")
    for i in range(USERS):
        yield s.add_user(User(f"u{i}", f"u{i}", os.urandom(32), 1))
    t = time.perf_counter()
    ds = []
    for i in range(N):
        ds.append(
            s.add_message(NewMessage(sender(i), recipient(i), "y" * 100, None, None, "unsigned", i))
        )
        if len(ds) >= 512:
            yield defer.gatherResults(ds)
            ds = []
    yield defer.gatherResults(ds)
    el = time.perf_counter() - t
    yield s.close()
    print(
        json.dumps(
            {
                "engine": ENGINE,
                "variant": VARIANT,
                "messages": N,
                "prefill": PREFILL,
                "group_size": GROUP_SIZE,
                "us_per_message": round(el * 1e6 / N, 2),
                "rows": counts(db),
            }
        )
    )
    cleanup()
    reactor.stop()


reactor.callWhenRunning(lambda: main().addErrback(lambda f: (f.printTraceback(), reactor.stop())))
reactor.run()
