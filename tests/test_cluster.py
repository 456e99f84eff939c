"""Two in-process nodes on one PostgreSQL database and one Redis (protocol
section 11): live traffic, broadcasts and status cross nodes."""

from __future__ import annotations

import random
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from wsserver.messages import BROADCAST

from .cluster import OwnRedis, ready, start_node, two_nodes, wait_for
from .services import fresh_postgres_database, fresh_redis_prefix, redis_url, require_redis
from .support import LiveServer, RemoteServer, Twistd, free_port


class TwoNodeTests(unittest.TestCase):
    """Clients of two nodes of one cluster talk as if to one server."""

    timeout = 120

    @defer.inlineCallbacks
    def test_direct_message_and_its_status_cross_nodes(self):
        """A direct message sent on one node reaches its recipient on the other,
        and the sender learns it was delivered (ack or status frame)."""
        a, b = yield two_nodes(self)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield b.user("bob")
        alice = yield a.connect(alice_token, testcase=self)
        bob = yield b.connect(bob_token, testcase=self)
        alice.send_json({"to": "bob", "content": "over there", "nonce": "n-1"})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual(
            (got["id"], got["from"], got["content"]), (ack["id"], "alice", "over there")
        )
        if ack["status"] != "delivered":
            status = yield alice.next_of("status")
            self.assertEqual((status["id"], status["status"]), (ack["id"], "delivered"))
        yield a.service.store.drain()
        yield b.service.store.drain()
        stored = yield a.service.store.get_message(ack["id"])
        self.assertEqual(stored.status, "delivered")

    @defer.inlineCallbacks
    def test_broadcast_counts_connections_on_every_node(self):
        """A broadcast reaches connections on both nodes; its sender gets a status
        frame saying delivered with the cluster-wide recipients."""
        a, b = yield two_nodes(self)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield b.user("bob")
        _, carol_token = yield a.user("carol")
        alice = yield a.connect(alice_token, testcase=self)
        bob = yield b.connect(bob_token, testcase=self)
        carol = yield a.connect(carol_token, testcase=self)
        alice.send_json({"to": BROADCAST, "content": "all", "nonce": "b-1"})
        ack = yield alice.next_of("ack")
        for client in (bob, carol):
            got = yield client.next_of("message")
            self.assertEqual((got["id"], got["to"]), (ack["id"], BROADCAST))
        self.assertEqual(ack["status"], "pending")
        status = yield alice.next_of("status")
        self.assertEqual(
            (status["id"], status["status"], status["recipients"]), (ack["id"], "delivered", 2)
        )

    @defer.inlineCallbacks
    def test_order_per_connection_across_nodes(self):
        """Messages from senders on both nodes reach a recipient in increasing id
        order, none missing."""
        a, b = yield two_nodes(self)
        _, alice_token = yield a.user("alice")
        _, dave_token = yield b.user("dave")
        _, bob_token = yield b.user("bob")
        alice = yield a.connect(alice_token, testcase=self)
        dave = yield b.connect(dave_token, testcase=self)
        bob = yield b.connect(bob_token, testcase=self)
        for i in range(10):
            alice.send_json({"to": "bob", "content": f"a{i}", "nonce": f"a-{i}"})
            dave.send_json({"to": "bob", "content": f"d{i}", "nonce": f"d-{i}"})
        acks = yield alice.take(10, "ack")
        acks += yield dave.take(10, "ack")
        got = yield bob.take(20, "message")
        ids = [m["id"] for m in got]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(set(ids), {ack["id"] for ack in acks})

    @defer.inlineCallbacks
    def test_a_missed_publication_is_read_back_from_the_database(self):
        """A node that never hears a publication (dropped on purpose) still
        delivers the message to its connection, from the database."""
        a, b = yield two_nodes(self)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield b.user("bob")
        alice = yield a.connect(alice_token, testcase=self)
        bob = yield b.connect(bob_token, testcase=self)
        heard = []
        b.service.broker._received = heard.append  # node b drops every publication
        alice.send_json({"to": "bob", "content": "lost on the wire", "nonce": "m-1"})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (ack["id"], "lost on the wire"))
        self.assertTrue(heard, "node b should have been sent the publication it dropped")

    @defer.inlineCallbacks
    def test_two_nodes_on_one_sqlite_file_with_a_broker(self):
        """Two nodes sharing one SQLite file through a broker deliver each
        other's messages in id order (SQLite hands out ids in commit order)."""
        db = self.mktemp() + ".db"
        prefix = fresh_redis_prefix(self)
        a = start_node(self, db, prefix, "lite-a")
        b = start_node(self, db, prefix, "lite-b")
        yield ready(a)
        yield ready(b)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield b.user("bob")
        _, carol_token = yield b.user("carol")
        alice = yield a.connect(alice_token, testcase=self)
        bob = yield b.connect(bob_token, testcase=self)
        carol = yield b.connect(carol_token, testcase=self)
        for i in range(5):
            alice.send_json({"to": "carol", "content": f"a{i}", "nonce": f"a-{i}"})
            bob.send_json({"to": "carol", "content": f"b{i}", "nonce": f"b-{i}"})
        acks = (yield alice.take(5, "ack")) + (yield bob.take(5, "ack"))
        got = yield carol.take(10, "message")
        ids = [m["id"] for m in got]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(set(ids), {ack["id"] for ack in acks})


