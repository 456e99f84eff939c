"""Hostile input against a real server (real TCP, in-process): every bad input gets
its documented answer, nothing stored changes, and the logs stay clean."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from .support import LiveServer, b64, public_b64, vector_key, within

LONE = "\ud800"  # json.dumps writes it as the escape \ud800, a lone surrogate


def surrogate_json(obj: dict) -> bytes:
    """``obj`` as JSON text, ASCII only, lone surrogates written as escapes."""
    return json.dumps(obj).encode("ascii")


class InvalidUnicodeTests(unittest.TestCase):
    """A lone surrogate in any JSON string is refused as documented, never a crash."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "1000"})
        self.alice_key, self.alice_token = yield self.server.user("alice", vector_key("alice"))
        yield self.server.user("bob", vector_key("bob"))

    @defer.inlineCallbacks
    def post_raw(self, path: str, body: bytes):
        client = self.server.http()
        resp = yield within(
            client.post(
                self.server.base + path,
                data=body,
                headers={b"content-type": [b"application/json"]},
            )
        )
        return resp.code, json.loads((yield resp.content()))

    @defer.inlineCallbacks
    def test_frame_fields_with_a_lone_surrogate_are_invalid_message(self):
        """content, to, nonce, signature, type and from holding a lone surrogate are each
        answered with a system invalid_message frame; nothing is stored; the same
        connection then sends a message that is acked and delivered."""
        alice = yield self.server.connect(self.alice_token, testcase=self)
        before = yield self.server.service.store.count_messages()
        good = {"to": "bob", "content": "x", "nonce": "u-1"}
        for name in ("content", "to", "nonce", "signature", "type", "from"):
            alice.sendMessage(surrogate_json({**good, name: "a" + LONE}))
            frame = yield alice.next_of("system")
            self.assertEqual(frame["code"], "invalid_message", name)
            self.assertIn(name, frame["content"])
        after = yield self.server.service.store.count_messages()
        self.assertEqual(after, before)
        alice.send_json({"to": "bob", "content": "still here"})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["content"], "still here")
        self.assertIsNone(alice.close_code)

    @defer.inlineCallbacks
    def test_registration_fields_with_a_lone_surrogate_are_400_naming_the_field(self):
        """username, user_id and public_key holding a lone surrogate are 400
        invalid_request naming the field, and no user is created."""
        good = {
            "user_id": "carol",
            "username": "Carol",
            "public_key": public_b64(vector_key("bob")),
        }
        for name in ("username", "user_id", "public_key"):
            code, body = yield self.post_raw(
                "/auth/register", surrogate_json({**good, name: "Car" + LONE})
            )
            self.assertEqual((code, body["error"]["code"]), (400, "invalid_request"), name)
            self.assertIn(name, body["error"]["message"])
        code, body = yield self.server.get("/auth/users/carol")
        self.assertEqual((code, body["error"]["code"]), (404, "unknown_user"))
        code, _ = yield self.server.post("/auth/register", good)
        self.assertEqual(code, 201)

    @defer.inlineCallbacks
    def test_login_fields_with_a_lone_surrogate_are_400_naming_the_field(self):
        """Both login steps answer 400 invalid_request naming user_id, challenge or
        signature when it holds a lone surrogate; a proper login then still works."""
        sig = b64(b"\x00" * 64)
        cases = [
            ("/auth/login", {"user_id": "alice" + LONE}, "user_id"),
            ("/auth/login?verify=true", {"user_id": "al" + LONE, "signature": sig}, "user_id"),
            (
                "/auth/login?verify=true",
                {"user_id": "alice", "signature": sig, "challenge": "c" + LONE},
                "challenge",
            ),
            ("/auth/login?verify=true", {"user_id": "alice", "signature": LONE}, "signature"),
        ]
        for path, body, name in cases:
            code, out = yield self.post_raw(path, surrogate_json(body))
            self.assertEqual((code, out["error"]["code"]), (400, "invalid_request"), body)
            self.assertIn(name, out["error"]["message"])
        token = yield self.server.login("alice", self.alice_key)
        self.assertEqual(token.count("."), 2)
