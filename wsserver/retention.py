"""Retention: old messages deleted in small batches, off the message path.

``MESSAGE_RETENTION_DAYS`` bounds how long delivered messages (direct and
broadcast) are kept, ``PENDING_RETENTION_DAYS`` how long messages still
pending are (protocol sections 10 and 14); 0 keeps them for ever.  A
``LoopingCall`` on the reactor's clock runs a pass every ``interval``
seconds: it asks the store to delete at most ``batch`` messages at a time,
oldest first, each batch its own short transaction (``IStore.expire_batch``),
so a group commit waits for at most one batch, resting ``pause`` seconds
between two batches, and walks on from where the previous batch ended (the
created_ms cursor) so rows it keeps are not read again.  After deleting it
gives the freed pages back to the file system (``IStore.reclaim_space``:
SQLite's incremental vacuum, a step at a time).

In a cluster every node runs it: deleting what is already gone deletes
nothing, and PostgreSQL's ``SKIP LOCKED`` keeps two nodes from waiting on the
same rows.  The pass also forgets account events older than a day
(``events.py``: nodes need them for seconds).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .messages import DELIVERED, PENDING

_log = Logger()

DAY_MS = 86_400_000
INTERVAL = 60.0  # seconds between passes
FIRST_PASS_DELAY = 10.0  # seconds from start to the first pass
BATCH = 500  # messages per delete transaction
VACUUM_PAGES = 256  # pages per incremental-vacuum step (1 MiB at 4 KiB pages)
# Seconds between two batches (and two vacuum steps): a large deletion takes
# at most about half of the writer's time and CPU, not all of it
# (docs/performance.md, Retention while serving).
PAUSE = 0.02
EVENTS_KEPT_MS = DAY_MS  # account events older than this are forgotten


class Retention:
    """The periodic deletion of expired messages on one node."""

    def __init__(
        self,
        store: Any,
        clock: IReactorTime,
        message_days: float,
        pending_days: float,
        interval: float = INTERVAL,
        batch: int = BATCH,
        vacuum_pages: int = VACUUM_PAGES,
        pause: float = PAUSE,
    ) -> None:
        self._store = store
        self._clock = clock
        self.message_days = message_days
        self.pending_days = pending_days
        self._batch = batch
        self._vacuum_pages = vacuum_pages
        self._pause = pause
        self._loop = task.LoopingCall(self.run_pass)
        self._loop.clock = clock
        self._interval = interval
        self._current: defer.Deferred | None = None
        self._stopped = False
        self._first: Any = None  # the call that begins the loop
        self.deleted = {DELIVERED: 0, PENDING: 0}  # messages deleted so far, by status
        self.passes = 0

    def start(self, first_delay: float = FIRST_PASS_DELAY) -> None:
        """Run a pass ``first_delay`` seconds from now (a restart does not wait
        a whole interval), then every ``interval`` seconds."""
        if self._loop.running or self._first is not None or self._stopped:
            return
        self._first = self._clock.callLater(first_delay, self._begin)

    def _begin(self) -> None:
        self._first = None
        if not self._stopped:
            self._loop.start(self._interval, now=True).addErrback(
                lambda f: _log.failure("retention stopped", f)
            )

    def stop(self) -> defer.Deferred:
        """Stop the loop; fires when a pass in progress has ended its batch."""
        self._stopped = True
        if self._first is not None:
            self._first.cancel()
            self._first = None
        if self._loop.running:
            self._loop.stop()
        current = self._current
        if current is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        current.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def run_pass(self) -> defer.Deferred:
        """One pass: delete every expired message, batch by batch; fires with
        (delivered, pending) deleted.  A failed pass is logged; the next one
        tries again."""
        self._current = self._pass()
        self._current.addErrback(lambda f: _log.failure("retention pass failed", f))

        def done(result: Any) -> Any:
            self._current = None
            return result

        return self._current.addBoth(done)

    @defer.inlineCallbacks
    def _pass(self) -> Any:
        now = self._now_ms()
        counts = []
        for status, days in ((DELIVERED, self.message_days), (PENDING, self.pending_days)):
            deleted = 0
            if days > 0:
                deleted = yield self._expire(status, now - int(days * DAY_MS))
            self.deleted[status] += deleted
            counts.append(deleted)
        if sum(counts):
            freed = yield self._reclaim()
            _log.info(
                "retention: deleted {delivered} delivered and {pending} pending messages"
                " in {seconds:.1f} s, gave {freed} pages back",
                delivered=counts[0],
                pending=counts[1],
                seconds=self._clock.seconds() - now / 1000,
                freed=freed,
            )
        yield self._store.prune_account_events(now - EVENTS_KEPT_MS)
        self.passes += 1
        return tuple(counts)

    @defer.inlineCallbacks
    def _expire(self, status: str, before_ms: int) -> Any:
        total, cursor = 0, 0
        while not self._stopped:
            count, newest = yield self._store.expire_batch(status, before_ms, cursor, self._batch)
            total += count
            if count < self._batch or newest is None:
                break
            cursor = newest
            yield self._rest()
        return total

    def _rest(self) -> defer.Deferred:
        """Wait ``pause`` seconds of the clock between two steps."""
        if self._pause <= 0:
            return defer.succeed(None)
        return task.deferLater(self._clock, self._pause, lambda: None)

    @defer.inlineCallbacks
    def _reclaim(self) -> Any:
        freed = 0
        while not self._stopped:
            step = yield self._store.reclaim_space(self._vacuum_pages)
            freed += step
            if step < self._vacuum_pages:
                break
            yield self._rest()
        return freed


__all__ = ["BATCH", "DAY_MS", "FIRST_PASS_DELAY", "INTERVAL", "Retention"]
