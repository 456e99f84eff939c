"""The end-to-end suite's modes (``support.suite_mode``): with
``WSSERVER_TEST_WORKERS=2`` the tests' connections really cross workers."""

from __future__ import annotations

import re

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
