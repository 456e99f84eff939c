"""Faults in a cluster of real ``twistd -n wsserver`` nodes on one PostgreSQL
database and one Redis (protocol section 11): a node killed outright under
load, Redis restarted and the pub/sub connection killed under load, a node's
database connections terminated, and a reconnect storm of a killed node's
connections onto the others.

Every test has a PostgreSQL database of its own (dropped at the end) and a
redis-server of its own on a free port (the nodes' key and channel names are
the defaults, and the machine's Redis must never be restarted). The tests
skip with the reason when PostgreSQL or Redis is absent, and fail instead
under ``WSSERVER_REQUIRE_SERVICES=1``. Kill points come from a seeded
generator; ``WSSERVER_FAULT_SEED`` replays a run (the seed is in failures).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from .cluster import OwnRedis
from .services import (
    fresh_postgres_database,
    redis_command,
    require_postgres,
    require_redis,
)
from .support import (
    TIMEOUT,
    ConnectionClosed,
    RemoteServer,
    Twistd,
    connect_ws,
    eventually,
    serve_args,
)

FAST = {
    "MESSAGE_RATE_LIMIT": "100000",
    "MESSAGE_BURST_LIMIT": "100000",
    "MAX_CONNECTIONS_PER_USER": "100",
    "MAX_HANDSHAKES_PER_IP": "5000",
    "AUTH_RATE_LIMIT": "100000",
    "AUTH_BURST_LIMIT": "100000",
}
WINDOW = 16  # unacknowledged messages each sender keeps in flight


def require_services() -> None:
    """Skip (or fail under WSSERVER_REQUIRE_SERVICES=1) without PostgreSQL,
    Redis or a redis-server binary to start one of the test's own."""
    require_postgres()
    require_redis()
    if shutil.which("redis-server") is None:
        why = "redis-server is not installed (the fault tests restart a Redis of their own)"
        if os.environ.get("WSSERVER_REQUIRE_SERVICES") == "1":
            raise AssertionError(f"{why} (and WSSERVER_REQUIRE_SERVICES=1)")
        raise unittest.SkipTest(why)


def sql(db: str, query: str, *params: Any) -> list[tuple]:
    """Run one statement on the test database; its rows (if any)."""
    import psycopg

    with psycopg.connect(db, connect_timeout=10, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


class Node:
    """One ``twistd -n wsserver`` node of the test's cluster."""

    def __init__(self, testcase: Any, db: str, broker: str, name: str, env: dict) -> None:
        self.name = name
        self.proc = Twistd(
            testcase,
            serve_args(0, db),
            {**FAST, **env, "BROKER": broker, "NODE_NAME": name},
        )
        self.testcase = testcase
        self.server: RemoteServer | None = None

    @property
    def pid(self) -> int:
        return self.proc.transport.pid

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Wait for the start-up line, then for /ready to answer 200."""
        port = yield self.proc.listening()
        self.server = RemoteServer(self.testcase, port)
        yield wait_ready(self.server)
        return self

    def kill(self) -> defer.Deferred:
        """SIGKILL; fires once the process is gone."""
        return self.proc.kill()


@defer.inlineCallbacks
def wait_ready(server: RemoteServer, seconds: float = 30) -> Any:
    """Wait until ``server`` answers /ready with 200 (``seconds`` at most)."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = yield server.get("/ready")
        except Exception as exc:
            last = exc
        if isinstance(last, tuple) and last[0] == 200:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{server.base} not ready within {seconds:g} s; last: {last!r}")


@dataclass
class Device:
    """One device of a recipient: the ids each of its connections received."""

    user: str
    connections: list[list[int]] = field(default_factory=list)
    client: Any = None

    def attach(self, client: Any) -> None:
        """Record every message id ``client`` receives, as its own connection."""
        ids: list[int] = []
        self.connections.append(ids)
        self.client = client
        original = client.onMessage

        def on_message(payload: bytes, is_binary: bool) -> None:
            original(payload, is_binary)
            frame = client.received[-1]
            if frame.get("type") == "message":
                ids.append(frame["id"])

        client.onMessage = on_message

    @property
    def last(self) -> int:
        return max((i for ids in self.connections for i in ids), default=0)

    def got(self) -> set[int]:
        return {i for ids in self.connections for i in ids}


@dataclass
class Load:
    """Senders' plans and what the server answered."""

    plan: dict[str, list[dict]] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)  # nonce -> id
    errors: dict[str, int] = field(default_factory=dict)  # nonce -> internal_error count
    acks: int = 0
    hooks: list[tuple[int, Any]] = field(default_factory=list)  # (after N acks, call)

    def on_ack(self) -> None:
        self.acks += 1
        due = [h for h in self.hooks if self.acks >= h[0]]
        for hook in due:
            self.hooks.remove(hook)
            hook[1]()


