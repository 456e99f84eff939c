"""``--workers N``: one parent, one listening socket, N supervised node processes
(issue 10 item 7; docs/architecture.md, "Workers").

Real ``twistd`` processes on port 0.  Which child accepts a connection is
the kernel's choice; to reach one child for certain, the tests stop the
others with SIGSTOP (a stopped process cannot accept, so the running one
takes every new connection) and continue them after.  ``BROKER`` is set to
a ``redis://`` URL that the configuration accepts; nothing on this branch
connects to it yet, and no test here needs live traffic between workers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from wsserver import workers as workers_module
from wsserver.config import ConfigError, load
from wsserver.tap import build_workers

from .support import (
    RemoteServer,
    Twistd,
    connect_ws,
    eventually,
    serve_args,
    within,
)
from .test_tls import make_certificate

BROKER = {"BROKER": "redis://127.0.0.1:6379/15"}
_STARTED = re.compile(rb"worker (\d+)/(\d+) started \(pid (\d+)\)")
_LISTENING = re.compile(rb"worker (\d+)/\d+ \(pid (\d+)\): .*wsserver listening on")


def _listening_pids(proc: Twistd) -> dict[int, int]:
    """{worker index: pid} of the children that logged their start-up line
    (the latest child of each slot)."""
    found: dict[int, int] = {}
    for match in _LISTENING.finditer(proc.proc.out):
        found[int(match.group(1))] = int(match.group(2))
    return found


def _signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class _Workers:
    """A ``twistd -n wsserver --workers N`` and helpers to reach each child."""

    def __init__(self, testcase: unittest.TestCase, proc: Twistd, port: int, pids: dict) -> None:
        self.testcase = testcase
        self.proc = proc
        self.port = port
        self.pids = pids
        self.server = RemoteServer(testcase, port)

    @contextlib.contextmanager
    def only(self, pid: int):
        """While inside, every child but ``pid`` is stopped (SIGSTOP)."""
        others = [p for p in self.pids.values() if p != pid]
        for other in others:
            _signal_quietly(other, signal.SIGSTOP)
        try:
            yield
        finally:
            for other in others:
                _signal_quietly(other, signal.SIGCONT)


@defer.inlineCallbacks
def start_workers(testcase, db: str, count: int = 2, env: dict | None = None, extra=()) -> object:
    """``twistd -n wsserver --workers COUNT`` on port 0; fire with ``_Workers``
    once every child has logged that it listens."""
    proc = Twistd(
        testcase, serve_args(0, db, "--workers", str(count), *extra), {**BROKER, **(env or {})}
    )
    port = yield proc.listening()
    yield eventually(
        lambda: len(_listening_pids(proc)) == count or proc.proc.ended.called,
        "every worker listens",
    )
    pids = _listening_pids(proc)
    testcase.assertEqual(sorted(pids), list(range(1, count + 1)), proc.proc.out)

    def stop_children() -> None:
        # The parent is killed at cleanup; a child it left (stopped by a
        # failed test) is continued and killed here.
        for pid in _listening_pids(proc).values():
            _signal_quietly(pid, signal.SIGCONT)
            _signal_quietly(pid, signal.SIGKILL)

    testcase.addCleanup(stop_children)
    return _Workers(testcase, proc, port, pids)


@defer.inlineCallbacks
def fresh_get(url: str, tls_options=None) -> object:
    """GET ``url`` on a connection of its own (never a pooled one, which
    would stay with the child that accepted it); fire with (code, JSON)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    if tls_options is not None:

        class Policy(BrowserLikePolicyForHTTPS):
            def creatorForNetloc(self, hostname, port):
                return tls_options

        agent = Agent(reactor, contextFactory=Policy(), pool=pool)
    else:
        agent = Agent(reactor, pool=pool)
    resp = yield within(HTTPClient(agent).get(url))
    body = yield within(resp.json())
    return resp.code, body


class WorkersTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_every_worker_serves_http_and_websocket_on_the_one_port(self):
        """With --workers 2, each child in turn (the other stopped) answers
        /health naming its own pid and carries a WebSocket conversation, on the
        port the parent bound; the parent's pid is neither."""
        db = os.path.abspath(self.mktemp() + ".db")
        workers = yield start_workers(self, db)
        parent = workers.proc.transport.pid
        self.assertNotIn(parent, workers.pids.values())
        self.assertEqual(len(set(workers.pids.values())), 2)
        _, alice_token = yield workers.server.user("alice")
        _, bob_token = yield workers.server.user("bob")
        seen = set()
        for index, pid in sorted(workers.pids.items()):
            with workers.only(pid):
                code, body = yield fresh_get(f"{workers.server.base}/health")
                self.assertEqual(code, 200)
                seen.add(body["node"])
                self.assertTrue(body["node"].endswith(f":{pid}"), (body, pid))
                alice = yield connect_ws(workers.server.ws_base, alice_token)
                bob = yield connect_ws(workers.server.ws_base, bob_token)
                alice.send_json(
                    {"to": "bob", "content": f"via worker {index}", "nonce": f"w{index}"}
                )
                ack = yield alice.next_of("ack")
                got = yield bob.next_of("message")
                # What the other child delivered may still be pending in the
                # database for a moment, and come again first (section 15).
                while got["id"] < ack["id"]:
                    got = yield bob.next_of("message")
                self.assertEqual((got["id"], got["content"]), (ack["id"], f"via worker {index}"))
                yield alice.close_and_wait()
                yield bob.close_and_wait()
        self.assertEqual(len(seen), 2)

    @defer.inlineCallbacks
    def test_a_worker_killed_outright_is_started_again(self):
        """SIGKILL to a child: the parent logs its end with the signal, starts a
        new child in its slot, which adopts the socket and serves; the other
        child serves all along."""
        db = os.path.abspath(self.mktemp() + ".db")
        workers = yield start_workers(self, db)
        victim, survivor = workers.pids[1], workers.pids[2]
        os.kill(victim, signal.SIGKILL)
        ended = f"worker 1/2 (pid {victim}) killed by signal 9; starting it again".encode()
        yield eventually(lambda: ended in workers.proc.proc.out, "the parent logs the kill")
        with workers.only(survivor):
            code, body = yield fresh_get(f"{workers.server.base}/health")
        self.assertEqual((code, body["node"].rsplit(":", 1)[1]), (200, str(survivor)))
        yield eventually(
            lambda: _listening_pids(workers.proc).get(1, victim) != victim,
            "a new worker 1 listens",
        )
        replacement = _listening_pids(workers.proc)[1]
        workers.pids[1] = replacement
        with workers.only(replacement):
            code, body = yield fresh_get(f"{workers.server.base}/health")
        self.assertEqual((code, body["node"].rsplit(":", 1)[1]), (200, str(replacement)))
        self.assertIn(f"worker 1/2 started (pid {replacement})".encode(), workers.proc.proc.out)

    @defer.inlineCallbacks
    def test_sigterm_to_the_parent_drains_every_worker(self):
        """SIGTERM to the parent reaches both children: clients on each get 1001,
        every acknowledged message is in the database, each child shuts down
        cleanly, and then the parent ends."""
        db = os.path.abspath(self.mktemp() + ".db")
        workers = yield start_workers(self, db)
        _, alice_token = yield workers.server.user("alice")
        _, bob_token = yield workers.server.user("bob")
        with workers.only(workers.pids[1]):
            alice = yield connect_ws(workers.server.ws_base, alice_token)
        with workers.only(workers.pids[2]):
            bob = yield connect_ws(workers.server.ws_base, bob_token)
        for i in range(200):
            alice.send_json({"to": "bob", "content": f"a{i}", "nonce": f"a-{i}"})
            bob.send_json({"to": "alice", "content": f"b{i}", "nonce": f"b-{i}"})
        yield alice.next_of("ack")
        yield bob.next_of("ack")
        workers.proc.transport.signalProcess("TERM")
        codes = yield defer.gatherResults([alice.wait_closed(), bob.wait_closed()])
        self.assertEqual(codes, [1001, 1001])
        how = yield workers.proc.ended(60)
        out = workers.proc.proc.out
        self.assertIn(how, [("exit", 0), ("signal", signal.SIGTERM)], out)
        acked = [f["id"] for c in (alice, bob) for f in c.received if f["type"] == "ack"]
        conn = sqlite3.connect(db)
        self.addCleanup(conn.close)
        stored = {row[0] for row in conn.execute("SELECT id FROM messages")}
        self.assertLessEqual(set(acked), stored)
        for index, pid in workers.pids.items():
            self.assertIn(
                f"worker {index}/2 (pid {pid}): [wsserver.tap#info] shut down cleanly".encode(), out
            )
        self.assertIn(b"shut down cleanly: every worker has ended", out)
        for pid in workers.pids.values():
            yield eventually(lambda pid=pid: not _alive(pid), f"child {pid} has ended")

    @defer.inlineCallbacks
    def test_sigint_to_the_parent_stops_every_worker(self):
        """SIGINT (a Ctrl-C) to the parent is forwarded too: every child shuts
        down cleanly and the parent ends."""
        db = os.path.abspath(self.mktemp() + ".db")
        workers = yield start_workers(self, db)
        workers.proc.transport.signalProcess("INT")
        how = yield workers.proc.ended(60)
        out = workers.proc.proc.out
        self.assertIn(how, [("exit", 0), ("signal", signal.SIGINT)], out)
        for index, pid in workers.pids.items():
            line = f"worker {index}/2 (pid {pid}): [wsserver.tap#info] shut down cleanly"
            self.assertIn(line.encode(), out)
            yield eventually(lambda pid=pid: not _alive(pid), f"child {pid} has ended")
        self.assertIn(b"shut down cleanly: every worker has ended", out)

    @defer.inlineCallbacks
    def test_children_stop_when_the_parent_is_killed_outright(self):
        """SIGKILL to the parent (which can forward nothing): each child sees
        its stdin pipe end and stops, so no orphan keeps serving the port."""
        db = os.path.abspath(self.mktemp() + ".db")
        workers = yield start_workers(self, db)
        workers.proc.transport.signalProcess("KILL")
        yield workers.proc.ended()
        for pid in workers.pids.values():
            yield eventually(lambda pid=pid: not _alive(pid), f"child {pid} has ended")

    @defer.inlineCallbacks
    def test_tls_with_two_workers(self):
        """TLS_CERT/TLS_KEY with --workers 2: each child speaks HTTPS and WSS
        on the shared socket, verified for localhost."""
        cert, key = make_certificate(Path(self.mktemp()).resolve())
        tls = optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(cert.with_name("ca.pem").read_bytes())
        )
        db = os.path.abspath(self.mktemp() + ".db")
        workers = yield start_workers(
            self, db, extra=("--tls-cert", str(cert), "--tls-key", str(key))
        )
        self.assertIn(f"https://127.0.0.1:{workers.port}/".encode(), workers.proc.proc.out)
        base = f"https://localhost:{workers.port}"
        workers.server.base = base
        workers.server.tls_options = tls
        _, token = yield workers.server.user("alice")
        for pid in workers.pids.values():
            with workers.only(pid):
                code, body = yield fresh_get(f"{base}/health", tls)
                self.assertEqual((code, body["node"].rsplit(":", 1)[1]), (200, str(pid)))
                client = yield connect_ws(
                    f"wss://localhost:{workers.port}/ws", token, tls_options=tls
                )
                client.send_json({"to": "alice", "content": "to myself", "nonce": f"t{pid}"})
                got = yield client.next_of("message")
                self.assertEqual(got["content"], "to myself")
                yield client.close_and_wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) counts as ended.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


class WorkersStartFailureTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_a_taken_port_ends_the_start_foreground_and_daemonized(self):
        """--workers 2 on a port already taken: twistd -n and a daemonized twistd
        both end with exit status 1 and the same one line naming SERVER_ADDR, no
        traceback, no pidfile, and no child started."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        blocker = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(blocker.stopListening)
        args = [
            *("wsserver", "--port", f"tcp:{blocker.getHost().port}:interface=127.0.0.1"),
            *("--database", str(tmp / "db.sqlite"), "--workers", "2"),
        ]
        pidfile = tmp / "w.pid"
        foreground = Twistd(self, ["-n", "--pidfile=", *args], BROKER)
        daemon = Twistd(self, [f"--pidfile={pidfile}", f"--logfile={tmp / 'w.log'}", *args], BROKER)
        how = yield foreground.ended(120)
        line = foreground.proc.err.decode()
        self.assertEqual(how, ("exit", 1), line)
        self.assertEqual(len(line.strip().splitlines()), 1, line)
        self.assertIn("SERVER_ADDR", line)
        self.assertNotIn(b"started (pid", foreground.proc.out)
        how = yield daemon.ended(120)
        self.assertEqual(how, ("exit", 1), daemon.proc.err)
        self.assertEqual(daemon.proc.err.decode(), line)
        self.assertFalse(pidfile.exists())

    @defer.inlineCallbacks
    def test_workers_without_a_broker_are_refused(self):
        """WORKERS=2 (variable or option) without BROKER: exit status 1 and one
        line naming WORKERS and BROKER, before anything listens."""
        db = os.path.abspath(self.mktemp() + ".db")
        for args, env in ((["--workers", "2"], {}), ([], {"WORKERS": "2"})):
            proc = Twistd(self, serve_args(0, db, *args), env)
            how = yield proc.ended()
            err = proc.proc.err.decode()
            self.assertEqual(how, ("exit", 1), err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("WORKERS", err)
            self.assertIn("BROKER", err)
            self.assertNotIn("Traceback", err)
            self.assertNotIn(b"listening on", proc.proc.out)

    @defer.inlineCallbacks
    def test_daemonized_workers_write_the_parents_pid(self):
        """Daemonized with --workers 2: the pidfile holds the parent's pid (not a
        child's), the port serves, and SIGTERM to that pid ends every process and
        removes the pidfile."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        pidfile, logfile = tmp / "w.pid", tmp / "w.log"
        args = [
            *(f"--pidfile={pidfile}", f"--logfile={logfile}", "wsserver"),
            *("--port", "tcp:0:interface=127.0.0.1", "--database", str(tmp / "db.sqlite")),
            *("--workers", "2"),
        ]
        launcher = Twistd(self, args, BROKER)
        how = yield launcher.ended()
        self.assertEqual(how, ("exit", 0), launcher.proc.err)
        pid = int(pidfile.read_text())
        self.addCleanup(lambda: _signal_quietly(pid, signal.SIGKILL))
        yield eventually(
            lambda: len(_LISTENING.findall(logfile.read_bytes())) == 2, "both workers listen"
        )
        children = {int(m.group(2)) for m in _LISTENING.finditer(logfile.read_bytes())}
        self.assertNotIn(pid, children)
        for child in children:
            self.addCleanup(lambda child=child: _signal_quietly(child, signal.SIGKILL))
        port = int(
            re.search(rb"listening on http://127.0.0.1:(\d+)/", logfile.read_bytes()).group(1)
        )
        code, body = yield fresh_get(f"http://127.0.0.1:{port}/health")
        self.assertEqual(code, 200)
        self.assertIn(int(body["node"].rsplit(":", 1)[1]), children)
        os.kill(pid, signal.SIGTERM)
        yield eventually(lambda: not pidfile.exists(), "the pidfile is removed")
        for child in children:
            yield eventually(lambda child=child: not _alive(child), f"child {child} has ended")
        self.assertIn(b"every worker has ended", logfile.read_bytes())


