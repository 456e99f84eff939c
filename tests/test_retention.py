"""Retention (protocol sections 10 and 14): expired messages deleted in small
batches by a loop on a clock the tests control, on real SQLite and PostgreSQL
databases; SQLite gives the space back; ``since`` older than what is kept
returns what is kept; schema version 3 upgrades a database that has data."""

from __future__ import annotations

import os
import sqlite3

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from tests.support import LiveServer, eventually
from tests.test_store import SECRET, new_message
from wsserver import store as st
from wsserver.messages import BROADCAST, DELIVERED
from wsserver.retention import DAY_MS, Retention
from wsserver.store import sqlite as sq

NOW_MS = 400 * DAY_MS  # the test clock's "now"


class RetentionContract:
    """What retention does on every engine.  Subclasses define make_store()."""

    def make_store(self) -> st.IStore:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        for user_id in ("alice", "bob"):
            yield self.store.add_user(st.User(user_id, user_id.title(), b"\x01" * 32, 5))
        self.clock = task.Clock()
        self.clock.advance(NOW_MS / 1000)

    @defer.inlineCallbacks
    def add(self, age_days: float, delivered: bool, to: str = "bob", content: str = "x") -> int:
        """Store a message created ``age_days`` before the clock's now; its id."""
        ms = NOW_MS - int(age_days * DAY_MS)
        outcome, msg = yield self.store.add_message(new_message("alice", to, content, ms=ms))
        self.assertEqual(outcome, st.STORED)
        if delivered:
            if to == BROADCAST:
                self.store.mark_broadcast(msg.id, 1)
            else:
                self.store.mark_delivered([msg.id])
            yield self.store.drain()
        return msg.id

    @defer.inlineCallbacks
    def remaining(self) -> defer.Deferred:
        head = yield self.store.stream_head()
        rows = yield self.store.messages_between(0, head, 100_000)
        return [m.id for m in rows]

    @defer.inlineCallbacks
    def test_expired_delivered_and_pending_go_the_rest_stays(self):
        """MESSAGE_RETENTION_DAYS deletes delivered messages (direct and
        broadcast) older than it; pending ones stay until PENDING_RETENTION_DAYS
        (0 keeps them); messages younger than the limits stay."""
        old_delivered = yield self.add(10, delivered=True)
        old_broadcast = yield self.add(10, delivered=True, to=BROADCAST)
        old_pending = yield self.add(10, delivered=False)
        older_pending = yield self.add(40, delivered=False)
        young_delivered = yield self.add(2, delivered=True)
        young_pending = yield self.add(2, delivered=False)
        retention = Retention(self.store, self.clock, message_days=7, pending_days=0, pause=0)
        counts = yield retention.run_pass()
        self.assertEqual(counts, (2, 0))
        left = yield self.remaining()
        self.assertEqual(left, sorted([old_pending, older_pending, young_delivered, young_pending]))
        self.assertNotIn(old_delivered, left)
        self.assertNotIn(old_broadcast, left)
        retention = Retention(self.store, self.clock, message_days=7, pending_days=30, pause=0)
        counts = yield retention.run_pass()
        self.assertEqual(counts, (0, 1))
        left = yield self.remaining()
        self.assertEqual(left, sorted([old_pending, young_delivered, young_pending]))

    @defer.inlineCallbacks
    def test_zero_keeps_everything(self):
        """Both limits at 0 (the default): nothing is deleted, however old."""
        for age in (1, 100, 399):
            yield self.add(age, delivered=True)
            yield self.add(age, delivered=False)
        counts = yield Retention(self.store, self.clock, 0, 0, pause=0).run_pass()
        self.assertEqual(counts, (0, 0))
        left = yield self.remaining()
        self.assertEqual(len(left), 6)

    @defer.inlineCallbacks
    def test_deletes_in_small_batches_oldest_first(self):
        """A large deletion is many transactions of at most ``batch`` rows each,
        oldest first, walking on from where the last one ended (each batch
        starts at or after the previous one's newest row)."""
        ids = []
        for i in range(23):
            ids.append((yield self.add(30 - i * 0.5, delivered=True)))
        yield self.add(30, delivered=False)  # pending and kept: skipped, not read again
        calls = []
        original = self.store.expire_batch

        def spy(status, before_ms, from_ms, limit):
            d = original(status, before_ms, from_ms, limit)
            d.addCallback(lambda r: (calls.append((status, from_ms, limit, r[0])), r)[1])
            return d

        self.store.expire_batch = spy
        retention = Retention(
            self.store, self.clock, message_days=1, pending_days=0, batch=5, pause=0
        )
        counts = yield retention.run_pass()
        self.assertEqual(counts, (23, 0))
        self.assertEqual([c[3] for c in calls], [5, 5, 5, 5, 3])
        self.assertTrue(all(c[2] == 5 and c[0] == DELIVERED for c in calls))
        starts = [c[1] for c in calls]
        self.assertEqual(starts, sorted(starts))
        self.assertEqual(starts[0], 0)
        self.assertGreater(starts[1], 0)

    @defer.inlineCallbacks
    def test_rests_between_batches_on_its_clock(self):
        """Between two batches the pass waits ``pause`` seconds of its clock: a
        large deletion leaves the writer free part of the time."""
        for i in range(12):
            yield self.add(30 - i * 0.1, delivered=True)
        retention = Retention(self.store, self.clock, 1, 0, batch=5, pause=0.5)
        done = retention.run_pass()
        yield eventually(
            lambda: retention.deleted[DELIVERED] == 0 and self.clock.getDelayedCalls(),
            "the first rest",
        )
        left = yield self.remaining()
        self.assertEqual(len(left), 7)  # one batch done, resting
        self.clock.advance(0.49)
        left = yield self.remaining()
        self.assertEqual(len(left), 7)
        self.clock.advance(0.01)
        yield eventually(
            lambda: len(self.clock.getDelayedCalls()) == 1 and not done.called, "the second rest"
        )
        left = yield self.remaining()
        self.assertEqual(len(left), 2)
        self.clock.advance(0.5)
        counts = yield done
        self.assertEqual(counts, (12, 0))

    @defer.inlineCallbacks
    def test_runs_every_interval_on_its_clock(self):
        """Started, it runs a first pass ``first_delay`` seconds later, then one
        each ``interval`` seconds of its clock, and none once stopped."""
        retention = Retention(
            self.store, self.clock, message_days=1, pending_days=0, interval=60, pause=0
        )
        retention.start(first_delay=10)
        self.addCleanup(retention.stop)
        yield self.add(5, delivered=True)
        self.clock.advance(9.9)
        self.assertEqual(retention.passes, 0)
        self.clock.advance(0.1)
        yield eventually(lambda: retention.passes == 1, "the first pass")
        self.assertEqual(retention.deleted[DELIVERED], 1)
        yield self.add(5, delivered=True)
        self.clock.advance(59)
        self.assertEqual(retention.passes, 1)
        self.clock.advance(1)
        yield eventually(lambda: retention.passes == 2, "the second pass")
        self.assertEqual(retention.deleted[DELIVERED], 2)
        yield retention.stop()
        self.clock.advance(600)
        self.assertEqual(retention.passes, 2)

    def test_stopped_before_the_first_pass_runs_none(self):
        """Stopped before its first pass, it leaves nothing scheduled."""
        retention = Retention(self.store, self.clock, 1, 0, pause=0)
        retention.start()
        retention.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_two_nodes_running_together_delete_each_row_once(self):
        """Every node runs retention: two loops on one database at the same time
        end with every expired row gone, none twice and none kept."""
        for i in range(60):
            yield self.add(10 + i / 100, delivered=True)
        kept = yield self.add(1, delivered=True)
        other = self.second_store()
        first = Retention(self.store, self.clock, 5, 0, batch=7, pause=0)
        second = Retention(other, self.clock, 5, 0, batch=7, pause=0)
        results = yield defer.gatherResults([first.run_pass(), second.run_pass()])
        self.assertEqual(results[0][0] + results[1][0], 60)
        left = yield self.remaining()
        self.assertEqual(left, [kept])

    @defer.inlineCallbacks
    def test_since_older_than_what_is_kept_returns_what_is_kept(self):
        """A client asking since=0 after retention ran gets the kept messages
        (still pending, or young enough), in id order, and nothing deleted."""
        gone = yield self.add(10, delivered=True)
        pending = yield self.add(10, delivered=False)
        young = yield self.add(1, delivered=True)
        yield Retention(self.store, self.clock, message_days=7, pending_days=0, pause=0).run_pass()
        page = yield self.store.replay_page("bob", 0, 0, 100)
        self.assertEqual([m.id for m in page], [pending, young])
        page = yield self.store.replay_page("bob", gone - 1, 0, 100)
        self.assertEqual([m.id for m in page], [pending, young])


