"""The store: one conformance suite any ``IStore`` must pass (``StoreContract``),
run here on SQLite and in test_store_postgres.py on PostgreSQL, plus the
SQLite schema versions and their upgrade path."""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from wsserver import keylog
from wsserver import store as st
from wsserver.messages import BROADCAST, PENDING, UNSIGNED, VERIFIED
from wsserver.store import sqlite as sq

SECRET = b"k" * 32


def new_message(sender="alice", to="bob", content="hi", nonce=None, ms=1000):
    return st.NewMessage(sender, to, content, None, nonce, UNSIGNED, ms)


class StoreContract:
    """Behaviour every store engine must show.  Subclasses define make_store() (a
    fresh, prepared, empty database's store) and make_read_only(on) (make the
    database refuse writes, or accept them again)."""

    def make_store(self) -> st.IStore:
        raise NotImplementedError

    def make_read_only(self, on: bool):
        raise NotImplementedError

    def test_provides_the_interface(self):
        """The store provides IStore, so the rest of the server may rely on it."""
        from zope.interface.verify import verifyObject

        self.assertTrue(verifyObject(st.IStore, self.store))

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        for user_id in ("alice", "bob", "carol"):
            added = yield self.store.add_user(st.User(user_id, user_id.title(), b"\x01" * 32, 5))
            self.assertTrue(added)

    @defer.inlineCallbacks
    def test_users(self):
        """Users are stored whole; a taken id is refused; unknown ids are None."""
        user = yield self.store.get_user("alice")
        self.assertEqual(user, st.User("alice", "Alice", b"\x01" * 32, 5))
        again = yield self.store.add_user(st.User("alice", "Other", b"\x02" * 32, 6))
        self.assertFalse(again)
        user = yield self.store.get_user("alice")
        self.assertEqual(user.username, "Alice")
        missing = yield self.store.get_user("zed")
        self.assertIsNone(missing)

    @defer.inlineCallbacks
    def test_jwt_secret_is_the_prepared_one(self):
        """The running store reads the JWT secret prepare_database kept, so every
        process on the database signs and checks tokens with one secret."""
        secret = yield self.store.jwt_secret()
        self.assertEqual(secret, SECRET)

    @defer.inlineCallbacks
    def test_challenges(self):
        """Challenges are tried newest first and consumed; expired ones and all but the
        newest five of a user are forgotten; a named challenge is tried alone."""
        for i in range(7):
            yield self.store.add_challenge("alice", f"c{i}", 100 + i, 1000)
        yield self.store.add_challenge("bob", "b0", 100, 1000)
        tried = []

        def check(candidate):
            tried.append(candidate)
            return candidate == "c3"

        outcome = yield self.store.consume_challenge("alice", None, 200, check)
        self.assertEqual(outcome, st.CHALLENGE_OK)
        self.assertEqual(tried, ["c6", "c5", "c4", "c3"])  # c0, c1 were forgotten
        outcome = yield self.store.consume_challenge("alice", "c6", 200, lambda c: True)
        self.assertEqual(outcome, st.CHALLENGE_NONE)  # consumed already
        outcome = yield self.store.consume_challenge("alice", None, 200, lambda c: False)
        self.assertEqual(outcome, st.CHALLENGE_BAD)  # c2 tried and consumed
        outcome = yield self.store.consume_challenge("alice", None, 200, lambda c: True)
        self.assertEqual(outcome, st.CHALLENGE_NONE)
        outcome = yield self.store.consume_challenge("bob", None, 1000, lambda c: True)
        self.assertEqual(outcome, st.CHALLENGE_NONE)  # expired
        outcome = yield self.store.consume_challenge("bob", None, 999, lambda c: True)
        self.assertEqual(outcome, st.CHALLENGE_OK)

    @defer.inlineCallbacks
    def test_group_commit_one_transaction_for_a_burst(self):
        """Messages queued in one reactor turn are committed by one batch, ids in order."""
        before = self.store.batches
        results = yield defer.gatherResults(
            [self.store.add_message(new_message(content=str(i))) for i in range(50)]
        )
        self.assertEqual(self.store.batches - before, 1)
        ids = [msg.id for kind, msg in results]
        self.assertEqual([kind for kind, _ in results], [st.STORED] * 50)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 50)
        count = yield self.store.count_messages()
        self.assertEqual(count, 50)

    @defer.inlineCallbacks
    def test_stored_message_round_trips(self):
        """Every field comes back as stored; status starts pending."""
        new = st.NewMessage("alice", "bob", "héllo\n😀", b"\x07" * 64, "n-1", VERIFIED, 1234)
        kind, msg = yield self.store.add_message(new)
        self.assertEqual(kind, st.STORED)
        got = yield self.store.get_message(msg.id)
        self.assertEqual(got, msg)
        self.assertEqual(
            (got.content, got.signature, got.status), ("héllo\n😀", b"\x07" * 64, PENDING)
        )

    @defer.inlineCallbacks
    def test_duplicate_nonce_returns_the_first(self):
        """A second message with the sender's nonce is not stored; the first is returned."""
        _, first = yield self.store.add_message(new_message(nonce="n-1", content="a"))
        kind, dup = yield self.store.add_message(new_message(nonce="n-1", content="b"))
        self.assertEqual(kind, st.DUPLICATE)
        self.assertEqual((dup.id, dup.content), (first.id, "a"))
        # Another sender may use the same nonce.
        kind, _ = yield self.store.add_message(new_message(sender="carol", nonce="n-1"))
        self.assertEqual(kind, st.STORED)
        count = yield self.store.count_messages()
        self.assertEqual(count, 2)

    @defer.inlineCallbacks
    def test_duplicates_within_one_batch(self):
        """Two sends with one nonce in the same batch store one message."""
        results = yield defer.gatherResults(
            [self.store.add_message(new_message(nonce="same")) for _ in range(3)]
        )
        self.assertEqual([k for k, _ in results], [st.STORED, st.DUPLICATE, st.DUPLICATE])
        self.assertEqual(len({m.id for _, m in results}), 1)

    @defer.inlineCallbacks
    def test_unknown_recipient_stores_nothing(self):
        """A message to an unregistered user is refused, and nothing is stored."""
        kind, msg = yield self.store.add_message(new_message(to="nobody"))
        self.assertEqual((kind, msg), (st.NO_RECIPIENT, None))
        count = yield self.store.count_messages()
        self.assertEqual(count, 0)
        kind, _ = yield self.store.add_message(new_message(to=BROADCAST))
        self.assertEqual(kind, st.STORED)

    @defer.inlineCallbacks
    def test_pending_replay_and_delivery_marks(self):
        """Pending direct messages replay in id order; delivered ones no longer do."""
        ids = []
        for i in range(5):
            _, msg = yield self.store.add_message(new_message(content=str(i)))
            ids.append(msg.id)
        yield self.store.add_message(new_message(to="carol"))
        yield self.store.add_message(new_message(to=BROADCAST))
        page = yield self.store.replay_page("bob", None, 0, 100)
        self.assertEqual([m.id for m in page], ids)
        self.store.mark_delivered(ids[:2])
        yield self.store.drain()
        page = yield self.store.replay_page("bob", None, 0, 100)
        self.assertEqual([m.id for m in page], ids[2:])
        page = yield self.store.replay_page("bob", None, ids[2], 1)
        self.assertEqual([m.id for m in page], [ids[3]])

    @defer.inlineCallbacks
    def test_since_replay(self):
        """With since: pending ones whatever their id, then everything direct or broadcast
        above since, in id order, never another user's direct messages."""
        _, old_pending = yield self.store.add_message(new_message(content="old"))
        _, old_done = yield self.store.add_message(new_message(content="done"))
        self.store.mark_delivered([old_done.id])
        _, mid = yield self.store.add_message(new_message(content="mid"))
        self.store.mark_delivered([mid.id])
        _, bcast = yield self.store.add_message(new_message(sender="bob", to=BROADCAST))
        self.store.mark_broadcast(bcast.id, 3)
        _, other = yield self.store.add_message(new_message(to="carol"))
        _, late = yield self.store.add_message(new_message(content="late"))
        yield self.store.drain()
        page = yield self.store.replay_page("bob", old_done.id, 0, 100)
        self.assertEqual([m.id for m in page], [old_pending.id, mid.id, bcast.id, late.id])
        self.assertEqual(page[2].recipients, 3)
        page = yield self.store.replay_page("bob", old_done.id, mid.id, 100)
        self.assertEqual([m.id for m in page], [bcast.id, late.id])
        self.assertNotIn(other.id, [m.id for m in page])

    @defer.inlineCallbacks
    def test_messages_between_and_stream_head(self):
        """messages_between reads every message (any recipient, broadcasts too) with
        after < id <= upto, by id and up to the limit; stream_head is the largest id."""
        head = yield self.store.stream_head()
        self.assertEqual(head, 0)
        ids = []
        for to in ("bob", "carol", BROADCAST, "bob"):
            _, msg = yield self.store.add_message(new_message(to=to, content=to))
            ids.append(msg.id)
        head = yield self.store.stream_head()
        self.assertEqual(head, ids[-1])
        page = yield self.store.messages_between(ids[0], ids[3], 100)
        self.assertEqual([m.id for m in page], ids[1:])
        self.assertEqual([m.recipient for m in page], ["carol", BROADCAST, "bob"])
        page = yield self.store.messages_between(0, ids[2], 2)
        self.assertEqual([m.id for m in page], ids[:2])
        page = yield self.store.messages_between(ids[3], ids[3] + 10, 100)
        self.assertEqual(page, [])

    @defer.inlineCallbacks
    def test_write_failure_fails_the_batch_and_the_store_recovers(self):
        """When the database refuses writes every sender of the batch gets a failure,
        nothing is stored, and later writes succeed again."""
        yield self.make_read_only(True)
        results = yield defer.DeferredList(
            [self.store.add_message(new_message(content=str(i))) for i in range(3)],
            consumeErrors=True,
        )
        self.assertEqual([ok for ok, _ in results], [False, False, False])
        self.assertTrue(self.flushLoggedErrors())  # the failure is logged
        yield self.make_read_only(False)
        count = yield self.store.count_messages()
        self.assertEqual(count, 0)
        kind, _ = yield self.store.add_message(new_message())
        self.assertEqual(kind, st.STORED)

    @defer.inlineCallbacks
    def test_drain_and_close(self):
        """close() commits what is queued, then refuses new writes."""
        d = self.store.add_message(new_message())
        yield self.store.close()
        kind, _ = yield d
        self.assertEqual(kind, st.STORED)
        with self.assertRaises(st.StoreClosed):
            yield self.store.add_message(new_message())