@defer.inlineCallbacks
def pump(client: Any, messages: list[dict], load: Load) -> Any:
    """Send ``messages`` with up to WINDOW unacknowledged; record every ack.

    Each message sent gets one answer: an ack (its id must not change if it
    comes again) or ``internal_error`` (not stored, so no ack was sent before
    it: the same message, same nonce, goes again). Any other refusal fails.
    Stops quietly when the connection closes (its node was killed); the
    caller resends what is not acknowledged on another node.
    """
    queue = list(messages)
    in_flight = 0
    try:
        while queue or in_flight:
            while queue and in_flight < WINDOW:
                client.send_json(queue.pop(0))
                in_flight += 1
            frame = yield client.next_frame(30)
            kind = frame["type"]
            if kind == "closed":
                raise ConnectionClosed(frame["code"])
            if kind == "ack":
                in_flight -= 1
                previous = load.acked.setdefault(frame["nonce"], frame["id"])
                assert previous == frame["id"], (
                    f"nonce {frame['nonce']} acked as {previous} and {frame['id']}"
                )
                load.on_ack()
            elif kind == "system":
                in_flight -= 1
                assert frame["code"] == "internal_error", frame
                nonce = frame["nonce"]
                assert nonce not in load.acked, f"{nonce} refused after its ack"
                load.errors[nonce] = load.errors.get(nonce, 0) + 1
                queue.append(next(m for m in messages if m["nonce"] == nonce))
    except ConnectionClosed:
        pass


def plan_for(sender: str, recipients: tuple[str, ...], count: int) -> list[dict]:
    return [
        {
            "to": recipients[i % len(recipients)],
            "content": f"{sender}:{i}",
            "nonce": f"{sender}-{i}",
        }
        for i in range(count)
    ]


