"""The PostgreSQL store: the conformance suite, its schema versions and their
upgrade under a lock, ids in commit order across several writer nodes, and a
terminated backend.  Each test has a database of its own (tests/services.py);
without a reachable PostgreSQL these skip (or fail, with
WSSERVER_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import threading

import psycopg
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from tests.test_store import SECRET, StoreContract, new_message
from wsserver import keylog
from wsserver import store as st
from wsserver.bench.history import plan_stops_early
from wsserver.messages import VERIFIED
from wsserver.store import postgres as pg

NEWEST = pg.migrations()[-1][0]


class PostgresStoreTests(StoreContract, unittest.TestCase):
    """The conformance suite on PostgreSQL."""

    def make_store(self) -> st.IStore:
        self.url = fresh_postgres_database(self)
        st.prepare_database(self.url, lambda: SECRET)
        store = st.open_store(self.url, reactor)
        self.assertIsInstance(store, pg.PostgresStore)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def make_read_only(self, on: bool):
        # A constraint no row passes makes every insert fail (NOT VALID: the rows
        # already there are not checked), whichever pool connection writes.
        with psycopg.connect(self.url, autocommit=True) as conn:
            if on:
                conn.execute(
                    "ALTER TABLE messages ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"
                )
            else:
                conn.execute("ALTER TABLE messages DROP CONSTRAINT refuse_all")


class PostgresSchemaTests(unittest.TestCase):
    """Schema versions, the JWT secret and URL handling on PostgreSQL."""

    def test_secret_is_generated_once_and_kept(self):
        """The first node stores a secret; every later start gets the same one."""
        url = fresh_postgres_database(self)
        first = st.prepare_database(url, lambda: b"a" * 32)
        second = st.prepare_database(url, lambda: b"b" * 32)
        self.assertEqual((first, second), (b"a" * 32, b"a" * 32))

    def test_preparers_starting_together_apply_each_version_once(self):
        """Several nodes preparing one empty database at the same moment all succeed,
        agree on the secret, and leave the newest schema (a version applied twice
        would fail on its CREATE TABLE)."""
        url = fresh_postgres_database(self)
        count = 4
        barrier = threading.Barrier(count)
        results: list = [None] * count

        def prepare(i: int) -> None:
            barrier.wait()
            try:
                results[i] = st.prepare_database(url, lambda: bytes([65 + i]) * 32)
            except Exception as exc:
                results[i] = exc

        workers = [threading.Thread(target=prepare, args=(i,)) for i in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        self.assertEqual([type(r) for r in results], [bytes] * count, results)
        self.assertEqual(len(set(results)), 1)
        with pg.connect(url) as conn:
            self.assertEqual(pg.schema_version(conn), NEWEST)

    def test_upgrade_from_version_1_keeps_data(self):
        """A version-1 database upgrades to the newest version; its users, messages,
        stream head and secret survive, and new messages continue the ids."""
        url = fresh_postgres_database(self)
        with pg.connect(url) as conn:
            self.assertEqual(pg.upgrade(conn, target=1), 1)
            conn.execute("INSERT INTO users VALUES ('bob', 'Bob', %s, 1)", (b"\x01",))
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, nonce, verification,"
                " created_ms) VALUES (1, 'alice', 'bob', 'one', 'n-1', 'unsigned', 1),"
                " (2, 'alice', 'bob', 'two', NULL, 'unsigned', 1)"
            )
            conn.execute("UPDATE stream_head SET last_id = 2")
            conn.execute("INSERT INTO meta VALUES ('jwt_secret', %s)", (SECRET,))
            conn.commit()
        self.assertEqual(st.prepare_database(url, lambda: b"x" * 32), SECRET)
        with pg.connect(url) as conn:
            self.assertEqual(pg.schema_version(conn), NEWEST)
            rows = conn.execute("SELECT id, content, nonce FROM messages ORDER BY id").fetchall()
            self.assertEqual(rows, [(1, "one", "n-1"), (2, "two", None)])
            self.assertEqual(conn.execute("SELECT count(*) FROM nodes").fetchone(), (0,))
        store = st.open_store(url, reactor)
        self.addCleanup(store.close)
        d = store.add_message(new_message(nonce="n-1"))
        d.addCallback(lambda r: self.assertEqual((r[0], r[1].id), (st.DUPLICATE, 1)))
        d.addCallback(lambda _: store.add_message(new_message()))
        d.addCallback(lambda r: self.assertEqual(r[0], st.STORED) or self.assertGreater(r[1].id, 2))
        return d

    @defer.inlineCallbacks
    def test_upgrade_from_version_3_gives_every_user_entry_0(self):
        """A version-3 database with users and messages upgrades to version 4:
        each user's key becomes entry 0 of their key log (at their creation
        time) and their one active key, generation 0; messages survive with no
        key_id; the store then serves keys, signed messages and sign-out."""
        url = fresh_postgres_database(self)
        with pg.connect(url) as conn:
            self.assertEqual(pg.upgrade(conn, target=3), 3)
            conn.execute(
                "INSERT INTO users VALUES ('alice', 'A', %s, 11), ('bob', 'B', %s, 22)",
                (b"\x01" * 32, b"\x02" * 32),
            )
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, verification,"
                " created_ms) VALUES (1, 'alice', 'bob', 'kept', 'unsigned', 7)"
            )
            conn.execute("UPDATE stream_head SET last_id = 1")
            conn.commit()
        st.prepare_database(url, lambda: SECRET)
        with pg.connect(url) as conn:
            self.assertEqual(pg.schema_version(conn), NEWEST)
        store = st.open_store(url, reactor)
        self.addCleanup(store.close)
        for user_id, key, created in (("alice", b"\x01" * 32, 11), ("bob", b"\x02" * 32, 22)):
            log = yield store.key_log(user_id)
            self.assertEqual(log, [keylog.Entry(0, keylog.REGISTER, key, at_ms=created)])
            keys = yield store.user_keys(user_id)
            self.assertEqual(
                keys, st.UserKeys((st.KeyRecord(keylog.key_id(key), key, None, created),), 0)
            )
        old = yield store.get_message(1)
        self.assertEqual((old.content, old.key_id), ("kept", None))
        kind, new = yield store.add_message(
            st.NewMessage("bob", "alice", "signed", b"\x07" * 64, None, VERIFIED, 8, "kid")
        )
        self.assertEqual((kind, new.id), (st.STORED, 2))
        self.assertEqual((yield store.get_message(2)).key_id, "kid")
        self.assertEqual((yield store.revoke_tokens("alice", 9)), 1)

    def test_newer_schema_is_refused(self):
        """A database from a newer server is not touched; the error names DATABASE."""
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        with pg.connect(url) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
        with self.assertRaises(st.DatabaseError) as ctx:
            st.prepare_database(url, lambda: SECRET)
        self.assertTrue(str(ctx.exception).startswith("DATABASE: "), ctx.exception)

    def test_unreachable_server_is_one_clear_line_without_the_password(self):
        """A server that does not answer is a DatabaseError naming DATABASE and the URL
        with its password hidden."""
        url = "postgresql://someone:hunter2secret@127.0.0.1:1/nothing"
        with self.assertRaises(st.DatabaseError) as ctx:
            st.prepare_database(url, lambda: SECRET)
        text = str(ctx.exception)
        self.assertTrue(text.startswith("DATABASE: cannot use postgresql://someone:***@"), text)
        self.assertNotIn("hunter2secret", text)
        self.assertNotIn("\n", text)

    def test_describe_hides_only_the_password(self):
        """The form of DATABASE that may be logged keeps everything but the password."""
        self.assertEqual(
            st.describe("postgresql://u:p%40ss@db.example:5433/chat?sslmode=require"),
            "postgresql://u:***@db.example:5433/chat?sslmode=require",
        )
        self.assertEqual(st.describe("postgres://u@h/d"), "postgres://u@h/d")
        self.assertEqual(
            st.describe("postgresql://u@h/d?sslmode=require&password=s3cr3t&x=1"),
            "postgresql://u@h/d?sslmode=require&password=***&x=1",
        )
        self.assertEqual(st.describe("/var/lib/wsserver.db"), "/var/lib/wsserver.db")


class CommitOrderTests(unittest.TestCase):
    """Ids in commit order across nodes (protocol section 11)."""

    timeout = 120

    @defer.inlineCallbacks
    def test_a_tailing_reader_never_sees_an_id_below_one_it_has_seen(self):
        """Several writer nodes (stores with pools of their own) store messages at once
        while a reader on another node follows the stream with since: no id ever
        appears below the reader's high-water mark, and following with since misses
        none of the stored messages."""
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        with pg.connect(url) as conn:
            conn.execute(
                "INSERT INTO users VALUES ('alice', 'A', %s, 1), ('bob', 'B', %s, 1)",
                (b"\x01", b"\x01"),
            )
        writers = [st.open_store(url, reactor) for _ in range(4)]
        reader = st.open_store(url, reactor)
        for store in [*writers, reader]:
            self.addCleanup(store.close)
        rounds, per_round = 40, 8
        done = []
        seen: list[int] = []
        seen_ids: set[int] = set()
        below: list[tuple[int, int]] = []

        @defer.inlineCallbacks
        def write(store):
            for r in range(rounds):
                results = yield defer.gatherResults(
                    [store.add_message(new_message(content=f"{r}.{i}")) for i in range(per_round)]
                )
                self.assertEqual({kind for kind, _ in results}, {st.STORED})
            done.append(store)

        @defer.inlineCallbacks
        def follow():
            high = 0
            while True:
                finished = len(done) == len(writers)
                page = yield reader.replay_page("bob", high, high, 1000)
                for msg in page:
                    if msg.id <= high:
                        below.append((msg.id, high))
                    seen.append(msg.id)
                    seen_ids.add(msg.id)
                    high = max(high, msg.id)
                # Anything at or below the mark that the reader did not see became
                # visible after a larger id: since would have skipped it for good.
                rows = yield reader._pool.runQuery(
                    "SELECT id FROM messages WHERE id <= %s", (high,)
                )
                below.extend((row[0], high) for row in rows if row[0] not in seen_ids)
                if finished and not page:
                    return
                yield task.deferLater(reactor, 0, lambda: None)

        following = follow()
        yield defer.gatherResults([write(store) for store in writers])
        yield following
        self.assertEqual(below, [])
        total = len(writers) * rounds * per_round
        stored = yield reader.count_messages()
        self.assertEqual(stored, total)
        self.assertEqual(len(seen), total)
        self.assertEqual(seen, sorted(set(seen)))
        # Every writer committed batches of its own, interleaved with the others.
        self.assertGreater(sum(store.batches for store in writers), len(writers))


class BatchRowsTests(unittest.TestCase):
    """A batch's rows travel as one JSON parameter: every field of every kind
    of text and signature comes back exactly as it was given."""

    @defer.inlineCallbacks
    def test_awkward_fields_round_trip_in_one_batch(self):
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        with pg.connect(url) as conn:
            conn.execute(
                "INSERT INTO users VALUES ('alice', 'A', %s, 1), ('bob', 'B', %s, 1)",
                (b"\x01", b"\x01"),
            )
        store = st.open_store(url, reactor)
        self.addCleanup(store.close)
        contents = [
            'quote " backslash \\ slash / {"json": [1, "x"]}',
            "controls \x01\x1f\t\r\n and \u2028\u2029 separators",
            "astral \U0001f600\U0010fffd, combining e\u0301, rtl \u202e",
            "",
            "x" * 5000,
        ]
        signatures = [bytes(range(64)), None, b"\xff" * 64, None, bytes(range(255, 191, -1))]
        news = [
            st.NewMessage("alice", "bob", c, sig, f"n-{i}" if i % 2 else None, VERIFIED, 10 + i)
            for i, (c, sig) in enumerate(zip(contents, signatures, strict=True))
        ]
        before = store.batches
        results = yield defer.gatherResults([store.add_message(new) for new in news])
        self.assertEqual(store.batches - before, 1)
        for new, (kind, msg) in zip(news, results, strict=True):
            self.assertEqual(kind, st.STORED)
            got = yield store.get_message(msg.id)
            self.assertEqual(
                (got.sender, got.recipient, got.content, got.signature, got.nonce),
                (new.sender, new.recipient, new.content, new.signature, new.nonce),
            )
            self.assertEqual((got.verification, got.created_ms), (new.verification, new.created_ms))


class DeliveryMarkPlanTests(unittest.TestCase):
    """The batch's delivery marks find their rows by primary key, not by scanning
    the partial index of pending messages (its cost grew with every message
    marked since the last vacuum: most of a cluster's PostgreSQL CPU)."""

    def plans(self, url: str, ids: list[int]) -> list[str]:
        with pg.connect(url) as conn:
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, verification, status,"
                " created_ms) SELECT g, 'u' || (g % 50), 'r' || (g % 50), 'hello',"
                " 'unsigned', CASE WHEN g > 19950 THEN 'pending' ELSE 'delivered' END, 0"
                " FROM generate_series(1, 20000) AS g"
            )
            conn.execute("ANALYZE messages")
            found = []
            custom = conn.execute(b"EXPLAIN " + pg._SQL_DELIVERED.encode(), (ids,)).fetchall()
            found.append("\n".join(row[0] for row in custom))
            # The plan a prepared statement may settle on (psycopg prepares a
            # statement once it has run it five times).
            conn.execute("SET plan_cache_mode = force_generic_plan")
            conn.execute(
                b"PREPARE marks (bigint[]) AS " + pg._SQL_DELIVERED.replace("%s", "$1").encode()
            )
            array = "{" + ",".join(str(i) for i in ids) + "}"
            generic = conn.execute(
                psycopg.sql.SQL("EXPLAIN EXECUTE marks ({})").format(psycopg.sql.Literal(array))
            ).fetchall()
            found.append("\n".join(row[0] for row in generic))
            conn.rollback()
        return found

    def test_marks_use_the_primary_key(self):
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        for plan in self.plans(url, list(range(19960, 20000))):
            self.assertIn("messages_pkey", plan)
            self.assertNotIn("messages_pending", plan)


