"""Keyed token buckets refilled lazily from the reactor's clock.

No timer runs per key: a bucket is brought up to date when it is used, and
one periodic sweep forgets buckets that are full again (a full bucket and a
missing one behave the same, so forgetting loses nothing, while a bucket in
debt is kept: disconnecting and reconnecting does not refill it).
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class RateLimiter:
    """One token bucket per key: ``rate`` tokens a second, ``burst`` at most."""

    def __init__(
        self, rate: float, burst: int, clock: IReactorTime, sweep_interval: float = 60.0
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        # key -> [tokens, time of last update]; a list, so updates are in place.
        self._buckets: dict[Hashable, list[float]] = {}
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        self._sweep_interval = sweep_interval

    def take(self, key: Hashable) -> float:
        """Spend one token of ``key``'s bucket.

        Returns 0.0 when the token was there, else the seconds until one will
        be (and nothing is spent).
        """
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [self.burst - 1.0, now]
            return 0.0
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def sweep(self) -> None:
        """Forget every bucket that has refilled completely."""
        now = self._clock.seconds()
        rate, burst = self.rate, self.burst
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * rate >= burst]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)

    def start(self) -> None:
        """Start the periodic sweep."""
        if not self._sweeper.running:
            self._sweeper.start(self._sweep_interval, now=False)

    def stop(self) -> None:
        """Stop the periodic sweep."""
        if self._sweeper.running:
            self._sweeper.stop()