class ClusterBase(unittest.TestCase):
    """A database and a Redis of the test's own, and nodes started on them."""

    timeout = 180

    def setUp(self) -> None:
        require_services()
        self.seed = int(os.environ.get("WSSERVER_FAULT_SEED", random.randrange(1 << 30)))
        self.rng = random.Random(self.seed)
        self.db = fresh_postgres_database(self)
        self.redis = OwnRedis(self)
        self.redis.start()

    @defer.inlineCallbacks
    def nodes(self, *names: str, env: dict | None = None) -> Any:
        """Start the named nodes one after the other (the first applies the schema)."""
        started = []
        for name in names:
            node = yield Node(self, self.db, self.redis.url, name, env or {}).start()
            started.append(node)
        return started

    @defer.inlineCallbacks
    def users(self, server: RemoteServer, names: list[str]) -> Any:
        tokens = {}
        for name in names:
            _, tokens[name] = yield server.user(name)
        return tokens

    @defer.inlineCallbacks
    def device(self, user: str, token: str, base: str, since: int | None = None) -> Any:
        device = Device(user)
        client = yield connect_ws(base, token, since=since)
        device.attach(client)
        self.addCleanup(lambda: device.client.close_and_wait())
        return device

    def assert_order(self, devices: list[Device]) -> None:
        """Ids only grow on each connection of each device."""
        for device in devices:
            for ids in device.connections:
                self.assertEqual(ids, sorted(set(ids)), f"order on a {device.user} connection")

    def wanted(self, load: Load, user: str) -> set[int]:
        """The ids of the acknowledged messages addressed to ``user``."""
        by_nonce = {m["nonce"]: m for ms in load.plan.values() for m in ms}
        return {i for nonce, i in load.acked.items() if by_nonce[nonce]["to"] == user}

    @defer.inlineCallbacks
    def all_delivered(self, devices: list[Device], load: Load, seconds: float = 30) -> Any:
        """Wait until every acknowledged message is in every device of its
        recipient (over its connections), then check the order on each."""
        for device in devices:
            want = self.wanted(load, device.user)
            yield eventually(
                lambda d=device, w=want: w <= d.got(),
                f"every acknowledged message reaches a device of {device.user}",
                seconds,
            )
        self.assert_order(devices)

    def stored_once(self, load: Load) -> None:
        """Every planned message is acknowledged with an id of its own and
        stored exactly once (the probe's round trips aside)."""
        total = sum(len(ms) for ms in load.plan.values())
        self.assertEqual(len(load.acked), total)
        self.assertEqual(len(set(load.acked.values())), total)
        (count,) = sql(self.db, "SELECT COUNT(*) FROM messages WHERE sender <> 'probe'")[0]
        self.assertEqual(count, total, "a message stored twice (or lost)")

    def note(self, text: str) -> None:
        """A measurement for the report (shown with pytest -s)."""
        print(f"\n[seed {self.seed}] {text}")


