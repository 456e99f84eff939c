"""Shared test helpers: keys from the vectors, a live server, HTTP and WebSocket clients."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.testing import create_memory_agent, create_pumper
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from nacl.signing import SigningKey
from treq.client import HTTPClient
from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from wsserver.auth import Session
from wsserver.keylog import Entry
from wsserver.messages import b64decode, signing_input
from wsserver.tap import WsServerService, build_service

from .services import (
    database_for_test,
    fresh_postgres_database,
    fresh_redis_prefix,
    redis_url,
)

HERE = Path(__file__).parent
VECTORS = json.loads((HERE / "vectors.json").read_text("utf-8"))
TIMEOUT = 30.0  # seconds: a generous deadline for any one event (the machine may be loaded)
WORKERS_START = 120.0  # seconds for a --workers 2 server (three Python processes) to start
# A worker's start-up line as its parent relays it.
_WORKER_LISTENING = re.compile(rb"worker (\d+/2) \(pid (\d+)\): [^\n]*wsserver listening on ")


def vector_key(name: str) -> SigningKey:
    """The signing key of a test-vector user (``alice`` or ``bob``)."""
    return SigningKey(bytes.fromhex(VECTORS["users"][name]["secret_seed_hex"]))


def vector_entry(index: int, at_ms: int = 0) -> Entry:
    """Entry ``index`` of the shared vector key log (alice's)."""
    e = VECTORS["keylog"]["entries"][index]
    return Entry(
        e["seq"],
        e["action"],
        b64decode(e["public_key"]),
        None,
        e["by"],
        b64decode(e["signature"]) if e["signature"] else None,
        b64decode(e["key_signature"]) if e["key_signature"] else None,
        at_ms,
    )


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def public_b64(key: SigningKey) -> str:
    return b64(bytes(key.verify_key))


def sign_message(key: SigningKey, sender: str, to: str, content: str, nonce: str | None) -> str:
    """A client's signature of a message, per protocol section 4."""
    return b64(key.sign(signing_input(sender, to, nonce, content)).signature)


def free_port() -> int:
    """A port free now, for a client-side need.

    Racy for a server: it is released before the server binds it, and another
    process may take it in between. Servers bind port 0 and report the port
    they got instead (``serve_args(0, ...)``, ``Twistd.listening``,
    ``wait_listening(0, ...)``).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def within(d: defer.Deferred, seconds: float = TIMEOUT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


WORKERS_SKIP = (
    "inspects the in-process service; WSSERVER_TEST_WORKERS=2 runs the server in other processes"
)


def suite_mode() -> str:
    """How ``LiveServer`` runs the end-to-end tests: ``"single"`` (one
    in-process node, the default), ``"cluster"`` (``WSSERVER_TEST_CLUSTER=1``:
    two in-process nodes on one PostgreSQL database and Redis) or
    ``"workers"`` (``WSSERVER_TEST_WORKERS=2``: a real ``twistd -n wsserver
    --workers 2`` process)."""
    workers = os.environ.get("WSSERVER_TEST_WORKERS", "")
    cluster = os.environ.get("WSSERVER_TEST_CLUSTER") == "1"
    if workers not in ("", "1", "2"):
        raise ValueError(f"WSSERVER_TEST_WORKERS={workers!r}: only 2 is supported")
    if workers == "2":
        if cluster:
            raise ValueError("WSSERVER_TEST_WORKERS=2 and WSSERVER_TEST_CLUSTER=1: choose one")
        return "workers"
    return "cluster" if cluster else "single"


def in_cluster() -> bool:
    """True when the end-to-end tests run on several nodes (a test cluster or
    ``--workers 2``): a promise that section 11 states differently for a
    cluster (an ack ``pending`` then a ``status`` frame) is checked as such."""
    return suite_mode() != "single"


class LiveServer:
    """A real ``WsServerService`` on a free loopback port, in this process;
    in the test modes of ``suite_mode()`` two nodes, or a ``--workers 2``
    process."""

    def __init__(
        self,
        testcase: Any,
        env: dict[str, str] | None = None,
        service: WsServerService | None = None,
    ) -> None:
        """Build the service from ``env`` (settings by variable name), or start
        the ``service`` given (built elsewhere, e.g. by the twistd plugin)."""
        self.testcase = testcase
        self.others: list[WsServerService] = []
        self._service: WsServerService | None = None
        self._process: subprocess.Popen | None = None
        self._reader: Any = None  # workers mode: the test's own store on the database
        self.log: Path | None = None  # workers mode: the twistd process's log
        self._turn = 0
        self._stopped = False
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(self._pool.closeCachedConnections)
        self.tls_options = None
        own_cluster = service is None and "BROKER" not in (env or {})
        self.mode = suite_mode() if own_cluster else "single"
        if self.mode == "workers":
            self._start_workers(testcase, env or {})
            return
        if service is None:
            cluster = self.mode == "cluster"
            if env and "DATABASE" in env:
                self.db = env["DATABASE"]
            elif cluster:
                self.db = fresh_postgres_database(testcase)
            else:
                self.db = database_for_test(testcase)
            settings = {"DATABASE": self.db, "SERVER_ADDR": "tcp:0:interface=127.0.0.1"}
            settings.update(env or {})
            if cluster:
                # WSSERVER_TEST_CLUSTER=1: two nodes on one database and one
                # Redis; WebSocket clients go to each in turn.
                prefix = fresh_redis_prefix(testcase)
                settings["BROKER"] = redis_url(0)
                second = {
                    **settings,
                    "NODE_NAME": "test-2",
                    "SERVER_ADDR": "tcp:0:interface=127.0.0.1",
                }
                self.others.append(build_service({}, second, broker_prefix=prefix))
                settings["NODE_NAME"] = "test-1"
                service = build_service({}, settings, broker_prefix=prefix)
            else:
                service = build_service({}, settings)
        else:
            self.db = service.config.database
        self._service = service
        service.privilegedStartService()
        service.startService()
        for other in self.others:
            other.privilegedStartService()
            other.startService()
        self.port = service.port.getHost().port
        self.tls = service.tls is not None
        self._set_urls()
        self._ws_bases += [
            f"{self._ws_scheme}://127.0.0.1:{other.port.getHost().port}/ws" for other in self.others
        ]
        testcase.addCleanup(self._stop_others)
        testcase.addCleanup(self.stop)

    def _set_urls(self) -> None:
        scheme = "https" if self.tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self._ws_scheme = "wss" if self.tls else "ws"
        self.ws_base = f"{self._ws_scheme}://127.0.0.1:{self.port}/ws"
        self._ws_bases = [self.ws_base]

    @property
    def service(self) -> WsServerService:
        """The in-process service (the first node in a test cluster).  With
        ``--workers 2`` there is none here: a test that inspects it is skipped."""
        if self._service is None:
            raise unittest.SkipTest(WORKERS_SKIP)
        return self._service

    @property
    def node_bases(self) -> list[str]:
        """The HTTP base of each node: one per node of a test cluster, one
        for ``--workers 2`` (where the kernel picks the worker of each
        connection) and for a single server."""
        scheme = "https" if self.tls else "http"
        return [scheme + ws[len(self._ws_scheme) :].removesuffix("/ws") for ws in self._ws_bases]

    @property
    def multi_node(self) -> bool:
        """True when this server is several nodes (a test cluster or workers)."""
        return self.mode != "single"

    # -- --workers 2 in a process of its own (WSSERVER_TEST_WORKERS=2) ------------

    def _start_workers(self, testcase: Any, env: dict[str, str]) -> None:
        """``twistd -n wsserver --workers 2`` with a Redis of the test's own
        (its keys and channels cannot meet another test's) and a SQLite file
        or fresh PostgreSQL database; blocks until both workers serve."""
        from .cluster import OwnRedis

        redis = OwnRedis(testcase)
        redis.start()
        self.db = env.get("DATABASE") or database_for_test(testcase)
        settings = {
            "DATABASE": self.db,
            "SERVER_ADDR": "tcp:0:interface=127.0.0.1",
            "BROKER": redis.url,
            "WORKERS": "2",
            **env,
        }
        self.tls = "TLS_CERT" in settings
        self.log = Path(os.path.abspath(testcase.mktemp() + ".log"))
        out = open(self.log, "wb")  # noqa: SIM115 (closed at cleanup)
        testcase.addCleanup(out.close)
        self._process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "wsserver"],
            cwd=os.getcwd(),  # a relative DATABASE means what it means to the test
            env=twistd_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        testcase.addCleanup(self.stop)
        self.port = read_port(self.log, WORKERS_START)
        self._set_urls()
        self.worker_pids = self._wait_for_workers()

    def _wait_for_workers(self) -> dict[str, int]:
        """Block until both workers logged that they listen; {"1/2": pid, ...}."""
        deadline = time.monotonic() + WORKERS_START
        while True:
            text = self.log.read_bytes()
            pids = {m[0].decode(): int(m[1]) for m in _WORKER_LISTENING.findall(text)}
            if len(pids) == 2:
                return pids
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError("the workers' parent ended:\n" + self.log_text())
            if time.monotonic() > deadline:
                raise AssertionError("the workers did not both start:\n" + self.log_text())
            time.sleep(0.05)

    def log_text(self) -> str:
        """Workers mode: everything the parent logged so far (its workers' lines
        prefixed ``worker I/2 (pid P)``)."""
        return self.log.read_text("utf-8", "replace")

    @property
    def store(self) -> Any:
        """A store on the server's database to read what it stored: the
        service's own, or with ``--workers 2`` one of the test's."""
        if self._service is not None:
            return self._service.store
        if self._reader is None:
            from wsserver.store import open_store

            self._reader = open_store(self.db, reactor)
            self._reader.start()
            self.testcase.addCleanup(self._reader.close)
        return self._reader

    @defer.inlineCallbacks
    def settled(self, msg_id: int, until: Any) -> Any:
        """The stored message ``msg_id`` once the server wrote its delivery
        marks.  One node: after its store drained, read once.  Several nodes
        (a mark is written by whichever node delivered, batched): the first
        read within ``DEADLINE`` s for which ``until(message)`` holds."""
        if not self.multi_node:
            yield self.store.drain()
            stored = yield self.store.get_message(msg_id)
            return stored
        deadline = time.monotonic() + DEADLINE
        while True:
            for node in [self._service, *self.others]:
                if node is not None:
                    yield node.store.drain()
            stored = yield self.store.get_message(msg_id)
            if until(stored) or time.monotonic() > deadline:
                return stored
            yield task.deferLater(reactor, 0.05, lambda: None)

    def http(self, tls_options: Any = None, fresh: bool = False) -> HTTPClient:
        """A treq client whose connections are closed at the end of the test;
        with ``fresh`` each request has a connection of its own."""
        pool = HTTPConnectionPool(reactor, persistent=False) if fresh else self._pool
        tls_options = tls_options or self.tls_options
        if tls_options is not None:
            from twisted.web.client import BrowserLikePolicyForHTTPS

            class Policy(BrowserLikePolicyForHTTPS):
                def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                    return tls_options

            return HTTPClient(Agent(reactor, contextFactory=Policy(), pool=pool))
        return HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if not self._stopped:
            self._stopped = True
            if self._process is not None:
                yield self._stop_process()
            else:
                yield self.service.stopService()
                yield self._stop_others()
            cancel_batched_timers()

    @defer.inlineCallbacks
    def _stop_process(self) -> Any:
        """SIGTERM to the workers' parent (it forwards it and ends once its
        workers drained); SIGKILL if it is still there after the deadline."""
        proc = self._process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                yield eventually(lambda: proc.poll() is not None, "the workers' parent ends", 60)
            except AssertionError:
                proc.kill()
                proc.wait()
                raise

    @defer.inlineCallbacks
    def _stop_others(self) -> Any:
        """Stop the test cluster's other nodes (also when a test stopped the
        first node itself)."""
        others, self.others = self.others, []
        for other in others:
            yield other.stopService()

    @defer.inlineCallbacks
    def post(self, path: str, body: Any, client: Any = None) -> Any:
        """POST JSON; fire with (status, parsed body)."""
        client = client or self.http()
        resp = yield within(client.post(self.base + path, json=body))
        content = yield resp.content()
        return resp.code, json.loads(content) if content else None

    @defer.inlineCallbacks
    def get(self, path: str, headers: dict | None = None, client: Any = None) -> Any:
        client = client or self.http()
        resp = yield within(client.get(self.base + path, headers=headers))
        content = yield resp.content()
        return resp.code, json.loads(content) if content else None

    @defer.inlineCallbacks
    def register(self, user_id: str, key: SigningKey | None = None, client: Any = None) -> Any:
        """Register ``user_id`` (a fresh key unless given); fire with its key."""
        key = key or SigningKey.generate()
        code, body = yield self.post(
            "/auth/register",
            {"user_id": user_id, "username": user_id.title(), "public_key": public_b64(key)},
            client,
        )
        assert code == 201, (code, body)
        return key

    @defer.inlineCallbacks
    def login(self, user_id: str, key: SigningKey, client: Any = None) -> Any:
        """The challenge-response login; fire with the token."""
        code, body = yield self.post("/auth/login", {"user_id": user_id}, client)
        assert code == 200, (code, body)
        signature = b64(key.sign(body["challenge"].encode("utf-8")).signature)
        code, body = yield self.post(
            "/auth/login?verify=true", {"user_id": user_id, "signature": signature}, client
        )
        assert code == 200, (code, body)
        return body["token"]

    @defer.inlineCallbacks
    def user(self, user_id: str, key: SigningKey | None = None) -> Any:
        """Register and log in; fire with (key, token)."""
        key = yield self.register(user_id, key)
        token = yield self.login(user_id, key)
        return key, token

    def connect(self, token: str | None, node: int | None = None, **kwargs: Any) -> defer.Deferred:
        """Open a WebSocket (to each node in turn in a test cluster, or to
        node ``node`` of it: 0 is the first, ``service``)."""
        bases = getattr(self, "_ws_bases", None) or [self.ws_base]
        if node is not None:
            return connect_ws(bases[node], token, **kwargs)
        self._turn = getattr(self, "_turn", 0) + 1
        return connect_ws(bases[(self._turn - 1) % len(bases)], token, **kwargs)


class ServerLog:
    """Every line the server under test logs from now on.

    In this process: the log events as they are published, formatted (and
    with ``fields``, each event's repr too).  With ``--workers 2``: the
    lines of the twistd process's log, read by ``lines()`` once the server
    has stopped, so that every worker's lines have been relayed by then.
    """

    def __init__(self, testcase: Any, server: LiveServer, fields: bool = False) -> None:
        self._server = server
        self._events: list[str] = []
        self._start = 0
        if server.log is None:

            def observe(event: dict) -> None:
                self._events.append(formatEvent(event) + (" " + repr(event) if fields else ""))

            globalLogPublisher.addObserver(observe)
            testcase.addCleanup(globalLogPublisher.removeObserver, observe)
        else:
            self._start = server.log.stat().st_size

    @defer.inlineCallbacks
    def lines(self) -> Any:
        """The lines so far; with ``--workers 2`` all of them, after stopping
        the server (nothing can be asked of it afterwards)."""
        if self._server.log is None:
            return list(self._events)
        yield self._server.stop()
        with open(self._server.log, "rb") as f:
            f.seek(self._start)
            return f.read().decode("utf-8", "replace").splitlines()


class ConnectionClosed(Exception):
    """The connection closed while a frame was awaited."""


class Client(WebSocketClientProtocol):
    """A test WebSocket client: every frame it receives goes into a queue."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: defer.DeferredQueue = defer.DeferredQueue()
        self.received: list[dict] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.close_code: int | None = None

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.received.append(frame)
        self.frames.put(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        self.frames.put({"type": "closed", "code": code})
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback(code)

    def send_json(self, obj: dict) -> None:
        self.sendMessage(json.dumps(obj).encode("utf-8"))

    def next_frame(self, seconds: float = TIMEOUT) -> defer.Deferred:
        return within(self.frames.get(), seconds)

    @defer.inlineCallbacks
    def next_of(self, kind: str, seconds: float = TIMEOUT) -> Any:
        """The next frame of type ``kind``, skipping others."""
        while True:
            frame = yield self.next_frame(seconds)
            if frame["type"] == kind:
                return frame
            if frame["type"] == "closed":
                raise ConnectionClosed(frame["code"])

    @defer.inlineCallbacks
    def take(self, count: int, kind: str | None = None) -> Any:
        """The next ``count`` frames (of type ``kind`` if given)."""
        frames = []
        for _ in range(count):
            frame = yield (self.next_of(kind) if kind else self.next_frame())
            frames.append(frame)
        return frames

    def wait_closed(self, seconds: float = TIMEOUT) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.closed.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        return within(d, seconds)

    @defer.inlineCallbacks
    def close_and_wait(self) -> Any:
        if self.close_code is None and not self.closed.called:
            self.sendClose(1000)
            yield self.wait_closed()


def connect_ws(
    url: str,
    token: str | None,
    since: int | None = None,
    headers: dict[str, str] | None = None,
    tls_options: Any = None,
    testcase: Any = None,
    open_timeout: float | None = None,
) -> defer.Deferred:
    """Open a WebSocket (token in the Authorization header); fire with the ``Client``.

    ``open_timeout`` replaces Autobahn's 5 s client deadline for the opening
    handshake (a test opening hundreds at once on a loaded machine needs more;
    the server keeps its own deadline).
    """
    if since is not None:
        url += f"?since={since}"
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    factory = WebSocketClientFactory(url, headers=all_headers)
    factory.protocol = Client
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False, maxFramePayloadSize=0)
    if open_timeout is not None:
        factory.setProtocolOptions(openHandshakeTimeout=open_timeout)
    host, port = factory.host, factory.port
    endpoint: Any = endpoints.TCP4ClientEndpoint(reactor, host, port)
    if factory.isSecure:
        endpoint = endpoints.wrapClientTLS(tls_options or optionsForClientTLS(host), endpoint)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.opened)
    if testcase is not None:
        d.addCallback(lambda client: (testcase.addCleanup(client.close_and_wait), client)[1])
    return within(d, max(TIMEOUT, open_timeout or 0))