class SQLiteRetentionTests(RetentionContract, unittest.TestCase):
    def make_store(self) -> st.IStore:
        self.path = self.mktemp()
        st.prepare_database(self.path, lambda: SECRET)
        return self.open()

    def open(self) -> st.IStore:
        store = st.open_store(self.path, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    second_store = open

    @defer.inlineCallbacks
    def test_space_goes_back_to_the_file_system(self):
        """A new database is created with auto_vacuum=INCREMENTAL, and after a
        large deletion retention gives the freed pages back: the file shrinks."""
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA auto_vacuum").fetchone()[0], 2)
        for _ in range(300):
            yield self.add(10, delivered=True, content="z" * 4000)
        yield self.add(1, delivered=True)
        before = conn.execute("PRAGMA page_count").fetchone()[0]
        counts = yield Retention(self.store, self.clock, 7, 0, vacuum_pages=50, pause=0).run_pass()
        self.assertEqual(counts, (300, 0))
        after = conn.execute("PRAGMA page_count").fetchone()[0]
        self.assertEqual(conn.execute("PRAGMA freelist_count").fetchone()[0], 0)
        self.assertLess(after, before / 4)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertLess(os.path.getsize(self.path), after * 4096 + 4096)

    @defer.inlineCallbacks
    def test_an_old_database_keeps_its_space_until_vacuumed_as_documented(self):
        """A database made before version 3 has auto_vacuum NONE: retention
        deletes but the file keeps its size; the documented one-off
        (PRAGMA auto_vacuum = INCREMENTAL; VACUUM) switches it over, and the
        next deletion gives space back."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        sq.upgrade(conn, target=2)
        conn.close()
        st.prepare_database(path, lambda: SECRET)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA auto_vacuum").fetchone()[0], 0)
        self.path = path
        self.store = self.open()
        yield self.store.add_user(st.User("bob", "Bob", b"\x01" * 32, 5))
        for _ in range(100):
            yield self.add(10, delivered=True, content="z" * 4000)
        before = conn.execute("PRAGMA page_count").fetchone()[0]
        yield Retention(self.store, self.clock, 7, 0, pause=0).run_pass()
        self.assertEqual(conn.execute("PRAGMA page_count").fetchone()[0], before)
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        self.assertGreater(free, 50)
        yield self.store.close()
        # The one-off of docs/operations.md (server stopped).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        self.assertEqual(conn.execute("PRAGMA auto_vacuum").fetchone()[0], 2)
        # The free pages went back to the file system (VACUUM lays the
        # tables out afresh: a page or two more or less than before).
        after = conn.execute("PRAGMA page_count").fetchone()[0]
        self.assertLessEqual(after, before - free * 9 // 10, (before, free, after))

    def test_upgrade_to_version_3_keeps_data(self):
        """A version-2 database with users and messages upgrades through version 3:
        rows survive, the age index and the new tables exist."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        sq.upgrade(conn, target=2)
        conn.execute("INSERT INTO users VALUES ('alice', 'A', x'01', 1)")
        conn.execute(
            "INSERT INTO messages (sender, recipient, content, verification, created_ms)"
            " VALUES ('alice', 'bob', 'kept', 'unsigned', 7)"
        )
        conn.commit()
        conn.close()
        st.prepare_database(path, lambda: SECRET)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(sq.schema_version(conn), sq.migrations()[-1][0])
        self.assertEqual(conn.execute("SELECT user_id FROM users").fetchall(), [("alice",)])
        self.assertEqual(conn.execute("SELECT content FROM messages").fetchall(), [("kept",)])
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        self.assertTrue({"messages_created", "deleted_users", "account_events"} <= names)
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE created_ms >= 0"
            " AND created_ms < 5 AND status = 'delivered' ORDER BY created_ms LIMIT 5"
        ).fetchall()
        self.assertIn("messages_created", " ".join(str(r) for r in plan))


