"""Delivery guarantees in one process: slow readers, streams interrupted mid-way,
messages in flight while a replay is written, and a locked database."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from wsserver.store import is_postgres

from .support import LiveServer, eventually

BIG = "x" * 60_000


def assert_in_order_once(testcase, frames):
    """Message ids on one connection strictly increase (no duplicate, no reordering)."""
    ids = [f["id"] for f in frames if f["type"] == "message"]
    testcase.assertEqual(ids, sorted(set(ids)))
    return ids


class SlowConsumerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_slow_reader_is_closed_1013_without_delaying_others(self):
        """A client that stops reading is closed with 1013 once its unsent bytes pass
        MAX_OUTBOX_BYTES; meanwhile two other users keep exchanging without delay;
        everything sent to the slow one arrives after it reconnects with since."""
        server = LiveServer(
            self,
            {
                "MAX_OUTBOX_BYTES": "262144",
                "MESSAGE_RATE_LIMIT": "10000",
                "MESSAGE_BURST_LIMIT": "10000",
            },
        )
        tokens = {}
        for name in ("alice", "bob", "carol", "dave"):
            _, tokens[name] = yield server.user(name)
        alice = yield server.connect(tokens["alice"], testcase=self)
        bob = yield server.connect(tokens["bob"], testcase=self)
        carol = yield server.connect(tokens["carol"], testcase=self)
        dave = yield server.connect(tokens["dave"], testcase=self)
        nodes = [server.service, *server.others]  # the test cluster's nodes, or the one
        (bob_on_server,) = [
            c for node in nodes for c in node.broker.connections() if c.user_id == "bob"
        ]
        bob.transport.pauseProducing()  # bob stops reading

        to_bob, pings_while_bob_was_full = [], 0
        for i in range(2000):
            if bob_on_server.state == bob_on_server.STATE_CLOSED or bob_on_server.localCloseCode:
                break
            alice.send_json({"to": "bob", "content": BIG, "nonce": f"big-{i}"})
            to_bob.append((yield alice.next_of("ack"))["id"])
            if i % 5 == 0:
                full = bob_on_server._paused  # bob's transport holds unsent bytes
                carol.send_json({"to": "dave", "content": f"ping {i}"})
                got = yield dave.next_of("message")
                self.assertEqual(got["content"], f"ping {i}")
                pings_while_bob_was_full += full and bob_on_server._paused
        self.assertEqual(bob_on_server.localCloseCode, 1013)
        # Others were served while bob's outbox was full, not after he went.
        self.assertGreater(pings_while_bob_was_full, 0)
        # Keep sending while bob is gone: these stay pending.
        for i in range(3):
            alice.send_json({"to": "bob", "content": f"later {i}"})
            ack = yield alice.next_of("ack")
            self.assertEqual(ack["status"], "pending")
            to_bob.append(ack["id"])

        bob.transport.resumeProducing()
        yield bob.wait_closed(seconds=30)
        seen = assert_in_order_once(self, bob.received)
        since = seen[-1] if seen else 0
        bob2 = yield server.connect(tokens["bob"], since=since, testcase=self)
        missing = len([i for i in to_bob if i > since])
        again = yield bob2.take(missing, "message")
        got = set(seen) | set(assert_in_order_once(self, again))
        self.assertLessEqual(set(to_bob), got)


class InterruptedStreamTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_reconnect_in_the_middle_of_a_stream(self):
        """A recipient drops mid-stream while two senders keep sending; reconnecting
        with since gives the whole sequence with no gap, duplicate or reordering,
        including messages that arrive during the replay."""
        server = LiveServer(self, {"MESSAGE_RATE_LIMIT": "10000", "MESSAGE_BURST_LIMIT": "10000"})
        _, a_token = yield server.user("alice")
        _, c_token = yield server.user("carol")
        _, b_token = yield server.user("bob")
        senders = yield defer.gatherResults(
            [server.connect(t, testcase=self) for t in (a_token, c_token)]
        )
        bob = yield server.connect(b_token, testcase=self)
        acked: list[int] = []
        sending = True

        @defer.inlineCallbacks
        def stream(client, tag):
            n = 0
            while sending:
                client.send_json({"to": "bob", "content": f"{tag}{n}", "nonce": f"{tag}-{n}"})
                acked.append((yield client.next_of("ack"))["id"])
                n += 1

        runs = [stream(senders[0], "a"), stream(senders[1], "c")]
        yield bob.take(50, "message")
        bob.transport.abortConnection()  # drop without a goodbye
        yield bob.wait_closed()
        seen = assert_in_order_once(self, bob.received)
        bob2 = yield server.connect(b_token, since=seen[-1], testcase=self)
        # Live traffic goes on during and after the replay: stop once bob2 has
        # had 50 messages more than were acked when he came back.
        target = len([i for i in acked if i > seen[-1]]) + 50
        yield eventually(
            lambda: len([f for f in bob2.received if f["type"] == "message"]) >= target,
            "live traffic after the replay",
            60,
        )
        sending = False
        yield defer.gatherResults(runs)
        expected = sorted(i for i in acked if i > seen[-1])
        yield eventually(
            lambda: set(expected) <= {f.get("id") for f in bob2.received},
            "every message acked after since",
        )
        ids = assert_in_order_once(self, bob2.received)
        # The replay brings a message still pending whatever its id (section
        # 6): one bob took just before he dropped may come again if its
        # delivery mark was not stored yet (PostgreSQL's marks are batched).
        again = [i for i in ids if i <= seen[-1]]
        self.assertLessEqual(set(again), set(seen))
        self.assertEqual([i for i in ids if i > seen[-1]], expected)
        self.assertEqual(sorted(set(seen) | set(ids)), sorted(acked))


class LockedDatabaseTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_locked_past_busy_timeout_answers_internal_error(self):
        """When another process holds the write lock past busy_timeout, the sender gets
        internal_error and no ack; once it is released, sending works again."""
        server = LiveServer(self)
        if is_postgres(server.db):
            raise unittest.SkipTest(
                "SQLite's busy_timeout (PostgreSQL waits for a lock, with no timeout); "
                "tested on one node with SQLite"
            )
        _, token = yield server.user("alice")
        alice = yield server.connect(token, testcase=self)
        if server.mode != "workers":
            # Shorter than the store's own 5 s; with --workers the workers'
            # connections are out of reach and keep their 5 s.
            yield server.service.store._pool.runOperation("PRAGMA busy_timeout = 200")
        blocker = sqlite3.connect(server.db, timeout=0, isolation_level=None)
        self.addCleanup(blocker.close)
        blocker.execute("BEGIN EXCLUSIVE")
        alice.send_json({"to": "alice", "content": "blocked", "nonce": "l-1"})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("internal_error", "l-1"))
        if server.mode != "workers":  # the workers log it in their own processes
            self.assertTrue(self.flushLoggedErrors(sqlite3.OperationalError))
        blocker.execute("ROLLBACK")
        alice.send_json({"to": "alice", "content": "free", "nonce": "l-2"})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["content"], "free")
        self.assertEqual([f for f in alice.received if f["type"] == "ack"], [ack])


def gate_replay(testcase, store):
    """Hold every replay page ``store`` is asked for until the returned
    ``release()`` is called; ``asked`` lists the held requests.  Lets a test put
    live traffic between a connection's attach and its replay's read."""
    real = store.replay_page
    asked: list = []

    def gated(*args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        asked.append((d, args))
        return d

    def release() -> None:
        del store.replay_page
        for d, args in asked:
            real(*args).chainDeferred(d)

    store.replay_page = gated
    testcase.addCleanup(lambda: "replay_page" in vars(store) and release())
    return asked, release


def hold_publications(broker):
    """Node ``broker`` hears nothing (no publication, no poll of the database)
    until the returned ``hear()`` is called: then it hears what it missed."""
    broker._poller.stop()
    held: list = []
    broker._received = held.append

    def hear() -> None:
        del broker._received
        for payload in held:
            broker._received(payload)
        broker._poller.start(1.0, now=True)

    return held, hear


class LatePublicationTests(unittest.TestCase):
    """Found by running InterruptedStreamTests on a test cluster."""

    timeout = 120

    @defer.inlineCallbacks
    def late_publication(self, bob_elsewhere: bool, publication_first: bool = False) -> Any:
        """alice (node a) sends bob one message while node b hears nothing; bob
        connects to node b with since = its id; then node b hears the
        publication late and alice sends a second message.  With
        ``bob_elsewhere`` another device of bob's on node a got the first one
        live.  With ``publication_first`` node b applies the late publication
        (and commits what it wrote for it) before bob's replay reads; else in
        whichever order they come.  Fire with (first ack, second ack, bob's
        client on node b)."""
        from .cluster import two_nodes

        a, b = yield two_nodes(self)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield a.user("bob")
        alice = yield a.connect(alice_token, testcase=self)
        if bob_elsewhere:
            bob_a = yield a.connect(bob_token, testcase=self)
        broker = b.service.broker
        held, hear = hold_publications(broker)
        alice.send_json({"to": "bob", "content": "first", "nonce": "l-1"})
        first = yield alice.next_of("ack")
        if bob_elsewhere:
            got = yield bob_a.next_of("message")
            self.assertEqual(got["id"], first["id"])
            # Once stored as delivered, a replay no longer brings it (section 6).
            stored = yield a.settled(first["id"], lambda m: m.status == "delivered")
            self.assertEqual(stored.status, "delivered")
        yield eventually(lambda: held, "node b is sent the publication")
        if publication_first:
            asked, release = gate_replay(self, broker._store)
        bob = yield b.connect(bob_token, since=first["id"], testcase=self)
        if publication_first:
            yield eventually(lambda: asked, "bob's replay asks for its first page")
        # Node b hears it late, after bob said he has everything up to it.
        hear()
        if publication_first:
            self.assertGreaterEqual(broker.applier.cursor, first["id"])
            yield broker._store.drain()
            release()
        alice.send_json({"to": "bob", "content": "second", "nonce": "l-2"})
        second = yield alice.next_of("ack")
        return first, second, bob

    @defer.inlineCallbacks
    def test_a_publication_at_or_below_since_is_not_delivered_again(self):
        """A message delivered to another device of the recipient, whose
        publication reaches a node only after the recipient connected there with
        ``since`` at or above its id, is not written to that connection: the
        client has it already (section 6), and ids only grow."""
        first, second, bob = yield self.late_publication(bob_elsewhere=True)
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (second["id"], "second"))
        ids = [f["id"] for f in bob.received if f["type"] == "message"]
        self.assertNotIn(first["id"], ids)

    @defer.inlineCallbacks
    def test_a_pending_message_at_or_below_since_is_replayed_once(self):
        """The same with the message still pending (bob had no connection): the
        replay brings it whatever its id (section 6), once, before the next one,
        although its late publication says the same."""
        first, second, bob = yield self.late_publication(bob_elsewhere=False)
        got = yield bob.take(2, "message")
        self.assertEqual(
            [(f["id"], f["content"]) for f in got],
            [(first["id"], "first"), (second["id"], "second")],
        )
        self.assertEqual(len([f for f in bob.received if f["type"] == "message"]), 2)

    @defer.inlineCallbacks
    def test_a_late_publication_applied_before_the_replay_reads_does_not_lose_it(self):
        """The same, in the order that made the test above fail one run in
        eight: node b applies the late publication of the pending message while
        bob's replay has not read yet.  The connection does not write it (it is
        at or below since), so it must not count as delivered there: the
        replay, reading after, still finds it pending and brings it, once,
        before the next one (section 6)."""
        first, second, bob = yield self.late_publication(
            bob_elsewhere=False, publication_first=True
        )
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (first["id"], "first"))
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (second["id"], "second"))
        self.assertEqual(len([f for f in bob.received if f["type"] == "message"]), 2)


class ReplayLiveOverlapTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_a_live_message_held_during_replay_comes_before_a_later_replayed_one(self):
        """bob connects to node b without ``since``; before his replay reads,
        node b hands him a pending message live (held until the replay ends,
        and marked delivered), and alice sends another that node b has not
        heard of yet: the replay finds only that later one pending.  Both reach
        bob, in id order, once each (sections 5 and 6): the held one is not
        dropped for being below what the replay wrote."""
        from .cluster import two_nodes

        a, b = yield two_nodes(self)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield a.user("bob")
        alice = yield a.connect(alice_token, testcase=self)
        broker = b.service.broker
        asked, release = gate_replay(self, broker._store)
        bob = yield b.connect(bob_token, testcase=self)
        yield eventually(lambda: asked, "bob's replay asks for its first page")
        alice.send_json({"to": "bob", "content": "one", "nonce": "o-1"})
        one = yield alice.next_of("ack")
        status = yield alice.next_of("status")  # node b took it for bob
        self.assertEqual((status["id"], status["status"]), (one["id"], "delivered"))
        held, hear = hold_publications(broker)
        alice.send_json({"to": "bob", "content": "two", "nonce": "o-2"})
        two = yield alice.next_of("ack")
        self.assertEqual(two["status"], "pending")
        yield eventually(lambda: held, "node b is sent the publication of the second")
        yield broker._store.drain()
        release()  # reads "one" delivered, "two" pending
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (one["id"], "one"))
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (two["id"], "two"))
        hear()
        alice.send_json({"to": "bob", "content": "three", "nonce": "o-3"})
        three = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (three["id"], "three"))
        ids = assert_in_order_once(self, bob.received)
        self.assertEqual(ids, [one["id"], two["id"], three["id"]])


class PendingBelowSinceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_reconnect_with_since_above_a_pending_message_gets_it(self):
        """bob, offline, is sent a message; he comes back with ``since`` above
        its id (he saw a later broadcast on another device): the replay brings
        the pending message whatever its id (section 6), and its sender is told
        it was delivered."""
        server = LiveServer(self)
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield server.connect(alice_token, testcase=self)
        alice.send_json({"to": "bob", "content": "while away", "nonce": "p-1"})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["status"], "pending")
        alice.send_json({"to": "broadcast", "content": "later, to all", "nonce": "p-2"})
        later = yield alice.next_of("ack")
        self.assertGreater(later["id"], ack["id"])
        bob = yield server.connect(bob_token, since=later["id"], testcase=self)
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (ack["id"], "while away"))
        # (On several nodes the broadcast's own status frame may come first.)
        status = yield alice.next_of("status")
        while status["id"] != ack["id"]:
            status = yield alice.next_of("status")
        self.assertEqual(status["status"], "delivered")