class SQLiteStoreTests(StoreContract, unittest.TestCase):
    def make_store(self) -> st.Store:
        self.path = self.mktemp()
        st.prepare_database(self.path, lambda: SECRET)
        store = st.Store(self.path, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def make_read_only(self, on: bool):
        return self.store._pool.runOperation(f"PRAGMA query_only = {int(on)}")

    def test_pragmas(self):
        """The file is in WAL mode and the schema is at the newest version."""
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(st.schema_version(conn), st.migrations()[-1][0])


class SchemaTests(unittest.TestCase):
    def test_secret_is_generated_once_and_kept(self):
        """The first start stores a secret; later starts get the same one back."""
        path = self.mktemp()
        first = st.prepare_database(path, lambda: b"a" * 32)
        second = st.prepare_database(path, lambda: b"b" * 32)
        self.assertEqual(first, second)
        self.assertEqual(first, b"a" * 32)

    def test_upgrade_from_version_1_keeps_data(self):
        """A version-1 database upgrades: users and messages survive, repeated nonces
        keep their first owner, and the new unique index holds."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        st.upgrade(conn, target=1)
        self.assertEqual(st.schema_version(conn), 1)
        conn.execute("INSERT INTO users VALUES ('alice', 'A', x'01', 1)")
        rows = [
            ("alice", "bob", "one", "n-1"),
            ("alice", "bob", "two", "n-1"),
            ("alice", "bob", "three", None),
        ]
        conn.executemany(
            "INSERT INTO messages (sender, recipient, content, nonce, verification, created_ms)"
            " VALUES (?, ?, ?, ?, 'unsigned', 1)",
            rows,
        )
        conn.close()
        st.prepare_database(path, lambda: SECRET)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(st.schema_version(conn), st.migrations()[-1][0])
        got = conn.execute("SELECT content, nonce, status, recipients FROM messages ORDER BY id")
        self.assertEqual(
            got.fetchall(),
            [
                ("one", "n-1", "pending", None),
                ("two", None, "pending", None),
                ("three", None, "pending", None),
            ],
        )
        with self.assertRaises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO messages (sender, recipient, content, nonce, verification,"
                " created_ms) VALUES ('alice', 'bob', 'x', 'n-1', 'unsigned', 1)"
            )

    @defer.inlineCallbacks
    def test_upgrade_from_version_3_gives_every_user_entry_0(self):
        """A version-3 database with users and messages upgrades to version 4:
        each user's key becomes entry 0 of their key log (at their creation
        time) and their one active key, generation 0; messages survive with no
        key_id; the store then serves keys, appends and signed messages."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        st.upgrade(conn, target=3)
        conn.executemany(
            "INSERT INTO users VALUES (?, ?, ?, ?)",
            [("alice", "A", b"\x01" * 32, 11), ("bob", "B", b"\x02" * 32, 22)],
        )
        conn.execute(
            "INSERT INTO messages (sender, recipient, content, verification, created_ms)"
            " VALUES ('alice', 'bob', 'kept', 'unsigned', 7)"
        )
        conn.commit()
        conn.close()
        st.prepare_database(path, lambda: SECRET)
        store = sq.Store(path, reactor)
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
        self.assertEqual((kind, (yield store.get_message(new.id)).key_id), (st.STORED, "kid"))
        self.assertEqual((yield store.revoke_tokens("alice", 9)), 1)

    def test_newer_schema_is_refused(self):
        """A database from a newer server is not touched."""
        path = self.mktemp()
        st.prepare_database(path, lambda: SECRET)
        conn = sqlite3.connect(path)
        conn.execute("UPDATE schema_version SET version = 99")
        conn.commit()
        conn.close()
        with self.assertRaises(st.DatabaseError):
            st.prepare_database(path, lambda: SECRET)

    def test_unopenable_database_is_a_clear_error(self):
        """A path in a missing directory fails with DatabaseError naming the path."""
        with self.assertRaises(st.DatabaseError) as ctx:
            st.prepare_database("/nonexistent/dir/x.db", lambda: SECRET)
        self.assertIn("/nonexistent/dir/x.db", str(ctx.exception))

    def test_migrations_are_numbered_from_one(self):
        """Shipped schema files are versions 1..N without gaps."""
        versions = [v for v, _ in st.migrations()]
        self.assertEqual(versions, list(range(1, len(versions) + 1)))


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class FileModeTests(unittest.TestCase):
    """The database holds the JWT secret: only its owner may read it."""

    def with_umask(self, mask: int) -> None:
        old = os.umask(mask)
        self.addCleanup(os.umask, old)

    def capture_log(self) -> list[str]:
        lines: list[str] = []

        def observe(event: dict) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    @defer.inlineCallbacks
    def test_new_database_and_its_companions_are_owner_only_whatever_the_umask(self):
        """Under a permissive umask (022, 000) and a strict one (277, which would
        leave the owner unable to write), a new database file is created 0600, and
        the -wal and -shm files SQLite makes beside it while the store runs are
        0600 too; no warning is logged for them."""
        for mask in (0o022, 0o000, 0o277):
            path = self.mktemp()  # makes its directory: before the umask
            self.with_umask(mask)
            lines = self.capture_log()
            st.prepare_database(path, lambda: SECRET)
            self.assertEqual(mode_of(path), 0o600, oct(mask))
            store = st.Store(path, reactor)
            added = yield store.add_user(st.User("alice", "A", b"\x01" * 32, 1))
            self.assertTrue(added)
            for companion in (path + "-wal", path + "-shm"):
                self.assertTrue(os.path.exists(companion), companion)
                self.assertEqual(mode_of(companion), 0o600, (companion, oct(mask)))
            yield store.close()
            self.assertEqual([line for line in lines if "chmod" in line], [])

    def test_existing_readable_database_gets_a_warning_naming_the_fix(self):
        """An existing database file that group or others can read is opened (it is
        the operator's file) with a warning naming the file and `chmod 600 <file>`;
        an owner-only one gets no warning."""
        path = os.path.abspath(self.mktemp())
        st.prepare_database(path, lambda: SECRET)
        os.chmod(path, 0o644)
        lines = self.capture_log()
        st.prepare_database(path, lambda: SECRET)
        warnings = [line for line in lines if path in line]
        self.assertEqual(len(warnings), 1, lines)
        self.assertIn(f"chmod 600 {path}", warnings[0])
        self.assertEqual(mode_of(path), 0o644)
        os.chmod(path, 0o600)
        del lines[:]
        st.prepare_database(path, lambda: SECRET)
        self.assertEqual([line for line in lines if path in line], [])


