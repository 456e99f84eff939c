"""Limits shared by the nodes of a cluster (protocol section 11): one token
bucket per user, and MAX_CONNECTIONS_PER_USER counted on every node, as
leases that a dead node's connections outlive by at most 30 s."""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from wsserver.broker.limits import (
    AHEAD,
    HOLD,
    LEASE_REFRESH,
    LEASE_TTL,
    MAX_HELD,
    SharedRateLimiter,
)
from wsserver.broker.redis import RedisBroker
from wsserver.ratelimit import RateLimiter

from .cluster import OwnRedis, ready, start_node, two_nodes
from .services import fresh_redis_prefix, redis_command, redis_url, require_redis
from .support import eventually


class SharedBucketTests(unittest.TestCase):
    """One token bucket per user across the cluster."""

    timeout = 120

    @defer.inlineCallbacks
    def test_reconnecting_to_another_node_does_not_refill_the_bucket(self):
        """A user who spent the burst on one node is refused on the other
        (rate_limited with retry_after_ms), and in order with its acks."""
        env = {"MESSAGE_BURST_LIMIT": "2", "MESSAGE_RATE_LIMIT": "0.001"}
        a, b = yield two_nodes(self, env)
        _, alice_token = yield a.user("alice")
        yield b.register("bob")
        on_a = yield a.connect(alice_token, testcase=self)
        for i in range(2):
            on_a.send_json({"to": "bob", "content": str(i), "nonce": f"n-{i}"})
        acks = yield on_a.take(2, "ack")
        self.assertEqual([ack["nonce"] for ack in acks], ["n-0", "n-1"])
        yield on_a.close_and_wait()
        on_b = yield b.connect(alice_token, testcase=self)
        on_b.send_json({"to": "bob", "content": "more", "nonce": "n-2"})
        frame = yield on_b.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("rate_limited", "n-2"))
        self.assertGreater(frame["retry_after_ms"], 0)

    @defer.inlineCallbacks
    def test_without_redis_each_node_limits_on_its_own(self):
        """While Redis is away the node-local bucket (same rate and burst) still
        limits: messages within the burst are stored, the next is refused."""
        require_redis()
        own = OwnRedis(self)
        own.start()
        env = {"MESSAGE_BURST_LIMIT": "2", "MESSAGE_RATE_LIMIT": "0.001"}
        node = start_node(self, self.mktemp() + ".db", "wstest:", "solo", own.url, env)
        yield ready(node)
        _, alice_token = yield node.user("alice")
        yield node.register("bob")
        alice = yield node.connect(alice_token, testcase=self)
        own.stop()
        yield eventually(lambda: node.service.broker.command_connection() is None, "Redis gone")
        for i in range(3):
            alice.send_json({"to": "bob", "content": str(i), "nonce": f"n-{i}"})
        frames = yield alice.take(3)  # the refusal may come before the acks
        acks = [f["nonce"] for f in frames if f["type"] == "ack"]
        refusals = [(f["code"], f["nonce"]) for f in frames if f["type"] == "system"]
        self.assertEqual((acks, refusals), (["n-0", "n-1"], [("rate_limited", "n-2")]))