class ReplayPlanTests(unittest.TestCase):
    """A since replay reads a page, not the client's whole backlog: the three
    branches are merged in id order and the merge stops at the page."""

    def test_a_far_since_merges_and_stops_at_the_page(self):
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        with pg.connect(url) as conn:
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, verification, status,"
                " created_ms) SELECT g, 'u' || (g % 7), CASE WHEN g % 10 = 0 THEN '*'"
                " ELSE 'r' || (g % 20) END, 'hello', 'unsigned',"
                " CASE WHEN g > 99000 THEN 'pending' ELSE 'delivered' END, 0"
                " FROM generate_series(1, 100000) AS g"
            )
            conn.execute("ANALYZE messages")
            args = ("r1", 0, 0, 256, "r1", 0, 256, "*", 0, 256, 256)
            plans = []
            custom = conn.execute(b"EXPLAIN " + pg._SQL_SINCE.encode(), args).fetchall()
            plans.append([row[0] for row in custom])
            conn.execute("SET plan_cache_mode = force_generic_plan")
            sql = pg._SQL_SINCE
            for i in range(1, len(args) + 1):
                sql = sql.replace("%s", f"${i}", 1)
            types = (
                "text, bigint, bigint, bigint, text, bigint, bigint, text, bigint, bigint, bigint"
            )
            conn.execute(f"PREPARE since_page ({types}) AS {sql}".encode())
            literal = ", ".join(psycopg.sql.Literal(a).as_string(conn) for a in args)
            generic = conn.execute(f"EXPLAIN EXECUTE since_page ({literal})".encode()).fetchall()
            plans.append([row[0] for row in generic])
            conn.rollback()
        for plan in plans:
            self.assertTrue(plan_stops_early("postgresql", plan), "\n".join(plan))


