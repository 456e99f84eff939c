"""The events nodes publish to each other (wsserver/broker/redis.py): the
array form, the earlier object form still read, a node's own publications
skipped unparsed, and malformed events ignored.  No Redis needed: the broker
is not started, and publications are handed to it as its subscription would."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from wsserver.broker import redis as rb
from wsserver.messages import PENDING, UNSIGNED, VERIFIED, Message


class NoStore:
    def stream_head(self):
        raise AssertionError("not polled here")


class Sender:
    """A connection of the sender, recording its status frames."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.live = True
        self.frames: list[dict] = []

    def notify(self, payload: bytes) -> None:
        self.frames.append(json.loads(payload))


def publication(node: str, events: list) -> bytes:
    return json.dumps({"node": node, "e": events}).encode("utf-8")


class EventTests(unittest.TestCase):
    def setUp(self) -> None:
        self.broker = rb.RedisBroker(NoStore(), Clock(), "redis://127.0.0.1:1/0", "node-a")
        self.offered: list[Message] = []
        self.broker._applier.offer = lambda msg, sender=None: self.offered.append(msg)
        self.alice = Sender("alice")
        self.broker.attach(self.alice)

    def test_messages_round_trip_in_the_array_form(self):
        msgs = [
            Message(
                7,
                "alice",
                "bob",
                'a "quoted" \u00e9 text',
                b"\x01\x02",
                "n-1",
                VERIFIED,
                PENDING,
                1_700_000_000_123,
            ),
            Message(8, "alice", "broadcast", "", None, None, UNSIGNED, "delivered", 5),
            Message(
                10, "alice", "bob", "x", b"\x03" * 64, None, VERIFIED, PENDING, 6, key_id="k" * 16
            ),
        ]
        events = [rb._encode_message(m) for m in msgs]
        self.assertEqual(events[0][0], "m")
        self.assertEqual(events[2][-1], "k" * 16)
        self.broker._received(publication("node-b", events))
        self.assertEqual(self.offered, msgs)

    def test_a_message_without_key_id_from_an_older_node_is_read(self):
        """A node of the version before key ids sends ten fields: key_id is null."""
        event = ["m", 12, "alice", "bob", "hi", None, "n-1", UNSIGNED, PENDING, 7]
        self.broker._received(publication("node-b", [event]))
        self.assertEqual(
            self.offered, [Message(12, "alice", "bob", "hi", None, "n-1", UNSIGNED, PENDING, 7)]
        )
        self.assertIsNone(self.offered[0].key_id)

    def test_the_earlier_object_form_is_still_read(self):
        old = {
            "id": 9,
            "from": "alice",
            "to": "bob",
            "content": "hi",
            "sig": None,
            "nonce": "n-9",
            "ver": UNSIGNED,
            "status": PENDING,
            "ms": 42,
        }
        self.broker._received(
            publication("node-b", [{"t": "m", "m": old}, {"t": "s", "id": 9, "from": "alice"}])
        )
        self.assertEqual(
            self.offered, [Message(9, "alice", "bob", "hi", None, "n-9", UNSIGNED, PENDING, 42)]
        )
        self.assertEqual([(f["id"], f["status"]) for f in self.alice.frames], [(9, "delivered")])

    def test_status_events_reach_the_senders_connections_once(self):
        self.broker._received(
            publication("node-b", [["s", 11, "alice", None], ["s", 12, "alice", 3]])
        )
        self.broker._received(publication("node-c", [["s", 11, "alice", None]]))
        frames = [(f["id"], f["status"], f.get("recipients")) for f in self.alice.frames]
        self.assertEqual(frames, [(11, "delivered", None), (12, "delivered", 3)])

    def test_own_publications_are_skipped(self):
        published = []

        class Redis:
            def publish(self, channel, payload):
                published.append(payload)
                return defer.Deferred()

        self.broker.command_connection = lambda: Redis()
        self.broker._outgoing.append(["s", 13, "alice", None])
        self.broker._flush()
        self.assertEqual(
            json.loads(published[0]), {"node": "node-a", "e": [["s", 13, "alice", None]]}
        )
        self.broker._received(published[0].encode("utf-8"))
        # Written some other way, it is still recognised by its node's name.
        self.broker._received(publication("node-a", [["s", 14, "alice", None]]))
        # A node whose name merely starts with this one's is another node.
        self.broker._received(publication("node-ab", [["s", 15, "alice", None]]))
        self.assertEqual([f["id"] for f in self.alice.frames], [15])

    def test_malformed_events_are_ignored_and_the_rest_applied(self):
        self.broker._received(
            publication(
                "node-b",
                [
                    ["s"],
                    ["m", 1, "x"],
                    ["c", "not a number", 1],
                    {"t": "m"},
                    17,
                    ["s", 15, "alice", None],
                ],
            )
        )
        self.broker._received(b"not json")
        self.assertEqual([f["id"] for f in self.alice.frames], [15])
        self.assertEqual(self.offered, [])
