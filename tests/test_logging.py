"""What the server logs: one line per connect, close and refusal, and never a
token, a signature or message content."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from .support import LiveServer, ServerLog, connect_ws, sign_message, vector_key


class LogHygieneTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_no_secrets_or_content_in_any_log_event(self):
        """A whole session (login, token in the query string, signed, refused and
        broadcast messages, a forged token) logs connects, closes and refusals with
        user ids and codes, and no token, signature or content."""
        server = LiveServer(self)
        log = ServerLog(self, server, fields=True)
        key, token = yield server.user("alice", vector_key("alice"))
        _, bob_token = yield server.user("bob")
        alice = yield connect_ws(f"{server.ws_base}?token={token}", None, testcase=self)
        secret_text = "the launch code is 0000"
        sig = sign_message(key, "alice", "bob", secret_text, "n-1")
        alice.send_json({"to": "bob", "content": secret_text, "signature": sig, "nonce": "n-1"})
        yield alice.next_of("ack")
        alice.send_json({"to": "nobody", "content": secret_text})
        yield alice.next_of("system")
        alice.send_json({"to": "broadcast", "content": secret_text})
        yield alice.next_of("ack")
        code, _ = yield server.get("/ws?token=forged.token.value")
        self.assertEqual(code, 401)
        yield alice.close_and_wait()

        text = "\n".join((yield log.lines()))
        for secret in (token, bob_token, sig, secret_text, "forged.token.value"):
            self.assertNotIn(secret, text)
        self.assertIn("connected: alice", text)
        self.assertIn("closed: alice code=1000", text)
        self.assertIn("refused a message from alice: unknown_recipient", text)
        self.assertIn("refused a WebSocket upgrade: unauthorized", text)
        self.assertIn("/ws?token=<redacted>", text)