class TerminatedBackendTests(unittest.TestCase):
    """A node's database connection terminated (pg_terminate_backend)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_only_the_batch_in_flight_fails_and_the_store_recovers(self):
        """When the backend running a batch is terminated mid-transaction, the senders
        of that batch get a failure (no ack), nothing of it is stored, and the next
        messages are stored through a new connection without any intervention."""
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        store = st.open_store(url, reactor)
        self.addCleanup(store.close)
        yield store.add_user(st.User("bob", "Bob", b"\x01" * 32, 1))
        _, first = yield store.add_message(new_message())
        # Hold the stream head so the next batch waits inside its transaction.
        blocker = psycopg.connect(url)
        self.addCleanup(blocker.close)
        blocker.execute("SELECT last_id FROM stream_head FOR UPDATE")
        in_flight = [store.add_message(new_message(content=str(i))) for i in range(3)]
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]

        def terminate_waiting() -> int:
            with psycopg.connect(url, autocommit=True) as conn:
                for _ in range(300):
                    rows = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND wait_event_type = 'Lock'",
                        (name,),
                    ).fetchall()
                    if rows:
                        return len(rows)
                    threading.Event().wait(0.1)
            return 0

        terminated = yield threads.deferToThread(terminate_waiting)
        self.assertEqual(terminated, 1)
        blocker.rollback()
        results = yield defer.DeferredList(in_flight, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [False, False, False])
        self.flushLoggedErrors()  # the failed batch and adbapi's rollback are logged
        kind, later = yield store.add_message(new_message(content="after"))
        self.assertEqual(kind, st.STORED)
        self.assertGreater(later.id, first.id)
        count = yield store.count_messages()
        self.assertEqual(count, 2)


class PostgresUrlTests(unittest.TestCase):
    """Which DATABASE values choose PostgreSQL."""

    def test_postgres_urls_choose_postgresql(self):
        """postgresql:// and postgres:// URLs are PostgreSQL; paths are SQLite files."""
        self.assertTrue(st.is_postgres("postgresql://u@h/d"))
        self.assertTrue(st.is_postgres("postgres://u@h/d"))
        self.assertFalse(st.is_postgres("wsserver.db"))
        self.assertFalse(st.is_postgres("./postgresql://x"))
