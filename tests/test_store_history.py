"""The store's side of history (protocol section 13) on SQLite and on
PostgreSQL: the insert's ``conv`` and ``conversations`` rows, pages of a
conversation (``before``, ``limit``, ``more``), groups' windows (rows put in
``chat_groups`` / ``group_members`` directly: the groups part writes them),
the conversation list, deletion's cleanup, and the plans of the page
queries (an index range, never a scan of ``messages``).  One suite
(``HistoryContract``) runs on both engines."""

from __future__ import annotations

import sqlite3
from typing import Any

import psycopg
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from wsserver import store as st
from wsserver.messages import UNSIGNED
from wsserver.store.history import KnownConversations

SECRET = b"k" * 32
USERS = ("alice", "bob", "carol", "dave")


class Recording:
    """A cursor that remembers every statement and its arguments."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.statements: list[tuple[str, tuple]] = []

    def execute(self, sql: str, args: tuple = ()) -> Any:
        self.statements.append((sql, args))
        return self._cursor.execute(sql, args)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> Any:
        return self._cursor.fetchall()


class HistoryContract:
    """What both engines must do.  Subclasses define ``make_store()``,
    ``query(sql, args)`` (rows, on a connection of the test's own, committed)
    and ``explain(sql, args)`` (the plan's lines)."""

    scan_pattern = ""

    def make_store(self) -> Any:
        raise NotImplementedError

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def explain(self, sql: str, args: tuple) -> str:
        raise NotImplementedError

    def cursor(self) -> Any:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        for user_id in USERS:
            added = yield self.store.add_user(st.User(user_id, user_id, b"k" * 32, 1))
            self.assertTrue(added)

    @defer.inlineCallbacks
    def send(self, sender: str, recipient: str, content: str = "x") -> Any:
        """Store a message; fire with its id."""
        outcome, msg = yield self.store.add_message(
            st.NewMessage(sender, recipient, content, None, None, UNSIGNED, 1000)
        )
        self.assertEqual(outcome, st.STORED)
        return msg.id

    def sql(self, text: str) -> str:
        return self.store._sql(text)

    # -- the insert -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_insert_writes_conv_and_a_row_per_direction_once(self):
        """A direct message stores conv (the two ids sorted, space-joined, the
        same either way), a note to self "u u", a broadcast NULL; the pair
        gets one conversations row per direction (one for notes to self)
        and a second message of the pair writes none (the store knows it)."""
        a = yield self.send("bob", "alice")
        b = yield self.send("alice", "bob")
        c = yield self.send("carol", "carol")
        d = yield self.send("alice", "broadcast")
        rows = self.query(self.sql("SELECT id, conv FROM messages ORDER BY id"))
        self.assertEqual(rows, [(a, "alice bob"), (b, "alice bob"), (c, "carol carol"), (d, None)])
        rows = self.query("SELECT user_id, peer, wrote FROM conversations ORDER BY user_id, peer")
        self.assertEqual(
            [(u, p, bool(w)) for u, p, w in rows],
            [("alice", "bob", True), ("bob", "alice", True), ("carol", "carol", True)],
        )
        self.assertIn("alice bob", self.store._known_convs)
        self.assertIn("bob alice", self.store._known_convs)

    @defer.inlineCallbacks
    def test_a_forgotten_pair_is_written_again_harmlessly(self):
        """A store that lost its cache (another node, a restart) writes the
        rows again, which changes nothing."""
        yield self.send("alice", "bob")
        self.store._known_convs = KnownConversations()
        yield self.send("bob", "alice")
        rows = self.query("SELECT user_id, peer FROM conversations ORDER BY user_id, peer")
        self.assertEqual(rows, [("alice", "bob"), ("bob", "alice")])

    # -- pages ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_pages_of_a_direct_conversation(self):
        """Both directions, newest first, nothing of other pairs; ``before``
        excludes its own id; ``more`` says whether an older message exists
        (False on a page that ends exactly at the oldest)."""
        ids = []
        for i in range(5):
            ids.append((yield self.send(*(("alice", "bob") if i % 2 else ("bob", "alice")))))
            yield self.send("alice", "carol")
        page, more, _ = yield self.store.history("alice", "bob", None, 2)
        self.assertEqual(([m.id for m in page], more), (ids[:2:-1], True))
        page, more, _ = yield self.store.history("bob", "alice", ids[3], 3)
        self.assertEqual(([m.id for m in page], more), (ids[2::-1], False))
        page, more, _ = yield self.store.history("alice", "bob", ids[2], 2)
        self.assertEqual(([m.id for m in page], more), (ids[1::-1], False))
        page, more, _ = yield self.store.history("alice", "bob", ids[0], 50)
        self.assertEqual((page, more), ([], False))
        self.assertEqual(page, [])
        full, _, _ = yield self.store.history("alice", "bob", None, 50)
        self.assertEqual(
            (full[0].sender, full[0].recipient, full[0].content), ("bob", "alice", "x")
        )

    @defer.inlineCallbacks
    def test_a_page_carries_its_receipts(self):
        """A page says who read each of the caller's own direct and group
        messages (in the order they read) and which of the others' messages
        the caller read; reads of other pages' messages, by others of the
        others' messages, and of the caller's broadcasts are not in it."""
        self.query(
            self.sql(
                "INSERT INTO chat_groups (group_id, name, owner, created_ms) VALUES (?, ?, ?, 1)"
            ),
            ("#team", "Team", "alice"),
        )
        for user in ("alice", "bob", "carol"):
            self.member("#team", user, 0, None)
        old = yield self.send("alice", "bob")
        mine = yield self.send("alice", "bob")
        theirs = yield self.send("bob", "alice")
        unread = yield self.send("bob", "alice")
        group = self.group_message("#team", "alice")
        cast = yield self.send("alice", "broadcast")
        reads = [
            ("bob", old, 1), ("bob", mine, 2), ("alice", theirs, 3), ("carol", group, 4),
            ("bob", group, 5), ("carol", cast, 6), ("carol", unread, 7),
        ]  # fmt: skip
        for reader, msg_id, ms in reads:
            self.query(
                self.sql(
                    "INSERT INTO message_reads (message_id, user_id, read_ms) VALUES (?, ?, ?)"
                ),
                (msg_id, reader, ms),
            )
        page, _, got = yield self.store.history("alice", "bob", old, 50)
        self.assertEqual((page, got.readers, got.read), ([], {}, set()))
        page, _, got = yield self.store.history("alice", "bob", None, 3)
        self.assertEqual([m.id for m in page], [unread, theirs, mine])
        self.assertEqual((got.readers, got.read), ({mine: ["bob"]}, {theirs}))
        page, _, got = yield self.store.history("alice", "#team", None, 50)
        self.assertEqual(got.readers, {group: ["carol", "bob"]})
        _, _, got = yield self.store.history("bob", "#team", None, 50)
        self.assertEqual((got.readers, got.read), ({}, {group}))
        _, _, got = yield self.store.history("alice", "broadcast", None, 50)
        self.assertEqual((got.readers, got.read), ({}, set()))

    @defer.inlineCallbacks
    def test_notes_to_self_broadcast_and_unknown_peers(self):
        """The caller's own id pages their notes to self only; ``broadcast``
        every broadcast; an unknown or deleted user is None."""
        note = yield self.send("alice", "alice")
        yield self.send("alice", "bob")
        cast = yield self.send("bob", "broadcast")
        page, _, _ = yield self.store.history("alice", "alice", None, 50)
        self.assertEqual([m.id for m in page], [note])
        page, _, _ = yield self.store.history("carol", "broadcast", None, 50)
        self.assertEqual([m.id for m in page], [cast])
        self.assertIsNone((yield self.store.history("alice", "zed", None, 50)))

    @defer.inlineCallbacks
    def test_a_group_page_is_inside_the_callers_window(self):
        """A member sees the group's messages after joined_id; a removed
        member up to removed_id; a user never in the group gets None."""
        first = yield self.send("alice", "broadcast")  # ids before the group
        self.query(
            self.sql(
                "INSERT INTO chat_groups (group_id, name, owner, created_ms) VALUES (?, ?, ?, 1)"
            ),
            ("#team", "Team", "alice"),
        )
        ids = [first]
        for user, joined in (("alice", 0), ("bob", 0)):
            self.member("#team", user, joined, None)
        for _ in range(3):
            ids.append(self.group_message("#team", "alice"))
        self.member("#team", "carol", ids[1], None)  # joined after the first
        self.member("#team", "dave", 0, ids[2])  # removed after the second
        ids.append(self.group_message("#team", "bob"))
        page, more, _ = yield self.store.history("alice", "#team", None, 50)
        self.assertEqual(([m.id for m in page], more), (ids[:0:-1], False))
        page, _, _ = yield self.store.history("carol", "#team", None, 50)
        self.assertEqual([m.id for m in page], ids[:1:-1])
        page, _, _ = yield self.store.history("dave", "#team", None, 50)
        self.assertEqual([m.id for m in page], ids[2:0:-1])
        page, more, _ = yield self.store.history("dave", "#team", ids[2], 1)
        self.assertEqual(([m.id for m in page], more), ([ids[1]], False))
        self.assertIsNone((yield self.store.history("alice", "#other", None, 50)))
        self.assertIsNone(
            (yield self.store.history("zed", "#team", None, 50)),
        )
        rows = yield self.store.conversations("dave", 50)
        self.assertEqual([(p, i) for p, i, _ in rows], [("#team", ids[2]), ("broadcast", first)])
        rows = yield self.store.conversations("carol", 50)
        self.assertEqual(rows[0][0], "#team")

    def member(self, group: str, user: str, joined: int, removed: int | None) -> None:
        self.query(
            self.sql(
                "INSERT INTO group_members (group_id, user_id, joined_id, removed_id,"
                " delivered_id, added_ms) VALUES (?, ?, ?, ?, 0, 1)"
            ),
            (group, user, joined, removed),
        )

    def group_message(self, group: str, sender: str) -> int:
        """A group message written directly (the groups part stores them)."""
        (head,) = self.query("SELECT COALESCE(MAX(id), 0) FROM messages")[0]
        self.query(
            self.sql(
                "INSERT INTO messages (id, sender, recipient, content, verification, status,"
                " created_ms) VALUES (?, ?, ?, 'g', 'unsigned', 'delivered', 5)"
            ),
            (head + 1, sender, group),
        )
        self.bump(head + 1)
        return head + 1

    def bump(self, head: int) -> None:
        """Move the engine's id counter past ``head`` (PostgreSQL's stream head)."""

    # -- the list -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_conversations_most_recent_first(self):
        """Each peer once with its newest id and timestamp, newest first,
        notes to self and broadcast included; ``limit`` cuts; a peer whose
        messages are gone is left out."""
        yield self.send("alice", "bob")
        yield self.send("carol", "alice")
        last_bob = yield self.send("bob", "alice")
        note = yield self.send("alice", "alice")
        rows = yield self.store.conversations("alice", 50)
        self.assertEqual(
            rows,
            [("alice", note, 1000), ("bob", last_bob, 1000), ("carol", last_bob - 1, 1000)],
        )
        rows = yield self.store.conversations("alice", 1)
        self.assertEqual([p for p, _, _ in rows], ["alice"])
        cast = yield self.send("dave", "broadcast")
        rows = yield self.store.conversations("bob", 50)
        self.assertEqual([(p, i) for p, i, _ in rows], [("broadcast", cast), ("alice", last_bob)])
        self.query(self.sql("DELETE FROM messages WHERE conv = ?"), ("alice carol",))
        rows = yield self.store.conversations("carol", 50)
        self.assertEqual([p for p, _, _ in rows], ["broadcast"])

    @defer.inlineCallbacks
    def test_deletion_removes_the_users_conversations_rows(self):
        """Deleting an account removes its conversations rows both as user
        and as peer, and no one else's."""
        yield self.send("alice", "bob")
        yield self.send("carol", "bob")
        yield self.send("alice", "carol")
        deleted = yield self.store.delete_account("bob", 5, lambda entries: None)
        self.assertTrue(deleted)
        rows = self.query("SELECT user_id, peer FROM conversations ORDER BY user_id, peer")
        self.assertEqual(rows, [("alice", "carol"), ("carol", "alice")])

    # -- plans ----------------------------------------------------------------------

    def filled(self) -> None:
        """Enough messages of enough pairs that a planner prefers an index."""
        raise NotImplementedError

    def history_plan(self, user_id: str, peer: str) -> str:
        """The plan of the page query ``history`` runs for (user_id, peer)."""
        rec = Recording(self.cursor())
        self.store._history(rec, user_id, peer, 2**62, 50)
        # The page query is the last statement reading messages (the page's
        # receipts are read from message_reads after it).
        sql, args = [st for st in rec.statements if " FROM messages " in st[0]][-1]
        return self.explain(sql, args)

    @defer.inlineCallbacks
    def test_page_plans_use_an_index_range(self):
        """A direct page (and notes to self) is a range of messages_conv; a
        broadcast or group page a range of messages_recipient; none scans
        messages."""
        for user_id in ("u1", "u2"):
            yield self.store.add_user(st.User(user_id, user_id, b"k" * 32, 1))
        self.filled()
        for peer, index in (
            ("u2", "messages_conv"),
            ("u1", "messages_conv"),
            ("broadcast", "messages_recipient"),
            ("#g", "messages_recipient"),
        ):
            plan = self.history_plan("u1", peer)
            self.assertIn(index, plan, (peer, plan))
            self.assertNotRegex(plan, self.scan_pattern, (peer, plan))
            self.assertNotIn("messages_pkey", plan, (peer, plan))

    def test_the_list_plan_probes_indexes(self):
        """The conversation list reads each entry's newest id from an index
        (messages_conv, messages_recipient) and never scans messages."""
        self.filled()
        rec = Recording(self.cursor())
        self.store._conversations(rec, "u1", 50)
        sql, args = rec.statements[-1]
        plan = self.explain(sql, args)
        self.assertIn("messages_conv", plan)
        self.assertIn("messages_recipient", plan)
        self.assertNotRegex(plan, self.scan_pattern)
        self.assertNotIn("Backward using messages_pkey", plan)  # PostgreSQL's filtered walk


class SQLiteHistoryTests(HistoryContract, unittest.TestCase):
    scan_pattern = r"SCAN (messages|x|m)\b"

    def make_store(self) -> Any:
        self.path = self.mktemp()
        st.prepare_database(self.path, lambda: SECRET)
        store = st.open_store(self.path, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def cursor(self) -> Any:
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        return conn.cursor()

    def explain(self, sql: str, args: tuple) -> str:
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        return "\n".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    def filled(self) -> None:
        conn = sqlite3.connect(self.path)
        with conn:
            conn.executemany(
                "INSERT INTO messages (id, sender, recipient, content, verification,"
                " created_ms, conv) VALUES (?, ?, ?, 'x', 'unsigned', 0, ?)",
                (
                    (g, f"u{g % 500}", r, None if r[0] in "#b" else f"u{g % 500} {r}")
                    for g in range(1, 20001)
                    for r in [("broadcast", "#g", f"u{g % 300}")[g % 3]]
                ),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO conversations (user_id, peer) VALUES (?, ?)",
                [("u1", f"u{i}") for i in range(300)],
            )
            conn.execute(
                "INSERT INTO group_members (group_id, user_id, joined_id, delivered_id,"
                " added_ms) VALUES ('#g', 'u1', 0, 0, 0)"
            )
            conn.execute("ANALYZE")
        conn.close()


class PostgresHistoryTests(HistoryContract, unittest.TestCase):
    scan_pattern = r"Seq Scan on messages"

    def make_store(self) -> Any:
        self.url = fresh_postgres_database(self)
        st.prepare_database(self.url, lambda: SECRET)
        store = st.open_store(self.url, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql, args or None)
            return cur.fetchall() if cur.description else []

    def cursor(self) -> Any:
        conn = psycopg.connect(self.url, autocommit=True)
        self.addCleanup(conn.close)
        return conn.cursor()

    def explain(self, sql: str, args: tuple) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return "\n".join(row[0] for row in conn.execute(b"EXPLAIN " + sql.encode(), args))

    def bump(self, head: int) -> None:
        self.query("UPDATE stream_head SET last_id = GREATEST(last_id, %s)", (head,))

    @defer.inlineCallbacks
    def test_a_busy_conversation_is_not_read_through_the_primary_key(self):
        """With a third of the table in one conversation PostgreSQL would
        take a page of it from messages_pkey backwards with a filter (reading
        every newer message of the table: not flat when the conversation's
        messages are old); the page query is a range of messages_conv."""
        for user_id in ("u1", "u2"):
            yield self.store.add_user(st.User(user_id, user_id, b"k" * 32, 1))
        self.query(
            "INSERT INTO messages (id, sender, recipient, content, verification, created_ms, conv)"
            " SELECT g, 'u1', CASE WHEN g % 3 = 0 THEN 'u2' ELSE 'u' || (g % 1000 + 3) END,"
            " 'x', 'unsigned', 0, CASE WHEN g % 3 = 0 THEN 'u1 u2' ELSE 'u1 u' || (g % 1000 + 3)"
            " END FROM generate_series(1, 60000) AS g"
        )
        self.query("ANALYZE")
        plan = self.history_plan("u1", "u2")
        self.assertIn("messages_conv", plan)
        self.assertNotIn("messages_pkey", plan)

    def filled(self) -> None:
        self.query(
            "INSERT INTO messages (id, sender, recipient, content, verification, created_ms)"
            " SELECT g, 'u' || (g % 500), (ARRAY['broadcast', '#g', 'u' || (g % 300)])[g % 3 + 1],"
            " 'x', 'unsigned', 0 FROM generate_series(1, 50000) AS g"
        )
        self.query(
            'UPDATE messages SET conv = CASE WHEN sender COLLATE "C" <= recipient COLLATE "C"'
            " THEN sender || ' ' || recipient ELSE recipient || ' ' || sender END"
            " WHERE recipient LIKE 'u%'"
        )
        self.query(
            "INSERT INTO conversations (user_id, peer) SELECT 'u1', 'u' || g"
            " FROM generate_series(0, 299) AS g ON CONFLICT DO NOTHING"
        )
        self.query(
            "INSERT INTO group_members (group_id, user_id, joined_id, delivered_id, added_ms)"
            " VALUES ('#g', 'u1', 0, 0, 0)"
        )
        self.query("ANALYZE")
