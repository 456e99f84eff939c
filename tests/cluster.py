"""Clusters for tests: several in-process nodes on one PostgreSQL database and
one Redis, and a Redis server of a test's own that it may stop and start."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from typing import Any

from twisted.internet import defer, reactor

from wsserver.tap import build_service

from .services import fresh_postgres_database, fresh_redis_prefix, redis_command, redis_url
from .support import LiveServer, free_port


def start_node(
    testcase: Any,
    db: str,
    prefix: str,
    name: str,
    broker: str | None = None,
    env: dict[str, str] | None = None,
) -> LiveServer:
    """One node (a real ``WsServerService`` on a free port) of a cluster."""
    settings = {
        "DATABASE": db,
        "SERVER_ADDR": "tcp:0:interface=127.0.0.1",
        "BROKER": broker or redis_url(0),
        "NODE_NAME": name,
    }
    settings.update(env or {})
    service = build_service({}, settings, broker_prefix=prefix)
    return LiveServer(testcase, service=service)


@defer.inlineCallbacks
def ready(node: LiveServer) -> Any:
    """Wait until ``node`` answers /ready with 200."""
    state: dict[str, Any] = {}

    @defer.inlineCallbacks
    def check() -> Any:
        code, body = yield node.get("/ready")
        state["last"] = (code, body)
        return code == 200

    yield wait_for(check, f"{node.base} to be ready", state)


@defer.inlineCallbacks
def wait_for(check: Any, what: str, state: dict | None = None, seconds: float = 30.0) -> Any:
    """Run the Deferred-returning ``check`` until it fires True (``seconds`` at most)."""
    deadline = reactor.seconds() + seconds
    while True:
        ok = yield check()
        if ok:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"waited {seconds:g} s for {what}; last: {state}")
        d: defer.Deferred = defer.Deferred()
        reactor.callLater(0.05, d.callback, None)
        yield d


@defer.inlineCallbacks
def two_nodes(testcase: Any, env: dict[str, str] | None = None, db: str | None = None) -> Any:
    """Two ready nodes on one fresh PostgreSQL database and the machine's Redis."""
    db = db or fresh_postgres_database(testcase)
    prefix = fresh_redis_prefix(testcase)
    first = start_node(testcase, db, prefix, "node-a", env=env)
    second = start_node(testcase, db, prefix, "node-b", env=env)
    yield ready(first)
    yield ready(second)
    return first, second


class OwnRedis:
    """A redis-server of the test's own on a free port, which it may stop and
    start again (the machine's Redis is shared and must not be restarted)."""

    def __init__(self, testcase: Any) -> None:
        path = shutil.which("redis-server")
        if path is None:
            from twisted.trial import unittest

            raise unittest.SkipTest("redis-server is not installed")
        self._path = path
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="wsredis")
        self._process: subprocess.Popen | None = None
        testcase.addCleanup(self.stop)
        testcase.addCleanup(shutil.rmtree, self._dir, True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (blocks until it answers PING, 30 s at most)."""
        self._process = subprocess.Popen(
            [
                self._path,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(600):
            try:
                if redis_command("PING", port=self.port) == "PONG":
                    return
            except OSError:
                pass
            import time

            time.sleep(0.05)
        raise AssertionError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Stop it and wait for it to be gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(30)
        self._process = None


__all__ = ["OwnRedis", "ready", "start_node", "two_nodes", "wait_for"]
