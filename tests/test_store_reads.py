"""The store's side of protocol section 13's read receipts and presence
contacts, on SQLite and on PostgreSQL: ``record_read`` decides whether the
reader received the message and records the read once (two stores racing
record it once), ``contacts_among`` finds who shares a direct conversation
or a current group, and an account deletion removes the user's reads.  One
suite (``ReadsContract``) runs on both engines."""

from __future__ import annotations

import sqlite3
from typing import Any

import psycopg
from nacl.signing import SigningKey
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from wsserver import store as st
from wsserver.messages import UNSIGNED
from wsserver.store import postgres as pg
from wsserver.store import sqlite as sq
from wsserver.store.reads import ALREADY_READ, NOT_RECEIVED, READ

SECRET = b"r" * 32
USERS = ("alice", "bob", "carol", "dave")


def message(sender: str, to: str, content: str) -> st.NewMessage:
    return st.NewMessage(sender, to, content, None, None, UNSIGNED, 10, None)


class ReadsContract:
    """What both engines must do.  Subclasses define ``make_store()`` (a
    second call opens another store on the same database, as another node
    would), ``execute(sql, args)`` (on a connection of the test's own, with
    ``?`` placeholders) and ``query(sql, args)`` (rows as tuples)."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def execute(self, sql: str, args: tuple = ()) -> None:
        raise NotImplementedError

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        for user_id in USERS:
            key = bytes(SigningKey(user_id.encode().ljust(32, b".")).verify_key)
            added = yield self.store.add_user(st.User(user_id, user_id.title(), key, 1))
            self.assertTrue(added)

    @defer.inlineCallbacks
    def send(self, sender: str, to: str, delivered: bool = True) -> Any:
        kind, msg = yield self.store.add_message(message(sender, to, f"{sender}>{to}"))
        self.assertEqual(kind, st.STORED)
        if delivered:
            self.store.mark_delivered([msg.id])
            yield self.store.drain()
        return msg.id

    def group_message(self, msg_id: int, sender: str, group: str) -> int:
        self.execute(
            "INSERT INTO messages (id, sender, recipient, content, verification, status,"
            " created_ms) VALUES (?, ?, ?, 'g', 'unsigned', 'pending', 0)",
            (msg_id, sender, group),
        )
        return msg_id

    def member(
        self,
        group: str,
        user: str,
        joined: int,
        removed: int | None = None,
        delivered: int | None = None,
    ) -> None:
        """A ``group_members`` row; the delivered cursor at ``joined`` unless given."""
        self.execute(
            "INSERT INTO group_members (group_id, user_id, joined_id, removed_id,"
            " delivered_id, added_ms) VALUES (?, ?, ?, ?, ?, 0)",
            (group, user, joined, removed, joined if delivered is None else delivered),
        )

    def reads(self) -> list[tuple]:
        return sorted(self.query("SELECT message_id, user_id, read_ms FROM message_reads"))

    # -- record_read -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_delivered_direct_message_is_read_once(self):
        """bob reads alice's delivered message: (READ, alice), one row with the
        time; the same read again is ALREADY_READ and writes nothing."""
        msg_id = yield self.send("alice", "bob")
        self.assertEqual((yield self.store.record_read("bob", msg_id, 500)), (READ, "alice"))
        self.assertEqual((yield self.store.record_read("bob", msg_id, 600)), (ALREADY_READ, None))
        self.assertEqual(self.reads(), [(msg_id, "bob", 500)])

    @defer.inlineCallbacks
    def test_what_the_reader_did_not_receive_is_refused_and_writes_nothing(self):
        """NOT_RECEIVED, and no row, for: a pending direct message, the
        reader's own message, a note to self, someone else's direct message,
        an unknown id, the reader's own broadcast."""
        pending = yield self.send("alice", "bob", delivered=False)
        to_bob = yield self.send("alice", "bob")
        note = yield self.send("alice", "alice")
        mine = yield self.send("alice", "broadcast")
        for reader, msg_id in (
            ("bob", pending),
            ("alice", to_bob),
            ("carol", to_bob),
            ("alice", note),
            ("alice", mine),
            ("bob", 10**9),
        ):
            got = yield self.store.record_read(reader, msg_id, 1)
            self.assertEqual(got, (NOT_RECEIVED, None), (reader, msg_id))
        self.assertEqual(self.reads(), [])

    @defer.inlineCallbacks
    def test_a_broadcast_is_read_by_anyone_but_its_sender(self):
        """Every other user may read a broadcast, once each."""
        msg_id = yield self.send("alice", "broadcast")
        for reader in ("bob", "carol"):
            got = yield self.store.record_read(reader, msg_id, 7)
            self.assertEqual(got, (READ, "alice"))
        self.assertEqual(self.reads(), [(msg_id, "bob", 7), (msg_id, "carol", 7)])

    @defer.inlineCallbacks
    def test_a_group_message_is_read_inside_the_readers_window(self):
        """bob (joined at 100) reads #team's 150; carol (joined at 100, removed
        at 120) may read 110 but not 150; dave (joined at 160) may not read
        150; alice's own is refused to her; a non-member is refused."""
        self.member("#team", "alice", 0)
        self.member("#team", "bob", 100, delivered=150)
        self.member("#team", "carol", 100, removed=120, delivered=150)
        self.member("#team", "dave", 160, delivered=200)
        early = self.group_message(110, "alice", "#team")
        late = self.group_message(150, "alice", "#team")
        self.group_message(200, "alice", "#other")
        expected = {
            ("bob", late): (READ, "alice"),
            ("carol", early): (READ, "alice"),
            ("carol", late): (NOT_RECEIVED, None),
            ("dave", late): (NOT_RECEIVED, None),
            ("alice", late): (NOT_RECEIVED, None),
            ("bob", 200): (NOT_RECEIVED, None),
            ("bob", 100): (NOT_RECEIVED, None),
        }
        for (reader, msg_id), outcome in expected.items():
            got = yield self.store.record_read(reader, msg_id, 3)
            self.assertEqual(got, outcome, (reader, msg_id))
        self.assertEqual(self.reads(), [(early, "carol", 3), (late, "bob", 3)])

    @defer.inlineCallbacks
    def test_a_group_message_above_the_readers_cursor_is_refused(self):
        """Inside bob's window but above his delivered cursor (not handed to
        him yet), #team's 150 is refused to him; at the cursor it is read.
        carol, removed at 160 with her cursor at 140, never received 150:
        refused, though it is inside her window."""
        self.member("#team", "alice", 0)
        self.member("#team", "bob", 100, delivered=149)
        self.member("#team", "carol", 100, removed=160, delivered=140)
        msg_id = self.group_message(150, "alice", "#team")
        for reader in ("bob", "carol"):
            got = yield self.store.record_read(reader, msg_id, 4)
            self.assertEqual(got, (NOT_RECEIVED, None), reader)
        self.execute("UPDATE group_members SET delivered_id = 150 WHERE user_id = 'bob'")
        self.assertEqual((yield self.store.record_read("bob", msg_id, 5)), (READ, "alice"))
        self.assertEqual(self.reads(), [(msg_id, "bob", 5)])

    @defer.inlineCallbacks
    def test_two_stores_racing_record_one_read(self):
        """The same read through two stores at once (two nodes): exactly one
        is READ, the other ALREADY_READ, and one row."""
        msg_id = yield self.send("alice", "bob")
        other = self.make_store()
        for _ in range(5):
            self.execute("DELETE FROM message_reads")
            got = yield defer.gatherResults(
                [
                    self.store.record_read("bob", msg_id, 1),
                    other.record_read("bob", msg_id, 2),
                ]
            )
            self.assertEqual(sorted(kind for kind, _ in got), [ALREADY_READ, READ])
            self.assertEqual(len(self.reads()), 1)

    @defer.inlineCallbacks
    def test_deleting_an_account_removes_its_reads(self):
        """bob's reads go with his account; alice's stay."""
        to_bob = yield self.send("carol", "bob")
        to_alice = yield self.send("carol", "alice")
        yield self.store.record_read("bob", to_bob, 1)
        yield self.store.record_read("alice", to_alice, 1)
        self.assertTrue((yield self.store.delete_account("bob", 9, lambda entries: None)))
        self.assertEqual(self.reads(), [(to_alice, "alice", 1)])

    # -- contacts_among --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_contacts_are_who_wrote_and_current_groups(self):
        """alice's contacts among the candidates: bob (he wrote to her: his
        row says ``wrote``), carol (a current group); not dave (removed from
        the group), not an unknown id; nobody for no candidates."""
        self.execute(
            "INSERT INTO conversations (user_id, peer, wrote) VALUES (?, ?, ?)",
            ("bob", "alice", True),
        )
        self.execute(
            "INSERT INTO conversations (user_id, peer, wrote) VALUES (?, ?, ?)",
            ("alice", "bob", False),
        )
        self.member("#team", "alice", 0)
        self.member("#team", "carol", 0)
        self.member("#team", "dave", 0, removed=5)
        self.member("#old", "dave", 0)
        got = yield self.store.contacts_among("alice", ["bob", "carol", "dave", "zed"])
        self.assertEqual(got, {"bob", "carol"})
        self.assertEqual((yield self.store.contacts_among("dave", ["alice", "carol"])), set())
        self.assertEqual((yield self.store.contacts_among("alice", [])), set())

    @defer.inlineCallbacks
    def test_a_stranger_who_writes_does_not_become_a_contact(self):
        """dave writes alice once: he may not watch her (she never wrote to
        him), she may watch him; once she replies, he may watch her too."""
        yield self.send("dave", "alice")
        self.assertEqual((yield self.store.contacts_among("dave", ["alice"])), set())
        self.assertEqual((yield self.store.contacts_among("alice", ["dave"])), {"dave"})
        yield self.send("alice", "dave")
        self.assertEqual((yield self.store.contacts_among("dave", ["alice"])), {"alice"})
        self.assertEqual((yield self.store.contacts_among("alice", ["dave"])), {"dave"})

    @defer.inlineCallbacks
    def test_wrote_is_kept_by_another_store_and_in_one_batch(self):
        """Another store (another node: an empty cache) writing the reverse
        direction marks it; a batch holding both directions marks both; a
        later message the other way never unmarks."""
        yield self.send("alice", "bob")
        other = self.make_store()
        kind, _ = yield other.add_message(message("bob", "alice", "reply"))
        self.assertEqual(kind, st.STORED)
        yield other.drain()
        self.assertEqual((yield self.store.contacts_among("alice", ["bob"])), {"bob"})
        self.assertEqual((yield self.store.contacts_among("bob", ["alice"])), {"alice"})
        both = [
            self.store.add_message(message("carol", "dave", "a")),
            self.store.add_message(message("dave", "carol", "b")),
            self.store.add_message(message("carol", "dave", "c")),
        ]
        yield defer.gatherResults(both)
        self.assertEqual((yield self.store.contacts_among("carol", ["dave"])), {"dave"})
        self.assertEqual((yield self.store.contacts_among("dave", ["carol"])), {"carol"})
        rows = self.query("SELECT user_id, peer, wrote FROM conversations ORDER BY user_id, peer")
        self.assertEqual(
            [(u, p, bool(w)) for u, p, w in rows],
            [
                ("alice", "bob", True),
                ("bob", "alice", True),
                ("carol", "dave", True),
                ("dave", "carol", True),
            ],
        )

    def upgrade_from_5(self, statements: list[str]) -> list[tuple]:
        """A fresh version-5 database given ``statements``, upgraded to the
        newest: its conversations rows (user_id, peer, wrote)."""
        raise NotImplementedError

    def test_upgrade_marks_who_wrote(self):
        """Version 6 marks the existing rows from the stored messages: alice
        wrote bob (bob only received), carol wrote herself; dave's and bob's
        messages are all gone (retention): who wrote can no longer be told,
        so both rows keep the rule they had before (each may see the other),
        as a reviewer asked (they lost each other's presence)."""
        rows = self.upgrade_from_5(
            [
                "INSERT INTO messages (id, sender, recipient, content, verification,"
                " created_ms, conv) VALUES (1, 'alice', 'bob', 'x', 'unsigned', 1, 'alice bob'),"
                " (2, 'carol', 'carol', 'x', 'unsigned', 1, 'carol carol'),"
                " (3, 'alice', 'broadcast', 'x', 'unsigned', 1, NULL)",
                "INSERT INTO conversations (user_id, peer) VALUES ('alice', 'bob'),"
                " ('bob', 'alice'), ('carol', 'carol'), ('dave', 'bob'), ('bob', 'dave')",
            ]
        )
        self.assertEqual(
            [(u, p, bool(w)) for u, p, w in rows],
            [
                ("alice", "bob", True),
                ("bob", "alice", False),
                ("bob", "dave", True),
                ("carol", "carol", True),
                ("dave", "bob", True),
            ],
        )

    @defer.inlineCallbacks
    def test_a_removed_watcher_has_no_group_contacts(self):
        """A user removed from a group no longer shares it with its members."""
        self.member("#team", "alice", 0, removed=3)
        self.member("#team", "bob", 0)
        self.assertEqual((yield self.store.contacts_among("alice", ["bob"])), set())