def env_with(**values: Any) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def cancel_batched_timers() -> None:
    """Cancel txaio's leftover timer buckets.

    Autobahn schedules handshake timeouts through txaio batched timers; cancelling
    a call leaves the bucket's own reactor call pending until it fires empty.  Once
    every connection of a test is closed they do nothing, but trial would report
    them as a dirty reactor.
    """
    for call in reactor.getDelayedCalls():
        if getattr(call.func, "__name__", "") == "_notify_bucket" and call.active():
            call.cancel()


# -- WebSocket clients in memory (no sockets) ------------------------------------

DEADLINE = 30.0  # real seconds for an event that takes milliseconds on an idle machine


@defer.inlineCallbacks
def eventually(condition: Any, what: str, seconds: float = DEADLINE) -> Any:
    """Wait on the real reactor (which runs pumps, sockets and the database
    thread) until ``condition()`` is true; fail naming ``what`` after ``seconds``.

    For an event that has no Deferred of its own; never a fixed sleep.
    """
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


class Recorder(WebSocketClientProtocol):
    """An in-memory client that keeps every frame it receives and its close code.

    ``deaf = True`` makes it ignore everything that arrives from then on (a
    client that never answers the closing handshake).
    """

    deaf = False

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[dict] = []
        self.close_code: int | None = None
        self.gone: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.deaf:
            super().dataReceived(data)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.gone.called:
            self.gone.callback(code)

    def send_json(self, obj: dict) -> None:
        self.sendMessage(json.dumps(obj).encode("utf-8"))

    def of(self, kind: str) -> list[dict]:
        """The frames received of type ``kind``."""
        return [f for f in self.frames if f["type"] == kind]


