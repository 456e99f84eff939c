# ruff: noqa: S608 (SQL built from this file's own constants and placeholders)
"""Issue 13 groundwork: GET /conversations without a per-message upsert.

    python docs/bench/histmodel_list.py sqlite 1000000 > out.json

Model E: B's index (conv, id) plus a table conversation_members (user_id,
conv) written only when a conversation is new (a store-side cache of known
conversations, as the store's cache of known users, skips the write for the
others); the list reads the user's conversations and each one's newest id
from the index.  Compared with D (the upserted table, primary key only) and
D2 (with an index (user_id, last_id)), for a heavy user (h0, about 9,500
conversations at 1,000,000 messages) and ordinary users (u0..u399).
Same data and loader as histmodel_query.py.
"""

import json
import time

from histmodel_query import ENGINE, RUNS, SIZE, Conn, P, load, timed

MEMBERS = (
    "CREATE TABLE conversation_members (user_id TEXT NOT NULL, conv TEXT NOT NULL,"
    " PRIMARY KEY (user_id, conv))"
)
MEMBERS_LOAD = (
    "INSERT INTO conversation_members SELECT DISTINCT u, conv FROM"
    " (SELECT sender u, conv FROM messages WHERE recipient <> 'broadcast' UNION ALL"
    " SELECT recipient, conv FROM messages WHERE recipient <> 'broadcast') x"
)
Q_E = (
    "SELECT m.conv, (SELECT MAX(id) FROM messages WHERE conv = m.conv) AS last"
    f" FROM conversation_members m WHERE m.user_id = {P} ORDER BY last DESC LIMIT {P}"
)
Q_D = f"SELECT peer, last_id FROM conversations WHERE user_id = {P} ORDER BY last_id DESC LIMIT {P}"


def main():
    t = time.monotonic()
    db, _pairs, cleanup = load()
    out = {"engine": ENGINE, "stored": SIZE, "load_s": round(time.monotonic() - t, 1)}
    conn = Conn(db)
    try:
        conn.run(MEMBERS)
        conn.run(MEMBERS_LOAD)
        conn.run("CREATE INDEX messages_conv ON messages (conv, id)")
        conn.analyze()
        heavy = [(f"h{n % 5}", 50) for n in range(RUNS)]
        ordinary = [(f"u{n}", 50) for n in range(RUNS)]
        out["members_rows"] = conn.rows("SELECT COUNT(*) FROM conversation_members")[0][0]
        out["members_bytes"] = conn.index_bytes("conversation_members")
        out["ordinary_conversations_median"] = sorted(
            conn.rows("SELECT COUNT(*) FROM conversation_members WHERE user_id = " + P, (u,))[0][0]
            for u, _ in ordinary
        )[RUNS // 2]
        out["E_heavy"] = timed(conn, [(Q_E, a) for a in heavy[:100]])
        out["E_heavy"]["plan"] = conn.plan(Q_E, heavy[0])
        out["E_ordinary"] = timed(conn, [(Q_E, a) for a in ordinary])
        out["D_ordinary"] = timed(conn, [(Q_D, a) for a in ordinary])
        conn.run("CREATE INDEX conversations_latest ON conversations (user_id, last_id)")
        conn.analyze()
        out["D2_ordinary"] = timed(conn, [(Q_D, a) for a in ordinary])
    finally:
        conn.c.close()
        cleanup()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
