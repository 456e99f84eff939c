"""The Python client library against the real server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet import defer, reactor, task, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from wsserver import client as wc

from .support import VECTORS, LiveServer, eventually, vector_key
from .test_tls import make_certificate


def _endpoint_timer(call) -> bool:
    """A reactor call left by a HostnameEndpoint's connection attempts."""
    owner = getattr(call.func, "__self__", None)
    func = getattr(owner, "f", call.func)
    return call.active() and getattr(func, "__module__", "") == "twisted.internet.endpoints"


def _connection(selectable) -> bool:
    """An open TCP connection (not a listening port, not the reactor's waker)."""
    return isinstance(selectable, tcp.Connection)


@defer.inlineCallbacks
def reactor_quiet(seconds: float = 20):
    """Wait until the connections of a test are closed on both sides and
    HostnameEndpoint's connection-attempt timers have ended (they outlive a
    quick connect), so that trial finds a clean reactor.  Polls, with a
    generous deadline: closing takes a few reactor turns, more on a loaded
    machine."""
    deadline = reactor.seconds() + seconds
    while any(_endpoint_timer(c) for c in reactor.getDelayedCalls()) or any(
        _connection(s) for s in reactor.getReaders() + reactor.getWriters()
    ):
        if reactor.seconds() > deadline:
            break
        yield task.deferLater(reactor, 0.05, lambda: None)


def _recording(method, into: list):
    """``method`` wrapped to note its instance in ``into`` first."""

    def recorded(self, *args, **kwargs):
        into.append(self)
        return method(self, *args, **kwargs)

    return recorded


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
        return self.arrived.get().addTimeout(30, reactor)


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
        self.addCleanup(reactor_quiet)  # runs last: after the clients and the server
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
        # A list, not a Deferred: on several nodes the live message's ack may
        # say pending too, and a second status frame follows (section 11).
        statuses: list[dict] = []
        alice.on_status = statuses.append
        yield bob.connect()
        frame, verified = yield inbox.next()
        self.assertEqual((frame["content"], verified), ("before you came", True))
        yield eventually(lambda: statuses, "a status frame")
        got = statuses[0]
        self.assertEqual((got["id"], got["status"]), (ack["id"], "delivered"))
        ack2 = yield alice.send("bob", "live")
        frame, verified = yield inbox.next()
        self.assertEqual((frame["id"], verified), (ack2["id"], True))

    @defer.inlineCallbacks
    def test_refusal_fails_the_send(self):
        """A refused message fails its Deferred with the server's code, and only
        that: on_system is not called for the refusal as well."""
        alice = yield self.make(self.server, "alice")
        system = []
        alice.on_system = system.append
        yield alice.connect()
        with self.assertRaises(wc.ServerError) as ctx:
            yield alice.send("nobody", "hello?")
        self.assertEqual(ctx.exception.code, "unknown_recipient")
        self.assertEqual(system, [])  # reported once: by the send, not on_system too

    @defer.inlineCallbacks
    def test_refused_upgrade_fails_connect(self):
        """A first connection whose upgrade is refused (a forged token) fails
        connect() instead of retrying forever, naming the HTTP status."""
        alice = yield self.make(self.server, "alice")
        alice.token = "forged.token.value"
        with self.assertRaises(wc.ServerError) as ctx:
            yield alice.connect().addTimeout(10, reactor)
        self.assertEqual(ctx.exception.code, "upgrade_refused")
        self.assertEqual(ctx.exception.message, "the WebSocket upgrade failed (HTTP 401)")

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
        stored = yield self.server.store.count_messages()
        self.assertEqual(stored, 3)
        self.assertEqual(ack["content"], "sent as the line dropped")

    @defer.inlineCallbacks
    def test_close_stops_a_reconnect_in_flight(self):
        """close() while a reconnect's TCP connect is still pending cancels it
        and schedules nothing more (it used to leave the attempt running, and
        the connection it made stayed open with nobody to close it)."""
        alice = yield self.make(self.server, "alice")
        yield alice.connect()
        attempts: list[defer.Deferred] = []
        cancelled: list[defer.Deferred] = []

        class Held:  # an endpoint whose connect never completes by itself
            def connect(self, factory):
                attempts.append(defer.Deferred(cancelled.append))
                return attempts[-1]

        alice._endpoint = Held
        alice._conn.transport.abortConnection()
        yield eventually(lambda: attempts, "a reconnect attempt")
        yield alice.close()
        self.assertEqual(cancelled, attempts)
        self.assertIsNone(alice._retrying)

    @defer.inlineCallbacks
    def test_connect_close_connect_makes_one_connection(self):
        """connect(), close() while its login is under way, connect() again:
        only the second makes a connection (the first dial, its login
        answered after close(), used to dial on, since the client wanted a
        connection again, and a second one stayed open that close() never
        reached)."""
        alice = yield self.make(self.server, "alice")
        made: list = []
        dials: list[defer.Deferred] = []
        self.patch(wc._Conn, "connectionMade", _recording(wc._Conn.connectionMade, made))
        dial = alice._dial
        alice._dial = lambda *a, **k: dials.append(dial(*a, **k)) or dials[-1]
        first = alice.connect()  # logs in first: the token is None
        yield alice.close()
        self.assertFailure(first, defer.CancelledError)
        yield first
        yield alice.connect()
        yield defer.DeferredList(dials)  # both dials have ended
        self.assertEqual(len(dials), 2)
        self.assertEqual(len(made), 1)

    @defer.inlineCallbacks
    def test_close_during_the_upgrade_closes_the_connection(self):
        """close() after the TCP connect but before the server answered the
        upgrade drops that connection, fires once it is gone, and fails the
        pending connect() with CancelledError."""
        accepted: list = []
        lost: list = []

        class Silent(Protocol):  # accepts, never answers the upgrade
            def connectionMade(self):
                accepted.append(self)

            def connectionLost(self, reason=None):
                lost.append(reason)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        c = wc.Client(f"http://127.0.0.1:{port.getHost().port}", "alice", wc.generate_key())
        c.token = "not.needed.here"  # no login: the upgrade is what hangs
        connected = c.connect()
        yield eventually(lambda: accepted, "the server accepted the connection")
        yield c.close().addTimeout(10, reactor)
        self.assertFailure(connected, defer.CancelledError)
        yield connected
        yield eventually(lambda: lost, "the server saw the connection go")


