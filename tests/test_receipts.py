"""Read receipts (protocol section 13, decisions in docs/protocol.md section
15): the ``read`` frame, the sender's ``status`` frame ``read`` on each of
their connections (on every node), once per message and reader even when
two of the reader's devices race, refusals (``invalid_message``) of reads of
what the reader never received and of every bad spelling, and the
rate-limit token a ``read`` costs.  End-to-end tests run in the four suite
modes."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from wsserver.messages import MAX_MESSAGE_ID, ReadFrame, Refusal, parse_control_frame

from .support import LiveServer, eventually
from .test_presence import FAST, execute_sql, live_server, seconds_of


def reads_of(client: Any, msg_id: int) -> list[dict]:
    """The ``read`` status frames ``client`` received about ``msg_id``."""
    return [
        f
        for f in client.received
        if f["type"] == "status" and f.get("status") == "read" and f["id"] == msg_id
    ]


def count_reads(server: LiveServer) -> Any:
    """Fire with the number of message_reads rows (read on the server's store)."""
    store = server.store

    def interaction(txn: Any) -> int:
        txn.execute("SELECT COUNT(*) FROM message_reads")
        return txn.fetchone()[0]

    return store._run(interaction)


class ReceiptTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield live_server(self, FAST)
        self.tokens = {}
        for name in ("alice", "bob", "carol"):
            _, self.tokens[name] = yield self.server.user(name)

    @defer.inlineCallbacks
    def connect(self, name: str) -> Any:
        conn = yield self.server.connect(self.tokens[name], testcase=self)
        self.addCleanup(conn.close_and_wait)
        return conn

    @defer.inlineCallbacks
    def send(self, sender: Any, to: str, content: str) -> Any:
        sender.send_json({"to": to, "content": content})
        return (yield sender.next_of("ack"))["id"]

    @defer.inlineCallbacks
    def test_each_connection_of_the_sender_hears_of_a_read_once(self):
        """alice on two connections (both nodes in a cluster) sends bob two
        messages; bob reads the first twice, then the second: each of alice's
        connections gets one ``read`` status for each, by bob, with a
        timestamp; one row per read."""
        alice_a = yield self.connect("alice")
        alice_b = yield self.connect("alice")
        bob = yield self.connect("bob")
        first = yield self.send(alice_a, "bob", "one")
        second = yield self.send(alice_a, "bob", "two")
        got = yield bob.take(2, "message")
        self.assertEqual([f["id"] for f in got], [first, second])
        for msg_id in (first, first, second):
            bob.send_json({"type": "read", "id": msg_id})
        for alice in (alice_a, alice_b):
            yield eventually(lambda a=alice: reads_of(a, second), "the second read")
            (frame,) = reads_of(alice, first)
            self.assertEqual(
                {k: frame[k] for k in ("type", "id", "status", "by")},
                {"type": "status", "id": first, "status": "read", "by": "bob"},
            )
            self.assertGreater(seconds_of(frame["timestamp"]), 0)
            self.assertEqual(len(reads_of(alice, second)), 1)
        self.assertEqual([f for f in bob.received if f["type"] == "system"], [])
        self.assertEqual((yield count_reads(self.server)), 2)

    @defer.inlineCallbacks
    def test_two_devices_reading_at_once_send_one_receipt(self):
        """bob on two connections (two nodes in a cluster) reads the same
        message on both at once, ten times over: alice hears of each message's
        read exactly once."""
        alice = yield self.connect("alice")
        bob_a = yield self.connect("bob")
        bob_b = yield self.connect("bob")
        ids = []
        for i in range(10):
            ids.append((yield self.send(alice, "bob", f"m{i}")))
        yield bob_a.take(10, "message")
        yield bob_b.take(10, "message")
        for msg_id in ids:
            bob_a.send_json({"type": "read", "id": msg_id})
            bob_b.send_json({"type": "read", "id": msg_id})
        marker = yield self.send(alice, "bob", "marker")
        yield bob_a.next_of("message")
        bob_a.send_json({"type": "read", "id": marker})
        yield eventually(lambda: reads_of(alice, marker), "the marker's read")
        # bob_a's reads were all answered before the marker's; bob_b's may
        # still be in flight.
        yield eventually(
            lambda: all(len(reads_of(alice, msg_id)) == 1 for msg_id in ids), "every read"
        )
        self.assertEqual((yield count_reads(self.server)), 11)
        for bob in (bob_a, bob_b):
            self.assertEqual([f for f in bob.received if f["type"] == "system"], [])

    @defer.inlineCallbacks
    def test_a_broadcast_is_read_by_others(self):
        """bob reads alice's broadcast: alice gets ``read`` by bob; alice's
        read of her own broadcast is refused."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        msg_id = yield self.send(alice, "broadcast", "all")
        yield bob.next_of("message")
        bob.send_json({"type": "read", "id": msg_id})
        yield eventually(lambda: reads_of(alice, msg_id), "bob's read of the broadcast")
        alice.send_json({"type": "read", "id": msg_id})
        self.assertEqual((yield alice.next_of("system"))["code"], "invalid_message")

    @defer.inlineCallbacks
    def test_what_was_not_received_is_refused_and_bad_spellings_too(self):
        """bob's reads of alice's message to carol, of his own message, of a
        note to self and of an unknown id, and every bad spelling of the
        frame, each get one ``system`` invalid_message; the connection stays
        open, nothing is stored, and alice hears of none (a good read after
        them is the only receipt she gets)."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        carol = yield self.connect("carol")
        to_carol = yield self.send(alice, "carol", "not for bob")
        yield carol.next_of("message")
        own = yield self.send(bob, "alice", "bob's own")
        note = yield self.send(bob, "bob", "a note")
        yield eventually(
            lambda: any(f.get("id") == note for f in bob.received if f["type"] == "message"),
            "the note reaches bob's connection",
        )
        frames: list[Any] = [
            {"type": "read", "id": to_carol},
            {"type": "read", "id": own},
            {"type": "read", "id": note},
            {"type": "read", "id": 10**12},
            {"type": "read"},
            {"type": "read", "id": str(to_carol)},
            {"type": "read", "id": float(to_carol)},
            {"type": "read", "id": 0},
            {"type": "read", "id": -1},
            {"type": "read", "id": True},
            {"type": "read", "id": None},
            {"type": "read", "id": [to_carol]},
            {"type": "read", "id": MAX_MESSAGE_ID + 1},
            {"type": "read", "id": 10**400},
            {"type": "read", "id": to_carol, "nonce": "x"},
            {"type": "read", "id": to_carol, "to": "alice"},
        ]
        for frame in frames:
            bob.send_json(frame)
            refusal = yield bob.next_of("system")
            self.assertEqual(refusal["code"], "invalid_message", frame)
        for raw in (b'{"type":"read","id":1e3}', b'{"type":"read","id":1,"id":2}'):
            bob.sendMessage(raw)
            self.assertEqual((yield bob.next_of("system"))["code"], "invalid_message")
        self.assertEqual((yield count_reads(self.server)), 0)
        good = yield self.send(alice, "bob", "read me")
        yield bob.next_of("message")
        bob.send_json({"type": "read", "id": good})
        yield eventually(lambda: reads_of(alice, good), "the good read")
        others = [f for f in alice.received if f["type"] == "status" and f.get("status") == "read"]
        self.assertEqual([f["id"] for f in others], [good])

    @defer.inlineCallbacks
    def test_a_group_message_read_inside_the_window(self):
        """A group message (stored directly: the group path is another part's)
        may be read by a member inside their window; the sender hears of it;
        a member who joined after it is refused."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        carol = yield self.connect("carol")
        head = yield self.send(alice, "carol", "before the group message")
        msg_id = head + 1000
        execute_sql(
            self.server,
            "INSERT INTO messages (id, sender, recipient, content, verification, status,"
            " created_ms) VALUES (?, 'alice', '#team', 'g', 'unsigned', 'pending', 0)",
            (msg_id,),
        )
        # bob's cursor is at the message (it was handed to him), carol's
        # window starts after it.
        for user, joined, cursor in (
            ("alice", 0, 0),
            ("bob", 0, msg_id),
            ("carol", msg_id, msg_id),
        ):
            execute_sql(
                self.server,
                "INSERT INTO group_members (group_id, user_id, joined_id, removed_id,"
                " delivered_id, added_ms) VALUES ('#team', ?, ?, NULL, ?, 0)",
                (user, joined, cursor),
            )
        bob.send_json({"type": "read", "id": msg_id})
        yield eventually(lambda: reads_of(alice, msg_id), "bob's read of the group message")
        carol.send_json({"type": "read", "id": msg_id})
        self.assertEqual((yield carol.next_of("system"))["code"], "invalid_message")

    @defer.inlineCallbacks
    def test_refusals_of_reads_come_in_the_order_sent(self):
        """bob sends reads without waiting: ones the store must look at
        (nothing to read) between ones refused on sight (spelt wrong); the
        refusals come in the order the frames were sent, and the good read
        among them still reaches alice."""
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        good = yield self.send(alice, "bob", "read me")
        yield bob.next_of("message")
        frames: list[Any] = [
            {"type": "read", "id": 10**12},
            {"type": "read"},
            {"type": "read", "id": good},
            {"type": "read", "id": 10**12 + 1},
            {"type": "read", "id": 0},
            {"type": "read", "id": 10**12 + 2},
            {"type": "read", "id": "x"},
        ]
        for frame in frames:
            bob.send_json(frame)
        refusals = yield bob.take(6, "system")
        self.assertEqual(
            [r["content"] for r in refusals],
            [
                f"no message {10**12} was received by you",
                "a read frame has exactly 'type' and 'id'",
                f"no message {10**12 + 1} was received by you",
                "'id' must be a message id (a positive integer)",
                f"no message {10**12 + 2} was received by you",
                "'id' must be a message id (a positive integer)",
            ],
        )
        yield eventually(lambda: reads_of(alice, good), "the good read")

    @defer.inlineCallbacks
    def test_a_read_costs_one_rate_limit_token(self):
        """With a burst of 2 and a slow refill: two reads are looked at (and
        refused: nothing to read), the third is refused rate_limited, after
        them (sent without waiting, the refusals come in the order sent)."""
        server = yield live_server(self, {"MESSAGE_RATE_LIMIT": "0.01", "MESSAGE_BURST_LIMIT": "2"})
        _, token = yield server.user("dave")
        dave = yield server.connect(token, testcase=self)
        self.addCleanup(dave.close_and_wait)
        for _ in range(3):
            dave.send_json({"type": "read", "id": 10**9})
        codes = [frame["code"] for frame in (yield dave.take(3, "system"))]
        self.assertEqual(codes, ["invalid_message", "invalid_message", "rate_limited"])


class ReadParsingTests(unittest.TestCase):
    """``parse_control_frame`` for ``read``."""

    def test_good_and_bad_reads(self):
        """A positive integer up to 2**63-1 is a read; anything else refused."""
        self.assertEqual(parse_control_frame('{"type":"read","id":7}'), ReadFrame(7))
        top = parse_control_frame(f'{{"type":"read","id":{MAX_MESSAGE_ID}}}')
        self.assertEqual(top, ReadFrame(MAX_MESSAGE_ID))
        self.assertEqual(parse_control_frame('{"\\u0074ype":"read","id":7}'), ReadFrame(7))
        for text in (
            '{"type":"read","id":7.0}',
            '{"type":"read","id":"7"}',
            '{"type":"read","id":0}',
            '{"type":"read","id":false}',
            '{"type":"read","id":7,"x":1}',
            '{"type":"read"}',
            f'{{"type":"read","id":{MAX_MESSAGE_ID + 1}}}',
        ):
            with self.assertRaises(Refusal) as caught:
                parse_control_frame(text)
            self.assertEqual(caught.exception.code, "invalid_message", text)
