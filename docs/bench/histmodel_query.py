# ruff: noqa: S608 (SQL built from this file's own constants and placeholders)
"""Issue 13 groundwork: a history page's cost under each data model, at a
given number of stored messages, on SQLite or PostgreSQL.

    python docs/bench/histmodel_query.py sqlite 1000000 > out.json

The messages are bulk-loaded (not timed) into the real schema
(prepare_database) plus a column conv and a table conversations; then for
each model its index is built, ANALYZEd, the page queries are timed on a
connection of their own (warm cache, 400 pages per kind, 10% first pages,
the rest at a random depth with a full page older), the plan kept, and the
index dropped again.  Models (docs/architecture.md, "History and groups"):
  A  no new index: both directions as two branches on messages_recipient,
     filtered on sender
  B  WHERE conv = ? on an index (conv, id)
  C  the two branches of A on an index (recipient, sender, id)
  C2 C's index, each branch with its own ORDER BY id DESC LIMIT
  D  GET /conversations from a table conversations (user_id, peer, last_id),
     with its primary key only (D) or also an index (user_id, last_id) (D2);
     and, for comparison, computed from messages (grouped, with C's index
     and an index (sender, recipient, id)).
The data: 10,000 users; 5 heavy users h0..h4, each with 4 friends (f0..f3)
(15% of all messages are between a heavy user and a friend, either way:
the dense conversations), 15% from random users to a heavy user (their
inbox noise), a sparse conversation h_i <-> s_i (0.05%), notes to self of
the heavy users (0.5%), broadcasts (1%), the rest between random users.
"""

import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid

from wsserver.store import prepare_database

ENGINE, SIZE = sys.argv[1], int(sys.argv[2])
PG_BASE = "postgresql://postgres@127.0.0.1:5432/postgres"
PAGE, RUNS = 50, 400
COLS = "id, sender, recipient, content, signature, nonce, verification, status, created_ms, key_id"
CONTENT = "history " + "x" * 92
P = "?" if ENGINE == "sqlite" else "%s"


def conv_of(s, r):
    if r == "broadcast" or r.startswith("#"):
        return r
    return f"{s} {r}" if s < r else f"{r} {s}"


def generate(size):
    rnd = random.Random(1)
    pairs = {}
    for i in range(1, size + 1):
        d = rnd.random()
        if d < 0.15:
            h, f = f"h{rnd.randrange(5)}", f"f{rnd.randrange(4)}"
            s, r = (h, f) if rnd.random() < 0.5 else (f, h)
        elif d < 0.30:
            s, r = f"u{rnd.randrange(10_000)}", f"h{rnd.randrange(5)}"
        elif d < 0.31:
            s, r = f"u{rnd.randrange(10_000)}", "broadcast"
        elif d < 0.315:
            s = r = f"h{rnd.randrange(5)}"
        elif d < 0.3155:
            k = rnd.randrange(5)
            s, r = (f"h{k}", f"s{k}") if rnd.random() < 0.5 else (f"s{k}", f"h{k}")
        else:
            s, r = f"u{rnd.randrange(10_000)}", f"u{rnd.randrange(10_000)}"
        c = conv_of(s, r)
        if s[0] in "hfs" or r[0] in "hb":
            pairs.setdefault(c, []).append(i)
        yield (i, s, r, CONTENT, "unsigned", "delivered", 1_700_000_000_000 + i, c), pairs


CONV_LOAD = (
    "INSERT INTO conversations (user_id, peer, last_id) SELECT u, p, MAX(id) FROM"
    " (SELECT sender u, recipient p, id FROM messages UNION ALL SELECT recipient, sender, id"
    " FROM messages WHERE recipient <> 'broadcast' AND recipient <> sender) x GROUP BY u, p"
)
CONV_TABLE = (
    "CREATE TABLE conversations (user_id TEXT NOT NULL, peer TEXT NOT NULL,"
    " last_id BIGINT NOT NULL, PRIMARY KEY (user_id, peer))"
)


