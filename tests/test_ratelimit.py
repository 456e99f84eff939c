"""Token buckets on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from wsserver.ratelimit import RateLimiter


class RateLimiterTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.limiter = RateLimiter(5.0, 10, self.clock)

    def test_burst_then_refused_with_wait(self):
        """Ten frames pass at once; the eleventh waits 1/rate seconds."""
        for _ in range(10):
            self.assertEqual(self.limiter.take("alice"), 0.0)
        self.assertAlmostEqual(self.limiter.take("alice"), 0.2)

    def test_refill_follows_the_clock(self):
        """After 0.2 s one more token is there, and only one."""
        for _ in range(10):
            self.limiter.take("alice")
        self.clock.advance(0.2)
        self.assertEqual(self.limiter.take("alice"), 0.0)
        self.assertGreater(self.limiter.take("alice"), 0.0)

    def test_keys_are_independent(self):
        """Bob's bucket is full while Alice's is empty."""
        for _ in range(10):
            self.limiter.take("alice")
        self.assertGreater(self.limiter.take("alice"), 0.0)
        self.assertEqual(self.limiter.take("bob"), 0.0)

    def test_refused_frames_do_not_deepen_the_debt(self):
        """Refusals spend nothing: the wait shrinks as time passes."""
        for _ in range(10):
            self.limiter.take("alice")
        first = self.limiter.take("alice")
        self.clock.advance(0.1)
        self.assertAlmostEqual(self.limiter.take("alice"), first - 0.1)

    def test_sweep_forgets_full_buckets_only(self):
        """The sweep drops refilled buckets and keeps those in debt."""
        for _ in range(10):
            self.limiter.take("alice")
        self.limiter.take("bob")
        self.clock.advance(0.5)  # bob full again (9 + 2.5 > 10), alice not (2.5)
        self.limiter.sweep()
        self.assertEqual(len(self.limiter), 1)
        self.assertEqual(self.limiter.take("alice"), 0.0)  # 2.5 tokens were kept

    def test_periodic_sweep_runs_on_the_clock(self):
        """start() sweeps every interval; stop() stops it."""
        self.limiter.take("carol")
        self.limiter.start()
        self.clock.advance(61)
        self.assertEqual(len(self.limiter), 0)
        self.limiter.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_parameters(self):
        """A zero rate or an empty bucket is refused."""
        with self.assertRaises(ValueError):
            RateLimiter(0, 10, self.clock)
        with self.assertRaises(ValueError):
            RateLimiter(1, 0, self.clock)
