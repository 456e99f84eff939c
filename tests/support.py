"""Shared test helpers: keys from the vectors, a live server, HTTP and WebSocket clients."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from nacl.signing import SigningKey
from treq.client import HTTPClient
from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent, HTTPConnectionPool

from tests.services import database_for_test
from wsserver.messages import signing_input
from wsserver.tap import WsServerService, build_service

HERE = Path(__file__).parent
VECTORS = json.loads((HERE / "vectors.json").read_text("utf-8"))
TIMEOUT = 10.0


def vector_key(name: str) -> SigningKey:
    """The signing key of a test-vector user (``alice`` or ``bob``)."""
    return SigningKey(bytes.fromhex(VECTORS["users"][name]["secret_seed_hex"]))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def public_b64(key: SigningKey) -> str:
    return b64(bytes(key.verify_key))


def sign_message(key: SigningKey, sender: str, to: str, content: str, nonce: str | None) -> str:
    """A client's signature of a message, per protocol section 4."""
    return b64(key.sign(signing_input(sender, to, nonce, content)).signature)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def within(d: defer.Deferred, seconds: float = TIMEOUT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


class LiveServer:
    """A real ``WsServerService`` on a free loopback port, in this process."""

    def __init__(self, testcase: Any, env: dict[str, str] | None = None) -> None:
        self.testcase = testcase
        self.db = env.get("DATABASE") if env and "DATABASE" in env else database_for_test(testcase)
        settings = {"DATABASE": self.db, "SERVER_ADDR": "tcp:0:interface=127.0.0.1"}
        settings.update(env or {})
        self.service: WsServerService = build_service({}, settings)
        self.service.privilegedStartService()
        self.service.startService()
        self.port = self.service.port.getHost().port
        scheme = "https" if self.service.tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self.ws_base = f"{'wss' if self.service.tls else 'ws'}://127.0.0.1:{self.port}/ws"
        self._stopped = False
        testcase.addCleanup(self.stop)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(self._pool.closeCachedConnections)
        self.tls_options = None

    def http(self, tls_options: Any = None) -> HTTPClient:
        """A treq client whose connections are closed at the end of the test."""
        tls_options = tls_options or self.tls_options
        if tls_options is not None:
            from twisted.web.client import BrowserLikePolicyForHTTPS

            class Policy(BrowserLikePolicyForHTTPS):
                def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                    return tls_options

            return HTTPClient(Agent(reactor, contextFactory=Policy(), pool=self._pool))
        return HTTPClient(Agent(reactor, pool=self._pool))

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if not self._stopped:
            self._stopped = True
            yield self.service.stopService()
            cancel_batched_timers()

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

    def connect(self, token: str | None, **kwargs: Any) -> defer.Deferred:
        return connect_ws(self.ws_base, token, **kwargs)


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
) -> defer.Deferred:
    """Open a WebSocket (token in the Authorization header); fire with the ``Client``."""
    if since is not None:
        url += f"?since={since}"
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    factory = WebSocketClientFactory(url, headers=all_headers)
    factory.protocol = Client
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False, maxFramePayloadSize=0)
    host, port = factory.host, factory.port
    endpoint: Any = endpoints.TCP4ClientEndpoint(reactor, host, port)
    if factory.isSecure:
        endpoint = endpoints.wrapClientTLS(tls_options or optionsForClientTLS(host), endpoint)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.opened)
    if testcase is not None:
        d.addCallback(lambda client: (testcase.addCleanup(client.close_and_wait), client)[1])
    return within(d)


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


# -- the server as its own process ------------------------------------------------

ROOT = HERE.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated):
            result = ("signal", value.signal) if value.signal else ("exit", value.exitCode)
        else:
            result = ("exit", 0)
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

    def ended(self, seconds: float = 20) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.proc.ended.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        return within(d, seconds)


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

    @defer.inlineCallbacks
    def wait_up(self, seconds: float = 20) -> defer.Deferred:
        for _ in range(int(seconds * 10)):
            try:
                code, _ = yield self.get("/health")
            except Exception:
                yield task.deferLater(reactor, 0.1, lambda: None)
                continue
            if code == 200:
                return
        raise AssertionError("the server did not come up")


def serve_args(port: int, db: str, *extra: str) -> list[str]:
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
    """``twistd -n wsserver`` on a free port and ``db``; fire with (Twistd, RemoteServer)."""
    port = free_port()
    proc = Twistd(testcase, serve_args(port, db), env)
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


def wait_listening(port: int, log: Path, seconds: float = 20) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up:\n" + log.read_text(errors="replace"))