def load():
    pairs = {}
    rows = []
    for row, seen in generate(SIZE):
        rows.append(row)
        pairs = seen
    if ENGINE == "sqlite":
        path = os.path.join(tempfile.gettempdir(), f"histq_{uuid.uuid4().hex}.db")
        prepare_database(path, lambda: b"k" * 32)
        c = sqlite3.connect(path)
        c.execute("PRAGMA synchronous = OFF")
        c.execute("ALTER TABLE messages ADD COLUMN conv TEXT")
        c.execute(CONV_TABLE)
        c.executemany(
            "INSERT INTO messages (id, sender, recipient, content, verification, status,"
            " created_ms, conv) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
        c.execute(CONV_LOAD)
        c.commit()
        c.execute("ANALYZE")
        c.commit()
        c.close()
        return path, pairs, lambda: os.remove(path)
    import psycopg

    name = "hq_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_BASE, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = PG_BASE.rsplit("/", 1)[0] + "/" + name
    prepare_database(url, lambda: b"k" * 32)
    with psycopg.connect(url) as c:
        c.execute("ALTER TABLE messages ADD COLUMN conv TEXT")
        c.execute(CONV_TABLE)
        with c.cursor().copy(
            "COPY messages (id, sender, recipient, content, verification, status,"
            " created_ms, conv) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        c.execute(CONV_LOAD)
        c.commit()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")

    def drop():
        with psycopg.connect(PG_BASE, autocommit=True) as c:
            c.execute(f"DROP DATABASE {name}")

    return url, pairs, drop


def q_pair():
    return (
        f"SELECT * FROM (SELECT {COLS} FROM messages WHERE recipient = {P} AND sender = {P}"
        f" AND id < {P} UNION ALL SELECT {COLS} FROM messages WHERE recipient = {P}"
        f" AND sender = {P} AND id < {P}) x ORDER BY id DESC LIMIT {P}"
    )


def q_pair_limited():
    """A's query with each branch limited on its own (model C2)."""
    one = f"SELECT {COLS} FROM messages WHERE recipient = {P} AND sender = {P} AND id < {P}"
    return (
        f"SELECT * FROM (SELECT * FROM ({one} ORDER BY id DESC LIMIT {P}) a"
        f" UNION ALL SELECT * FROM ({one} ORDER BY id DESC LIMIT {P}) b) x"
        f" ORDER BY id DESC LIMIT {P}"
    )


def q_self():
    return (
        f"SELECT {COLS} FROM messages WHERE recipient = {P} AND sender = {P} AND id < {P}"
        f" ORDER BY id DESC LIMIT {P}"
    )


def q_recipient():
    return (
        f"SELECT {COLS} FROM messages WHERE recipient = {P} AND id < {P} ORDER BY id DESC LIMIT {P}"
    )


def q_conv():
    return f"SELECT {COLS} FROM messages WHERE conv = {P} AND id < {P} ORDER BY id DESC LIMIT {P}"


Q_CONV_LIST = (
    f"SELECT peer, last_id FROM conversations WHERE user_id = {P} ORDER BY last_id DESC LIMIT {P}"
)
Q_CONV_FROM_MESSAGES = (
    "SELECT peer, MAX(id) AS last FROM (SELECT sender AS peer, id FROM messages"
    f" WHERE recipient = {P}"
    f" UNION ALL SELECT recipient, id FROM messages WHERE sender = {P}) x"
    f" GROUP BY peer ORDER BY last DESC LIMIT {P}"
)

INDEXES = {
    "A": [],
    "B": ["CREATE INDEX messages_conv ON messages (conv, id)"],
    "C": ["CREATE INDEX messages_pair ON messages (recipient, sender, id)"],
    "C2": ["CREATE INDEX messages_pair ON messages (recipient, sender, id)"],
    "D2": ["CREATE INDEX conversations_latest ON conversations (user_id, last_id)"],
    "Cs": [
        "CREATE INDEX messages_pair ON messages (recipient, sender, id)",
        "CREATE INDEX messages_from ON messages (sender, recipient, id)",
    ],
}


def pages(pairs, kind):
    """(conversation, user, peer, before) for RUNS pages of ``kind``."""
    rnd = random.Random(7)
    out = []
    for n in range(RUNS):
        k = n % 5
        if kind == "dense":
            h, p = f"h{k}", f"f{(n // 5) % 4}"
        elif kind == "sparse":
            h, p = f"h{k}", f"s{k}"
        elif kind == "self":
            h = p = f"h{k}"
        else:
            h, p = "broadcast", "broadcast"
        c = conv_of(h, p) if kind != "broadcast" else "broadcast"
        ids = pairs.get(c, [])
        first = n % 10 == 0 or len(ids) <= PAGE
        before = 2**62 if first else ids[rnd.randrange(PAGE, len(ids))]
        out.append((c, h, p, before))
    return out


def args_for(model, kind, c, h, p, before):
    if model == "B":
        return q_conv(), (c, before, PAGE)
    if kind == "broadcast":
        return q_recipient(), ("broadcast", before, PAGE)
    if kind == "self":
        return q_self(), (h, h, before, PAGE)
    if model == "C2":
        return q_pair_limited(), (h, p, before, PAGE, p, h, before, PAGE, PAGE)
    return q_pair(), (h, p, before, p, h, before, PAGE)


def pct(v, p):
    o = sorted(v)
    return o[min(len(o) - 1, max(0, round(p / 100 * (len(o) - 1))))]


class Conn:
    def __init__(self, db):
        if ENGINE == "sqlite":
            self.c = sqlite3.connect(db, isolation_level=None)
        else:
            import psycopg

            self.c = psycopg.connect(db, autocommit=True)

    def rows(self, sql, args=()):
        return self.c.execute(sql, args).fetchall()

    def run(self, sql):
        self.c.execute(sql)

    def plan(self, sql, args):
        if ENGINE == "sqlite":
            return [r[-1] for r in self.rows("EXPLAIN QUERY PLAN " + sql, args)]
        return [r[0] for r in self.rows("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + sql, args)]

    def analyze(self):
        self.run("ANALYZE")

    def index_bytes(self, name):
        if ENGINE == "sqlite":
            return self.rows("SELECT SUM(pgsize) FROM dbstat WHERE name = ?", (name,))[0][0]
        return self.rows("SELECT pg_relation_size(%s)", (name,))[0][0]


def timed(conn, items):
    times, counts = [], []
    for sql, args in items[:20]:
        conn.rows(sql, args)  # warm up
    for sql, args in items:
        t = time.perf_counter()
        counts.append(len(conn.rows(sql, args)))
        times.append((time.perf_counter() - t) * 1000)
    return {
        "p50_ms": round(pct(times, 50), 3),
        "p99_ms": round(pct(times, 99), 3),
        "rows_median": statistics.median(counts),
    }


def main():
    t = time.monotonic()
    db, pairs, cleanup = load()
    out = {
        "engine": ENGINE,
        "stored": SIZE,
        "load_s": round(time.monotonic() - t, 1),
        "conversation_sizes": {
            k: len(pairs.get(conv_of(*k.split("-")), [])) for k in ("h0-f0", "h0-s0", "h0-h0")
        },
        "models": {},
    }
    out["conversation_sizes"]["broadcast"] = len(pairs.get("broadcast", []))
    conn = Conn(db)
    try:
        for model in ("A", "B", "C", "C2"):
            for sql in INDEXES[model]:
                conn.run(sql)
            conn.analyze()
            res = {
                "index_bytes": {
                    s.split()[2]: conn.index_bytes(s.split()[2]) for s in INDEXES[model]
                }
            }
            for kind in ("dense", "sparse", "self", "broadcast"):
                items = [args_for(model, kind, *pg) for pg in pages(pairs, kind)]
                res[kind] = timed(conn, items)
                res[kind]["plan"] = conn.plan(*items[1])
            out["models"][model] = res
            for sql in INDEXES[model]:
                conn.run("DROP INDEX " + sql.split()[2])
        users = [f"h{n % 5}" for n in range(RUNS)]
        for model in ("D", "D2", "Cs"):
            for sql in INDEXES.get(model, []):
                conn.run(sql)
            conn.analyze()
            if model == "Cs":
                items = [(Q_CONV_FROM_MESSAGES, (u, u, PAGE)) for u in users[:100]]
            else:
                items = [(Q_CONV_LIST, (u, PAGE)) for u in users]
            res = timed(conn, items)
            res["plan"] = conn.plan(*items[0])
            res["index_bytes"] = {
                s.split()[2]: conn.index_bytes(s.split()[2]) for s in INDEXES.get(model, [])
            }
            out["models"]["list_" + model] = res
            for sql in INDEXES.get(model, []):
                conn.run("DROP INDEX " + sql.split()[2])
        if ENGINE == "sqlite":
            out["table_bytes"] = {
                n: conn.index_bytes(n) for n in ("messages", "messages_recipient", "conversations")
            }
        else:
            out["table_bytes"] = {
                n: conn.index_bytes(n) for n in ("messages", "messages_recipient", "conversations")
            }
        out["conv_column_bytes"] = conn.rows("SELECT SUM(LENGTH(conv)) FROM messages")[0][0]
        out["conversations_rows"] = conn.rows("SELECT COUNT(*) FROM conversations")[0][0]
        out["heavy_user_conversations"] = conn.rows(
            "SELECT COUNT(*) FROM conversations WHERE user_id = 'h0'"
        )[0][0]
    finally:
        conn.c.close()
        cleanup()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
