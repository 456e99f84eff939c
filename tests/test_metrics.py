"""Prometheus metrics (protocol section 14, ``METRICS_ADDR``): scraped over HTTP
from the real listener while real traffic moves the counters, on SQLite, on
PostgreSQL, per node of a cluster and per worker of ``--workers``; the
Grafana dashboard shipped in examples/ queries only metrics that exist."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.trial import unittest

from wsserver.config import ConfigError
from wsserver.metrics import LOOP_INTERVAL, Metrics, worker_address
from wsserver.tap import build_service

from .cluster import start_node, two_nodes, wait_for
from .services import (
    fresh_postgres_database,
    fresh_redis_prefix,
    redis_url,
    require_postgres,
    require_redis,
)
from .support import (
    ROOT,
    LiveServer,
    RemoteServer,
    Twistd,
    connect_ws,
    eventually,
    serve_args,
    sign_message,
    vector_key,
)

DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition, read with
    prometheus_client's own parser (as Prometheus reads it)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    if key not in found:
        raise AssertionError(f"{name}{labels} is not in the scrape")
    return found[key]


@defer.inlineCallbacks
def scrape(server: Any, port: int, path: str = "/metrics") -> Any:
    """GET http://127.0.0.1:``port````path``: (status, content type, body text)."""
    resp = yield server.http().get(f"http://127.0.0.1:{port}{path}")
    body = yield resp.content()
    kind = (resp.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
    return resp.code, kind, body.decode("utf-8")


def metrics_port(server: LiveServer) -> int:
    return server.service.metrics_port.getHost().port


class TrafficTests(unittest.TestCase):
    """The counters move with real traffic, on the engine ``database`` names."""

    timeout = 120
    database: str | None = None  # None: a SQLite file of the test's own

    def env(self) -> dict[str, str]:
        env = {
            "METRICS_ADDR": "tcp:0:interface=127.0.0.1",
            "MESSAGE_BURST_LIMIT": "4",
            "MESSAGE_RATE_LIMIT": "0.01",
            "AUTH_BURST_LIMIT": "8",
            "AUTH_RATE_LIMIT": "0.001",
        }
        if self.database == "postgresql":
            require_postgres()
            env["DATABASE"] = fresh_postgres_database(self)
        return env

    @defer.inlineCallbacks
    def test_counters_move_with_real_traffic(self):
        """Register, log in (and fail to), connect, send direct and broadcast
        messages, be refused and rate limited, on messages and on /auth/*:
        each counter of the scrape says exactly that."""
        server = LiveServer(self, self.env())
        port = metrics_port(server)
        self.assertNotEqual(port, server.port)
        alice_key, token = yield server.user("alice", vector_key("alice"))  # 3 /auth requests
        _, bob_token = yield server.user("bob")  # 3 more
        code, _ = yield server.post("/auth/login", {"user_id": "alice"})
        code, _ = yield server.post(
            "/auth/login?verify=true",
            {"user_id": "alice", "signature": sign_message(alice_key, "x", "y", "z", None)},
        )
        self.assertEqual(code, 401)  # 8 /auth requests: the bucket is empty
        code, _ = yield server.get("/auth/users/alice")
        self.assertEqual(code, 429)

        alice = yield connect_ws(f"{server.ws_base}?token={token}", None, testcase=self)
        bob = yield connect_ws(f"{server.ws_base}?token={bob_token}", None, testcase=self)
        # Both replays (of nothing) over before anything is sent, so what
        # follows arrives live (a replay reading late would replay it).
        state: dict[str, Any] = {}

        @defer.inlineCallbacks
        def replays_done() -> Any:
            _, _, text = yield scrape(server, port)
            state["replays"] = value(samples(text), "wsserver_replay_duration_seconds_count")
            return state["replays"] == 2

        yield wait_for(replays_done, "both replays", state)
        sig = sign_message(alice_key, "alice", "bob", "hello", "n-1")
        alice.send_json({"to": "bob", "content": "hello", "signature": sig, "nonce": "n-1"})
        yield alice.next_of("ack")
        yield bob.next_of("message")
        alice.send_json({"to": "nobody", "content": "x", "nonce": "n-2"})
        refusal = yield alice.next_of("system")
        self.assertEqual(refusal["code"], "unknown_recipient")
        alice.send_json({"to": "broadcast", "content": "all", "nonce": "n-3"})
        yield alice.next_of("ack")
        yield bob.next_of("message")
        alice.send_json({"to": "bob", "content": "fourth", "nonce": "n-4"})
        yield alice.next_of("ack")
        yield bob.next_of("message")
        alice.send_json({"to": "bob", "content": "over the burst", "nonce": "n-5"})
        refusal = yield alice.next_of("system")
        self.assertEqual(refusal["code"], "rate_limited")
        yield server.service.store.drain()  # the delivery marks, written lazily

        code, kind, text = yield scrape(server, port)
        self.assertEqual(code, 200)
        self.assertEqual(kind, "text/plain; version=0.0.4; charset=utf-8")
        found = samples(text)
        self.assertEqual(value(found, "wsserver_connections_open"), 2)
        self.assertEqual(value(found, "wsserver_users_online"), 2)
        self.assertEqual(value(found, "wsserver_connections_opened_total"), 2)
        self.assertEqual(value(found, "wsserver_messages_received_total"), 5)
        self.assertEqual(value(found, "wsserver_messages_stored_total", kind="direct"), 2)
        self.assertEqual(value(found, "wsserver_messages_stored_total", kind="broadcast"), 1)
        self.assertEqual(value(found, "wsserver_messages_delivered_total", path="live"), 3)
        self.assertEqual(value(found, "wsserver_messages_delivered_total", path="replay"), 0)
        self.assertEqual(
            value(found, "wsserver_messages_refused_total", code="unknown_recipient"), 1
        )
        self.assertEqual(value(found, "wsserver_messages_refused_total", code="rate_limited"), 1)
        self.assertEqual(value(found, "wsserver_messages_refused_total", code="nonce_reused"), 0)
        self.assertEqual(value(found, "wsserver_rate_limited_total", limit="message"), 1)
        self.assertEqual(value(found, "wsserver_rate_limited_total", limit="auth"), 1)
        self.assertEqual(value(found, "wsserver_logins_total", outcome="ok"), 2)
        self.assertEqual(value(found, "wsserver_logins_total", outcome="invalid_signature"), 1)
        self.assertEqual(value(found, "wsserver_slow_consumer_closes_total"), 0)
        commits = value(found, "wsserver_commit_batch_size_count")
        self.assertEqual(commits, server.service.store.batches)
        # Every operation committed: 4 messages (the one to "nobody" is found
        # to have no recipient inside the transaction), the delivery marks of
        # the 2 delivered direct ones and the broadcast's count of recipients.
        self.assertEqual(value(found, "wsserver_commit_batch_size_sum"), 4 + 2 + 1)
        self.assertEqual(value(found, "wsserver_commit_duration_seconds_count"), commits)
        self.assertGreater(value(found, "wsserver_commit_duration_seconds_sum"), 0)
        self.assertEqual(value(found, "wsserver_replay_duration_seconds_count"), 2)
        self.assertEqual(value(found, "wsserver_commit_failures_total"), 0)
        # No BROKER (but WSSERVER_TEST_CLUSTER=1 runs this on a cluster's first node).
        self.assertEqual(value(found, "wsserver_broker_up"), 1 if server.others else 0)

        # A reconnect with since replays what bob missed: counted as replayed.
        yield bob.close_and_wait()
        bob = yield connect_ws(f"{server.ws_base}?token={bob_token}&since=0", None, testcase=self)
        yield bob.take(3, "message")
        _, _, text = yield scrape(server, port)
        found = samples(text)
        self.assertEqual(value(found, "wsserver_messages_delivered_total", path="replay"), 3)
        self.assertEqual(value(found, "wsserver_replay_duration_seconds_count"), 3)
        self.assertEqual(value(found, "wsserver_connections_opened_total"), 3)
        yield alice.close_and_wait()
        yield bob.close_and_wait()
        _, _, text = yield scrape(server, port)
        self.assertEqual(value(samples(text), "wsserver_connections_open"), 0)

    @defer.inlineCallbacks
    def test_reactor_delay_is_measured(self):
        """The loop-delay timer runs in a started server: its histogram fills."""
        server = LiveServer(self, self.env())
        port = metrics_port(server)
        state: dict[str, float] = {}

        @defer.inlineCallbacks
        def ticked() -> Any:
            _, _, text = yield scrape(server, port)
            state["n"] = value(samples(text), "wsserver_reactor_delay_seconds_count")
            return state["n"] >= 2

        yield wait_for(ticked, "two measurements of the loop delay", state)

    @defer.inlineCallbacks
    def test_slow_consumer_close_is_counted(self):
        """A client that stops reading is closed with 1013: counted once."""
        env = {
            **self.env(),
            "MAX_OUTBOX_BYTES": "65536",
            "MESSAGE_RATE_LIMIT": "10000",
            "MESSAGE_BURST_LIMIT": "10000",
        }
        server = LiveServer(self, env)
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        # Both on the first node (WSSERVER_TEST_CLUSTER=1 has two).
        alice = yield connect_ws(server.ws_base, alice_token, testcase=self)
        bob = yield connect_ws(server.ws_base, bob_token, testcase=self)
        (bob_on_server,) = [c for c in server.service.broker.connections() if c.user_id == "bob"]
        bob.transport.pauseProducing()  # bob stops reading
        for i in range(2000):
            if bob_on_server.localCloseCode:
                break
            alice.send_json({"to": "bob", "content": "x" * 60_000, "nonce": f"big-{i}"})
            yield alice.next_of("ack")
        self.assertEqual(bob_on_server.localCloseCode, 1013)
        _, _, text = yield scrape(server, metrics_port(server))
        self.assertEqual(value(samples(text), "wsserver_slow_consumer_closes_total"), 1)
        bob.transport.resumeProducing()


class PostgresTrafficTests(TrafficTests):
    """The same on PostgreSQL."""

    database = "postgresql"


class ListenerTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_only_on_its_own_listener(self):
        """/metrics answers on METRICS_ADDR only: the public port answers 404 for
        it, and the metrics listener 404 for every other path."""
        server = LiveServer(self, {"METRICS_ADDR": "tcp:0:interface=127.0.0.1"})
        code, _ = yield server.get("/metrics")
        self.assertEqual(code, 404)
        port = metrics_port(server)
        for path in ("/", "/health", "/metrics/x", "/auth/login"):
            code, _, _ = yield scrape(server, port, path)
            self.assertEqual(code, 404, path)
        code, _, text = yield scrape(server, port)
        self.assertEqual(code, 200)
        self.assertIn("wsserver_connections_open", text)

    def test_unset_serves_nothing(self):
        """Without METRICS_ADDR no listener is opened (metrics are still counted)."""
        server = LiveServer(self)
        self.assertIsNone(server.service.metrics_port)
        self.assertIn(b"wsserver_messages_received_total", server.service.metrics.render())

    @defer.inlineCallbacks
    def test_each_node_has_its_own_registry(self):
        """Two servers in one process count apart (a registry per node, not
        prometheus_client's global one)."""
        env = {"METRICS_ADDR": "tcp:0:interface=127.0.0.1"}
        one, two = LiveServer(self, env), LiveServer(self, env)
        yield one.user("alice")
        _, _, text_one = yield scrape(one, metrics_port(one))
        _, _, text_two = yield scrape(two, metrics_port(two))
        self.assertEqual(value(samples(text_one), "wsserver_logins_total", outcome="ok"), 1)
        self.assertEqual(value(samples(text_two), "wsserver_logins_total", outcome="ok"), 0)

    def test_a_taken_port_is_one_line_naming_metrics_addr(self):
        """METRICS_ADDR on a port already taken stops the start with ConfigError
        naming METRICS_ADDR, and leaves the public port free again."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        busy = taken.getsockname()[1]
        service = build_service(
            {},
            {
                "DATABASE": str(Path(self.mktemp()).resolve()),
                "SERVER_ADDR": "tcp:0:interface=127.0.0.1",
                "METRICS_ADDR": f"127.0.0.1:{busy}",
            },
        )
        self.addCleanup(service.store.close)
        with self.assertRaises(ConfigError) as ctx:
            service.bind()
        self.assertTrue(str(ctx.exception).startswith("METRICS_ADDR: cannot listen"), ctx.exception)
        self.assertIsNone(service.port)

    def test_bad_values(self):
        """A METRICS_ADDR that is no address, or LOG_FORMAT other than text/json,
        is refused naming the variable."""
        from wsserver.config import load

        for variable, bad in (("METRICS_ADDR", "http://x"), ("LOG_FORMAT", "xml")):
            with self.assertRaises(ConfigError) as ctx:
                load({}, {variable: bad})
            self.assertTrue(str(ctx.exception).startswith(f"{variable}: "), ctx.exception)


class UnitTests(unittest.TestCase):
    def test_loop_delay_is_how_late_the_timer_fires(self):
        """The reactor's delay is the time a tick comes past LOOP_INTERVAL after
        the last one (on a Clock: a tick held up 0.3 s measures 0.3 s)."""
        clock = task.Clock()
        metrics = Metrics("n")
        metrics.start(clock)
        self.addCleanup(metrics.stop)
        clock.advance(LOOP_INTERVAL)
        clock.advance(LOOP_INTERVAL + 0.3)  # LoopingCall: one late tick
        found = samples(metrics.render().decode())
        self.assertEqual(value(found, "wsserver_reactor_delay_seconds_count"), 2)
        self.assertAlmostEqual(value(found, "wsserver_reactor_delay_seconds_sum"), 0.3)

    def test_worker_addresses(self):
        """Worker i of --workers serves its metrics on METRICS_ADDR's port + i - 1."""
        self.assertEqual(worker_address("tcp:9108", 1), "tcp:9108")
        self.assertEqual(
            worker_address("tcp:9108:interface=127.0.0.1", 3), "tcp:9110:interface=127.0.0.1"
        )
        self.assertEqual(worker_address("tcp6:port=9108", 2), "tcp6:port=9109")
        self.assertEqual(worker_address("tcp:0", 4), "tcp:0")
        self.assertEqual(worker_address("unix:/run/m.sock", 2), "unix:/run/m.sock.2")
        with self.assertRaises(ValueError):
            worker_address("tcp:65535", 2)
        with self.assertRaises(ValueError):
            worker_address("systemd:domain=INET:index=0", 2)

    def test_refusal_codes_are_a_bounded_set(self):
        """A code outside the known ones is counted as "other": the label's
        values never grow with what clients send."""
        metrics = Metrics("n")
        metrics.refused("something_new")
        metrics.login("surprise")
        found = samples(metrics.render().decode())
        self.assertEqual(value(found, "wsserver_messages_refused_total", code="other"), 1)
        self.assertEqual(value(found, "wsserver_logins_total", outcome="other"), 1)


class ClusterTests(unittest.TestCase):
    """Per node of a cluster: the broker's lag and state."""

    timeout = 120

    def setUp(self):
        require_postgres()
        require_redis()

    @defer.inlineCallbacks
    def test_each_node_counts_its_own_and_the_broker_lag(self):
        """A message stored on node A for a user on node B: A counts it stored,
        B counts it delivered and observes its lag; both say the broker is up."""
        env = {"METRICS_ADDR": "tcp:0:interface=127.0.0.1"}
        a, b = yield two_nodes(self, env)
        alice_key, alice_token = yield a.user("alice", vector_key("alice"))
        _, bob_token = yield b.user("bob")
        bob = yield connect_ws(f"{b.ws_base}?token={bob_token}", None, testcase=self)
        alice = yield connect_ws(f"{a.ws_base}?token={alice_token}", None, testcase=self)
        sig = sign_message(alice_key, "alice", "bob", "across", "c-1")
        alice.send_json({"to": "bob", "content": "across", "signature": sig, "nonce": "c-1"})
        yield alice.next_of("ack")
        yield bob.next_of("message")
        _, _, text_a = yield scrape(a, metrics_port(a))
        _, _, text_b = yield scrape(b, metrics_port(b))
        found_a, found_b = samples(text_a), samples(text_b)
        self.assertEqual(value(found_a, "wsserver_messages_stored_total", kind="direct"), 1)
        self.assertEqual(value(found_b, "wsserver_messages_stored_total", kind="direct"), 0)
        self.assertEqual(value(found_b, "wsserver_messages_delivered_total", path="live"), 1)
        self.assertEqual(value(found_a, "wsserver_messages_delivered_total", path="live"), 0)
        self.assertEqual(value(found_b, "wsserver_broker_lag_seconds_count"), 1)
        self.assertEqual(value(found_a, "wsserver_broker_lag_seconds_count"), 0)
        for found in (found_a, found_b):
            self.assertEqual(value(found, "wsserver_broker_up"), 1)
            self.assertEqual(value(found, "wsserver_connections_open"), 1)
        self.assertIn(("wsserver_node_info", (("node", "node-a"),)), _info(found_a))
        self.assertIn(("wsserver_node_info", (("node", "node-b"),)), _info(found_b))

    @defer.inlineCallbacks
    def test_a_lost_broker_counts_one_reconnect(self):
        """Redis going away: broker_up drops to 0 and one reconnect is counted."""
        from .cluster import OwnRedis

        own = OwnRedis(self)
        own.start()
        db = fresh_postgres_database(self)
        node = start_node(
            self,
            db,
            fresh_redis_prefix(self),
            "node-r",
            broker=own.url,
            env={"METRICS_ADDR": "tcp:0:interface=127.0.0.1"},
        )
        port = metrics_port(node)
        state: dict[str, Any] = {}

        def reading(name: str, want: float) -> Any:
            @defer.inlineCallbacks
            def check() -> Any:
                _, _, text = yield scrape(node, port)
                state["found"] = value(samples(text), name)
                return state["found"] == want

            return check

        yield wait_for(reading("wsserver_broker_up", 1), "broker up", state)
        own.stop()
        yield wait_for(reading("wsserver_broker_up", 0), "broker down", state)
        yield wait_for(reading("wsserver_broker_reconnects_total", 1), "one reconnect", state)


def _info(found: dict) -> set:
    return {
        (name, tuple((k, v) for k, v in labels if k == "node"))
        for (name, labels) in found
        if name == "wsserver_node_info"
    }


class WorkersTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_every_worker_serves_its_own_metrics(self):
        """``--workers 2`` with one METRICS_ADDR starts (no two workers bind one
        port): each worker logs where its metrics are, and each answers."""
        require_redis()
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        env = {
            "BROKER": redis_url(0),
            "METRICS_ADDR": "tcp:0:interface=127.0.0.1",
            "WORKERS": "2",
        }
        proc = Twistd(self, serve_args(0, str(tmp / "db.sqlite")), env)
        port = yield proc.listening()
        yield RemoteServer(self, port).wait_up()
        pattern = re.compile(
            rb"worker (\d)/2 \(pid \d+\): .*?metrics at http://127\.0\.0\.1:(\d+)/metrics"
        )
        yield eventually(
            lambda: len(set(pattern.findall(proc.proc.out))) == 2, "both workers' metrics lines"
        )
        ports = {int(w): int(p) for w, p in pattern.findall(proc.proc.out)}
        self.assertEqual(set(ports), {1, 2})
        self.assertNotEqual(ports[1], ports[2])
        remote = RemoteServer(self, port)
        for metrics in ports.values():
            code, _, text = yield scrape(remote, metrics)
            self.assertEqual(code, 200)
            self.assertIn("wsserver_connections_open", text)


class DashboardTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_dashboard_queries_only_metrics_that_exist(self):
        """examples/grafana-dashboard.json is JSON with panels, and every metric
        its queries name is in a real scrape of a fresh server."""
        dashboard = json.loads(DASHBOARD.read_text())
        panels = dashboard["panels"]
        self.assertGreater(len(panels), 10)
        exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
        named = {n for e in exprs for n in re.findall(r"\bwsserver_[a-z_]+", e)}
        server = LiveServer(self, {"METRICS_ADDR": "tcp:0:interface=127.0.0.1"})
        _, _, text = yield scrape(server, metrics_port(server))
        exposed = {name for name, _ in samples(text)}
        self.assertEqual(named - exposed, set())
        # Every metric family of the scrape is on the dashboard (prometheus_client's
        # *_created timestamps aside).
        families = {
            f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
        }
        shown = {
            f
            for f in families
            if any(n == f or n.startswith(f + "_") for n in named) and f != "wsserver_node_info"
        }
        self.assertEqual(families - shown - {"wsserver_node_info"}, set())
