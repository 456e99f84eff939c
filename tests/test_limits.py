"""Connection caps: per user (1008) and per client address (closed at accept)."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from .support import LiveServer, eventually, within

HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


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
    def answered(self, conn):
        """Proof that the server took ``conn``: it answers an HTTP request on it
        (a refused connection is closed before anything is read)."""
        conn.transport.write(HEALTH)
        yield eventually(lambda: b"\r\n\r\n" in conn.data or conn.lost.called, "an answer")
        self.assertTrue(conn.data.startswith(b"HTTP/1.1 200"), conn.data)

    @defer.inlineCallbacks
    def test_handshakes_per_address_are_capped(self):
        """Past MAX_HANDSHAKES_PER_IP connections that are not WebSockets yet, a new
        connection is closed at once without an answer; one closing gives its
        place back, so the next one is served."""
        server = LiveServer(self, {"MAX_HANDSHAKES_PER_IP": "2"})
        peers = server.service.peers
        first = yield self.idle(server)
        second = yield self.idle(server)
        yield self.answered(second)
        third = yield self.idle(server)
        yield within(third.lost, 30)
        self.assertEqual(third.data, b"")
        self.assertEqual(peers.counts("127.0.0.1"), (2, 2))
        first.transport.loseConnection()
        yield first.lost
        yield eventually(lambda: peers.counts("127.0.0.1") == (1, 1), "the place is given back")
        fourth = yield self.idle(server)
        yield self.answered(fourth)
        self.assertEqual(peers.counts("127.0.0.1"), (2, 2))

    @defer.inlineCallbacks
    def test_websockets_leave_the_handshake_count(self):
        """Open WebSockets count against MAX_CONNECTIONS_PER_IP but not against the
        handshake cap; past the connection cap new connections are closed; a
        WebSocket that closes gives its place back."""
        server = LiveServer(self, {"MAX_HANDSHAKES_PER_IP": "2", "MAX_CONNECTIONS_PER_IP": "4"})
        peers = server.service.peers
        _, token = yield server.user("alice")
        # Per-address limits are per node (section 11): in a test cluster every
        # connection goes to the first node, the one whose counts are read.
        ws1 = yield server.connect(token, node=0, testcase=self)
        yield server.connect(token, node=0, testcase=self)
        yield server._pool.closeCachedConnections()
        # The server sees the HTTP connections close a moment later.
        yield eventually(lambda: peers.counts("127.0.0.1") == (2, 0), "the HTTP connections go")
        idle = yield self.idle(server)
        yield self.idle(server)
        fifth = yield self.idle(server)
        yield within(fifth.lost, 30)
        self.assertEqual(peers.counts("127.0.0.1"), (4, 2))
        yield ws1.close_and_wait()
        yield eventually(lambda: peers.counts("127.0.0.1") == (3, 2), "the WebSocket's place")
        idle.transport.loseConnection()
        yield eventually(lambda: peers.counts("127.0.0.1") == (2, 1), "the idle one's place")
        sixth = yield server.connect(token, node=0, testcase=self)
        sixth.send_json({"to": "alice", "content": "room again"})
        ack = yield sixth.next_of("ack")
        self.assertEqual(ack["content"], "room again")


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
        if server.multi_node and ack["status"] == "pending":
            # alice is on another node: a status frame says delivered (section 11).
            ack = yield client.next_of("status")
        self.assertEqual(ack["status"], "delivered")