class _CountingRedis:
    """A Redis command connection that counts its script calls."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.evals = 0

    def eval(self, *args, **kwargs):
        self.evals += 1
        return self._conn.eval(*args, **kwargs)


class BatchedBucketTests(unittest.TestCase):
    """The frames of one reactor turn take their tokens in one call to Redis,
    with the answers one call per frame would give."""

    timeout = 60

    @defer.inlineCallbacks
    def test_one_script_call_per_turn_and_per_frame_answers(self):
        require_redis()
        prefix = fresh_redis_prefix(self)
        clock = Clock()
        broker = RedisBroker(
            NoStore(), clock, redis_url(0), "node-a", prefix=prefix, reactor=reactor
        )
        broker.start()
        self.addCleanup(broker.stop)
        yield eventually(lambda: broker.command_connection() is not None, "Redis")
        counting = _CountingRedis(broker.command_connection())
        broker.command_connection = lambda: counting
        limiter = SharedRateLimiter(RateLimiter(0.001, 3, clock), broker, clock=reactor)
        self.assertEqual(limiter.ahead, 0)  # less than one token refills in AHEAD
        first = [limiter.take("alice") for _ in range(5)] + [limiter.take("bob")]
        waits = yield defer.gatherResults(first)
        self.assertEqual(counting.evals, 1)
        self.assertEqual(waits[:3] + waits[5:], [0.0, 0.0, 0.0, 0.0])
        self.assertTrue(all(w > 0 for w in waits[3:5]), waits)
        # The bucket is the user's one in Redis: the next turn finds it empty.
        again = yield limiter.take("alice")
        self.assertGreater(again, 0)
        self.assertEqual(counting.evals, 2)
        bob = yield defer.gatherResults([limiter.take("bob") for _ in range(3)])
        self.assertEqual([w > 0 for w in bob], [False, False, True])


class AllowanceTests(unittest.TestCase):
    """At a high rate a node takes up to AHEAD seconds of refill ahead and
    spends it without asking Redis; what it holds comes out of the user's one
    bucket and is dropped, not given back, after HOLD."""

    timeout = 60

    @defer.inlineCallbacks
    def test_tokens_taken_ahead_come_from_the_shared_bucket_and_expire(self):
        require_redis()
        prefix = fresh_redis_prefix(self)
        clock = Clock()
        clock.advance(1000)
        broker = RedisBroker(
            NoStore(), clock, redis_url(0), "node-a", prefix=prefix, reactor=reactor
        )
        broker.start()
        self.addCleanup(broker.stop)
        yield eventually(lambda: broker.command_connection() is not None, "Redis")
        counting = _CountingRedis(broker.command_connection())
        broker.command_connection = lambda: counting
        # 1000 tokens/s: 50 refill in AHEAD; a burst of 100.
        a = SharedRateLimiter(RateLimiter(1000, 100, clock), broker, clock=clock)
        self.assertEqual(a.ahead, min(MAX_HELD, int(1000 * AHEAD)))
        first = a.take("alice")
        clock.advance(0)
        # A frame that comes while the ask is under way waits for its answer
        # (and takes from the allowance it brings) instead of asking again.
        second = a.take("alice")
        clock.advance(0)
        self.assertEqual((yield first), 0.0)
        self.assertEqual((yield second), 0.0)
        self.assertEqual(counting.evals, 1)
        # The next frames spend the allowance: answered at once, no Redis call.
        spent = [a.take("alice") for _ in range(a.ahead - 1)]
        self.assertEqual(spent, [0.0] * (a.ahead - 1))
        self.assertEqual(counting.evals, 1)
        # The allowance came out of the user's one bucket (Redis's own record
        # of it, as node b would find it).
        key = f"{broker.prefix}bucket:alice"
        self.assertEqual(float(redis_command("HGET", key, "tokens")), 100 - 1 - a.ahead)
        # Spent: the next frame on a asks Redis again.
        again = a.take("alice")
        self.assertIsInstance(again, defer.Deferred)
        clock.advance(0)
        yield again
        self.assertEqual(counting.evals, 2)
        # An allowance not spent within HOLD is dropped.
        fresh = a.take("bob")
        clock.advance(0)
        self.assertEqual((yield fresh), 0.0)
        clock.advance(HOLD)
        late = a.take("bob")
        self.assertIsInstance(late, defer.Deferred)
        clock.advance(0)
        self.assertEqual((yield late), 0.0)
        self.assertEqual(counting.evals, 4)


class AllowanceCapTests(unittest.TestCase):
    """What a node holds ahead counts against the burst on every other node:
    the bucket refills only up to the burst less the live allowances."""

    timeout = 60

    @defer.inlineCallbacks
    def test_the_bucket_and_the_allowances_never_exceed_the_burst(self):
        require_redis()
        prefix = fresh_redis_prefix(self)
        clock = Clock()
        limiters = []
        for name in ("node-a", "node-b"):
            broker = RedisBroker(
                NoStore(), clock, redis_url(0), name, prefix=prefix, reactor=reactor
            )
            broker.start()
            self.addCleanup(broker.stop)
            yield eventually(lambda b=broker: b.command_connection() is not None, "Redis")
            limiters.append(SharedRateLimiter(RateLimiter(1000, 100, clock), broker, clock=clock))
        a, b = limiters
        first = a.take("alice")
        clock.advance(0)
        self.assertEqual((yield first), 0.0)
        key = f"{prefix}0:bucket:alice"
        self.assertEqual(redis_command("HGET", key, "h:node-a").split(":")[0], str(a.ahead))
        # Ten seconds pass for the bucket (its record is set back): refilled,
        # it would hold the whole burst again; a's allowance still counts.
        at = int(redis_command("HGET", key, "at"))
        redis_command("HSET", key, "at", str(at - 10_000))
        asked = [b.take("alice") for _ in range(100)]
        clock.advance(0)
        waits = yield defer.gatherResults(asked)
        self.assertEqual(sum(1 for w in waits if w == 0.0), 100 - a.ahead)
        self.assertTrue(all(w > 0 for w in waits[100 - a.ahead :]))
        # Once a's allowance has expired (its record says so), it no longer counts.
        redis_command("HSET", key, "h:node-a", f"{a.ahead}:1")
        redis_command("HSET", key, "at", str(at - 20_000))
        asked = [b.take("alice") for _ in range(100)]
        clock.advance(0)
        waits = yield defer.gatherResults(asked)
        self.assertEqual(sum(1 for w in waits if w == 0.0), 100)
        self.assertIsNone(redis_command("HGET", key, "h:node-a"))


class ConnectionCapTests(unittest.TestCase):
    """MAX_CONNECTIONS_PER_USER counts the user's connections on every node."""

    timeout = 120

    @defer.inlineCallbacks
    def test_the_cap_counts_connections_on_both_nodes(self):
        """With a cap of 1, a second connection of the user on the other node is
        closed with 1008; once the first closes, a new one is accepted."""
        a, b = yield two_nodes(self, {"MAX_CONNECTIONS_PER_USER": "1"})
        _, alice_token = yield a.user("alice")
        first = yield a.connect(alice_token, testcase=self)
        try:
            second = yield b.connect(alice_token)
        except ConnectionError as exc:
            self.assertIn("1008", str(exc))
        else:
            self.assertEqual((yield second.wait_closed()), 1008)
        yield first.close_and_wait()
        yield eventually(lambda: a.service.broker.count() == 0, "the first to be detached")
        prefix = b.service.broker.prefix
        yield eventually(
            lambda: redis_command("ZCARD", f"{prefix}conns:alice") == 0, "the lease to go"
        )
        yield b.connect(alice_token, testcase=self)
        yield eventually(
            lambda: redis_command("ZCARD", f"{prefix}conns:alice") == 1, "the new lease"
        )
        self.assertEqual(b.service.broker.count(), 1, "the new connection was refused")


