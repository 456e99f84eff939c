"""Connection caps: per user (1008) and per client address (closed at accept)."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from .support import LiveServer, within


class _Idle(protocol.Protocol):
    """A TCP connection that says nothing and records when it is closed."""

    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class PeerLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def idle(self, server):
        conn = _Idle()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: conn))

        def close():
            if not conn.lost.called:
                conn.transport.abortConnection()
            return conn.lost

        self.addCleanup(close)
        return conn

    @defer.inlineCallbacks
    def test_handshakes_per_address_are_capped(self):
        """Past MAX_HANDSHAKES_PER_IP connections that are not WebSockets yet, a new
        connection is closed at once without an answer; one closing makes room."""
        server = LiveServer(self, {"MAX_HANDSHAKES_PER_IP": "2"})
        first = yield self.idle(server)
        yield self.idle(server)
        third = yield self.idle(server)
        yield within(third.lost, 5)
        self.assertEqual(third.data, b"")
        self.assertEqual(server.service.peers.counts("127.0.0.1"), (2, 2))
        first.transport.loseConnection()
        yield first.lost
        fourth = yield self.idle(server)
        self.assertFalse(fourth.lost.called)
        self.assertEqual(server.service.peers.counts("127.0.0.1"), (2, 2))

    @defer.inlineCallbacks
    def test_websockets_leave_the_handshake_count(self):
        """Open WebSockets count against MAX_CONNECTIONS_PER_IP but not against the
        handshake cap; past the connection cap new connections are closed."""
        server = LiveServer(self, {"MAX_HANDSHAKES_PER_IP": "2", "MAX_CONNECTIONS_PER_IP": "4"})
        _, token = yield server.user("alice")
        yield server.connect(token, testcase=self)
        yield server.connect(token, testcase=self)
        yield server._pool.closeCachedConnections()
        # The server sees the HTTP connections close a moment later.
        for _ in range(50):
            if server.service.peers.counts("127.0.0.1") == (2, 0):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(server.service.peers.counts("127.0.0.1"), (2, 0))
        yield self.idle(server)
        yield self.idle(server)
        fifth = yield self.idle(server)
        yield within(fifth.lost, 5)
        self.assertEqual(server.service.peers.counts("127.0.0.1"), (4, 2))


class UserLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_other_users_are_not_affected(self):
        """A user at MAX_CONNECTIONS_PER_USER does not stop another user connecting."""
        server = LiveServer(self, {"MAX_CONNECTIONS_PER_USER": "1"})
        _, alice = yield server.user("alice")
        _, bob = yield server.user("bob")
        yield server.connect(alice, testcase=self)
        extra = yield server.connect(alice)
        code = yield extra.wait_closed()
        self.assertEqual(code, 1008)
        client = yield server.connect(bob, testcase=self)
        client.send_json({"to": "alice", "content": "hi"})
        ack = yield client.next_of("ack")
        self.assertEqual(ack["status"], "delivered")