class SQLiteReadsTests(ReadsContract, unittest.TestCase):
    def make_store(self) -> Any:
        if not hasattr(self, "path"):
            self.path = self.mktemp()
            st.prepare_database(self.path, lambda: SECRET)
        store = sq.Store(self.path, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def execute(self, sql: str, args: tuple = ()) -> None:
        conn = sqlite3.connect(self.path, timeout=30)
        with conn:
            conn.execute(sql, args)
        conn.close()

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def upgrade_from_5(self, statements: list[str]) -> list[tuple]:
        path = self.mktemp()
        conn = sqlite3.connect(path)
        sq.upgrade(conn, target=5)
        with conn:
            for sql in statements:
                conn.execute(sql)
        conn.close()
        st.prepare_database(path, lambda: SECRET)
        conn = sqlite3.connect(path)
        try:
            return conn.execute(
                "SELECT user_id, peer, wrote FROM conversations ORDER BY user_id, peer"
            ).fetchall()
        finally:
            conn.close()


class PostgresReadsTests(ReadsContract, unittest.TestCase):
    def make_store(self) -> Any:
        if not hasattr(self, "url"):
            self.url = fresh_postgres_database(self)
            st.prepare_database(self.url, lambda: SECRET)
        store = st.open_store(self.url, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def execute(self, sql: str, args: tuple = ()) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), args)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()

    def upgrade_from_5(self, statements: list[str]) -> list[tuple]:
        url = fresh_postgres_database(self)
        with pg.connect(url) as conn:
            pg.upgrade(conn, target=5)
            for sql in statements:
                conn.execute(sql)
            conn.commit()
        st.prepare_database(url, lambda: SECRET)
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(
                "SELECT user_id, peer, wrote FROM conversations ORDER BY user_id, peer"
            ).fetchall()