class InboxTests(unittest.TestCase):
    def test_a_burst_behind_a_slow_check_is_handled_in_order(self):
        """The first received message waits for its signature check (a key
        log fetched, say); 2,000 more come meanwhile and check at once.  When
        the first is done, every one reaches on_message, in order, and the
        inbox takes the next (Twisted's DeferredLock, used before, released
        into the next waiter from inside the last one's callback: the stack
        overflowed after about 120 and the inbox stayed locked for good)."""
        client = wc.Client("http://h:8080", "alice", wc.generate_key())
        gate: defer.Deferred = defer.Deferred()
        client._verify = lambda frame: gate if frame["id"] == 1 else defer.succeed(None)
        shown: list[int] = []
        client.on_message = lambda frame, verified: shown.append(frame["id"])
        for msg_id in range(1, 2002):
            client._frame({"type": "message", "id": msg_id})
        self.assertEqual(shown, [])
        gate.callback(None)
        self.assertEqual(shown, list(range(1, 2002)))
        client._frame({"type": "message", "id": 2002})
        self.assertEqual(shown[-1], 2002)


class ServerUrlTests(unittest.TestCase):
    def test_server_url_must_be_a_bare_root(self):
        """Client refuses a server URL with a path, query, credentials or a bad
        port, saying what is expected (never repeating a password)."""
        key = wc.generate_key()
        for url, wanted in (
            ("http://h:8080/sub/path", "root"),
            ("http://h:8080/?x=1", "root"),
            ("http://user:s3cret@h:8080", "user name or password"),
            ("http://h:99999", "1 to 65535"),
            ("http://h:0", "1 to 65535"),
        ):
            with self.assertRaises(ValueError, msg=url) as ctx:
                wc.Client(url, "alice", key)
            self.assertIn(wanted, str(ctx.exception))
            self.assertNotIn("s3cret", str(ctx.exception))
        self.assertEqual(wc.Client("http://h:8080/", "alice", key).server, "http://h:8080")


class GiveUpTests(ClientBase):
    @defer.inlineCallbacks
    def test_gives_up_when_the_server_forgets_the_user(self):
        """Reconnecting to a server restarted on an empty database: the login
        answers unknown_user, so the client stops, tells on_give_up, and fails
        the message still waiting for its ack."""
        alice = yield self.make(self.server, "alice")
        retries: list[str] = []
        gave_up: defer.Deferred = defer.Deferred()
        alice.on_retry = lambda delay, why: retries.append(why)
        alice.on_give_up = gave_up.callback
        yield alice.connect()
        port = self.server.port
        # Not LiveServer.stop(): its clean-up of txaio timers would also cancel
        # this in-process client's, which Autobahn then cancels again.
        self.server._stopped = True
        yield self.server.service.stopService()
        pending = alice.send("alice", "into the void")
        LiveServer(
            self, {"SERVER_ADDR": f"tcp:{port}:interface=127.0.0.1", "DATABASE": self.mktemp()}
        )
        err = yield gave_up.addTimeout(30, reactor)
        self.assertIsInstance(err, wc.ServerError)
        self.assertEqual(err.code, "unknown_user")
        self.assertTrue(retries)
        with self.assertRaises(wc.ServerError):
            yield pending
        self.assertIsNone(alice._conn)
        self.assertIsNone(alice._retrying)


