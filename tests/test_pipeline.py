"""The receive pipeline in one process, without sockets: parse, verify, store,
route, ack.

Clients talk to the real ``ServerProtocol``/``ServerFactory``/``LocalBroker``
and a real SQLite ``Store`` through Autobahn's in-memory agent
(``autobahn.twisted.testing``).  Every clock of the pipeline is one
``MemoryReactorClock``: the store's group commit, the rate limiter and the
token-expiry timer move only when a test advances it, so a test can hold a
commit, refill a bucket or expire a token at an exact moment.

"Nothing arrived" is never checked by waiting: the test sends a marker frame
that the server answers at once, without the store; frames on one connection
keep their order, so whatever the server wrote before the marker's answer has
arrived when the answer has.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from nacl.signing import SigningKey
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from wsserver.auth import Session, new_secret
from wsserver.broker import LocalBroker
from wsserver.ratelimit import RateLimiter
from wsserver.store import Store, User, prepare_database
from wsserver.websocket import ServerFactory, text_frame

from .support import (
    DEADLINE,
    MemoryLink,
    Recorder,
    cancel_batched_timers,
    eventually,
    sign_message,
    vector_key,
    within,
)

RATE, BURST = 1.0, 3


class RecordingStore(Store):
    """The real store, noting every message handed to it (before any commit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.added: list[Any] = []

    def add_message(self, new: Any) -> defer.Deferred:
        self.added.append(new)
        return super().add_message(new)


class PipelineTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.db = self.mktemp() + ".db"
        prepare_database(self.db, new_secret)
        self.store = RecordingStore(self.db, self.clock)
        self.addCleanup(self.close_store)
        self.keys = {"alice": vector_key("alice"), "bob": vector_key("bob")}
        for user_id, key in self.keys.items():
            yield self.store.add_user(User(user_id, user_id.title(), bytes(key.verify_key), 0))
        self.limiter = RateLimiter(RATE, BURST, self.clock)
        self.factory = ServerFactory(
            store=self.store,
            broker=LocalBroker(self.store, self.clock, prepare=text_frame),
            limiter=self.limiter,
            clock=self.clock,
            max_content_bytes=1024,
            max_frame_bytes=4096,
            max_outbox_bytes=1 << 20,
            require_signatures=False,
            auto_ping_interval=0,
        )
        self.link = MemoryLink(self, self.factory, self.clock)
        self._marks = 0

    @defer.inlineCallbacks
    def close_store(self):
        closing = self.store.close()
        yield self.let_commits_run(closing)
        cancel_batched_timers()

    @defer.inlineCallbacks
    def let_commits_run(self, d: defer.Deferred) -> Any:
        """Run the store's scheduled commits (they wait on the clock) until ``d`` fires."""
        done = []
        d.addBoth(lambda r: (done.append(r), r)[1])
        deadline = time.monotonic() + DEADLINE
        while not done:
            if time.monotonic() > deadline:
                raise AssertionError("the store did not commit")
            self.clock.advance(0)
            yield task.deferLater(reactor, 0.01, lambda: None)
        return (yield d)

    def commit(self) -> defer.Deferred:
        """Release the group commit held by the clock; fire once it is done."""
        return self.let_commits_run(self.store.drain())

    @defer.inlineCallbacks
    def connect(self, user_id: str, ttl: float = 3600.0) -> Any:
        """An open connection of ``user_id`` whose session ends ``ttl`` clock
        seconds from now; fires with the client once live traffic flows."""
        session = Session(user_id, self.keys[user_id].verify_key, self.clock.seconds() + ttl)
        client, _ = yield self.link.connect(session)
        return client

    @defer.inlineCallbacks
    def mark(self, client: Recorder) -> Any:
        """Send a frame the server refuses at once (no store, no clock); fire
        when its answer arrived: everything written before it has too."""
        self._marks += 1
        nonce = f"mark-{self._marks}"
        client.send_json({"content": "no recipient", "nonce": nonce})
        yield eventually(
            lambda: any(f.get("nonce") == nonce for f in client.of("system")),
            f"the answer to {nonce}",
        )
        return nonce

    def rows(self) -> list[tuple]:
        """What is committed in the database, read by a connection of its own."""
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute("SELECT id, sender, recipient, content FROM messages").fetchall()
        finally:
            conn.close()

    def signed(self, to: str, content: str, nonce: str, key: SigningKey | None = None) -> dict:
        key = key or self.keys["alice"]
        sig = sign_message(key, "alice", to, content, nonce)
        return {"to": to, "content": content, "nonce": nonce, "signature": sig}

    @defer.inlineCallbacks
    def test_signed_message_is_acked_after_the_commit_and_reaches_bob(self):
        """A signed message from alice to bob is verified, committed, handed to
        bob's connection and acked to alice with the stored id, as delivered."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        alice.send_json(self.signed("bob", "hello bob", "n-1"))
        yield eventually(lambda: self.store.added, "the message reaches the store")
        yield self.commit()
        yield eventually(lambda: alice.of("ack") and bob.of("message"), "the ack and the message")
        (ack,) = alice.of("ack")
        (got,) = bob.of("message")
        self.assertEqual(got["id"], ack["id"])
        self.assertEqual((got["from"], got["to"], got["content"]), ("alice", "bob", "hello bob"))
        self.assertEqual((got["verification"], got["nonce"]), ("verified", "n-1"))
        self.assertEqual((ack["status"], ack["verification"]), ("delivered", "verified"))
        self.assertEqual(self.rows(), [(ack["id"], "alice", "bob", "hello bob")])

    @defer.inlineCallbacks
    def test_nothing_is_acked_or_delivered_before_the_commit(self):
        """While the commit is held, alice gets no ack and bob no message (markers
        answered after the send prove nothing came in between); releasing the
        commit sends both."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        alice.send_json(self.signed("bob", "wait for it", "h-1"))
        yield eventually(lambda: self.store.added, "the message reaches the store")
        alice_mark = yield self.mark(alice)
        yield self.mark(bob)
        self.assertEqual([f["type"] for f in alice.frames], ["system"])
        self.assertEqual([f["type"] for f in bob.frames], ["system"])
        self.assertEqual(self.rows(), [])
        yield self.commit()
        yield eventually(lambda: alice.of("ack") and bob.of("message"), "the ack and the message")
        self.assertEqual([f.get("nonce") for f in alice.frames], [alice_mark, "h-1"])
        self.assertEqual(len(self.rows()), 1)

    @defer.inlineCallbacks
    def test_invalid_signature_is_refused_before_the_store(self):
        """A signature by another key answers a system frame invalid_signature with
        the nonce; nothing reaches the store and the connection stays open."""
        alice = yield self.connect("alice")
        alice.send_json(self.signed("bob", "forged", "s-1", key=self.keys["bob"]))
        yield eventually(lambda: alice.of("system"), "the refusal")
        (frame,) = alice.of("system")
        self.assertEqual(
            (frame["code"], frame["nonce"], frame["to"]), ("invalid_signature", "s-1", "alice")
        )
        self.assertEqual(self.store.added, [])
        alice.send_json(self.signed("bob", "genuine", "s-2"))
        yield eventually(lambda: self.store.added, "the next message reaches the store")
        yield self.commit()
        yield eventually(lambda: alice.of("ack"), "the ack")
        self.assertEqual(alice.of("ack")[0]["nonce"], "s-2")

    @defer.inlineCallbacks
    def test_unknown_recipient_is_refused_after_the_store_looked(self):
        """A message to nobody registered answers unknown_recipient with the nonce
        once the store has looked, and stores nothing."""
        alice = yield self.connect("alice")
        alice.send_json(self.signed("nobody", "anyone?", "u-1"))
        yield eventually(lambda: self.store.added, "the message reaches the store")
        yield self.commit()
        yield eventually(lambda: alice.of("system"), "the refusal")
        (frame,) = alice.of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("unknown_recipient", "u-1"))
        self.assertEqual(alice.of("ack"), [])
        self.assertEqual(self.rows(), [])

    @defer.inlineCallbacks
    def test_rate_limit_refuses_until_the_clock_refills_the_bucket(self):
        """Past the burst a frame answers rate_limited with the wait the clock
        gives (1000 ms at 1 message/s, then 500 ms half a second later) and is
        not stored; once the clock has refilled a token the next one is."""
        alice = yield self.connect("alice")
        for i in range(BURST):
            alice.send_json({"to": "bob", "content": f"m{i}", "nonce": f"r-{i}"})
        alice.send_json({"to": "bob", "content": "one too many", "nonce": "r-x"})
        yield eventually(lambda: alice.of("system"), "the refusal")
        (frame,) = alice.of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("rate_limited", "r-x"))
        self.assertEqual(frame["retry_after_ms"], 1000)
        self.assertEqual(len(self.store.added), BURST)
        self.clock.advance(0.5)
        alice.send_json({"to": "bob", "content": "still too soon", "nonce": "r-y"})
        yield eventually(lambda: len(alice.of("system")) == 2, "the second refusal")
        self.assertEqual(alice.of("system")[1]["retry_after_ms"], 500)
        self.clock.advance(0.5)
        alice.send_json({"to": "bob", "content": "now", "nonce": "r-z"})
        yield eventually(lambda: len(self.store.added) == BURST + 1, "the refilled send")
        yield self.commit()
        yield eventually(lambda: len(alice.of("ack")) == BURST + 1, "every ack")
        self.assertEqual(sorted(a["nonce"] for a in alice.of("ack")), ["r-0", "r-1", "r-2", "r-z"])
        self.assertEqual(len(self.rows()), BURST + 1)

    @defer.inlineCallbacks
    def test_a_flood_of_refusals_behind_a_read_is_answered_in_order(self):
        """bob's read waits for a held commit (a read first commits the node's
        queued writes); 600 more frames are refused on sight meanwhile and
        wait behind it.  Once the commit runs, all 601 answers come, the read's
        first, and a later read is still answered: the queue is a loop, not a
        chain of Deferreds (a reviewer's flood overflowed the stack after
        about 140 links, and the connection's reads were never answered
        again)."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        alice.send_json({"to": "bob", "content": "held", "nonce": "held-1"})
        yield eventually(lambda: len(self.store.added) == 1, "the message queued")
        bob.send_json({"type": "read", "id": 999})
        flood = 600
        for i in range(flood):
            bob.send_json({"type": "read", "id": f"bad-{i}"})
        yield self.commit()

        def answered(count: int) -> bool:
            self.clock.advance(0)  # the store's commits run on the test's clock
            return len(bob.of("system")) == count

        yield eventually(lambda: answered(flood + 1), "every answer", 60)
        answers = bob.of("system")
        self.assertIn("no message 999", answers[0]["content"])
        self.assertEqual(answers[0]["code"], "invalid_message")
        self.clock.advance(BURST / RATE)  # a full bucket again
        bob.send_json({"type": "read", "id": 998})
        yield eventually(lambda: answered(flood + 2), "a later read's answer")
        self.assertIn("no message 998", bob.of("system")[-1]["content"])

    @defer.inlineCallbacks
    def test_token_expiry_closes_4001_at_the_clocks_time(self):
        """The connection is still open a moment before its token's expiry on the
        clock, and is closed with 4001 when the clock reaches it."""
        alice = yield self.connect("alice", ttl=60)
        self.clock.advance(59.9)
        yield self.mark(alice)
        self.assertIsNone(alice.close_code)
        self.clock.advance(0.1)
        code = yield within(alice.gone, DEADLINE)
        self.assertEqual(code, 4001)