class MemoryLink:
    """Connects ``Recorder`` clients to a ``ServerFactory`` through Autobahn's
    in-memory agent; ``clock`` is the clients' reactor."""

    def __init__(self, testcase: Any, factory: Any, clock: Any) -> None:
        self._testcase = testcase
        self._factory = factory
        self._clock = clock
        self.pumper = create_pumper()
        self.pumper.start()
        testcase.addCleanup(self.pumper.stop)

    @defer.inlineCallbacks
    def connect(self, session: Session) -> Any:
        """Open a connection for ``session``; fire with (client, server protocol)
        once the server's (empty) replay is over and live traffic flows, or the
        server closed the connection."""
        factory = self._factory
        servers = []

        def server() -> Any:
            proto = factory.admit(session, None, lambda: factory.buildProtocol(None))
            servers.append(proto)
            return proto

        agent = create_memory_agent(self._clock, self.pumper, server)
        opening = agent.open("ws://localhost:9000/ws", {}, protocol_class=Recorder)
        client = yield within(opening, DEADLINE)
        self._testcase.addCleanup(self.disconnect, client)
        (proto,) = servers
        yield eventually(
            lambda: not proto._replaying or client.close_code is not None,
            "the replay ends (or the server closes the connection)",
        )
        return client, proto

    @defer.inlineCallbacks
    def disconnect(self, client: Recorder) -> Any:
        if client.close_code is None and not client.deaf:
            client.sendClose(1000)
            yield within(client.gone, DEADLINE)
        cancel_batched_timers()


