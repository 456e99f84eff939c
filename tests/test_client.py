"""The Python client library against the real server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

from wsserver import client as wc

from .support import VECTORS, LiveServer, vector_key
from .test_tls import make_certificate


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class Inbox:
    """Collects what a client reports."""

    def __init__(self, c: wc.Client) -> None:
        self.messages: list[tuple[dict, bool | None]] = []
        self.statuses: list[dict] = []
        self.arrived: defer.DeferredQueue = defer.DeferredQueue()
        c.on_message = self.message
        c.on_status = self.statuses.append

    def message(self, frame: dict, verified: bool | None) -> None:
        self.messages.append((frame, verified))
        self.arrived.put((frame, verified))

    def next(self) -> defer.Deferred:
        return self.arrived.get().addTimeout(10, reactor)


class KeyFileTests(unittest.TestCase):
    def test_key_file_round_trip_mode_and_no_overwrite(self):
        """A saved key loads back the same, is mode 0600, and is never overwritten."""
        path = self.mktemp()
        key = wc.generate_key()
        wc.save_key(key, path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(bytes(wc.load_key(path)), bytes(key))
        with self.assertRaises(FileExistsError):
            wc.save_key(wc.generate_key(), path)
        self.assertEqual(bytes(wc.load_key(path)), bytes(key))
        bad = Path(self.mktemp())
        bad.write_text("not a key")
        with self.assertRaises(ValueError):
            wc.load_key(str(bad))

    def test_check_signature_with_the_vectors(self):
        """Local verification: the vectors verify, the tampered one does not."""
        bob = vector_key("alice").verify_key
        for vec in VECTORS["messages"]:
            if vec["from"] == "alice":
                frame = {
                    "from": "alice",
                    "to": vec["to"],
                    "content": vec["content"],
                    "nonce": vec["nonce"] or None,
                    "signature": vec["signature"],
                }
                self.assertTrue(wc.check_signature(frame, bob))
        bad = VECTORS["invalid_messages"][0]
        frame = {
            "from": "alice",
            "to": bad["to"],
            "content": bad["content"],
            "nonce": bad["nonce"],
            "signature": bad["signature"],
        }
        self.assertFalse(wc.check_signature(frame, bob))
        self.assertIsNone(wc.check_signature({**frame, "signature": None}, bob))


class ClientBase(unittest.TestCase):
    """A live server and a way to make registered clients (no tests of its own)."""

    timeout = 60
    env: dict = {}

    @defer.inlineCallbacks
    def make(self, server, user_id, register=True):
        c = wc.Client(server.base, user_id, wc.generate_key(), cafile=self.cafile)
        if register:
            yield c.register(user_id.title())
        self.addCleanup(c.close)
        return c

    def setUp(self):
        # twisted.web's Agent connects through HostnameEndpoint, whose
        # connection-attempt timer outlives a quick connect by up to 0.3 s.
        self.addCleanup(task.deferLater, reactor, 0.5, lambda: None)
        self.cafile = None
        self.server = LiveServer(self, dict(self.env))


class ClientTests(ClientBase):
    @defer.inlineCallbacks
    def test_conversation_verified_locally(self):
        """Two clients register, log in, exchange signed messages; each checks the
        other's signature itself and gets its ack and the delivered status."""
        alice = yield self.make(self.server, "alice")
        bob = yield self.make(self.server, "bob")
        inbox = Inbox(bob)
        yield alice.connect()
        ack = yield alice.send("bob", "before you came")
        self.assertEqual(ack["status"], "pending")
        status = defer.Deferred()
        alice.on_status = status.callback
        yield bob.connect()
        frame, verified = yield inbox.next()
        self.assertEqual((frame["content"], verified), ("before you came", True))
        got = yield status.addTimeout(10, reactor)
        self.assertEqual((got["id"], got["status"]), (ack["id"], "delivered"))
        ack2 = yield alice.send("bob", "live")
        frame, verified = yield inbox.next()
        self.assertEqual((frame["id"], verified), (ack2["id"], True))

    @defer.inlineCallbacks
    def test_refusal_fails_the_send(self):
        """A refused message fails its Deferred with the server's code."""
        alice = yield self.make(self.server, "alice")
        yield alice.connect()
        with self.assertRaises(wc.ServerError) as ctx:
            yield alice.send("nobody", "hello?")
        self.assertEqual(ctx.exception.code, "unknown_recipient")

    @defer.inlineCallbacks
    def test_refused_upgrade_fails_connect(self):
        """A first connection whose upgrade is refused (a forged token) fails
        connect() instead of retrying forever."""
        alice = yield self.make(self.server, "alice")
        alice.token = "forged.token.value"
        with self.assertRaises(wc.ServerError) as ctx:
            yield alice.connect().addTimeout(10, reactor)
        self.assertEqual(ctx.exception.code, "upgrade_refused")

    @defer.inlineCallbacks
    def test_http_errors_carry_the_server_code(self):
        """Registering a taken id and logging in unknown fail with the server's codes."""
        yield self.make(self.server, "alice")
        dup = wc.Client(self.server.base, "alice", wc.generate_key())
        with self.assertRaises(wc.ServerError) as ctx:
            yield dup.register("Other")
        self.assertEqual((ctx.exception.code, ctx.exception.status), ("user_exists", 409))
        ghost = wc.Client(self.server.base, "ghost", wc.generate_key())
        with self.assertRaises(wc.ServerError) as ctx:
            yield ghost.login()
        self.assertEqual(ctx.exception.code, "unknown_user")

    @defer.inlineCallbacks
    def test_drop_reconnect_since_and_resend_without_doubles(self):
        """After the connection drops mid-send, the client reconnects with since, gets
        what it missed, and resends the unacknowledged message once (same nonce)."""
        alice = yield self.make(self.server, "alice")
        bob = yield self.make(self.server, "bob")
        inbox = Inbox(alice)
        yield alice.connect()
        yield bob.connect()
        yield bob.send("alice", "one")
        yield inbox.next()
        pending = alice.send("bob", "sent as the line dropped")
        alice._conn.transport.abortConnection()
        missed = yield bob.send("alice", "while you were away")
        ack = yield pending.addTimeout(20, reactor)
        frame, _ = yield inbox.next()
        self.assertEqual(frame["id"], missed["id"])
        stored = yield self.server.service.store.count_messages()
        self.assertEqual(stored, 3)
        self.assertEqual(ack["content"], "sent as the line dropped")


