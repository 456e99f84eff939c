"""Prometheus metrics of one node, and the site that serves them (``METRICS_ADDR``).

Every node (process) keeps its own ``CollectorRegistry``, never
prometheus_client's global one, so two nodes built in one process (the
in-process test clusters) count apart.  The message path only increments
plain integers of ``Metrics`` (``metrics.received += 1``: tens of
nanoseconds, where a prometheus_client ``Counter.inc`` takes its lock and
costs about ten times more), which a collector reads at scrape time; rarer
events use prometheus_client's counters, created (and, for labelled ones,
bound to their label) in advance: no allocation, no label look-up.  Levels (connections
open, users online, the broker's state) are read from the broker when a
scrape asks, not counted.

The exposition is rendered in the reactor thread, not in the reactor's
thread pool as prometheus_client's Twisted ``MetricsResource`` does: the
levels are read from the broker's dictionaries, which only the reactor
thread may walk (a pool thread doing it while a connection attaches would
see them change under it), and rendering this node's few dozen series takes
well under a millisecond.  So a scrape never races with the counters.

Nothing here imports the rest of wsserver: every module may call into it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.web import pages, server
from twisted.web.resource import Resource

from . import __version__

# Codes a refused message frame can carry (protocol section 5); any other is
# counted as "other", so the label's values stay a fixed, small set.
REFUSAL_CODES = (
    "invalid_message",
    "message_too_large",
    "from_mismatch",
    "unknown_recipient",
    "invalid_signature",
    "signature_required",
    "nonce_reused",
    "rate_limited",
    "internal_error",
    "not_a_member",
)
# Outcomes of POST /auth/login?verify=true: "ok" or the error code answered.
LOGIN_OUTCOMES = (
    "ok",
    "invalid_request",
    "unknown_user",
    "no_challenge",
    "invalid_signature",
)
LOOP_INTERVAL = 0.5  # seconds between two measurements of the reactor's delay

# The classic text format (what generate_latest writes for names like ours),
# which every Prometheus version reads; newer clients call theirs 1.0.0.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_SECONDS_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SECONDS_SLOW = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The metrics of one node.  Hooks call its counters and methods directly."""

    def __init__(self, node: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = Gauge(
            "wsserver_node_info",
            "Always 1; the node's name (NODE_NAME) and wsserver's version as labels",
            ["node", "version"],
            registry=r,
        )
        info.labels(node, __version__).set(1)
        self._connections = Gauge(
            "wsserver_connections_open", "WebSocket connections open on this node", registry=r
        )
        self._users = Gauge(
            "wsserver_users_online",
            "Users with at least one WebSocket connection open on this node",
            registry=r,
        )
        # The message path's counters: plain integers, exposed by _Tallies.
        self.received = 0
        self.stored_direct = 0
        self.stored_broadcast = 0
        self.delivered_live = 0
        self.delivered_replay = 0
        r.register(_Tallies(self))
        self.connections_opened = Counter(
            "wsserver_connections_opened",
            "WebSocket connections accepted (authenticated and attached)",
            registry=r,
        )
        refused = Counter(
            "wsserver_messages_refused",
            "Message frames refused with a system frame, by its code",
            ["code"],
            registry=r,
        )
        self._refused = {code: refused.labels(code) for code in (*REFUSAL_CODES, "other")}
        limited = Counter(
            "wsserver_rate_limited",
            "Requests refused by a rate limit: message frames (per user) or /auth/* (per IP)",
            ["limit"],
            registry=r,
        )
        self.rate_limited_message = limited.labels("message")
        self.rate_limited_auth = limited.labels("auth")
        self.slow_closes = Counter(
            "wsserver_slow_consumer_closes",
            "Connections closed with 1013 because their outbox outgrew MAX_OUTBOX_BYTES",
            registry=r,
        )
        logins = Counter(
            "wsserver_logins",
            "Finished logins (POST /auth/login?verify=true) by outcome",
            ["outcome"],
            registry=r,
        )
        self._logins = {o: logins.labels(o) for o in (*LOGIN_OUTCOMES, "other")}
        self._batch = Histogram(
            "wsserver_commit_batch_size",
            "Operations (messages and delivery marks) written in one database transaction",
            buckets=_BATCH_SIZES,
            registry=r,
        )
        self._commit = Histogram(
            "wsserver_commit_duration_seconds",
            "Time from a group commit's start to its end (the database's answer)",
            buckets=_SECONDS_FAST,
            registry=r,
        )
        self._commit_failures = Counter(
            "wsserver_commit_failures",
            "Group commits the database refused (their messages were not stored)",
            registry=r,
        )
        self._replay = Histogram(
            "wsserver_replay_duration_seconds",
            "Time to replay what a connecting client missed, from its open to the end",
            buckets=_SECONDS_SLOW,
            registry=r,
        )
        self._lag = Histogram(
            "wsserver_broker_lag_seconds",
            "Cluster: from a message's arrival on another node to its hand-out on this one",
            buckets=(*_SECONDS_FAST, 5.0, 10.0),
            registry=r,
        )
        self.broker_reconnects = Counter(
            "wsserver_broker_reconnects",
            "Cluster: times the subscription to Redis was lost while running (each outage once)",
            registry=r,
        )
        self._broker_up = Gauge(
            "wsserver_broker_up",
            "Cluster: 1 while subscribed to Redis and caught up with the database; "
            "0 otherwise (always 0 without BROKER)",
            registry=r,
        )
        self._loop_delay = Histogram(
            "wsserver_reactor_delay_seconds",
            f"How late a timer due every {LOOP_INTERVAL:g} s fires: the reactor's loop delay",
            buckets=_SECONDS_FAST,
            registry=r,
        )
        self._loop: task.LoopingCall | None = None
        self._last_tick: float | None = None

    # -- levels, read at scrape time -----------------------------------------------

    def watch(
        self,
        connections: Callable[[], int],
        users: Callable[[], int],
        broker_up: Callable[[], bool] | None = None,
    ) -> None:
        """Read the levels from these callables whenever a scrape asks."""
        self._connections.set_function(connections)
        self._users.set_function(users)
        if broker_up is not None:
            self._broker_up.set_function(lambda: 1.0 if broker_up() else 0.0)

    # -- events ---------------------------------------------------------------------

    def refused(self, code: str) -> None:
        """A message frame was refused with ``code``."""
        (self._refused.get(code) or self._refused["other"]).inc()
        if code == "rate_limited":
            self.rate_limited_message.inc()

    def stored(self, recipient: str) -> None:
        """A message to ``recipient`` (a user or "broadcast") was committed."""
        if recipient == "broadcast":
            self.stored_broadcast += 1
        else:
            self.stored_direct += 1

    def login(self, outcome: str) -> None:
        """A login finished: "ok" or the error code it was answered with."""
        (self._logins.get(outcome) or self._logins["other"]).inc()

    def commit(self, size: int, seconds: float, failed: bool = False) -> None:
        """A group commit of ``size`` operations took ``seconds``."""
        self._batch.observe(size)
        self._commit.observe(seconds)
        if failed:
            self._commit_failures.inc()

    def time_replay(self, replay: defer.Deferred, clock: IReactorTime) -> None:
        """Observe how long ``replay`` takes (from now until it fires)."""
        start = clock.seconds()

        def done(result: Any) -> Any:
            self._replay.observe(clock.seconds() - start)
            return result

        replay.addBoth(done)

    def applied(self, created_ms: int, now: float) -> None:
        """A message another node received at ``created_ms`` was handed out here at ``now``."""
        self._lag.observe(max(0.0, now - created_ms / 1000))

    # -- the reactor's delay ----------------------------------------------------------

    def start(self, clock: IReactorTime) -> None:
        """Measure the reactor's loop delay every ``LOOP_INTERVAL`` seconds."""
        if self._loop is not None:
            return
        self._last_tick = None
        self._loop = task.LoopingCall(self._tick, clock)
        self._loop.clock = clock
        self._loop.start(LOOP_INTERVAL, now=True)

    def stop(self) -> None:
        """Stop measuring the loop delay."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self, clock: IReactorTime) -> None:
        now = clock.seconds()
        if self._last_tick is not None:
            # Due LOOP_INTERVAL after the last tick: any later is the delay.
            # (A tick that comes after a late one may be early, as LoopingCall
            # keeps to its grid: that is no delay.)
            self._loop_delay.observe(max(0.0, now - self._last_tick - LOOP_INTERVAL))
        self._last_tick = now

    # -- exposition -------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition in Prometheus's text format."""
        return generate_latest(self.registry)


class _Tallies:
    """The message path's plain-integer counters, as Prometheus counters."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Any:
        m = self._metrics
        received = CounterMetricFamily(
            "wsserver_messages_received",
            "Text frames received on WebSocket connections (before any check)",
        )
        received.add_metric([], m.received)
        stored = CounterMetricFamily(
            "wsserver_messages_stored",
            "Messages committed to the database by this node",
            labels=["kind"],
        )
        stored.add_metric(["direct"], m.stored_direct)
        stored.add_metric(["broadcast"], m.stored_broadcast)
        delivered = CounterMetricFamily(
            "wsserver_messages_delivered",
            "Message frames handed to a connection of this node (live, or replayed on connect)",
            labels=["path"],
        )
        delivered.add_metric(["live"], m.delivered_live)
        delivered.add_metric(["replay"], m.delivered_replay)
        return [received, stored, delivered]


class _Exposition(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        # In the reactor thread, on purpose: see the module's docstring.
        if request.postpath:  # /metrics/anything
            return pages.notFound().render(request)
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.render()


class _Root(Resource):
    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return pages.notFound()

    def render(self, request: server.Request) -> bytes:
        return pages.notFound().render(request)


def metrics_site(metrics: Metrics) -> server.Site:
    """The site of ``METRICS_ADDR``: ``GET /metrics``, and 404 for every other path."""
    root = _Root()
    root.putChild(b"metrics", _Exposition(metrics))
    site = server.Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


_TCP_PORT = re.compile(r"^((?:tcp6?|ssl):(?:port=)?)(\d+)(?=:|$)", re.IGNORECASE)
_UNIX_PATH = re.compile(r"^(unix:(?:address=)?)([^:]+)", re.IGNORECASE)


def worker_address(listen: str, index: int) -> str:
    """The ``METRICS_ADDR`` endpoint of worker ``index`` (1-based) of ``--workers``.

    Worker 1 serves on the address as given, worker i on its port + i - 1
    (port 0 stays 0: each gets a port of its own); a UNIX socket's path gets
    ``.i`` appended for every worker but the first.  Raises ``ValueError``
    for an endpoint whose port or path is not found.
    """
    if index <= 1:
        return listen
    if m := _TCP_PORT.match(listen):
        port = int(m.group(2))
        shifted = port + index - 1 if port else 0
        if shifted > 65535:
            raise ValueError(f"worker {index}'s port {shifted} is above 65535")
        return f"{m.group(1)}{shifted}{listen[m.end() :]}"
    if m := _UNIX_PATH.match(listen):
        return f"{m.group(1)}{m.group(2)}.{index}{listen[m.end() :]}"
    raise ValueError("with WORKERS above 1 use HOST:PORT, :PORT, tcp:, tcp6:, ssl: or unix:")


DISCARD = Metrics()  # what an object counts into until it is given its node's Metrics

__all__ = ["DISCARD", "LOOP_INTERVAL", "Metrics", "metrics_site", "worker_address"]
