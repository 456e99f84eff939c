"""The store's side of protocol section 12 on SQLite and on PostgreSQL: the
key log (entry 0 at registration, appends checked inside the transaction,
racing appends), the active keys, sign-out (one token, every token) and
account deletion, and the key_id each message carries.  One suite
(``KeyStoreContract``) runs on both engines, with the shared vectors: alice
registers with the vector key, entries 1 and 2 of the vector log are
appended and read back identical, and the vector deletion statement deletes
her."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from nacl.signing import SigningKey
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from wsserver import keylog
from wsserver import store as st
from wsserver.keylog import Entry, KeyLogError
from wsserver.messages import UNSIGNED, VERIFIED, b64decode
from wsserver.store import postgres as pg
from wsserver.store import sqlite as sq

from .support import VECTORS, vector_entry

SECRET = b"k" * 32
LOG = VECTORS["keylog"]
ALICE = LOG["user_id"]
ALICE_KEY = b64decode(LOG["entries"][0]["public_key"])
SECOND_KEY = b64decode(LOG["second_device"]["public_key"])
ALICE_SIGNER = SigningKey(bytes.fromhex(VECTORS["users"]["alice"]["secret_seed_hex"]))
SECOND_SIGNER = SigningKey(bytes.fromhex(LOG["second_device"]["secret_seed_hex"]))
CREATED_MS = 1_700_000_000_000
DEADLINE = 30.0  # seconds a test waits for something another thread does


def checked(user_id: str, entry: Entry, seen: list | None = None) -> Callable[[list], None]:
    """The check a server passes: ``entry`` must be the valid next entry of
    the log as stored (``keylog.apply``).  ``seen`` collects the logs it was
    given."""

    def check(entries: list[Entry]) -> None:
        if seen is not None:
            seen.append(list(entries))
        keylog.apply(keylog.replay(user_id, entries, verify=False), user_id, entry)

    return check


def deletion_check(user_id: str, key_id: str, signature: bytes) -> Callable[[list], None]:
    """The check a server passes to delete_account: the signature by an
    active key over the deletion string with the log's next seq."""

    def check(entries: list[Entry]) -> None:
        state = keylog.replay(user_id, entries, verify=False)
        key = state.active.get(key_id)
        string = keylog.delete_string(user_id, state.next_seq)
        if key is None or not keylog.signature_ok(key, string, signature):
            raise KeyLogError("invalid_signature", "the deletion is not signed")

    return check


def signed_add(user_id: str, seq: int, prev: str, signer: SigningKey, new: SigningKey) -> Entry:
    """An ``add`` of ``new``'s key at ``seq`` after ``prev``, signed by both."""
    public = bytes(new.verify_key)
    string = keylog.entry_string(user_id, seq, keylog.ADD, public, prev)
    return Entry(
        seq,
        keylog.ADD,
        public,
        "laptop",
        keylog.key_id(bytes(signer.verify_key)),
        signer.sign(string.encode()).signature,
        new.sign(string.encode()).signature,
    )


def head_after(user_id: str, entries: list[Entry]) -> str:
    return keylog.replay(user_id, entries, verify=False).head


def message(sender: str, to: str, content: str, key_id: str | None = None, nonce=None):
    sig = None if key_id is None else b"\x07" * 64
    verification = UNSIGNED if key_id is None else VERIFIED
    return st.NewMessage(sender, to, content, sig, nonce, verification, 10, key_id)


@defer.inlineCallbacks
def wait_for(condition: Callable[[], Any], what: str) -> Any:
    """Poll ``condition`` (it may return a Deferred) until it is true."""
    deadline = reactor.seconds() + DEADLINE
    while True:
        value = yield defer.maybeDeferred(condition)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


