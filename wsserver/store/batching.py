"""Group commit: the write queue every store engine shares.

Messages (and delivery marks) that arrive while a commit is in flight, or
within one reactor turn, are handed together to the engine's write-a-batch
function, which applies them in one transaction; each sender's Deferred fires
only after that commit.  This module knows no SQL: the engine gives it
``write(ops) -> Deferred[list[result]]`` and the queue decides *when* and
*what* to write.  Engines import this module, never the other way round.

An op is ``(kind, arg)``: ``("message", NewMessage)``, ``("delivered",
[ids])``, ``("broadcast", (id, recipients))`` or ``("group_delivered",
[(group_id, user_id, id)])``; ``write`` returns one result
per op, in order (``(outcome, Message | None)`` for a message, None
otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..metrics import DISCARD, Metrics
from . import NewMessage, StoreClosed

_log = Logger()

MARK_DELAY = 0.1  # seconds a lone delivery mark may wait for a batch to join

Op = tuple[str, Any]
WriteBatch = Callable[[list[Op]], defer.Deferred]


class GroupCommit:
    """The queue of writes waiting for the next batch, and its scheduling."""

    metrics: Metrics = DISCARD  # counts each commit's size and time

    def __init__(self, clock: IReactorTime, write: WriteBatch, max_batch: int = 1024) -> None:
        self._clock = clock
        self._write = write
        self._max_batch = max_batch
        self._queue: list[tuple[str, Any, defer.Deferred | None]] = []
        self._waiting = 0  # queued operations a caller waits for
        self._scheduled: Any = None
        self._scheduled_urgent = False
        self._flushing = False
        self._closed = False
        # drain() callers, each with how many operations had been queued when
        # it asked: it fires once the batch holding the last of them is done
        # (later writes do not keep it waiting).
        self._drained: list[tuple[int, defer.Deferred]] = []
        self._queued_total = 0  # operations ever queued
        self._done_total = 0  # operations ever taken by a finished batch
        self.batches = 0  # commits made, for tests and stats
        self._started = 0.0  # when the commit in flight began

    @property
    def closed(self) -> bool:
        """True once ``close`` was called: no more writes are accepted."""
        return self._closed

    @property
    def queued(self) -> int:
        """Operations waiting for the next batch (not counting one in flight)."""
        return len(self._queue)

    def add_message(self, new: NewMessage) -> defer.Deferred:
        """Queue a message; fires with the engine's outcome after its commit."""
        if self._closed:
            return defer.fail(StoreClosed())
        d: defer.Deferred = defer.Deferred()
        self._enqueue("message", new, d)
        return d

    def mark_delivered(self, ids: list[int]) -> None:
        """Queue a delivery mark for these ids; nobody waits for it."""
        if ids and not self._closed:
            self._enqueue("delivered", list(ids), None)

    def mark_broadcast(self, msg_id: int, recipients: int) -> None:
        """Queue a broadcast's recipient count; nobody waits for it."""
        if not self._closed:
            self._enqueue("broadcast", (msg_id, recipients), None)

    def mark_group_delivered(self, marks: list[tuple[str, str, int]]) -> None:
        """Queue group members' cursor moves ``(group_id, user_id, msg_id)``;
        nobody waits for them."""
        if marks and not self._closed:
            self._enqueue("group_delivered", list(marks), None)

    def _enqueue(self, kind: str, arg: Any, d: defer.Deferred | None) -> None:
        self._queue.append((kind, arg, d))
        self._queued_total += 1
        if d is not None:
            self._waiting += 1
        self._schedule()

    def _schedule(self) -> None:
        """Flush on the next reactor turn if a sender waits, else a little later.

        Delivery marks wait no one, so they ride along with the next batch of
        messages instead of costing a transaction (and a thread round trip
        that messages would queue behind) of their own.
        """
        if self._flushing or not self._queue:
            return
        urgent = self._waiting > 0 or bool(self._drained)
        if self._scheduled is not None:
            if not urgent or self._scheduled_urgent:
                return
            self._scheduled.cancel()
        self._scheduled_urgent = urgent
        self._scheduled = self._clock.callLater(0 if urgent else MARK_DELAY, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        self._waiting -= sum(1 for _, _, d in batch if d is not None)
        self._flushing = True
        self._started = self._clock.seconds()
        ops = [(kind, arg) for kind, arg, _ in batch]
        upto = self._queued_total - len(self._queue)  # the batch's last operation
        d = defer.maybeDeferred(self._write, ops)
        d.addBoth(self._flushed, batch, upto)

    def _flushed(self, result: list[Any] | Failure, batch: list[Any], upto: int) -> None:
        self._flushing = False
        self._done_total = upto
        self.batches += 1
        failed = isinstance(result, Failure)
        self.metrics.commit(len(batch), self._clock.seconds() - self._started, failed)
        if isinstance(result, Failure):
            _log.failure("database write of {count} operations failed", result, count=len(batch))
            for _, _, d in batch:
                if d is not None:
                    d.errback(result)
        else:
            for (_, _, d), outcome in zip(batch, result, strict=True):
                if d is not None:
                    d.callback(outcome)
        done = [d for target, d in self._drained if target <= upto]
        self._drained = [(target, d) for target, d in self._drained if target > upto]
        if self._queue:
            self._schedule()
        for d in done:
            d.callback(None)

    def drain(self) -> defer.Deferred:
        """Fire once every write queued so far has been committed (or failed);
        what is queued after the call does not delay it."""
        if not self._queue and not self._flushing:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drained.append((self._queued_total, d))
        self._schedule()  # someone waits now: no lazy delay
        return d

    def close(self) -> defer.Deferred:
        """Refuse new writes; fire once what is queued has been written."""
        self._closed = True
        return self.drain()


class BatchedWrites:
    """The write half of ``IStore`` for an engine that keeps a ``GroupCommit``
    as ``self._commits``: plain methods (not attributes bound at start), so a
    subclass, or a test's recording store, can extend them."""

    _commits: GroupCommit

    def add_message(self, new: NewMessage) -> defer.Deferred:
        """Store a message; fires with the engine's outcome after its commit."""
        return self._commits.add_message(new)

    def mark_delivered(self, ids: list[int]) -> None:
        """Record that these pending messages were handed to a connection."""
        self._commits.mark_delivered(ids)

    def mark_broadcast(self, msg_id: int, recipients: int) -> None:
        """Record that a broadcast went out to ``recipients`` connections."""
        self._commits.mark_broadcast(msg_id, recipients)

    def drain(self) -> defer.Deferred:
        """Fire once every write queued so far has been committed (or failed)."""
        return self._commits.drain()

    def use_metrics(self, metrics: Metrics) -> None:
        """Count this store's commits (size, time, failures) in ``metrics``."""
        self._commits.metrics = metrics

    @property
    def batches(self) -> int:
        """Commits made by group commit so far, for tests and stats."""
        return self._commits.batches


__all__ = ["MARK_DELAY", "BatchedWrites", "GroupCommit", "Op", "WriteBatch"]