class PostgresRetentionTests(RetentionContract, unittest.TestCase):
    def make_store(self) -> st.IStore:
        self.url = fresh_postgres_database(self)
        st.prepare_database(self.url, lambda: SECRET)
        return self.second_store()

    def second_store(self) -> st.IStore:
        store = st.open_store(self.url, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def test_upgrade_to_version_3_keeps_data(self):
        """A version-2 PostgreSQL database with data upgrades to version 3."""
        import psycopg

        from wsserver.store import postgres as pg

        url = fresh_postgres_database(self)
        with psycopg.connect(url) as conn:
            pg.upgrade(conn, target=2)
            conn.execute("INSERT INTO users VALUES ('alice', 'A', '\\x01', 1)")
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, verification,"
                " created_ms) VALUES (1, 'alice', 'bob', 'kept', 'unsigned', 7)"
            )
            conn.commit()
        st.prepare_database(url, lambda: SECRET)
        with psycopg.connect(url) as conn:
            self.assertEqual(pg.schema_version(conn), pg.migrations()[-1][0])
            self.assertEqual(conn.execute("SELECT content FROM messages").fetchall(), [("kept",)])
            for name in ("messages_created", "deleted_users", "account_events"):
                found = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0]
                self.assertIsNotNone(found, name)


class LiveRetentionTests(unittest.TestCase):
    """Retention in a running server, seen by a client."""

    @defer.inlineCallbacks
    def test_a_client_asking_since_0_gets_what_is_kept(self):
        """With MESSAGE_RETENTION_DAYS=1, after a pass, a client reconnecting
        with since=0 receives the young and the pending messages and none of
        the expired ones."""
        server = LiveServer(self, {"MESSAGE_RETENTION_DAYS": "1"})
        store = server.service.store
        _, token = yield server.user("bob")
        yield server.user("alice")
        now_ms = int(reactor.seconds() * 1000)
        ids = {}
        for name, age_days, delivered in (
            ("expired", 3, True),
            ("pending", 3, False),
            ("young", 0.5, True),
        ):
            _, msg = yield store.add_message(
                new_message("alice", "bob", name, ms=now_ms - int(age_days * DAY_MS))
            )
            ids[name] = msg.id
            if delivered:
                store.mark_delivered([msg.id])
        yield store.drain()
        counts = yield server.service.retention.run_pass()
        self.assertEqual(counts, (1, 0))
        client = yield server.connect(token, since=0)
        frames = yield client.take(2, "message")
        self.assertEqual([f["content"] for f in frames], ["pending", "young"])
        yield client.close_and_wait()
        self.assertNotIn("expired", [f.get("content") for f in client.received])
        gone = yield store.get_message(ids["expired"])
        self.assertIsNone(gone)
