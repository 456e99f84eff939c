"""The real thing: ``twistd wsserver`` in its own process, started as a user would,
and in-process shutdown under traffic (protocol sections 8 and 10)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from wsserver.auth import Session
from wsserver.store import User, is_postgres
from wsserver.tap import build_service, open_url, where_listening

from .support import (
    DEADLINE,
    ROOT,
    LiveServer,
    MemoryLink,
    RemoteServer,
    Twistd,
    _Collect,
    connect_ws,
    eventually,
    read_port_async,
    serve_args,
    start_twistd,
    vector_key,
    within,
)


class TwistdTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_sigterm_closes_1001_and_keeps_every_acked_message(self):
        """Under traffic, SIGTERM closes every WebSocket with 1001, the process ends
        cleanly, and every acknowledged message is in the database."""
        db = os.path.abspath(self.mktemp() + ".db")
        proc, server = yield start_twistd(self, db)
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield connect_ws(server.ws_base, alice_token)
        bob = yield connect_ws(server.ws_base, bob_token)
        for i in range(200):
            alice.send_json({"to": "bob", "content": f"m{i}", "nonce": f"t-{i}"})
        yield alice.next_of("ack")
        proc.transport.signalProcess("TERM")
        codes = yield defer.gatherResults([alice.wait_closed(), bob.wait_closed()])
        self.assertEqual(codes, [1001, 1001])
        how = yield proc.ended()
        self.assertIn(how, [("exit", 0), ("signal", signal.SIGTERM)], proc.proc.err)
        acked = [f["id"] for f in alice.received if f["type"] == "ack"]
        self.assertTrue(acked)
        conn = sqlite3.connect(db)
        self.addCleanup(conn.close)
        stored = {row[0] for row in conn.execute("SELECT id FROM messages")}
        self.assertLessEqual(set(acked), stored)
        self.assertIn(b"shut down cleanly", proc.proc.out)

    @defer.inlineCallbacks
    def test_restart_keeps_users_messages_pending_and_tokens(self):
        """After a restart on the same database: users are there, an old token still
        works, and a message that was pending is delivered."""
        db = os.path.abspath(self.mktemp() + ".db")
        proc, server = yield start_twistd(self, db)
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield connect_ws(server.ws_base, alice_token)
        alice.send_json({"to": "bob", "content": "while you were away", "nonce": "p-1"})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["status"], "pending")
        proc.transport.signalProcess("TERM")
        yield alice.wait_closed()
        yield proc.ended()

        proc2, server2 = yield start_twistd(self, db)
        code, _body = yield server2.get("/auth/users/alice")
        self.assertEqual(code, 200)
        bob = yield connect_ws(server2.ws_base, bob_token)
        got = yield bob.next_of("message")
        self.assertEqual((got["id"], got["content"]), (ack["id"], "while you were away"))
        yield bob.close_and_wait()
        proc2.transport.signalProcess("TERM")
        yield proc2.ended()

    @defer.inlineCallbacks
    def test_bad_settings_stop_the_start_with_one_line(self):
        """A bad variable, a bad option, a half TLS pair or a taken port: exit status 1
        and one line naming the setting, no traceback."""
        db = os.path.abspath(self.mktemp() + ".db")
        cases = [
            ({"MESSAGE_RATE_LIMIT": "fast"}, [], "MESSAGE_RATE_LIMIT"),
            ({}, ["--max-frame-bytes", "x"], "MAX_FRAME_BYTES"),
            ({"TLS_CERT": "/nonexistent.pem"}, [], "TLS_CERT"),
            ({"JWT_SECRET": "too short"}, [], "JWT_SECRET"),
            ({}, ["--tls-cert", "/no.pem", "--tls-key", "/no.key"], "TLS_CERT"),
        ]
        for env, extra, name in cases:
            proc = Twistd(self, serve_args(0, db, *extra), env)
            how = yield proc.ended()
            err = proc.proc.err.decode()
            self.assertEqual(how, ("exit", 1), err)
            self.assertIn(name, err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
        blocker = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        taken = blocker.getHost().port
        proc = Twistd(self, serve_args(taken, db))
        how = yield proc.ended()
        self.assertEqual(how, ("exit", 1))
        self.assertIn("SERVER_ADDR", proc.proc.err.decode())
        self.assertNotIn("Traceback", proc.proc.err.decode())

    @defer.inlineCallbacks
    def test_daemonized_with_pidfile_and_logfile(self):
        """Without -n, twistd daemonizes: a pidfile appears, the server answers, the log
        goes to the logfile, and SIGTERM to the pid stops it and removes the pidfile."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        pidfile, logfile = tmp / "wsserver.pid", tmp / "wsserver.log"
        args = [
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "wsserver",
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--database",
            str(tmp / "db.sqlite"),
        ]
        launcher = Twistd(self, args)
        how = yield launcher.ended()
        self.assertEqual(how, ("exit", 0), launcher.proc.err)
        port = yield read_port_async(logfile)
        server = RemoteServer(self, port)
        yield server.wait_up()
        pid = int(pidfile.read_text())
        self.addCleanup(lambda: _kill_quietly(pid))
        os.kill(pid, signal.SIGTERM)
        yield eventually(lambda: not pidfile.exists(), "the pidfile is removed")
        self.assertIn("shut down cleanly", logfile.read_text())