class ReadyTests(unittest.TestCase):
    """GET /ready (protocol section 11)."""

    timeout = 120

    @defer.inlineCallbacks
    def test_ready_without_a_broker_checks_the_database(self):
        """A single node is ready when its database answers; the answer names
        the node and has no broker check."""
        server = LiveServer(self, env={"NODE_NAME": "solo"})
        code, body = yield server.get("/ready")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"ready": True, "node": "solo", "checks": {"database": "ok"}})

    @defer.inlineCallbacks
    def test_ready_is_503_while_redis_is_away_and_200_once_it_is_back(self):
        """A node whose Redis stops answers 503 naming the broker check (and
        /health stays 200); once Redis is back it subscribes again, catches up,
        and answers 200; messages sent meanwhile still reach their recipient."""
        require_redis()
        own = OwnRedis(self)
        own.start()
        db = self.mktemp() + ".db"
        prefix = "wstest:"
        node = start_node(self, db, prefix, "node-r", broker=own.url)
        yield ready(node)
        _, alice_token = yield node.user("alice")
        _, bob_token = yield node.user("bob")
        alice = yield node.connect(alice_token, testcase=self)
        bob = yield node.connect(bob_token, testcase=self)
        own.stop()
        state: dict = {}

        @defer.inlineCallbacks
        def not_ready():
            code, body = yield node.get("/ready")
            state["last"] = (code, body)
            return code == 503

        yield wait_for(not_ready, "/ready to say 503", state)
        code, body = state["last"]
        self.assertFalse(body["ready"])
        self.assertEqual(body["checks"]["database"], "ok")
        self.assertNotEqual(body["checks"]["broker"], "ok")
        code, _ = yield node.get("/health")
        self.assertEqual(code, 200)
        alice.send_json({"to": "bob", "content": "while away", "nonce": "w-1"})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual(got["id"], ack["id"])
        own.start()
        yield ready(node)


class StartRefusalTests(unittest.TestCase):
    """Protocol section 11: a node that cannot reach its broker does not start."""

    timeout = 300

    @defer.inlineCallbacks
    def test_unreachable_redis_is_one_line_naming_broker_and_exit_1(self):
        """twistd with BROKER on a closed port ends with exit 1 and one line
        naming BROKER (no password, no traceback), in the foreground and
        daemonized alike, leaving no pidfile."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        closed = free_port()
        broker = f"redis://:hunter2@127.0.0.1:{closed}/0"
        args = ["--port", "tcp:0:interface=127.0.0.1", "--database", str(tmp / "db.sqlite")]
        args += ["--broker", broker]
        pidfile = tmp / "node.pid"
        foreground = Twistd(self, ["-n", "--pidfile=", "wsserver", *args])
        daemon = Twistd(
            self, [f"--pidfile={pidfile}", f"--logfile={tmp / 'node.log'}", "wsserver", *args]
        )
        how = yield foreground.ended(120)
        line = foreground.proc.err.decode()
        self.assertEqual(how, ("exit", 1), line)
        self.assertEqual(len(line.strip().splitlines()), 1, line)
        self.assertTrue(line.startswith("wsserver: BROKER: "), line)
        self.assertNotIn("hunter2", line)
        how = yield daemon.ended(120)
        err = daemon.proc.err.decode()
        self.assertEqual(how, ("exit", 1), err)
        self.assertEqual(err, line)
        self.assertFalse(pidfile.exists())

    @defer.inlineCallbacks
    def test_two_real_nodes_share_one_postgresql_database_with_a_broker(self):
        """With BROKER set a second twistd node starts on the same PostgreSQL
        database (without it, it is refused: test_postgres_service) and a
        message sent on one node reaches a client of the other."""
        db = fresh_postgres_database(self)
        prefix_db = str(random.randint(1, 15))
        env = {"DATABASE": db, "BROKER": redis_url(int(prefix_db))}
        first = Twistd(
            self,
            [
                "-n",
                "--pidfile=",
                "wsserver",
                "--port",
                "tcp:0:interface=127.0.0.1",
                "--node-name",
                "one",
            ],
            env,
        )
        port_a = yield first.listening()
        second = Twistd(
            self,
            [
                "-n",
                "--pidfile=",
                "wsserver",
                "--port",
                "tcp:0:interface=127.0.0.1",
                "--node-name",
                "two",
            ],
            env,
        )
        port_b = yield second.listening()
        a, b = RemoteServer(self, port_a), RemoteServer(self, port_b)
        yield a.wait_up()
        yield b.wait_up()
        yield ready(a)
        yield ready(b)
        _, alice_token = yield a.user("alice")
        _, bob_token = yield b.user("bob")
        alice = yield a.connect(alice_token, testcase=self)
        bob = yield b.connect(bob_token, testcase=self)
        alice.send_json({"to": "bob", "content": "process to process", "nonce": "p-1"})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (ack["id"], "process to process"))