# -- the server as its own process ------------------------------------------------

ROOT = HERE.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# The line ``WsServerService.startService`` logs once it listens.
_LISTENING = re.compile(rb"wsserver listening on https?://(?:\[[^\]]*\]|[^:/\s]+):(\d+)/")


def listening_port(output: bytes) -> int | None:
    """The port in the server's start-up line within ``output``, if it is there."""
    match = _LISTENING.search(output)
    return int(match.group(1)) if match else None


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.port: int | None = None  # from the start-up line, once logged
        self._port_waiters: list[defer.Deferred] = []

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.port is None:
            self.port = listening_port(self.out)
            if self.port is not None:
                waiters, self._port_waiters = self._port_waiters, []
                for d in waiters:
                    d.callback(self.port)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def listening(self) -> defer.Deferred:
        """Fire with the port the server logged it listens on; fail if the
        process ends first."""
        if self.port is not None:
            return defer.succeed(self.port)
        if self.ended.called:
            return defer.fail(self._no_port())
        d: defer.Deferred = defer.Deferred()
        self._port_waiters.append(d)
        return d

    def _no_port(self) -> AssertionError:
        return AssertionError(
            "the server ended without listening:\n"
            + (self.out + self.err).decode("utf-8", "replace")
        )

    def processEnded(self, reason) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated):
            result = ("signal", value.signal) if value.signal else ("exit", value.exitCode)
        else:
            result = ("exit", 0)
        waiters, self._port_waiters = self._port_waiters, []
        for d in waiters:
            d.errback(self._no_port())
        self.ended.callback(result)