class ExpiryTests(ClientBase):
    env = {"TOKEN_TTL": "2"}

    @defer.inlineCallbacks
    def test_logs_in_again_after_4001(self):
        """When the token expires (close 4001) the client logs in again and goes on."""
        alice = yield self.make(self.server, "alice")
        yield alice.connect()
        first = alice.token
        yield sleep(3)
        ack = yield alice.send("alice", "still here").addTimeout(20, reactor)
        self.assertEqual(ack["content"], "still here")
        self.assertNotEqual(alice.token, first)


class TLSClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_private_ca(self):
        """Over HTTPS/WSS with a private CA given as cafile, hostname verified."""
        # HostnameEndpoint's connection-attempt timer (see ClientTests.setUp).
        self.addCleanup(task.deferLater, reactor, 0.5, lambda: None)
        cert, key = make_certificate(Path(self.mktemp()))
        server = LiveServer(self, {"TLS_CERT": str(cert), "TLS_KEY": str(key)})
        url = f"https://localhost:{server.port}"
        alice = wc.Client(url, "alice", wc.generate_key(), cafile=str(cert.with_name("ca.pem")))
        self.addCleanup(alice.close)
        yield alice.register("Alice")
        yield alice.connect()
        ack = yield alice.send("alice", "over tls")
        self.assertEqual(ack["verification"], "verified")
        stranger = wc.Client(url, "bob", wc.generate_key())  # no cafile: untrusted
        with self.assertRaises((ResponseNeverReceived, RequestTransmissionFailed)) as ctx:
            yield stranger.register("Bob")
        self.assertIn("certificate verify failed", str(ctx.exception.reasons[0].value))
