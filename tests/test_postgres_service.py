"""``twistd wsserver`` on PostgreSQL: a database it cannot reach, and a second
node on one database without a broker (issue 10 item 8, protocol section 11),
with real processes; and the node registry those rely on."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import psycopg
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from tests.support import RemoteServer, Twistd, connect_ws, free_port, serve_args, start_twistd
from tests.test_store import SECRET
from wsserver import store as st
from wsserver.store import postgres as pg


def one_line(err: bytes) -> str:
    lines = err.decode("utf-8", "replace").strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


class StartRefusalTests(unittest.TestCase):
    """What a node says and does when it cannot or must not start."""

    timeout = 120

    @defer.inlineCallbacks
    def test_unreachable_postgresql_is_one_line_and_exit_1(self):
        """DATABASE pointing at a closed port: exit status 1 and one line naming
        DATABASE, without the password and without a traceback."""
        url = f"postgresql://postgres:hunter2pw@127.0.0.1:{free_port()}/nothing"
        proc = Twistd(self, serve_args(free_port(), url))
        how = yield proc.ended()
        self.assertEqual(how, ("exit", 1), proc.proc.err)
        line = one_line(proc.proc.err)
        self.assertTrue(line.startswith("wsserver: DATABASE: cannot use postgresql://"), line)
        self.assertNotIn("hunter2pw", line + proc.proc.out.decode())
        self.assertNotIn("Traceback", line)

    @defer.inlineCallbacks
    def test_unreachable_postgresql_daemonized_is_one_line_and_exit_1(self):
        """Daemonized (no -n) the same: the line reaches the terminal, exit status 1,
        and no daemon is left behind."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        pidfile, logfile = tmp / "wsserver.pid", tmp / "wsserver.log"
        url = f"postgresql://postgres:hunter2pw@127.0.0.1:{free_port()}/nothing"
        args = [f"--pidfile={pidfile}", f"--logfile={logfile}", *serve_args(free_port(), url)[2:]]
        proc = Twistd(self, args)
        how = yield proc.ended()
        self.assertEqual(how, ("exit", 1), proc.proc.err)
        line = one_line(proc.proc.err)
        self.assertTrue(line.startswith("wsserver: DATABASE: cannot use postgresql://"), line)
        self.assertFalse(pidfile.exists())
        log = logfile.read_text() if logfile.exists() else ""
        self.assertNotIn("hunter2pw", log)

    @defer.inlineCallbacks
    def test_second_node_without_broker_is_refused_until_the_first_stops(self):
        """A node started on a database another live node uses, with no BROKER, exits
        1 with one line naming DATABASE and BROKER; once the first node has stopped
        cleanly (and unregistered) a node starts there again."""
        url = fresh_postgres_database(self)
        first, server = yield start_twistd(self, url)
        yield server.user("alice")
        second = Twistd(self, serve_args(free_port(), url))
        how = yield second.ended()
        self.assertEqual(how, ("exit", 1), second.proc.err)
        line = one_line(second.proc.err)
        self.assertTrue(line.startswith("wsserver: DATABASE: node "), line)
        self.assertIn("BROKER", line)
        code, _ = yield server.get("/health")  # the first node is not disturbed
        self.assertEqual(code, 200)
        first.transport.signalProcess("TERM")
        how = yield first.ended()
        self.assertIn(how, [("exit", 0), ("signal", signal.SIGTERM)])
        third, server3 = yield start_twistd(self, url)
        code, _ = yield server3.get("/auth/users/alice")
        self.assertEqual(code, 200)
        third.transport.signalProcess("TERM")
        yield third.ended()

    @defer.inlineCallbacks
    def test_a_daemonized_node_is_seen_by_the_next_one(self):
        """A node started daemonized (registered before the fork, serving after it)
        holds the database: a second node on this host is refused while it runs."""
        url = fresh_postgres_database(self)
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        pidfile, logfile = tmp / "wsserver.pid", tmp / "wsserver.log"
        port = free_port()
        args = [f"--pidfile={pidfile}", f"--logfile={logfile}", *serve_args(port, url)[2:]]
        launcher = Twistd(self, args)
        how = yield launcher.ended()
        self.assertEqual(how, ("exit", 0), launcher.proc.err)
        yield RemoteServer(self, port).wait_up()
        pid = int(pidfile.read_text())
        self.addCleanup(_stop_daemon, pid)
        for _ in range(200):  # the serving process records itself at start
            with pg.connect(url) as conn:
                row = conn.execute("SELECT pid FROM nodes").fetchone()
            if row == (pid,):
                break
            yield deferLater(0.05)
        self.assertEqual(row, (pid,))
        second = Twistd(self, serve_args(free_port(), url))
        how = yield second.ended()
        self.assertEqual(how, ("exit", 1), second.proc.err)
        self.assertIn("BROKER", one_line(second.proc.err))