class DaemonizedStartFailureTests(unittest.TestCase):
    """Issue 9 item 8: a daemonized start that cannot succeed must say so and end."""

    timeout = 300

    @defer.inlineCallbacks
    def test_every_start_failure_ends_a_daemonized_start_like_the_foreground(self):
        """Without -n, a taken port, unreadable TLS files, an unusable database and
        a bad setting each end twistd (within a generous deadline: it used to hang
        for ever on a taken port) with exit status 1, the same single line on
        stderr as ``twistd -n`` prints, no traceback, and no pidfile left."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        blocker = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        taken = blocker.getHost().port
        not_a_database = tmp / "not-a-database"
        not_a_database.write_bytes(b"this is not an SQLite file\n" * 200)
        good = str(tmp / "db.sqlite")
        anywhere = "tcp:0:interface=127.0.0.1"
        cases = {
            "taken-port": (
                ["--port", f"tcp:{taken}:interface=127.0.0.1", "--database", good],
                {},
                "SERVER_ADDR",
            ),
            "tls-files": (
                [
                    *("--port", anywhere, "--database", good),
                    *("--tls-cert", str(tmp / "no.pem"), "--tls-key", str(tmp / "no.key")),
                ],
                {},
                "TLS_CERT",
            ),
            "database": (
                ["--port", anywhere, "--database", str(not_a_database)],
                {},
                str(not_a_database),
            ),
            "setting": (
                ["--port", anywhere, "--database", good],
                {"MESSAGE_RATE_LIMIT": "fast"},
                "MESSAGE_RATE_LIMIT",
            ),
        }
        runs = {}
        for name, (args, env, _) in cases.items():
            pidfile = tmp / f"{name}.pid"
            # Each run its own database: two servers on one file are refused.
            fg_args = [str(tmp / f"{name}-fg.db") if a == good else a for a in args]
            bg_args = [str(tmp / f"{name}-bg.db") if a == good else a for a in args]
            foreground = Twistd(self, ["-n", "--pidfile=", "wsserver", *fg_args], env)
            daemon = Twistd(
                self,
                [f"--pidfile={pidfile}", f"--logfile={tmp / name}.log", "wsserver", *bg_args],
                env,
            )
            runs[name] = (foreground, daemon, pidfile)
        for name, (foreground, daemon, pidfile) in runs.items():
            expected = cases[name][2]
            how = yield foreground.ended(120)
            line = foreground.proc.err.decode()
            self.assertEqual(how, ("exit", 1), (name, line))
            self.assertEqual(len(line.strip().splitlines()), 1, (name, line))
            self.assertIn(expected, line)
            how = yield daemon.ended(120)
            err = daemon.proc.err.decode()
            self.assertEqual(how, ("exit", 1), (name, err))
            self.assertEqual(err, line, name)
            self.assertNotIn("Traceback", err)
            self.assertFalse(pidfile.exists(), name)


class RundirTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_a_relative_database_path_survives_twistds_rundir(self):
        """``twistd --rundir=DIR`` changes directory after makeService: a relative
        DATABASE still means the file next to where the command was given (the one
        prepared at start), not an empty one in DIR that has no tables."""
        tmp = Path(self.mktemp()).resolve()
        (tmp / "elsewhere").mkdir(parents=True)
        database = tmp / "here.db"
        relative = os.path.relpath(database, ROOT)  # children start in ROOT
        args = [f"--rundir={tmp / 'elsewhere'}", *serve_args(0, relative)]
        proc = Twistd(self, args)
        port = yield proc.listening()
        server = RemoteServer(self, port)
        yield server.wait_up()
        yield server.register("alice")  # needs the prepared tables
        proc.transport.signalProcess("TERM")
        yield proc.ended()
        conn = sqlite3.connect(database)
        self.addCleanup(conn.close)
        users = [row[0] for row in conn.execute("SELECT user_id FROM users")]
        self.assertEqual(users, ["alice"])
        self.assertFalse((tmp / "elsewhere" / relative).exists())


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stored_ids(db: str) -> set[int]:
    """The ids of every message in the database ``db`` (SQLite or PostgreSQL)."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(db) as conn:
            return {row[0] for row in conn.execute("SELECT id FROM messages")}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM messages")}


class InProcessShutdownTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_stop_commits_then_closes_1001(self):
        """Stopping the service with messages in flight: every ack that was sent is
        committed, and the clients see 1001."""
        server = LiveServer(self)
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield server.connect(alice_token)
        bob = yield server.connect(bob_token)
        for i in range(100):
            alice.send_json({"to": "bob", "content": f"m{i}"})
        yield alice.next_of("ack")
        db = server.db
        yield server.stop()
        codes = yield defer.gatherResults([alice.wait_closed(), bob.wait_closed()])
        self.assertEqual(codes, [1001, 1001])
        acked = {f["id"] for f in alice.received if f["type"] == "ack"}
        stored = stored_ids(db)
        self.assertLessEqual(acked, stored)
        delivered = {f["id"] for f in bob.received if f["type"] == "message"}
        self.assertLessEqual(delivered, stored)


class ClockedShutdownTests(unittest.TestCase):
    """The whole ``WsServerService`` on a ``MemoryReactorClock`` (its listening
    port, store commits and ``SHUTDOWN_TIMEOUT`` all on that clock), with
    clients joined to its WebSocket factory in memory."""

    timeout = 120
    SHUTDOWN_TIMEOUT = 7.0

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = MemoryReactorClock()
        settings = {
            "DATABASE": self.mktemp() + ".db",
            "SERVER_ADDR": "tcp:0:interface=127.0.0.1",
            "SHUTDOWN_TIMEOUT": str(self.SHUTDOWN_TIMEOUT),
        }
        self.service = build_service({}, settings, reactor=self.clock)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.stop)
        # Autobahn's own timers run on the real reactor: off, so that only the
        # service's SHUTDOWN_TIMEOUT can end a closing handshake nobody answers.
        self.service.factory.setProtocolOptions(closeHandshakeTimeout=0, autoPingInterval=0)
        self.link = MemoryLink(self, self.service.factory, self.clock)
        self.keys = {name: vector_key(name) for name in ("alice", "bob")}
        for name, key in self.keys.items():
            yield self.service.store.add_user(User(name, name.title(), bytes(key.verify_key), 0))

    @defer.inlineCallbacks
    def connect(self, user_id: str):
        session = Session(user_id, self.keys[user_id].verify_key, self.clock.seconds() + 3600)
        client, proto = yield self.link.connect(session)
        return client, proto

    def drive(self, d: defer.Deferred) -> defer.Deferred:
        """Run the store's commits (they wait on the clock, without moving it)
        until ``d`` has fired; return ``d``."""
        done: list = []
        d.addBoth(lambda r: (done.append(r), r)[1])

        @defer.inlineCallbacks
        def commit_until_done():
            while not done:
                self.clock.advance(0)
                yield task.deferLater(reactor, 0.01, lambda: None)

        commit_until_done()
        return d

    def stop_service(self) -> defer.Deferred:
        """Stop the service; fire once it has stopped."""
        stopping = self.service.stopService()
        stopping.addCallback(lambda r: (setattr(self, "stopped", True), r)[1])
        return self.drive(stopping)

    stopped = False

    @defer.inlineCallbacks
    def stop(self):
        if self.service.running:
            yield within(self.stop_service(), DEADLINE)
        elif not self.stopped:
            # A test failed in the middle of the shutdown: close the store
            # anyway, or its database threads outlive the test run.
            yield within(self.drive(self.service.store.close()), DEADLINE)

    @defer.inlineCallbacks
    def test_shutdown_commits_and_acks_what_was_received_before_closing_1001(self):
        """Messages received but not yet committed when shutdown starts are
        committed and acked (and delivered) before the connections are closed
        with 1001."""
        alice, _ = yield self.connect("alice")
        bob, _ = yield self.connect("bob")
        for i in range(3):
            alice.send_json({"to": "bob", "content": f"m{i}", "nonce": f"n-{i}"})
        # Answered at once, after the three were handed to the store (frames of
        # one connection are handled in order); their commit waits for the clock.
        alice.send_json({"content": "marker", "nonce": "mark"})
        yield eventually(lambda: alice.of("system"), "the marker's answer")
        self.assertEqual(alice.of("ack"), [])
        yield within(self.stop_service(), DEADLINE)
        yield within(defer.gatherResults([alice.gone, bob.gone]), DEADLINE)
        self.assertEqual((alice.close_code, bob.close_code), (1001, 1001))
        self.assertEqual([a["nonce"] for a in alice.of("ack")], ["n-0", "n-1", "n-2"])
        self.assertEqual([m["content"] for m in bob.of("message")], ["m0", "m1", "m2"])

    @defer.inlineCallbacks
    def test_connections_that_do_not_close_are_dropped_after_shutdown_timeout(self):
        """A client that never answers the 1001 close keeps the shutdown waiting
        until SHUTDOWN_TIMEOUT on the clock, not longer: then its connection is
        dropped and the service finishes stopping; its last log line says so
        instead of claiming a clean shutdown."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        alice, proto = yield self.connect("alice")
        alice.deaf = True
        stopping = self.stop_service()
        yield eventually(lambda: proto.localCloseCode == 1001, "the 1001 close is sent")
        self.clock.advance(self.SHUTDOWN_TIMEOUT - 0.01)
        self.assertFalse(stopping.called)
        self.assertEqual(self.service.broker.count(), 1)
        self.clock.advance(0.01)
        yield within(stopping, DEADLINE)
        yield within(alice.gone, DEADLINE)
        yield eventually(lambda: self.service.broker.count() == 0, "the server lets go of it")
        self.assertEqual(proto.state, proto.STATE_CLOSED)
        said = [formatEvent(e) for e in events if "shut down" in (e.get("log_format") or "")]
        self.assertEqual(
            said,
            [
                "shut down: everything received was committed; 1 connections dropped"
                " without their close handshake"
            ],
        )


class SharedSQLiteTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_a_second_server_on_one_file_without_a_broker_is_refused(self):
        """Two ``twistd wsserver`` on one SQLite file without BROKER would each
        deliver live messages only to their own connections: the second stops
        with one line naming DATABASE and BROKER (exit 1) while the first serves
        on; once the first is killed outright (no clean shutdown), a new one
        starts on the file."""
        db = str(Path(self.mktemp()).resolve()) + ".db"
        first, server = yield start_twistd(self, db)
        second = Twistd(self, serve_args(0, db))
        how = yield second.ended(60)
        err = second.proc.err.decode()
        self.assertEqual(how, ("exit", 1), err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("wsserver: DATABASE: "), err)
        self.assertIn("BROKER", err)
        code, _ = yield server.get("/health")
        self.assertEqual(code, 200)
        yield first.kill()
        _, server = yield start_twistd(self, db)
        code, _ = yield server.get("/health")
        self.assertEqual(code, 200)


class StartupLineTests(unittest.TestCase):
    def test_open_url_names_an_address_a_person_can_open(self):
        """The start-up URL: the bound address, a wildcard bind shown as the
        loopback address of its family, https with TLS, none for a UNIX socket."""
        cases = [
            (IPv4Address("TCP", "0.0.0.0", 8080), False, "http://127.0.0.1:8080/"),
            (IPv4Address("TCP", "192.0.2.5", 8443), True, "https://192.0.2.5:8443/"),
            (IPv6Address("TCP", "::", 8080), False, "http://[::1]:8080/"),
            (IPv6Address("TCP", "2001:db8::1", 80), True, "https://[2001:db8::1]:80/"),
            (UNIXAddress(b"/run/wsserver.sock"), False, None),
        ]
        for address, tls, url in cases:
            self.assertEqual(open_url(address, tls), url, address)

    def test_the_start_up_line_says_when_it_listens_on_every_interface(self):
        """A wildcard bind is shown by its loopback URL and "(every interface)",
        so the log does not suggest the server is reachable on loopback only."""
        cases = [
            (IPv4Address("TCP", "0.0.0.0", 8080), "http://127.0.0.1:8080/ (every interface)"),
            (IPv6Address("TCP", "::", 8080), "http://[::1]:8080/ (every interface)"),
            (IPv4Address("TCP", "127.0.0.1", 8080), "http://127.0.0.1:8080/"),
            (UNIXAddress(b"/run/wsserver.sock"), None),
        ]
        for address, shown in cases:
            self.assertEqual(where_listening(address, False), shown, address)

    def test_start_logs_the_url_and_the_databases_absolute_path(self):
        """Starting logs one line with the URL to open (the port actually bound)
        and the database's absolute path, even when it was given relative."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relative = self.mktemp() + ".db"
        self.assertFalse(os.path.isabs(relative))
        server = LiveServer(self, {"DATABASE": relative})
        lines = [formatEvent(e) for e in events if "listening" in (e.get("log_format") or "")]
        where = f"(database {os.path.abspath(relative)})"
        if server.mode == "workers":
            # The parent's line, once, in the log of the twistd process.
            self.assertEqual(lines, [])
            parent = [line for line in server.log_text().splitlines() if "2 workers)" in line]
            self.assertEqual(len(parent), 1, parent)
            self.assertTrue(
                parent[0].endswith(
                    f"wsserver listening on http://127.0.0.1:{server.port}/ "
                    f"(database {os.path.abspath(relative)}; 2 workers)"
                ),
                parent,
            )
            return
        # One line per node (two in a test cluster), each with its own port.
        ports = [server.port] + [node.port.getHost().port for node in server.others]
        expected = [f"wsserver listening on http://127.0.0.1:{port}/ {where}" for port in ports]
        self.assertEqual(lines, expected)


class ExampleTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_readme_example_runs(self):
        """examples/hello.py (shown in the README) registers, logs in, and gets its own
        signed message back verified, with an ack."""
        server = LiveServer(self)
        proc = _Collect()
        reactor.spawnProcess(
            proc,
            sys.executable,
            [sys.executable, str(ROOT / "examples" / "hello.py"), server.base],
            env=dict(os.environ),
            path=str(ROOT),
        )
        how = yield within(proc.ended, 30)
        self.assertEqual(how, ("exit", 0), proc.err)
        lines = proc.out.decode().split("\n")
        self.assertIn("message 1 delivered verified", lines)
        self.assertIn("ack 1 delivered verified", lines)
