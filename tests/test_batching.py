"""The group-commit queue on its own: when it writes and what, on a fake clock,
with a fake engine (the queue knows no SQL)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from wsserver.messages import BROADCAST, UNSIGNED
from wsserver.store import NewMessage, StoreClosed
from wsserver.store.batching import MARK_DELAY, GroupCommit


def new_message(content: str = "hi") -> NewMessage:
    return NewMessage("alice", BROADCAST, content, None, None, UNSIGNED, 1)


class FakeEngine:
    """Records every batch; answers each one when told to (a commit in flight)."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.pending: list[defer.Deferred] = []

    def write(self, ops: list) -> defer.Deferred:
        self.batches.append(ops)
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def commit(self) -> None:
        d = self.pending.pop(0)
        ops = self.batches[len(self.batches) - len(self.pending) - 1]
        d.callback([(kind, arg) for kind, arg in ops])


class GroupCommitSchedulingTests(unittest.TestCase):
    """When the queue flushes, and what goes into one batch."""

    def setUp(self):
        self.clock = Clock()
        self.engine = FakeEngine()
        self.queue = GroupCommit(self.clock, self.engine.write)

    def delays(self):
        return [round(c.getTime() - self.clock.seconds(), 3) for c in self.clock.getDelayedCalls()]

    def test_lone_delivery_mark_waits(self):
        """A delivery mark alone is flushed MARK_DELAY later, not at once."""
        self.queue.mark_delivered([1])
        self.assertEqual(self.delays(), [MARK_DELAY])
        self.clock.advance(MARK_DELAY)
        self.assertEqual(self.engine.batches, [[("delivered", [1])]])

    def test_message_hurries_the_marks_along(self):
        """A message queued after a mark makes one immediate flush that takes both."""
        self.queue.mark_delivered([1])
        d = self.queue.add_message(new_message())
        self.assertEqual(self.delays(), [0])
        self.clock.advance(0)
        self.assertEqual(self.queue.queued, 0)  # both went into that batch
        self.assertEqual([kind for kind, _ in self.engine.batches[0]], ["delivered", "message"])
        self.engine.commit()
        return d

    def test_drain_hurries_a_lazy_flush(self):
        """drain() does not wait MARK_DELAY for marks to be written."""
        self.queue.mark_delivered([1])
        d = self.queue.drain()
        self.assertEqual(self.delays(), [0])
        self.clock.advance(0)
        self.engine.commit()
        self.assertTrue(d.called)

    def test_drain_waits_only_for_what_was_queued_before_it(self):
        """Under steady traffic the queue is never empty when a commit ends:
        drain() still fires once the batch holding the last write queued
        before the call has committed (a reviewer saw it wait for an empty
        queue, i.e. forever, while marks kept coming)."""
        self.queue.mark_delivered([1])
        self.queue.add_message(new_message("in flight"))
        self.clock.advance(0)  # batch 1 in flight
        self.queue.mark_delivered([2])  # queued before drain: batch 2
        d = self.queue.drain()
        self.queue.mark_delivered([3])  # after drain: must not delay it
        self.engine.commit()  # batch 1 done; batch 2 starts
        self.assertFalse(d.called)
        self.clock.advance(0)
        for n in range(4, 50):  # writes keep arriving while each commit runs
            self.queue.mark_delivered([n])
        self.engine.commit()  # batch 2 (mark 2, mark 3) done
        self.assertTrue(d.called)
        self.assertTrue(self.queue.queued > 0)  # the queue is not empty
        self.clock.advance(MARK_DELAY)  # the rest: marks only, flushed lazily
        self.engine.commit()
        self.assertEqual(self.queue.queued, 0)

    def test_ack_waits_for_the_commit_and_the_next_batch_for_this_one(self):
        """A sender's Deferred fires only when its batch commits; what arrives while
        a commit is in flight goes into the next batch, written after that commit."""
        first = self.queue.add_message(new_message("a"))
        self.clock.advance(0)
        second = self.queue.add_message(new_message("b"))
        self.clock.advance(0)
        self.assertEqual(len(self.engine.batches), 1)  # one commit at a time
        self.assertFalse(first.called)
        self.engine.commit()
        self.assertTrue(first.called)
        self.assertFalse(second.called)
        self.clock.advance(0)
        self.assertEqual(len(self.engine.batches), 2)
        self.engine.commit()
        self.assertTrue(second.called)
        self.assertEqual(self.queue.batches, 2)

    def test_failed_batch_fails_its_senders_only(self):
        """A batch the engine refuses fails each of its senders; the next batch is
        written as usual."""
        d = self.queue.add_message(new_message())
        self.clock.advance(0)
        self.engine.pending.pop(0).errback(RuntimeError("refused"))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        again = self.queue.add_message(new_message())
        self.clock.advance(0)
        self.engine.commit()
        self.assertEqual(self.successResultOf(again)[0], "message")

    def test_close_refuses_new_writes_after_queued_ones(self):
        """close() writes what is queued and then refuses messages with StoreClosed."""
        d = self.queue.add_message(new_message())
        closing = self.queue.close()
        self.failureResultOf(self.queue.add_message(new_message()), StoreClosed)
        self.clock.advance(0)
        self.engine.commit()
        self.assertTrue(d.called)
        self.assertTrue(closing.called)