class DeviceTests(ClientBase):
    """Section 12 through the library: a second device, revocation, sign-out."""

    @defer.inlineCallbacks
    def test_a_linked_device_logs_in_with_its_key_and_stops_when_revoked(self):
        """A second key is linked (its pairing text approved by the first), logs
        in with its own key_id and sends; the first verifies the message with
        that key.  Revoked, its connection closes with 4003 and the client gives
        up with Stopped (no reconnect), failing what waited for an ack."""
        first = yield self.make(self.server, "alice")
        second = yield self.make(self.server, "alice", register=False)
        text = yield second.link()
        new_id = yield first.approve(text, "laptop")
        self.assertEqual(new_id, second.key_id)
        inbox = Inbox(first)
        yield first.connect()
        retries: list[str] = []
        gave_up: defer.Deferred = defer.Deferred()
        second.on_retry = lambda delay, why: retries.append(why)
        second.on_give_up = gave_up.callback
        yield second.connect()
        ack = yield second.send("alice", "from the laptop")
        self.assertEqual(ack["key_id"], second.key_id)
        frame, verified = yield inbox.next()
        self.assertEqual((frame["key_id"], verified), (second.key_id, True))
        listed = yield first.devices()
        self.assertEqual(
            [(d["key_id"], d["name"], d["this_device"]) for d in listed],
            [(first.key_id, None, True), (second.key_id, "laptop", False)],
        )
        yield first.revoke(second.key_id)
        err = yield gave_up.addTimeout(30, reactor)
        self.assertIsInstance(err, wc.Stopped)
        self.assertEqual((err.code, err.close_code), ("key_revoked", 4003))
        self.assertEqual(retries, [])
        self.assertIsNone(second._retrying)
        with self.assertRaises(wc.ServerError) as caught:
            yield second.login()
        self.assertEqual(caught.exception.code, "invalid_signature")

    @defer.inlineCallbacks
    def test_logout_closes_that_sessions_connection_with_4004(self):
        """logout() revokes the client's own token: its connection closes with
        4004 and the client stops; a session of another token is untouched
        until logout(everywhere=True)."""
        alice = yield self.make(self.server, "alice")
        other = wc.Client(self.server.base, "alice", alice.key)
        self.addCleanup(other.close)
        gave_up: defer.Deferred = defer.Deferred()
        alice.on_give_up = gave_up.callback
        other_gave_up: defer.Deferred = defer.Deferred()
        other.on_give_up = other_gave_up.callback
        yield alice.connect()
        yield other.connect()
        reply = yield alice.logout()
        self.assertEqual(reply, {"signed_out": True})
        err = yield gave_up.addTimeout(30, reactor)
        self.assertEqual((err.code, err.close_code), ("signed_out", 4004))
        self.assertFalse(other_gave_up.called)
        ack = yield other.send("alice", "still here")
        self.assertEqual(ack["content"], "still here")
        yield alice.logout(everywhere=True)
        err = yield other_gave_up.addTimeout(30, reactor)
        self.assertEqual(err.close_code, 4004)


class ExpiryTests(ClientBase):
    env = {"TOKEN_TTL": "6"}

    @defer.inlineCallbacks
    def test_logs_in_again_after_4001(self):
        """When the token expires (close 4001) the client says it is retrying, logs
        in again and goes on."""
        alice = yield self.make(self.server, "alice")
        retries: list[tuple[float, str]] = []
        again: defer.Deferred = defer.Deferred()
        alice.on_retry = lambda delay, why: retries.append((delay, why))
        connects: list[str | None] = []

        def connected() -> None:
            connects.append(alice.token)
            if len(connects) == 2:
                again.callback(None)

        alice.on_connect = connected
        yield alice.connect()
        first = alice.token
        yield again.addTimeout(30, reactor)  # the expiry, then the new session
        self.assertIn("session expired", retries[0][1])
        inbox = Inbox(alice)
        ack = yield alice.send("alice", "still here").addTimeout(30, reactor)
        frame, verified = yield inbox.next()  # checked with the key log's key
        self.assertEqual((frame["id"], verified), (ack["id"], True))
        self.assertEqual(ack["content"], "still here")
        self.assertNotEqual(alice.token, first)


class TLSClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_private_ca(self):
        """Over HTTPS/WSS with a private CA given as cafile, hostname verified."""
        self.addCleanup(reactor_quiet)  # see ClientBase.setUp
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
        with self.assertRaises(wc.ConnectionProblem) as ctx:
            yield stranger.register("Bob")
        self.assertEqual(ctx.exception.kind, "tls_untrusted")
        self.assertIn(url, str(ctx.exception))