class WorkersConfigTests(unittest.TestCase):
    def test_workers_need_a_broker_and_broker_urls_are_checked(self):
        """WORKERS > 1 without BROKER is a ConfigError naming both; BROKER must
        be redis://host[:port][/db] and its errors never repeat the URL."""
        self.assertEqual(load({}, {}).workers, 1)
        self.assertIsNone(load({}, {}).broker)
        with self.assertRaises(ConfigError) as caught:
            load({"workers": "2"}, {})
        self.assertTrue(str(caught.exception).startswith("WORKERS"))
        self.assertIn("BROKER", str(caught.exception))
        good = load({}, {"WORKERS": "4", "BROKER": "redis://:secret@redis.example:6380/2"})
        self.assertEqual((good.workers, good.broker), (4, "redis://:secret@redis.example:6380/2"))
        for bad in (
            "http://:secret@host:6379",
            "redis://:secret@",
            "redis://:secret@host:70000",
            "redis://:secret@host/db",
            "redis://:secret@host/1?x=1",
            "redis://:secret@ho st",
        ):
            with self.assertRaises(ConfigError, msg=bad) as caught:
                load({}, {"BROKER": bad})
            self.assertTrue(str(caught.exception).startswith("BROKER"), bad)
            self.assertNotIn("secret", str(caught.exception))
        for bad in ("0", "x", "257"):
            with self.assertRaises(ConfigError, msg=bad):
                load({}, {"WORKERS": bad, **BROKER})

    def test_only_tcp_endpoints_can_be_shared(self):
        """With --workers, an ssl:, unix: or systemd: SERVER_ADDR is refused naming
        SERVER_ADDR before anything is bound: the children adopt a bare socket
        and would lose an ssl: endpoint's TLS (TLS for workers is TLS_CERT and
        TLS_KEY), and a child stopping on its own would unlink a UNIX socket's
        path under the others."""
        sock = os.path.abspath(self.mktemp() + ".sock")
        for listen in (
            "ssl:0:privateKey=key.pem:certKey=cert.pem",
            f"unix:{sock}",
            "systemd:domain=INET:index=0",
        ):
            settings = {
                "SERVER_ADDR": listen,
                "DATABASE": os.path.abspath(self.mktemp() + ".db"),
                "WORKERS": "2",
                **BROKER,
            }
            with self.assertRaises(ConfigError, msg=listen) as caught:
                build_workers({}, settings)
            self.assertTrue(str(caught.exception).startswith("SERVER_ADDR"), listen)
            self.assertIn("TLS_CERT", str(caught.exception))
        self.assertFalse(os.path.exists(sock))

    def test_a_tcp6_endpoint_string_is_shared(self):
        """A tcp6: endpoint string with an interface binds for the workers,
        where the string says (the parent's reactor never accepts on it)."""
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6")
        settings = {
            "SERVER_ADDR": r"tcp6:0:interface=\:\:1",
            "DATABASE": os.path.abspath(self.mktemp() + ".db"),
            "WORKERS": "2",
            **BROKER,
        }
        try:
            parent = build_workers({}, settings)
        except ConfigError as exc:
            raise unittest.SkipTest(f"::1 cannot be bound here: {exc}") from None
        self.addCleanup(parent.port.stopListening)
        self.assertEqual(parent.port.getHost().host, "::1")
        self.assertNotIn(parent.port, reactor.getReaders())
        self.assertTrue(parent.url.startswith("http://[::1]:"), parent.url)