class KeyStoreContract:
    """What both engines must do for section 12.  Subclasses define
    ``make_store()`` (a fresh, prepared database's store; a second call
    opens another store on the same database, as another node would) and
    ``rows(table)`` (every row of a table as dicts, read on a connection of
    the test's own)."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def rows(self, table: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def tables(self) -> list[str]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        added = yield self.store.add_user(st.User(ALICE, "Alice", ALICE_KEY, CREATED_MS))
        self.assertTrue(added)
        for user_id in ("bob", "carol"):
            key = bytes(SigningKey(user_id.encode().ljust(32, b".")).verify_key)
            added = yield self.store.add_user(st.User(user_id, user_id.title(), key, CREATED_MS))
            self.assertTrue(added)

    def snapshot(self) -> dict[str, list]:
        """Every row of every table, in a stable order."""
        return {table: sorted(self.rows(table), key=repr) for table in self.tables()}

    @defer.inlineCallbacks
    def append_vectors(self) -> Any:
        """Append entries 1 and 2 of the vector log to alice's."""
        stored = []
        for index in (1, 2):
            entry = vector_entry(index, at_ms=CREATED_MS + index)
            got = yield self.store.append_key_entry(ALICE, entry, checked(ALICE, entry))
            stored.append(got)
        return stored

    # -- registration -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_registration_writes_entry_0_and_the_first_key(self):
        """add_user writes entry 0 (register, the key, at = created, no
        signatures) and makes the key the one active key, generation 0."""
        log = yield self.store.key_log(ALICE)
        self.assertEqual(log, [Entry(0, keylog.REGISTER, ALICE_KEY, at_ms=CREATED_MS)])
        keys = yield self.store.user_keys(ALICE)
        self.assertEqual(
            keys,
            st.UserKeys((st.KeyRecord(keylog.key_id(ALICE_KEY), ALICE_KEY, None, CREATED_MS),), 0),
        )
        self.assertEqual(keys.keys[0].key_id, VECTORS["key_ids"][0]["key_id"])
        self.assertIsNone((yield self.store.key_log("zed")))
        self.assertIsNone((yield self.store.user_keys("zed")))

    @defer.inlineCallbacks
    def test_a_refused_registration_writes_no_log(self):
        """A taken id writes no second entry 0 (and no key)."""
        again = yield self.store.add_user(st.User(ALICE, "Other", SECOND_KEY, 9))
        self.assertFalse(again)
        self.assertEqual(len((yield self.store.key_log(ALICE))), 1)
        self.assertEqual(len((yield self.store.user_keys(ALICE)).keys), 1)

    # -- appends ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_vector_entries_append_and_read_back_identical(self):
        """Entries 1 (add, by alice's key, with the new key's signature) and 2
        (revoke of alice's first key, by the second) are stored and read back
        field for field; the whole stored log replays with every signature;
        the active keys follow; the revocation is an account event."""
        before_events = yield self.store.last_account_event()
        stored = yield self.append_vectors()
        self.assertEqual(stored, [vector_entry(1, CREATED_MS + 1), vector_entry(2, CREATED_MS + 2)])
        log = yield self.store.key_log(ALICE)
        expected = [vector_entry(0, CREATED_MS), *stored]
        self.assertEqual(log, expected)
        state = keylog.replay(ALICE, log)  # every signature, every prev
        self.assertEqual(list(state.active), [keylog.key_id(SECOND_KEY)])
        keys = yield self.store.user_keys(ALICE)
        self.assertEqual(
            keys.keys, (st.KeyRecord(keylog.key_id(SECOND_KEY), SECOND_KEY, None, CREATED_MS + 1),)
        )
        # The user's public_key is the first key still active.
        self.assertEqual((yield self.store.get_user(ALICE)).public_key, SECOND_KEY)
        events = yield self.store.account_events(before_events, 10)
        self.assertEqual(
            [e[1:] for e in events], [(ALICE, st.EVENT_KEY_REVOKED, keylog.key_id(ALICE_KEY))]
        )

    @defer.inlineCallbacks
    def test_an_added_key_keeps_its_name_and_order(self):
        """Keys are listed oldest first with the name the approving device gave."""
        third = SigningKey(b"3" * 32)
        log = yield self.store.key_log(ALICE)
        entry = signed_add(ALICE, 1, head_after(ALICE, log), ALICE_SIGNER, third)
        got = yield self.store.append_key_entry(ALICE, entry, checked(ALICE, entry))
        self.assertGreater(got.at_ms, 0)  # the store's clock when the caller gave none
        keys = yield self.store.user_keys(ALICE)
        self.assertEqual([k.public_key for k in keys.keys], [ALICE_KEY, bytes(third.verify_key)])
        self.assertEqual([k.name for k in keys.keys], [None, "laptop"])
        self.assertEqual(keys.keys[1].added_ms, got.at_ms)
        self.assertEqual((yield self.store.key_log(ALICE))[1], got)

    @defer.inlineCallbacks
    def test_a_refused_check_changes_nothing(self):
        """Whatever check refuses (a bad signature, a stale seq, a key already
        there, the last key) fails with its KeyLogError and no row of any
        table changes."""
        before = self.snapshot()
        tampered = vector_entry(1)
        tampered = Entry(
            tampered.seq,
            tampered.action,
            tampered.public_key,
            None,
            tampered.by,
            bytes(64),
            tampered.key_signature,
        )
        stale = vector_entry(2)  # seq 2 while the next is 1
        head = head_after(ALICE, [vector_entry(0)])
        readd = signed_add(ALICE, 1, head, ALICE_SIGNER, ALICE_SIGNER)
        last = Entry(
            1,
            keylog.REVOKE,
            ALICE_KEY,
            None,
            keylog.key_id(ALICE_KEY),
            ALICE_SIGNER.sign(
                keylog.entry_string(ALICE, 1, keylog.REVOKE, ALICE_KEY, head).encode()
            ).signature,
        )
        for entry, code in (
            (tampered, "invalid_signature"),
            (stale, "keylog_conflict"),
            (readd, "key_exists"),
            (last, "last_key"),
        ):
            with self.assertRaises(KeyLogError) as caught:
                yield self.store.append_key_entry(ALICE, entry, checked(ALICE, entry))
            self.assertEqual(caught.exception.code, code)
        self.assertEqual(self.snapshot(), before)

    @defer.inlineCallbacks
    def test_the_store_keeps_seq_whatever_the_check_lets_through(self):
        """An entry whose seq is not the next one is refused keylog_conflict
        even by a check that accepts anything (no gap, no rewrite)."""
        before = self.snapshot()
        for seq in (0, 2):
            entry = Entry(seq, keylog.ADD, SECOND_KEY, None, "x", bytes(64), bytes(64))
            with self.assertRaises(KeyLogError) as caught:
                yield self.store.append_key_entry(ALICE, entry, lambda entries: None)
            self.assertEqual(caught.exception.code, "keylog_conflict")
        self.assertEqual(self.snapshot(), before)

    @defer.inlineCallbacks
    def test_an_unknown_user_has_no_log_to_append_to(self):
        """append_key_entry fires None for an id never registered, without
        calling check."""
        calls = []
        got = yield self.store.append_key_entry("zed", vector_entry(1), calls.append)
        self.assertIsNone(got)
        self.assertEqual(calls, [])

    @defer.inlineCallbacks
    def test_two_stores_racing_for_one_seq(self):
        """Two stores on one database (two nodes) append seq 1 of alice's log
        at once; the first holds its transaction open inside its check.  The
        second waits for it, then is checked against the log with the first's
        entry in it, so it is refused keylog_conflict: exactly one wins."""
        other = self.make_store()
        first = vector_entry(1)
        third = SigningKey(b"3" * 32)
        second = signed_add(ALICE, 1, head_after(ALICE, [vector_entry(0)]), ALICE_SIGNER, third)
        entered, release = threading.Event(), threading.Event()

        def holding(entries: list[Entry]) -> None:
            checked(ALICE, first)(entries)
            entered.set()
            release.wait(DEADLINE)

        seen: list = []
        won = self.store.append_key_entry(ALICE, first, holding)
        self.addCleanup(release.set)
        yield wait_for(entered.is_set, "the first append's check")
        blocked = yield self.watch(other)
        lost = other.append_key_entry(ALICE, second, checked(ALICE, second, seen))
        yield wait_for(blocked, "the second append to wait for the first's lock")
        release.set()
        stored = yield won
        self.assertEqual(stored.seq, 1)
        with self.assertRaises(KeyLogError) as caught:
            yield lost
        self.assertEqual(caught.exception.code, "keylog_conflict")
        # The second's check ran after the first committed, on the log with it.
        self.assertEqual([len(log) for log in seen], [2])
        log = yield self.store.key_log(ALICE)
        self.assertEqual([e.public_key for e in log], [ALICE_KEY, SECOND_KEY])
        self.assertEqual(len((yield other.user_keys(ALICE)).keys), 2)

    @defer.inlineCallbacks
    def test_an_append_racing_a_deletion_finds_no_user(self):
        """A deletion holds its transaction open inside its check while another
        store appends to the same log: the append waits, then finds no user
        (None, its check never called), and no key-log row of the deleted user
        is left behind."""
        other = self.make_store()
        entered, release = threading.Event(), threading.Event()
        delete = LOG["delete"]
        yield self.append_vectors()
        signed = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))

        def holding(entries: list[Entry]) -> None:
            signed(entries)
            entered.set()
            release.wait(DEADLINE)

        deleted = self.store.delete_account(ALICE, 77, holding)
        self.addCleanup(release.set)
        yield wait_for(entered.is_set, "the deletion's check")
        blocked = yield self.watch(other)
        third = SigningKey(b"3" * 32)
        log = [vector_entry(i) for i in range(3)]
        entry = signed_add(ALICE, 3, head_after(ALICE, log), SECOND_SIGNER, third)
        calls: list = []
        appended = other.append_key_entry(ALICE, entry, calls.append)
        yield wait_for(blocked, "the append to wait for the deletion's lock")
        release.set()
        self.assertTrue((yield deleted))
        self.assertIsNone((yield appended))
        self.assertEqual(calls, [])
        self.assertEqual([r for r in self.rows("key_log") if r["user_id"] == ALICE], [])
        self.assertEqual([r for r in self.rows("user_keys") if r["user_id"] == ALICE], [])

    def watch(self, store: Any) -> Any:
        """Fire with a function that tells (or fires with) whether ``store``'s
        append has got as far as the lock it must wait for."""
        raise NotImplementedError

    # -- sign-out -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_revoke_tokens_raises_the_generation(self):
        """Each revoke_tokens raises the user's generation by one, records an
        event with it, and leaves other users alone; an unknown user is None."""
        before = yield self.store.last_account_event()
        self.assertEqual((yield self.store.revoke_tokens(ALICE, 50)), 1)
        self.assertEqual((yield self.store.revoke_tokens(ALICE, 51)), 2)
        self.assertEqual((yield self.store.user_keys(ALICE)).token_gen, 2)
        self.assertEqual((yield self.store.user_keys("bob")).token_gen, 0)
        self.assertIsNone((yield self.store.revoke_tokens("zed", 52)))
        events = yield self.store.account_events(before, 10)
        self.assertEqual(
            [e[1:] for e in events],
            [(ALICE, st.EVENT_SIGNED_OUT_ALL, "1"), (ALICE, st.EVENT_SIGNED_OUT_ALL, "2")],
        )

    @defer.inlineCallbacks
    def test_revoked_tokens_are_kept_until_they_expire(self):
        """A signed-out jti is in revoked_tokens until its expiry, then
        forgotten (its row too); revoking it again changes nothing and records
        no second event."""
        before = yield self.store.last_account_event()
        yield self.store.revoke_token(ALICE, "jti-a", 2000, 1000)
        yield self.store.revoke_token(ALICE, "jti-a", 2000, 1001)
        yield self.store.revoke_token("bob", "jti-b", 3000, 1000)
        self.assertEqual((yield self.store.revoked_tokens(1999)), {"jti-a", "jti-b"})
        self.assertEqual((yield self.store.revoked_tokens(2000)), {"jti-b"})
        self.assertEqual([r["jti"] for r in self.rows("revoked_tokens")], ["jti-b"])
        self.assertEqual((yield self.store.revoked_tokens(3000)), set())
        self.assertEqual(self.rows("revoked_tokens"), [])
        events = yield self.store.account_events(before, 10)
        self.assertEqual(
            [e[1:] for e in events],
            [(ALICE, st.EVENT_SIGNED_OUT, "jti-a"), ("bob", st.EVENT_SIGNED_OUT, "jti-b")],
        )

    @defer.inlineCallbacks
    def test_revoke_token_forgets_the_expired(self):
        """Signing out forgets the tokens whose expiry has passed."""
        yield self.store.revoke_token(ALICE, "old", 100, 50)
        yield self.store.revoke_token(ALICE, "new", 900, 500)
        self.assertEqual([r["jti"] for r in self.rows("revoked_tokens")], ["new"])

    # -- deletion -----------------------------------------------------------------

    @defer.inlineCallbacks
    def fill(self) -> Any:
        """Give every user something in every table section 12 names."""
        for user_id in (ALICE, "bob", "carol"):
            yield self.store.add_challenge(user_id, f"ch-{user_id}", 1, 10**13)
            yield self.store.revoke_token(user_id, f"jti-{user_id}", 10**13, 1)
            yield self.store.revoke_tokens(user_id, 2)
        for sender, to in (
            (ALICE, "bob"),
            ("bob", ALICE),
            (ALICE, "broadcast"),
            ("bob", "carol"),
            ("carol", "broadcast"),
            (ALICE, ALICE),
        ):
            kind, _ = yield self.store.add_message(message(sender, to, f"{sender}>{to}"))
            self.assertEqual(kind, st.STORED)
        yield self.append_vectors()

    @defer.inlineCallbacks
    def test_delete_account_removes_exactly_what_section_12_lists(self):
        """With the vector deletion statement (by the second device's key over
        seq 3): alice, her keys, key log, challenges, signed-out tokens and
        every message from or to her and her conversations rows (both ways)
        go; her id stays as a tombstone with a
        "deleted" event; no row of any other user, and no other table, changes."""
        yield self.fill()
        before = self.snapshot()
        delete = LOG["delete"]
        check = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))
        self.assertTrue((yield self.store.delete_account(ALICE, 77, check)))
        after = self.snapshot()

        def hers(table: str, row: dict) -> bool:
            if table == "messages":
                return ALICE in (row["sender"], row["recipient"])
            if table == "conversations":  # both ways (protocol section 13)
                return ALICE in (row["user_id"], row["peer"])
            return row.get("user_id") == ALICE

        for table in self.tables():
            kept = [row for row in before[table] if not hers(table, row)]
            if table == "deleted_users":
                self.assertEqual(
                    after[table], [{"user_id": ALICE, "deleted_ms": 77, "purged": True}]
                )
            elif table == "account_events":
                new = [row for row in after[table] if row not in before[table]]
                self.assertEqual([(r["user_id"], r["kind"]) for r in new], [(ALICE, "deleted")])
                self.assertEqual([r for r in after[table] if r in before[table]], before[table])
            else:
                self.assertEqual(after[table], kept, table)
        # The counts this amounts to, for the tables section 12 names.
        gone = {t: len(before[t]) - len(after[t]) for t in self.tables()}
        self.assertEqual(
            {t: gone[t] for t in ("users", "user_keys", "key_log", "challenges", "messages")},
            {"users": 1, "user_keys": 1, "key_log": 3, "challenges": 1, "messages": 4},
        )
        self.assertEqual(gone["revoked_tokens"], 1)
        self.assertIsNone((yield self.store.key_log(ALICE)))
        self.assertIsNone((yield self.store.user_keys(ALICE)))
        self.assertIsNone((yield self.store.get_user(ALICE)))
        # The id stays taken for good.
        self.assertFalse((yield self.store.add_user(st.User(ALICE, "New", ALICE_KEY, 99))))
        self.assertIsNone((yield self.store.key_log(ALICE)))
        # A message to her is refused now.
        kind, _ = yield self.store.add_message(message("bob", ALICE, "late"))
        self.assertEqual(kind, st.NO_RECIPIENT)

    @defer.inlineCallbacks
    def test_a_refused_deletion_changes_nothing(self):
        """A deletion the check refuses (signed over an old seq, or by a
        revoked key) changes no row; an unknown user is None."""
        yield self.fill()
        before = self.snapshot()
        delete = LOG["delete"]
        stale = ALICE_SIGNER.sign(keylog.delete_string(ALICE, 1).encode()).signature
        for key_id, signature in (
            (keylog.key_id(ALICE_KEY), stale),  # revoked key, old seq
            (delete["key_id"], stale),
        ):
            with self.assertRaises(KeyLogError):
                yield self.store.delete_account(ALICE, 5, deletion_check(ALICE, key_id, signature))
        self.assertEqual(self.snapshot(), before)
        calls = []
        self.assertIsNone((yield self.store.delete_account("zed", 5, calls.append)))
        self.assertEqual(calls, [])

    # -- the message phase of a deletion ------------------------------------------------

    def messages_of(self, user_id: str) -> list[dict]:
        return [r for r in self.rows("messages") if user_id in (r["sender"], r["recipient"])]

    def tombstone(self, user_id: str) -> dict:
        (row,) = [r for r in self.rows("deleted_users") if r["user_id"] == user_id]
        return row

    def fail_second_page(self) -> list[int]:
        """Make the second page of message deletions fail once (a lock held
        past the timeout, a lost connection); fire with the calls seen."""
        real = self.engine._delete_ids
        calls: list[int] = []

        def failing(cur: Any, ids: list[int]) -> int:
            calls.append(len(ids))
            if len(calls) == 2:
                raise self.engine_error("database is locked")
            return real(cur, ids)

        self.patch(self.engine, "_delete_ids", failing)
        self.patch(self.engine, "DELETE_PAGE", 1)
        return calls

    @defer.inlineCallbacks
    def delete_alice_half_way(self) -> Any:
        """Fill, delete alice with a page of her messages failing: fire when
        the account is gone and part of her messages still there."""
        yield self.fill()
        others = [r for r in self.rows("messages") if ALICE not in (r["sender"], r["recipient"])]
        self.fail_second_page()
        delete = LOG["delete"]
        check = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))
        # The account's removal committed, so the deletion succeeded.
        self.assertTrue((yield self.store.delete_account(ALICE, 77, check)))
        self.assertIsNone((yield self.store.get_user(ALICE)))
        return others

    @defer.inlineCallbacks
    def test_a_message_phase_that_failed_is_finished_when_a_node_starts(self):
        """A deletion whose message phase failed half-way leaves the tombstone
        unpurged; another store (a node) finishes it as it starts: every
        message from or to alice goes, no other, and the tombstone is marked."""
        others = yield self.delete_alice_half_way()
        self.assertEqual(len(self.messages_of(ALICE)), 3)  # of 4: the first page went
        self.assertFalse(self.tombstone(ALICE)["purged"])
        node = self.make_store()
        yield node.start()
        yield wait_for(lambda: self.tombstone(ALICE)["purged"], "the tombstone to be purged")
        self.assertEqual(self.messages_of(ALICE), [])
        self.assertEqual(sorted(self.rows("messages"), key=repr), sorted(others, key=repr))
        # Nothing is left for a later pass.
        self.assertEqual((yield node.finish_deletions()), 0)

    @defer.inlineCallbacks
    def test_a_message_phase_that_failed_is_finished_while_running(self):
        """On a store already running (its first pass done, with nothing to do),
        a later pass finishes a deletion whose message phase failed."""
        yield self.store.start(purge_interval=0.05)
        self.assertEqual((yield self.store.finish_deletions()), 0)
        yield self.delete_alice_half_way()
        yield wait_for(lambda: self.tombstone(ALICE)["purged"], "the tombstone to be purged")
        self.assertEqual(self.messages_of(ALICE), [])

    @defer.inlineCallbacks
    def test_the_message_phase_goes_a_page_at_a_time(self):
        """With pages of 2 and slices of 3 ids, a user's messages (sent,
        received, broadcast, to themself) all go, in pages of at most 2, each
        page looking at no more than 3 ids (a full page goes on from its last
        id, the others from the end of their slice); other users' stay; late
        messages above a head go the same way (purge_user_messages)."""
        yield self.fill()
        for i in range(5):
            yield self.store.add_message(message("carol", ALICE, f"more {i}"))
        yield self.store.drain()
        ids = sorted(r["id"] for r in self.rows("messages"))
        self.assertEqual(ids, list(range(ids[0], ids[0] + len(ids))))  # no gaps
        others = [r for r in self.rows("messages") if ALICE not in (r["sender"], r["recipient"])]
        real_delete, real_page = self.engine._delete_ids, self.engine._delete_page_of
        pages: list[int] = []
        steps: list[tuple[int, int | None]] = []

        def counting(cur: Any, ids: list[int]) -> int:
            pages.append(len(ids))
            return real_delete(cur, ids)

        def stepping(cur: Any, user_id: str, after: int, finish: bool) -> Any:
            deleted, last = real_page(cur, user_id, after, finish)
            steps.append((after, last))
            return deleted, last

        self.patch(self.engine, "_delete_ids", counting)
        self.patch(self.engine, "_delete_page_of", stepping)
        self.patch(self.engine, "DELETE_PAGE", 2)
        self.patch(self.engine, "DELETE_SLICE", 3)
        head = ids[-1]
        purged = yield self.store.purge_user_messages(ALICE, head - 3)
        self.assertEqual(purged, 3)
        delete = LOG["delete"]
        check = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))
        self.assertTrue((yield self.store.delete_account(ALICE, 77, check)))
        self.assertEqual(self.messages_of(ALICE), [])
        self.assertEqual(sorted(self.rows("messages"), key=repr), sorted(others, key=repr))
        self.assertEqual(sum(pages), 4 + 5)
        self.assertLessEqual(max(pages), 2)
        # Each page looked at a slice of at most 3 ids (the ids have no gaps).
        self.assertEqual([last for _, last in steps].count(None), 2)  # one end per phase
        for after, last in steps:
            if last is not None:
                self.assertLessEqual(last - after, 3, steps)
        self.assertTrue(self.tombstone(ALICE)["purged"])

    @defer.inlineCallbacks
    def test_the_message_phase_skips_gaps_in_ids(self):
        """Where ids are missing (retention removed them), the next page starts
        at the next stored id: with slices of 3, messages at ids a few
        thousand apart take a few pages, not one per slice of the gap."""
        yield self.fill()
        head = max(r["id"] for r in self.rows("messages"))
        self.insert_message(head + 3000, ALICE, "bob")
        self.insert_message(head + 6000, "carol", ALICE)
        real = self.engine._delete_page_of
        calls: list[int] = []

        def counting(cur: Any, user_id: str, after: int, finish: bool) -> Any:
            calls.append(after)
            return real(cur, user_id, after, finish)

        self.patch(self.engine, "_delete_page_of", counting)
        self.patch(self.engine, "DELETE_SLICE", 3)
        delete = LOG["delete"]
        check = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))
        self.assertTrue((yield self.store.delete_account(ALICE, 77, check)))
        self.assertEqual(self.messages_of(ALICE), [])
        self.assertTrue(self.tombstone(ALICE)["purged"])
        self.assertLessEqual(len(calls), 6, calls[:10])

    @defer.inlineCallbacks
    def test_unfinished_deletions_are_finished_in_one_read_of_the_table(self):
        """finish_deletions finishes several unpurged tombstones (say, from
        before schema 4) together: with slices of 3 ids, one walk over the
        table's slices removes every message from or to any of them, no
        other, and marks them all purged."""
        yield self.fill()
        head = max(r["id"] for r in self.rows("messages"))
        for i, (sender, to) in enumerate(
            [
                ("dan", "bob"),
                ("bob", "erin"),
                ("erin", "dan"),
                ("carol", "bob"),
                ("dan", "broadcast"),
            ]
        ):
            self.insert_message(head + 1 + i, sender, to)
        for user_id in ("dan", "erin", "frank"):  # frank left nothing behind
            self.add_tombstone(user_id)
        gone = {"dan", "erin"}
        others = [r for r in self.rows("messages") if not gone & {r["sender"], r["recipient"]}]
        real = self.engine._delete_page_of
        calls: list[int] = []

        def counting(cur: Any, user_ids: Any, after: int, finish: bool) -> Any:
            calls.append(after)
            return real(cur, user_ids, after, finish)

        self.patch(self.engine, "_delete_page_of", counting)
        self.patch(self.engine, "DELETE_SLICE", 3)
        self.assertEqual((yield self.store.finish_deletions()), 3)
        self.assertEqual(sorted(self.rows("messages"), key=repr), sorted(others, key=repr))
        self.assertEqual(
            [self.tombstone(u)["purged"] for u in ("dan", "erin", "frank")], [True] * 3
        )
        slices = -(-(head + 5) // 3)  # ids 1 to head + 5, no gaps
        self.assertEqual(len(calls), slices + 1, calls)  # and the one that finds none left
        self.assertEqual((yield self.store.finish_deletions()), 0)

    def test_no_page_query_scans_the_table(self):
        """The deletion's page query reads the messages a user sent as a range
        of the primary key (a slice of ids) and those sent to them through
        the index on (recipient, id); the query finding the next stored id
        reads the primary key: no query scans the table.  And no index on
        sender slows every insert for the sake of it (messages_conv, on
        (conv, id), is history's: protocol section 13)."""
        plan = self.page_plan()
        self.assertRegex(plan, self.range_pattern)
        self.assertIn("messages_recipient", plan)
        self.assertNotRegex(plan, self.scan_pattern)
        self.assertEqual(
            sorted(self.message_indexes()),
            [
                "messages_conv",
                "messages_created",
                "messages_pending",
                "messages_recipient",
                "messages_sender_nonce",
            ],
        )

    # -- the key log's cap --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_full_key_log_refuses_adds_and_keeps_room_to_revoke(self):
        """With a cap of 5 entries: entry 0, two adds (3 keys), a third add
        refused too_many_keys (no room left to revoke all but one after it),
        then both revokes still accepted (the log reaches 5); then any
        append is refused, and no refusal changes a row."""
        self.store.max_log_entries = 5
        keys = [bytes(SigningKey(bytes([i]) * 32).verify_key) for i in range(1, 5)]
        lax = lambda entries: None  # noqa: E731 (the store's own limits only)

        def add(seq: int, key: bytes) -> Entry:
            return Entry(seq, keylog.ADD, key, None, "x", bytes(64), bytes(64))

        def revoke(seq: int, key: bytes) -> Entry:
            return Entry(seq, keylog.REVOKE, key, None, "x", bytes(64))

        yield self.store.append_key_entry(ALICE, add(1, keys[0]), lax)
        yield self.store.append_key_entry(ALICE, add(2, keys[1]), lax)
        for entry, at in ((add(3, keys[2]), 3), (revoke(5, keys[0]), 5)):
            before = self.snapshot()
            with self.assertRaises(KeyLogError) as caught:
                yield self.store.append_key_entry(ALICE, entry, lax)
            self.assertEqual(caught.exception.code, "too_many_keys")
            self.assertIn("full", caught.exception.message)
            self.assertEqual(self.snapshot(), before)
            if at == 3:
                yield self.store.append_key_entry(ALICE, revoke(3, ALICE_KEY), lax)
                yield self.store.append_key_entry(ALICE, revoke(4, keys[0]), lax)
        self.assertEqual(len((yield self.store.key_log(ALICE))), 5)
        self.assertEqual(
            [k.public_key for k in (yield self.store.user_keys(ALICE)).keys], [keys[1]]
        )

    def test_the_cap_is_a_thousand_entries(self):
        self.assertEqual(keylog.MAX_LOG_ENTRIES, 1000)
        self.assertEqual(self.store.max_log_entries, 1000)

    # -- what a lax check lets through ----------------------------------------------------

    @defer.inlineCallbacks
    def test_the_store_refuses_what_a_lax_check_lets_through(self):
        """An add of a key already active is key_exists, a revoke of a key
        that is not active invalid_request: no 500, no entry that changes
        nothing, no row changed."""
        lax = lambda entries: None  # noqa: E731
        before = self.snapshot()
        again = Entry(1, keylog.ADD, ALICE_KEY, None, "x", bytes(64), bytes(64))
        stranger = Entry(1, keylog.REVOKE, SECOND_KEY, None, "x", bytes(64))
        for entry, code in ((again, "key_exists"), (stranger, "invalid_request")):
            with self.assertRaises(KeyLogError) as caught:
                yield self.store.append_key_entry(ALICE, entry, lax)
            self.assertEqual(caught.exception.code, code)
        self.assertEqual(self.snapshot(), before)

    # -- the revocation event's time ------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_revocation_event_is_created_at_the_store_clock(self):
        """The key_revoked event is created at the store's clock, not at the
        entry's own at_ms (an old at_ms would let pruning drop the event
        before every node polled it)."""
        now_ms = int(reactor.seconds() * 1000)
        yield self.append_vectors()  # at_ms CREATED_MS + 1, + 2 (years ago)
        (event,) = [r for r in self.rows("account_events") if r["kind"] == st.EVENT_KEY_REVOKED]
        self.assertGreaterEqual(event["created_ms"], now_ms)
        yield self.store.prune_account_events(now_ms)
        self.assertEqual([r["kind"] for r in self.rows("account_events")], [st.EVENT_KEY_REVOKED])

    # -- sign-out of a user who is not there --------------------------------------------

    @defer.inlineCallbacks
    def test_revoke_token_of_no_user_stores_nothing(self):
        """revoke_token for an id never registered, or deleted, fires False and
        stores no row and no event; for a user it fires True (a repeat too)."""
        delete = LOG["delete"]
        yield self.append_vectors()
        check = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))
        self.assertTrue((yield self.store.delete_account(ALICE, 77, check)))
        before = self.snapshot()
        self.assertFalse((yield self.store.revoke_token("zed", "j-zed", 10**13, 5)))
        self.assertFalse((yield self.store.revoke_token(ALICE, "j-alice", 10**13, 5)))
        self.assertEqual(self.snapshot(), before)
        self.assertTrue((yield self.store.revoke_token("bob", "j-bob", 10**13, 5)))
        self.assertTrue((yield self.store.revoke_token("bob", "j-bob", 10**13, 6)))

    @defer.inlineCallbacks
    def test_revoke_token_racing_a_deletion_leaves_no_row(self):
        """A deletion holds its transaction open inside its check while another
        store signs out one of the user's tokens: the sign-out waits, then
        finds no user (False), and no revoked_tokens row or signed_out event
        of the deleted user is left."""
        other = self.make_store()
        entered, release = threading.Event(), threading.Event()
        delete = LOG["delete"]
        yield self.append_vectors()
        signed = deletion_check(ALICE, delete["key_id"], b64decode(delete["signature"]))

        def holding(entries: list[Entry]) -> None:
            signed(entries)
            entered.set()
            release.wait(DEADLINE)

        deleted = self.store.delete_account(ALICE, 77, holding)
        self.addCleanup(release.set)
        yield wait_for(entered.is_set, "the deletion's check")
        blocked = yield self.watch(other)
        revoked = other.revoke_token(ALICE, "j-racing", 10**13, 5)
        yield wait_for(blocked, "the sign-out to wait for the deletion's lock")
        release.set()
        self.assertTrue((yield deleted))
        self.assertFalse((yield revoked))
        self.assertEqual([r for r in self.rows("revoked_tokens") if r["user_id"] == ALICE], [])
        kinds = [r["kind"] for r in self.rows("account_events") if r["user_id"] == ALICE]
        self.assertNotIn(st.EVENT_SIGNED_OUT, kinds)

    # -- messages carry their key -----------------------------------------------------

    @defer.inlineCallbacks
    def test_messages_carry_their_key_id(self):
        """The key_id a message was stored with comes back from every read
        (the stored result, a duplicate, get_message, replay, the stream);
        an unsigned message has none."""
        kid = keylog.key_id(ALICE_KEY)
        kind, signed = yield self.store.add_message(message(ALICE, "bob", "s", kid, "n-1"))
        self.assertEqual((kind, signed.key_id), (st.STORED, kid))
        kind, dup = yield self.store.add_message(message(ALICE, "bob", "s", kid, "n-1"))
        self.assertEqual((kind, dup.key_id), (st.DUPLICATE, kid))
        _, plain = yield self.store.add_message(message(ALICE, "bob", "u"))
        self.assertIsNone(plain.key_id)
        got = yield self.store.get_message(signed.id)
        self.assertEqual(got.key_id, kid)
        for page in (
            (yield self.store.replay_page("bob", None, 0, 10)),
            (yield self.store.replay_page("bob", 0, 0, 10)),
            (yield self.store.messages_between(0, plain.id, 10)),
        ):
            self.assertEqual([m.key_id for m in page], [kid, None])


