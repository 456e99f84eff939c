"""End to end over real TCP: the WebSocket side of the protocol (sections 3-7)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from wsserver.messages import BROADCAST

from .support import LiveServer, sign_message, vector_key


class DirectMessageTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_signed_direct_message_is_acked_after_commit_and_delivered(self):
        """A signed message to an online user arrives verified and delivered; the ack
        comes after the row is in the database."""
        server = LiveServer(self)
        alice_key, alice_token = yield server.user("alice", vector_key("alice"))
        _, bob_token = yield server.user("bob", vector_key("bob"))
        alice = yield server.connect(alice_token, testcase=self)
        bob = yield server.connect(bob_token, testcase=self)
        sig = sign_message(alice_key, "alice", "bob", "hello bob", "n-1")
        alice.send_json({"to": "bob", "content": "hello bob", "signature": sig, "nonce": "n-1"})
        got = yield bob.next_of("message")
        ack = yield alice.next_of("ack")
        self.assertEqual(got["from"], "alice")
        self.assertEqual(got["verification"], "verified")
        self.assertEqual(got["status"], "delivered")
        self.assertEqual(ack["id"], got["id"])
        self.assertEqual(ack["status"], "delivered")
        stored = yield server.service.store.get_message(ack["id"])
        self.assertEqual(stored.content, "hello bob")
        self.assertEqual(stored.verification, "verified")