class FileClaimTests(unittest.TestCase):
    """Servers sharing one SQLite file must all have a broker, or be alone."""

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.addCleanup(sq.release_file, self.path)

    def second_claim(self, has_broker: bool) -> None:
        """Claim the file as another process would: a lock file of its own
        (the claim of this process is kept in a table, so forget it first)."""
        held = sq._claims.pop(self.path)
        self.addCleanup(os.close, held)
        sq.claim_file(self.path, st.NodeInfo("other", has_broker))

    def test_a_node_without_a_broker_is_alone(self):
        """A node without a broker holds the file: a second one, with or without a
        broker, is refused with one line naming DATABASE and BROKER; once the first
        lets go, the file can be claimed again."""
        st.prepare_database(self.path, lambda: SECRET, st.NodeInfo("one", False))
        for has_broker in (False, True):
            with self.assertRaises(st.DatabaseError) as ctx:
                held = sq._claims.pop(self.path)
                try:
                    sq.claim_file(self.path, st.NodeInfo("two", has_broker))
                finally:
                    sq._claims[self.path] = held
            text = str(ctx.exception)
            self.assertTrue(text.startswith("DATABASE: "), text)
            self.assertIn("BROKER", text)
            self.assertEqual(len(text.splitlines()), 1)
        sq.release_file(self.path)
        sq.claim_file(self.path, st.NodeInfo("two", False))

    def test_nodes_with_a_broker_share_the_file(self):
        """Nodes that all have a broker share the file; one without is refused
        beside them."""
        st.prepare_database(self.path, lambda: SECRET, st.NodeInfo("one", True))
        self.second_claim(True)
        self.assertIn(self.path, sq._claims)
        held = sq._claims.pop(self.path)
        self.addCleanup(os.close, held)
        with self.assertRaises(st.DatabaseError):
            sq.claim_file(self.path, st.NodeInfo("three", False))

    def test_preparing_without_a_node_claims_nothing(self):
        """Tools and tests that only prepare the file (no node) leave it free."""
        st.prepare_database(self.path, lambda: SECRET)
        self.assertNotIn(self.path, sq._claims)
        sq.claim_file(self.path, st.NodeInfo("one", False))
        self.assertIn(self.path, sq._claims)