class SQLiteKeyStoreTests(KeyStoreContract, unittest.TestCase):
    engine = sq
    engine_error = sqlite3.OperationalError
    # Any SCAN of messages reads all of it (the table, or a whole index).
    scan_pattern = r"SCAN messages"
    range_pattern = r"SEARCH messages USING INTEGER PRIMARY KEY \(rowid>\? AND rowid<\?\)"

    def page_plan(self) -> str:
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        plan = []
        for sql, args in (
            (sq._SQL_PAGE_OF, (1, 5000, "u5", "u5", 1, 5000, 500)),
            (sq._SQL_NEXT_ID, (0,)),
        ):
            plan += [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        return "\n".join(plan)

    def message_indexes(self) -> list[str]:
        rows = self._query(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
            " AND name NOT LIKE 'sqlite_autoindex%'"
        )
        return [row[0] for row in rows]

    def add_tombstone(self, user_id: str) -> None:
        conn = sqlite3.connect(self.path)
        with conn:
            conn.execute(
                "INSERT INTO deleted_users (user_id, deleted_ms, purged) VALUES (?, 1, 0)",
                (user_id,),
            )
        conn.close()

    def insert_message(self, id_: int, sender: str, recipient: str) -> None:
        conn = sqlite3.connect(self.path)
        with conn:
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, verification,"
                " created_ms) VALUES (?, ?, ?, 'x', 'unsigned', 0)",
                (id_, sender, recipient),
            )
        conn.close()

    def make_store(self) -> Any:
        if not hasattr(self, "path"):
            self.path = self.mktemp()
            st.prepare_database(self.path, lambda: SECRET)
        store = sq.Store(self.path, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    @defer.inlineCallbacks
    def watch(self, store: Any) -> Any:
        # The statement that takes the file's write lock has begun (SQLite
        # calls the trace callback as a statement starts running, before any
        # wait for a lock); without it, the append's first read of the log.
        started: list[str] = []

        def trace(sql: str) -> None:
            if sql.startswith(("BEGIN IMMEDIATE", "SELECT seq", "INSERT OR IGNORE INTO revoked")):
                started.append(sql)

        yield store._pool.runWithConnection(lambda conn: conn.set_trace_callback(trace))
        return lambda: bool(started)

    def _query(self, sql: str) -> sqlite3.Cursor:
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        return conn.execute(sql)

    def tables(self) -> list[str]:
        rows = self._query(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT IN ('schema_version', 'sqlite_sequence') ORDER BY name"
        )
        return [row[0] for row in rows]

    def rows(self, table: str) -> list[dict[str, Any]]:
        cur = self._query(f"SELECT * FROM {table}")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


class PostgresKeyStoreTests(KeyStoreContract, unittest.TestCase):
    engine = pg
    engine_error = psycopg.OperationalError
    scan_pattern = r"Seq Scan"
    range_pattern = (
        r"(Index Scan using|Bitmap Index Scan on) messages_pkey.*\n\s*"
        r"Index Cond: \(\(id >= .*\) AND \(id <= .*\)\)"
    )

    def page_plan(self) -> str:
        self.make_store()
        plan = []
        with psycopg.connect(self.url) as conn:
            # Enough rows of enough users that the planner prefers an index.
            conn.execute(
                "INSERT INTO messages (id, sender, recipient, content, verification,"
                " created_ms) SELECT g, 'u' || (g % 500), 'r' || (g % 500), 'x', 'unsigned', 0"
                " FROM generate_series(1, 50000) AS g"
            )
            conn.execute("ANALYZE messages")
            for sql, args in (
                (pg._SQL_PAGE_OF, (20001, 25000, ["u5"], ["u5"], 20001, 25000, 500)),
                (pg._SQL_NEXT_ID, (0,)),
            ):
                plan += [row[0] for row in conn.execute(b"EXPLAIN " + sql.encode(), args)]
            conn.rollback()
        return "\n".join(plan)

    def message_indexes(self) -> list[str]:
        _, rows = self._query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'"
            " AND indexname <> 'messages_pkey'"
        )
        return [row[0] for row in rows]

    def add_tombstone(self, user_id: str) -> None:
        self._query(
            "INSERT INTO deleted_users (user_id, deleted_ms, purged) VALUES (%s, 1, FALSE)"
            " RETURNING user_id",
            (user_id,),
        )

    def insert_message(self, id_: int, sender: str, recipient: str) -> None:
        self._query(
            "INSERT INTO messages (id, sender, recipient, content, verification, created_ms)"
            " VALUES (%s, %s, %s, 'x', 'unsigned', 0) RETURNING id",
            (id_, sender, recipient),
        )

    def make_store(self) -> Any:
        if not hasattr(self, "url"):
            self.url = fresh_postgres_database(self)
            st.prepare_database(self.url, lambda: SECRET)
        store = st.open_store(self.url, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def _query(self, sql: str, args: tuple = ()) -> tuple[list[str], list[tuple]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql, args)
            return [d.name for d in cur.description], cur.fetchall()

    def tables(self) -> list[str]:
        _, rows = self._query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_version' ORDER BY tablename"
        )
        return [row[0] for row in rows]

    def rows(self, table: str) -> list[dict[str, Any]]:
        names, rows = self._query(f"SELECT * FROM {table}")
        plain = [[bytes(v) if isinstance(v, memoryview) else v for v in row] for row in rows]
        return [dict(zip(names, row, strict=True)) for row in plain]

    def watch(self, store: Any) -> Any:
        # A backend of this database waits for a lock: the first's row lock
        # (or, without it, the first's uncommitted key_log row).
        def waiting() -> bool:
            _, rows = self._query(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return rows[0][0] > 0

        return defer.succeed(waiting)

    @defer.inlineCallbacks
    def test_a_unique_violation_is_a_conflict(self):
        """If an entry of the same seq lands between the store's read of the
        log and its insert (here written straight into the table from the
        check), the insert's unique violation is answered keylog_conflict
        and nothing else is written."""
        import psycopg

        entry = vector_entry(1)

        def sneak(entries: list[Entry]) -> None:
            checked(ALICE, entry)(entries)
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO key_log (user_id, seq, action, public_key, at_ms)"
                    " VALUES (%s, 1, 'add', %s, 1)",
                    (ALICE, b"\x05" * 32),
                )

        before_keys = self.rows("user_keys")
        with self.assertRaises(KeyLogError) as caught:
            yield self.store.append_key_entry(ALICE, entry, sneak)
        self.assertEqual(caught.exception.code, "keylog_conflict")
        self.assertEqual(self.rows("user_keys"), before_keys)
        log = yield self.store.key_log(ALICE)
        self.assertEqual([e.public_key for e in log], [ALICE_KEY, b"\x05" * 32])
