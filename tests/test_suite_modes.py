"""The end-to-end suite's modes (``support.suite_mode``): with
``WSSERVER_TEST_WORKERS=2`` the tests' connections really cross workers."""

from __future__ import annotations

import gc
import re
import socket
import threading

from twisted.internet import defer
from twisted.trial import unittest

from .support import LiveServer, eventually, suite_mode

_CONNECTED = re.compile(r"worker (\d)/2 \(pid \d+\): [^\n]*connected: alice from ")


class WorkersModeTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        if suite_mode() != "workers":
            raise unittest.SkipTest("checks WSSERVER_TEST_WORKERS=2 (not the mode of this run)")

    @defer.inlineCallbacks
    def test_connections_land_on_both_workers(self):
        """LiveServer runs a real --workers 2 process whose two workers both
        serve: the tests' WebSocket connections are taken by each (seen in the
        parent's log, where each worker's lines carry its number)."""
        server = LiveServer(self)
        self.assertEqual(server.mode, "workers")
        self.assertEqual(sorted(server.worker_pids), ["1/2", "2/2"])
        _, token = yield server.user("alice")
        clients = []
        for _ in range(40):
            clients.append((yield server.connect(token, testcase=self)))
            if len(set(_CONNECTED.findall(server.log_text()))) == 2:
                break
        # The last connection's log line may come a moment after its upgrade.
        yield eventually(
            lambda: set(_CONNECTED.findall(server.log_text())) == {"1", "2"},
            "connections on both workers",
        )
        # And a message crosses between them: every connection gets it.
        clients[0].send_json({"to": "alice", "content": "to every device"})
        for client in clients:
            got = yield client.next_of("message")
            self.assertEqual(got["content"], "to every device")


class _SilentRedis:
    """A TCP server that answers the start-up BROKER check (its first
    connection: SELECT and PING) like Redis, then reads every later
    connection's commands and never answers them."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.heard: list[bytes] = []
        self._socks: list[socket.socket] = []
        testcase.addCleanup(self.close)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        first = True
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(sock)
            if first:
                first = False
                sock.recv(4096)
                sock.sendall(b"+OK\r\n")
                sock.recv(4096)
                sock.sendall(b"+PONG\r\n")
                sock.close()
                continue
            threading.Thread(target=self._listen, args=(sock,), daemon=True).start()

    def _listen(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.heard.append(data)

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            sock.close()


class StopWhileConnectingTests(unittest.TestCase):
    """Found by the suite's cluster mode: short tests stop their nodes while
    the Redis connections are still being set up."""

    @defer.inlineCallbacks
    def test_stopping_before_redis_answered_logs_no_error(self):
        """A node stopped while Redis has not answered its connections' first
        commands (SELECT, SUBSCRIBE) stops quietly: no error is logged, and no
        failed Deferred is left unhandled (txredisapi's "could not set dbid",
        which without a handler was logged when collected, in whatever test
        ran then: seen failing in the cluster mode's runs)."""
        from .cluster import start_node
        from .services import fresh_postgres_database

        redis = _SilentRedis(self)
        db = fresh_postgres_database(self)
        node = start_node(
            self, db, "wstest:silent:", "quiet", broker=f"redis://127.0.0.1:{redis.port}/0"
        )
        yield eventually(lambda: b"SELECT" in b"".join(redis.heard), "the node's SELECT")
        yield node.stop()
        gc.collect()  # a failed Deferred nobody handled is logged when collected
        self.assertEqual(self.flushLoggedErrors(), [])
