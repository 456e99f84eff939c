"""Time the store's conversation list (``History._conversations``, limit 200)
for a heavy user (h0 of the history workload: ~9,800 peers) and an ordinary
one (u5), at SIZE stored messages (the history workload's data), on SQLite
and PostgreSQL; print JSON.  Run from the checkout: ``python
docs/bench/history_conversations_list.py 1000000 SCRATCH_DIR``."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from wsserver.bench import history, services
from wsserver.store import postgres as pg
from wsserver.store import sqlite as sq

ROWS = (
    "SELECT DISTINCT sender, recipient FROM messages WHERE conv IS NOT NULL",
    "SELECT DISTINCT recipient, sender FROM messages WHERE conv IS NOT NULL",
)


def timed(cursor: Any, store_class: Any, user: str, count: int = 50) -> dict:
    store = store_class.__new__(store_class)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        rows = store._conversations(cursor(), user, 200)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50": times[count // 2], "p99": times[int(0.99 * (count - 1))], "rows": len(rows)}


def main(size: int, scratch: Path) -> dict:
    out: dict[str, Any] = {}
    path = scratch / "conversations.sqlite"
    path.unlink(missing_ok=True)
    history.load_sqlite(str(path), history.History(), size)
    conn = sqlite3.connect(path)
    for rows in ROWS:
        conn.execute(f"INSERT OR IGNORE INTO conversations (user_id, peer) {rows}")
    conn.commit()
    conn.execute("ANALYZE")
    conn.commit()
    for user in ("h0", "u5"):
        count = conn.execute("SELECT COUNT(*) FROM conversations WHERE user_id = ?", (user,))
        out[f"sqlite_{user}"] = {
            **timed(conn.cursor, sq.Store, user),
            "conversations": count.fetchone()[0],
        }
    conn.close()
    db = services.Postgres(services.DEFAULT_DATABASE)
    db.create()
    try:
        history.load_postgres(db.url, history.History(), size)
        with psycopg.connect(db.url, autocommit=True) as conn:
            for rows in ROWS:
                conn.execute(
                    f"INSERT INTO conversations (user_id, peer) {rows} ON CONFLICT DO NOTHING"
                )
            conn.execute("VACUUM ANALYZE")
            for user in ("h0", "u5"):
                count = conn.execute(
                    "SELECT COUNT(*) FROM conversations WHERE user_id = %s", (user,)
                )
                out[f"postgres_{user}"] = {
                    **timed(conn.cursor, pg.PostgresStore, user),
                    "conversations": count.fetchone()[0],
                }
    finally:
        db.drop()
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), Path(sys.argv[2])), indent=1))