def _stop_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class DatabaseFaultTests(unittest.TestCase):
    """A real node whose database connection is terminated under it."""

    timeout = 120

    @defer.inlineCallbacks
    def test_terminated_backend_fails_the_batch_in_flight_and_the_node_recovers(self):
        """pg_terminate_backend on the connection writing a batch (and on the node's
        idle connections): the sender gets internal_error with its nonce and no ack,
        nothing is stored; then, with no restart, every request and send succeeds
        and the resend with the same nonce is stored once and delivered."""
        url = fresh_postgres_database(self)
        proc, server = yield start_twistd(self, url)
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield connect_ws(server.ws_base, alice_token, testcase=self)
        bob = yield connect_ws(server.ws_base, bob_token, testcase=self)
        # Hold the stream head so the node's next batch waits inside its transaction.
        blocker = psycopg.connect(url)
        self.addCleanup(blocker.close)
        blocker.execute("SELECT last_id FROM stream_head FOR UPDATE")
        alice.send_json({"to": "bob", "content": "in flight", "nonce": "t-1"})
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]

        def terminate_node_backends() -> int:
            # The one waiting in its batch, then the node's idle ones too (as a
            # database restart would): each must be replaced by itself.
            with psycopg.connect(url, autocommit=True) as conn:
                for _ in range(300):
                    waiting = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND wait_event_type = 'Lock'",
                        (name,),
                    ).fetchall()
                    if waiting:
                        break
                    threading.Event().wait(0.1)
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid NOT IN (pg_backend_pid(), %s)",
                    (name, blocker.info.backend_pid),
                )
            return len(waiting)

        terminated = yield threads.deferToThread(terminate_node_backends)
        self.assertEqual(terminated, 1)
        blocker.rollback()
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("internal_error", "t-1"))
        self.assertEqual([f for f in alice.received if f["type"] == "ack"], [])
        with pg.connect(url) as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM messages").fetchone(), (0,))
        # Everything works again at once: reads, the resend, further sends.
        for _ in range(2 * pg.POOL_SIZE):
            code, _ = yield server.get("/auth/users/alice")
            self.assertEqual(code, 200)
        alice.send_json({"to": "bob", "content": "in flight", "nonce": "t-1"})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (ack["id"], "in flight"))
        for i in range(2 * pg.POOL_SIZE):
            alice.send_json({"to": "bob", "content": f"after {i}", "nonce": f"a-{i}"})
            yield alice.next_of("ack")
        self.assertEqual([f for f in alice.received if f["type"] == "system"], [frame])
        with pg.connect(url) as conn:
            stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        self.assertEqual(stored, 1 + 2 * pg.POOL_SIZE)
        proc.transport.signalProcess("TERM")
        yield proc.ended()