class ClusterFaultTests(ClusterBase):
    """Protocol section 11's fault promises, checked on real processes."""

    # -- (a) ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_kill_node_under_load_clients_move_to_another(self) -> Any:
        """SIGKILL node A while two senders on it have messages in flight; they
        reconnect to node B and resend what was not acknowledged with the same
        nonces, and the recipients' devices on A reconnect to B with since.
        Every acknowledged message reaches every device of its recipient (the
        devices that stayed on B too), ids grow on every connection, and every
        message is stored once."""
        a, b = yield self.nodes("node-a", "node-b")
        senders, recipients = ("s1", "s2"), ("r1", "r2")
        tokens = yield self.users(a.server, list(senders + recipients))
        devices = {}
        for r in recipients:
            devices[(r, "a")] = yield self.device(r, tokens[r], a.server.ws_base)
            devices[(r, "b")] = yield self.device(r, tokens[r], b.server.ws_base)
        load = Load()
        per_sender = 300
        for s in senders:
            load.plan[s] = plan_for(s, recipients, per_sender)
        kill_at = self.rng.randrange(30, 2 * per_sender - 60)
        killed = []
        load.hooks.append((kill_at, lambda: killed.append(a.proc.transport.signalProcess("KILL"))))
        clients = {}
        for s in senders:
            clients[s] = yield connect_ws(a.server.ws_base, tokens[s])
        yield defer.gatherResults([pump(clients[s], load.plan[s], load) for s in senders])
        self.assertTrue(killed, "the load ended before the kill point")
        yield a.proc.ended()
        acked_before = dict(load.acked)

        for r in recipients:
            old = devices[(r, "a")]
            yield old.client.wait_closed()
            client = yield connect_ws(b.server.ws_base, tokens[r], since=old.last)
            old.attach(client)
        again = {}
        for s in senders:
            again[s] = yield connect_ws(b.server.ws_base, tokens[s])
            self.addCleanup(again[s].close_and_wait)
        yield defer.gatherResults(
            [
                pump(again[s], [m for m in load.plan[s] if m["nonce"] not in acked_before], load)
                for s in senders
            ]
        )
        for nonce, msg_id in acked_before.items():
            self.assertEqual(load.acked[nonce], msg_id)
        self.stored_once(load)
        yield self.all_delivered(list(devices.values()), load)
        self.note(
            f"(a) kill after {kill_at} acks: {len(acked_before)} acknowledged before the kill, "
            f"{2 * per_sender - len(acked_before)} resent to node B"
        )

    # -- (b) ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_redis_restart_and_pubsub_kill_under_load(self) -> Any:
        """Under load from a sender on each node to recipients with a device on
        each node: kill the nodes' pub/sub connections (CLIENT KILL TYPE pubsub),
        later stop Redis and start it again. Nothing acknowledged is missed by
        any device, ids grow on every connection, nothing is stored twice, and
        once Redis is back a message crosses nodes live within seconds."""
        a, b = yield self.nodes("node-a", "node-b")
        recipients = ("r1", "r2")
        tokens = yield self.users(a.server, ["sa", "sb", *recipients])
        devices = []
        for r in recipients:
            devices.append((yield self.device(r, tokens[r], a.server.ws_base)))
            devices.append((yield self.device(r, tokens[r], b.server.ws_base)))
        load = Load()
        per_sender = 400
        for s in ("sa", "sb"):
            load.plan[s] = plan_for(s, recipients, per_sender)
        total = 2 * per_sender
        marks = sorted(self.rng.sample(range(50, total - 100), 3))
        events: dict[str, float] = {}

        def kill_pubsub() -> None:
            events["pubsub killed"] = time.monotonic()
            killed = redis_command("CLIENT", "KILL", "TYPE", "pubsub", port=self.redis.port)
            events["pubsub connections killed"] = killed

        def stop_redis() -> None:
            events["redis stopped"] = time.monotonic()
            self.redis.stop()

        def start_redis() -> None:
            self.redis.start()
            events["redis started"] = time.monotonic()

        load.hooks += [(marks[0], kill_pubsub), (marks[1], stop_redis), (marks[2], start_redis)]
        clients = {}
        clients["sa"] = yield connect_ws(a.server.ws_base, tokens["sa"])
        clients["sb"] = yield connect_ws(b.server.ws_base, tokens["sb"])
        for c in clients.values():
            self.addCleanup(c.close_and_wait)
        yield defer.gatherResults([pump(clients[s], load.plan[s], load) for s in clients])
        self.assertIn("redis started", events, "the load ended before Redis came back")
        self.assertGreaterEqual(events["pubsub connections killed"], 2)
        self.stored_once(load)
        yield self.all_delivered(devices, load)
        caught_up = time.monotonic() - events["redis started"]

        # Live delivery across nodes is back: a new message from node A's
        # sender reaches r1's device on node B.
        yield wait_ready(a.server)
        yield wait_ready(b.server)
        ready = time.monotonic() - events["redis started"]
        on_b = next(d for d in devices if d.user == "r1" and d.client.factory.port == b.server.port)
        sent = time.monotonic()
        clients["sa"].send_json({"to": "r1", "content": "after", "nonce": "after-1"})
        ack = yield clients["sa"].next_of("ack")
        yield eventually(lambda: ack["id"] in on_b.got(), "a live message crosses nodes", 10)
        live = time.monotonic() - sent
        self.assert_order(devices)
        self.note(
            f"(b) pub/sub killed after {marks[0]} acks, Redis stopped after {marks[1]}, "
            f"started after {marks[2]}: every acked message delivered {caught_up:.2f} s "
            f"after the restart, both nodes ready {ready:.2f} s after it, "
            f"a live cross-node message took {live * 1000:.0f} ms"
        )

    # -- (c) ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_database_connections_terminated_under_load(self) -> Any:
        """Terminate node A's PostgreSQL backends (pg_terminate_backend) while a
        sender on A has messages in flight: the batch that was using them gets
        internal_error and no ack, the same messages sent again (same nonces)
        are acknowledged once, A answers /ready again and recovers by itself
        (no restart), and the recipient's devices on both nodes get everything."""
        a, b = yield self.nodes("node-a", "node-b")
        tokens = yield self.users(a.server, ["s", "r"])
        devices = [
            (yield self.device("r", tokens["r"], a.server.ws_base)),
            (yield self.device("r", tokens["r"], b.server.ws_base)),
        ]
        load = Load()
        load.plan["s"] = plan_for("s", ("r",), 600)
        marks = sorted(self.rng.sample(range(50, 450), 2))
        terminated: list[int] = []

        def terminate() -> None:
            pids = backends_of(self.db, a.pid)
            for pid in pids:
                sql(self.db, "SELECT pg_terminate_backend(%s)", pid)
            terminated.append(len(pids))

        def terminate_in_flight() -> None:
            # Hold the stream_head row lock so that A's next batch waits inside
            # its transaction, then terminate A's backends: that batch is in
            # flight when its connection dies.
            import psycopg

            with psycopg.connect(self.db, connect_timeout=10) as holder:
                holder.execute("SELECT last_id FROM stream_head FOR UPDATE")
                deadline = time.monotonic() + 30
                while not waiting_backends(self.db, a.pid):
                    if time.monotonic() > deadline:
                        raise AssertionError("node A's batch never waited for the row lock")
                    time.sleep(0.01)
                terminate()
                holder.rollback()

        in_flight: list[defer.Deferred] = []
        load.hooks += [
            (marks[0], terminate),
            (marks[1], lambda: in_flight.append(threads.deferToThread(terminate_in_flight))),
        ]
        sender = yield connect_ws(a.server.ws_base, tokens["s"])
        self.addCleanup(sender.close_and_wait)
        yield pump(sender, load.plan["s"], load)
        yield defer.gatherResults(in_flight)
        self.assertEqual(len(terminated), 2)
        self.assertTrue(all(terminated), f"node A had no backends to terminate: {terminated}")
        self.assertTrue(load.errors, "no batch got internal_error after its backends died")
        self.stored_once(load)
        yield wait_ready(a.server)
        yield self.all_delivered(devices, load)
        self.assertTrue(backends_of(self.db, a.pid), "node A did not reconnect to the database")
        self.note(
            f"(c) A's backends ({terminated}) terminated after {marks} acks: "
            f"{sum(load.errors.values())} answers internal_error (the batch in flight), "
            "every message acked once after resending"
        )