class FakeConnection:
    """What the broker needs of a connection, recording a refusal."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.refused = False
        self.live = True

    def over_cap(self) -> None:
        self.refused = True


class NoStore:
    """The broker's applier is never polled here (the Clock is not advanced
    past a poll that would need the database)."""

    def stream_head(self) -> defer.Deferred:
        return defer.succeed(0)

    def messages_between(self, after: int, upto: int, limit: int) -> defer.Deferred:
        return defer.succeed([])


class LeaseExpiryTests(unittest.TestCase):
    """A killed node's connections stop counting within LEASE_TTL (30 s)."""

    timeout = 120

    def broker(self, clock: Clock, prefix: str, name: str) -> RedisBroker:
        broker = RedisBroker(
            NoStore(), clock, redis_url(0), name, max_per_user=2, prefix=prefix, reactor=reactor
        )
        broker.start()
        self.addCleanup(broker.stop)
        return broker

    @defer.inlineCallbacks
    def test_leases_of_a_dead_node_expire_and_live_ones_are_refreshed(self):
        """Node a holds the user's two leases; node b's connection is refused.
        While a refreshes, its leases outlive LEASE_TTL; once a stops refreshing
        (killed), b is refused until LEASE_TTL has passed, then accepted."""
        require_redis()
        prefix = fresh_redis_prefix(self)
        clock = Clock()
        clock.advance(time.time())
        a = self.broker(clock, prefix, "node-a")
        b = self.broker(clock, prefix, "node-b")
        yield eventually(
            lambda: a.command_connection() is not None and b.command_connection() is not None,
            "both brokers to reach Redis",
        )
        key = f"{a.prefix}conns:alice"
        held = [FakeConnection("alice"), FakeConnection("alice")]
        for conn in held:
            self.assertTrue(a.attach(conn))
        yield eventually(lambda: redis_command("ZCARD", key) == 2, "a's two leases")

        def refused_on_b() -> FakeConnection:
            conn = FakeConnection("alice")
            self.assertTrue(b.attach(conn))  # the node's own count allows it
            return conn

        early = refused_on_b()
        yield eventually(lambda: early.refused, "b to refuse a third connection")
        self.assertEqual(b.count(), 0)
        # a refreshes its leases: they outlive the first LEASE_TTL.
        for _ in range(int(LEASE_TTL // LEASE_REFRESH) + 1):
            clock.advance(LEASE_REFRESH)
        after_refresh = refused_on_b()
        yield eventually(lambda: after_refresh.refused, "refusal while a refreshes")
        # a is killed: it neither refreshes nor removes its leases.
        a._leaser.stop()
        clock.advance(LEASE_TTL - 1)
        still = refused_on_b()
        yield eventually(lambda: still.refused, "refusal before the leases expire")
        clock.advance(2)
        late = FakeConnection("alice")
        self.assertTrue(b.attach(late))
        yield eventually(
            lambda: redis_command("ZSCORE", key, f"node-b/{id(late)}") is not None, "b's lease"
        )
        self.assertFalse(late.refused)
        self.assertEqual(b.count(), 1)