class NodeRegistryTests(unittest.TestCase):
    """Which registered nodes count as live."""

    def setUp(self):
        self.url = fresh_postgres_database(self)
        st.prepare_database(self.url, lambda: SECRET)

    def add_row(self, name: str, host: str, pid: int, age_s: int, broker: bool = False) -> None:
        with pg.connect(self.url) as conn:
            conn.execute(
                "INSERT INTO nodes (name, host, pid, has_broker, heartbeat_at)"
                " VALUES (%s, %s, %s, %s, now() - make_interval(secs => %s))",
                (name, host, pid, broker, age_s),
            )

    def names(self) -> list[str]:
        with pg.connect(self.url) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM nodes ORDER BY name")]

    def prepare(self, name: str = "me", broker: bool = False) -> bytes:
        return st.prepare_database(self.url, lambda: SECRET, st.NodeInfo(name, broker))

    def test_a_live_node_elsewhere_refuses_a_node_without_broker(self):
        """A node of another host with a fresh heartbeat makes registration fail,
        naming it, BROKER and DATABASE; nothing is registered."""
        self.add_row("other:1", "elsewhere", 1, 5)
        with self.assertRaises(st.DatabaseError) as ctx:
            self.prepare()
        text = str(ctx.exception)
        self.assertTrue(text.startswith("DATABASE: node other:1 "), text)
        self.assertIn("BROKER", text)
        self.assertEqual(self.names(), ["other:1"])

    def test_both_with_a_broker_may_share(self):
        """Nodes that both have a broker may share the database."""
        self.add_row("other:1", "elsewhere", 1, 5, broker=True)
        self.prepare(broker=True)
        self.assertEqual(self.names(), ["me", "other:1"])

    def test_a_stale_node_is_forgotten(self):
        """A node whose last heartbeat is older than NODE_EXPIRY no longer counts."""
        self.add_row("other:1", "elsewhere", 1, pg.NODE_EXPIRY + 1)
        self.prepare()
        self.assertEqual(self.names(), ["me"])

    def test_a_dead_process_of_this_host_is_forgotten_at_once(self):
        """A node of this host whose process no longer exists (killed outright) does
        not hold the next start back for NODE_EXPIRY seconds."""
        import socket

        self.add_row("old", socket.gethostname(), 2**22 + 12345, 1)  # above pid_max
        self.prepare()
        self.assertEqual(self.names(), ["me"])

    @defer.inlineCallbacks
    def test_start_records_the_serving_process(self):
        """twistd prepares (and registers) before it daemonizes, so the process that
        serves is another: starting the store records its pid at once, so the node
        is not taken for a dead process of this host by the next one to start."""
        self.prepare()
        with pg.connect(self.url) as conn:
            conn.execute("UPDATE nodes SET pid = 2147483647")
        store = st.open_store(self.url, Clock(), st.NodeInfo("me", False))
        self.addCleanup(lambda: store._closed or store.close())
        yield store.start()
        for _ in range(200):  # the heartbeat runs in the pool's thread
            with pg.connect(self.url) as conn:
                pid = conn.execute("SELECT pid FROM nodes").fetchone()[0]
            if pid == os.getpid():
                break
            yield deferLater(0.05)
        self.assertEqual(pid, os.getpid())
        with self.assertRaises(st.DatabaseError):
            st.prepare_database(self.url, lambda: SECRET, st.NodeInfo("next", False))

    @defer.inlineCallbacks
    def test_heartbeat_on_the_clock_and_unregister_at_close(self):
        """A started store refreshes its node's heartbeat every HEARTBEAT_INTERVAL
        of its clock, and its clean close removes the node."""
        self.prepare()
        with pg.connect(self.url) as conn:
            conn.execute("UPDATE nodes SET heartbeat_at = now() - interval '1 hour'")
        clock = Clock()
        store = st.open_store(self.url, clock, st.NodeInfo("me", False))
        self.addCleanup(lambda: store._closed or store.close())
        yield store.start()
        clock.advance(pg.HEARTBEAT_INTERVAL)
        for _ in range(200):  # the heartbeat runs in the pool's thread
            with pg.connect(self.url) as conn:
                age = conn.execute(
                    "SELECT extract(epoch FROM now() - heartbeat_at) FROM nodes"
                ).fetchone()[0]
            if age < 60:
                break
            yield deferLater(0.05)
        self.assertLess(age, 60)
        yield store.close()
        self.assertEqual(self.names(), [])


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