def waiting_backends(db: str, pid: int) -> list[int]:
    """Those of ``backends_of(db, pid)`` waiting for a lock."""
    pids = backends_of(db, pid)
    rows = sql(
        db,
        "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
        pids,
    )
    return [r[0] for r in rows]


def backends_of(db: str, pid: int) -> list[int]:
    """The PostgreSQL backend pids serving process ``pid`` on database ``db``
    (matched by the client port of each of the process's TCP sockets)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == 5432:
                ports.append(int(local.rsplit(":", 1)[1], 16))
    if not ports:
        return []
    name = db.rsplit("/", 1)[1]
    rows = sql(
        db,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND client_port = ANY(%s)",
        name,
        ports,
    )
    return [r[0] for r in rows]


class ReconnectStormTests(ClusterBase):
    """About 1,000 connections of a killed node reconnect at once to the others."""

    USERS = 50
    PER_USER = 20  # connections per user: 1,000 in all
    MISSED = 10  # messages per user sent while its connections are away

    @defer.inlineCallbacks
    def test_reconnect_storm(self) -> Any:
        """Kill node A with 1,000 open connections (50 users x 20); while they
        are away each user is sent 10 messages; then every connection reconnects
        at once with its since, half to node B and half to node C. Each gets
        what it missed, in order, and nothing else but the pre-kill message if
        that is still pending (section 6); a probe client on C keeps getting its
        round trips answered (within 10 s each) during the storm; the time until
        every connection has its replay is measured."""
        a, b, c = yield self.nodes("node-a", "node-b", "node-c")
        names = [f"u{i}" for i in range(self.USERS)]
        tokens = yield self.users(b.server, [*names, "sender", "probe"])
        devices: list[Device] = []
        for start in range(0, self.USERS * self.PER_USER, 100):
            batch = [
                connect_ws(a.server.ws_base, tokens[names[i % self.USERS]])
                for i in range(start, start + 100)
            ]
            clients = yield defer.gatherResults(batch)
            for i, client in zip(range(start, start + 100), clients, strict=True):
                device = Device(names[i % self.USERS])
                device.attach(client)
                devices.append(device)
                self.addCleanup(lambda d=device: d.client.close_and_wait())
        sender = yield connect_ws(b.server.ws_base, tokens["sender"])
        self.addCleanup(sender.close_and_wait)

        # One message each before the kill: every connection has a since.
        load = Load()
        load.plan["first"] = [{"to": n, "content": "before", "nonce": f"first-{n}"} for n in names]
        yield pump(sender, load.plan["first"], load)
        yield eventually(lambda: all(d.got() for d in devices), "every connection got one", 60)

        yield a.kill()
        yield defer.gatherResults([d.client.wait_closed() for d in devices])
        load.plan["missed"] = [
            {"to": n, "content": f"missed {k}", "nonce": f"missed-{n}-{k}"}
            for k in range(self.MISSED)
            for n in names
        ]
        yield pump(sender, load.plan["missed"], load)

        probe = yield connect_ws(c.server.ws_base, tokens["probe"])
        self.addCleanup(probe.close_and_wait)
        rtts: list[float] = []
        storm = {"done": False}

        @defer.inlineCallbacks
        def probing() -> Any:
            n = 0
            while not storm["done"]:
                n += 1
                t = time.monotonic()
                probe.send_json({"to": "probe", "content": "ping", "nonce": f"p-{n}"})
                seen: set[str] = set()
                while seen != {"ack", "message"}:  # to itself: both, in either order
                    frame = yield probe.next_frame(10)
                    if frame.get("nonce") == f"p-{n}":
                        seen.add(frame["type"])
                rtts.append(time.monotonic() - t)

        probing_done = probing()
        began = time.monotonic()
        reconnects = [
            # 1,000 handshakes at once: each gets the suite's generous deadline
            # instead of Autobahn's 5 s client default (CI, loaded, once took
            # longer); how long the storm took is measured and reported below.
            connect_ws(
                (b if i % 2 else c).server.ws_base,
                tokens[d.user],
                since=d.last,
                open_timeout=TIMEOUT,
            ).addCallback(d.attach)
            for i, d in enumerate(devices)
        ]
        yield defer.gatherResults(reconnects)
        connected = time.monotonic() - began
        for d in devices:
            want = self.wanted(load, d.user)
            yield eventually(lambda d=d, w=want: w <= d.got(), f"{d.user} replayed", 60)
        replayed = time.monotonic() - began
        storm["done"] = True
        yield probing_done
        again = 0
        for d in devices:
            first, second = d.connections
            self.assertEqual(len(first), 1)
            self.assertEqual(second, sorted(set(second)))
            missed = {load.acked[f"missed-{d.user}-{k}"] for k in range(self.MISSED)}
            self.assertLessEqual(missed, set(second))
            # The one message before the kill may come again: section 6 replays
            # a message still pending whatever its id, and the killed node may
            # have died before writing its delivered mark.
            extra = set(second) - missed
            self.assertLessEqual(extra, set(first), f"{d.user} was sent more than it missed")
            again += bool(extra)
        self.stored_once(load)
        self.assertTrue(rtts, "the probe got no round trip through during the storm")
        rtts.sort()
        self.note(
            f"(d) {len(devices)} connections reconnected in {connected:.2f} s, all replayed "
            f"({self.MISSED} each) {replayed:.2f} s after the storm began; probe round trips "
            f"during it: {len(rtts)}, median {rtts[len(rtts) // 2] * 1000:.0f} ms, "
            f"max {rtts[-1] * 1000:.0f} ms; {again} connections were sent their "
            "pre-kill message again (still pending)"
        )