def twistd_env(extra: dict | None) -> dict[str, str]:
    """This process's environment without the limit settings a developer may
    have exported (MESSAGE_*, MAX_*), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESSAGE_", "MAX_"))}
    env.update(extra or {})
    return env


class Twistd:
    """One ``twistd`` process of the working tree's wsserver."""

    def __init__(self, testcase, args: list[str], env: dict | None = None) -> None:
        self.proc = _Collect()
        self.transport = reactor.spawnProcess(
            self.proc, sys.executable, TWISTD + args, env=twistd_env(env), path=str(ROOT)
        )
        testcase.addCleanup(self.kill)

    def kill(self) -> defer.Deferred:
        if not self.proc.ended.called:
            with contextlib.suppress(error.ProcessExitedAlready):
                self.transport.signalProcess("KILL")
        return self.ended()

    def ended(self, seconds: float = 30) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.proc.ended.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        return within(d, seconds)

    def listening(self, seconds: float = 30) -> defer.Deferred:
        """Fire with the port the server reports listening on (``twistd -n``
        logs to stdout); fail if it ends first or says nothing in ``seconds``."""
        return within(self.proc.listening(), seconds)


class RemoteServer:
    """A LiveServer-like facade over a twistd process, for its HTTP helpers."""

    def __init__(self, testcase, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}/ws"
        from twisted.web.client import HTTPConnectionPool

        self._pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(self._pool.closeCachedConnections)

    tls_options = None
    http = LiveServer.http
    post = LiveServer.post
    get = LiveServer.get
    register = LiveServer.register
    login = LiveServer.login
    user = LiveServer.user
    connect = LiveServer.connect

    @defer.inlineCallbacks
    def wait_up(self, seconds: float = 30) -> defer.Deferred:
        """Fire once ``/health`` answers 200 (within ``seconds``)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                code, _ = yield self.get("/health")
            except Exception:
                code = None
            if code == 200:
                return
            yield task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("the server did not come up")


def serve_args(port: int, db: str, *extra: str) -> list[str]:
    """``twistd -n wsserver`` on 127.0.0.1:``port`` and ``db``; pass port 0 and
    read the port the server got from its start-up line."""
    return [
        "-n",
        "--pidfile=",
        "wsserver",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--database",
        db,
        *extra,
    ]


@defer.inlineCallbacks
def start_twistd(testcase: Any, db: str, env: dict | None = None) -> Any:
    """``twistd -n wsserver`` on port 0 and ``db``; fire with (Twistd, RemoteServer)
    once it answers on the port it reported."""
    proc = Twistd(testcase, serve_args(0, db), env)
    port = yield proc.listening()
    server = RemoteServer(testcase, port)
    yield server.wait_up()
    return proc, server


def spawn_twistd_sync(testcase: Any, args: list[str], env: dict | None, log: Path) -> Any:
    """``twistd`` as a ``subprocess.Popen`` for synchronous (stdlib unittest) tests:
    output to ``log``, SIGTERM then SIGKILL at cleanup."""
    out = open(log, "wb")  # noqa: SIM115 (closed at cleanup)
    proc = subprocess.Popen(
        TWISTD + args, cwd=str(ROOT), env=twistd_env(env), stdout=out, stderr=subprocess.STDOUT
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()

    testcase.addCleanup(stop)
    return proc


def read_port(log: Path, seconds: float = 30) -> int:
    """Block until the server's start-up line is in the file ``log``; its port."""
    deadline = time.monotonic() + seconds
    while True:
        port = listening_port(log.read_bytes()) if log.exists() else None
        if port is not None:
            return port
        if time.monotonic() > deadline:
            shown = log.read_text(errors="replace") if log.exists() else "(no log)"
            raise AssertionError("the server did not report a port:\n" + shown)
        time.sleep(0.05)


@defer.inlineCallbacks
def read_port_async(log: Path, seconds: float = 30) -> Any:
    """``read_port`` for Twisted tests: fire with the port logged in ``log``."""
    deadline = time.monotonic() + seconds
    while True:
        port = listening_port(log.read_bytes()) if log.exists() else None
        if port is not None:
            return port
        if time.monotonic() > deadline:
            shown = log.read_text(errors="replace") if log.exists() else "(no log)"
            raise AssertionError("the server did not report a port:\n" + shown)
        yield task.deferLater(reactor, 0.05, lambda: None)


def wait_listening(port: int, log: Path, seconds: float = 30) -> int:
    """Block until the server logging to ``log`` accepts TCP connections; its port.

    With ``port`` 0 (the server was started with ``serve_args(0, ...)``) the
    port is read from the server's start-up line in ``log``.
    """
    deadline = time.monotonic() + seconds
    if port == 0:
        port = read_port(log, seconds)
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up:\n" + log.read_text(errors="replace"))