class _FakeTransport:
    """What the supervisor sees of a child: its pid and the signals it got."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessClock(task.Clock):
    """A ``Clock`` that records ``spawnProcess`` instead of running anything."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kwargs):
        transport = _FakeTransport(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append((proto, transport, env, childFDs))
        return transport


class _FakePort:
    stopped = False

    def fileno(self) -> int:
        return 42

    def stopListening(self) -> None:
        self.stopped = True


def _ends(proto, *, status: int | None = None, sig: int | None = None) -> None:
    """Tell the supervisor that the child behind ``proto`` ended."""
    if status == 0:
        proto.processEnded(Failure(error.ProcessDone(0)))
    else:
        proto.processEnded(Failure(error.ProcessTerminated(status, sig)))


class WorkersSupervisionTests(unittest.TestCase):
    """The parent's supervision on a clock: restarts with backoff, SIGTERM
    forwarded, the drain awaited, stragglers killed."""

    SHUTDOWN_TIMEOUT = 5.0

    def setUp(self):
        self.clock = _ProcessClock()
        self.port = _FakePort()
        config = load(
            {}, {"WORKERS": "2", "SHUTDOWN_TIMEOUT": str(self.SHUTDOWN_TIMEOUT), **BROKER}
        )
        self.service = workers_module.WorkersService(
            config, self.port, {"DATABASE": "db"}, "http://127.0.0.1:1/", "db", self.clock
        )
        self.lines: list[str] = []
        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.service.startService()

    def test_children_get_the_socket_and_their_worker_name(self):
        """Each child gets the listening socket as descriptor 3, a pipe for
        stdin, and its worker name in its environment."""
        self.assertEqual(len(self.clock.spawned), 2)
        for index, (_, _, env, fds) in enumerate(self.clock.spawned, start=1):
            self.assertEqual(fds, {0: "w", 1: "r", 2: "r", 3: 42})
            self.assertEqual(env[workers_module.WORKER_VARIABLE], f"{index}/2")
            self.assertEqual(env["DATABASE"], "db")
            self.assertNotIn("NODE_NAME", env)  # each takes <hostname>:<its pid>

    def test_a_node_name_given_to_the_parent_is_one_per_worker(self):
        """NODE_NAME given to the parent reaches worker I as NODE_NAME-I: nodes
        must not share a name (the PostgreSQL node registry, /ready)."""
        service = workers_module.WorkersService(
            self.service.config,
            _FakePort(),
            {"DATABASE": "db", "NODE_NAME": "eu"},
            "http://127.0.0.1:1/",
            "db",
            self.clock,
        )
        before = len(self.clock.spawned)
        service.startService()
        names = [env["NODE_NAME"] for _, _, env, _ in self.clock.spawned[before:]]
        self.assertEqual(names, ["eu-1", "eu-2"])

    def test_a_child_that_ends_is_restarted_with_a_growing_backoff(self):
        """A child that ends is started again after 0.5 s, then 1, 2, ... up to
        30 s while it keeps ending at once; one that ran 30 s is restarted after
        0.5 s again.  Each end is logged with its status or signal."""
        proto = self.clock.spawned[0][0]
        waits = []
        for attempt in range(9):
            _ends(proto, sig=9) if attempt % 2 else _ends(proto, status=1)
            before = len(self.clock.spawned)
            delay = self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds()
            waits.append(round(delay, 6))
            self.clock.advance(delay - 0.001)
            self.assertEqual(len(self.clock.spawned), before)
            self.clock.advance(0.002)
            self.assertEqual(len(self.clock.spawned), before + 1)
        self.assertEqual(waits, [0.5, 1, 2, 4, 8, 16, 30, 30, 30])
        self.clock.advance(workers_module.STEADY)
        _ends(proto, status=1)
        delay = self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds()
        self.assertAlmostEqual(delay, 0.5)
        self.assertTrue(
            any("(pid 1000) exited with status 1; starting it again" in x for x in self.lines)
        )
        self.assertTrue(
            any("(pid 1002) killed by signal 9; starting it again" in x for x in self.lines)
        )
        self.assertEqual(self.clock.spawned[1][1].signals, [])

    def test_stop_forwards_sigterm_and_waits_for_every_child(self):
        """Stopping the parent sends SIGTERM to every child and finishes only
        once all have ended (then it closes its socket); none is restarted."""
        stopping = self.service.stopService()
        self.assertEqual([t.signals for _, t, _, _ in self.clock.spawned], [["TERM"], ["TERM"]])
        _ends(self.clock.spawned[0][0], sig=15)
        self.assertFalse(stopping.called)
        self.assertFalse(self.port.stopped)
        _ends(self.clock.spawned[1][0], status=0)
        self.assertTrue(stopping.called)
        self.assertTrue(self.port.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.clock.spawned), 2)

    def test_a_child_that_does_not_drain_is_killed(self):
        """A child still running SHUTDOWN_TIMEOUT + 15 s after the SIGTERM is
        sent SIGKILL; the parent finishes once it has ended."""
        stopping = self.service.stopService()
        _ends(self.clock.spawned[0][0], sig=15)
        stuck = self.clock.spawned[1][1]
        self.clock.advance(self.SHUTDOWN_TIMEOUT + workers_module.KILL_GRACE - 0.01)
        self.assertEqual(stuck.signals, ["TERM"])
        self.clock.advance(0.01)
        self.assertEqual(stuck.signals, ["TERM", "KILL"])
        self.assertFalse(stopping.called)
        _ends(self.clock.spawned[1][0], sig=9)
        self.assertTrue(stopping.called)

    def test_stop_during_a_backoff_cancels_the_restart(self):
        """A child waiting to be started again when the parent stops is not
        started; the parent waits only for the child still running."""
        _ends(self.clock.spawned[0][0], status=1)
        stopping = self.service.stopService()
        self.assertEqual(self.clock.spawned[1][1].signals, ["TERM"])
        _ends(self.clock.spawned[1][0], sig=15)
        self.assertTrue(stopping.called)
        self.clock.advance(60)
        self.assertEqual(len(self.clock.spawned), 2)
