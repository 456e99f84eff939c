"""StreamApplier: the cluster's message stream applied strictly in id order,
gaps read back from the database (with a fake store whose reads the test
answers by hand)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from wsserver.broker.stream import StreamApplier
from wsserver.messages import Message


def msg(msg_id: int) -> Message:
    return Message(msg_id, "alice", "bob", f"m{msg_id}", None, None, "unsigned", "pending", 0)


class FakeStore:
    """Committed messages by id; every read waits until the test answers it."""

    def __init__(self, ids: list[int]) -> None:
        self.rows = {i: msg(i) for i in ids}
        self.reads: list[tuple[int, int, int, defer.Deferred]] = []

    def messages_between(self, after: int, upto: int, limit: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.reads.append((after, upto, limit, d))
        return d

    def stream_head(self) -> defer.Deferred:
        return defer.succeed(max(self.rows, default=0))

    def answer(self) -> tuple[int, int]:
        """Answer the oldest read from the rows; return its range."""
        after, upto, limit, d = self.reads.pop(0)
        page = [self.rows[i] for i in sorted(self.rows) if after < i <= upto][:limit]
        d.callback(page)
        return after, upto


class StreamApplierTests(unittest.TestCase):
    """Every message applied once, in id order, whatever order it arrives in."""

    def make(self, ids: list[int], cursor: int = 0, page: int = 256):
        self.store = FakeStore(ids)
        self.applied: list[tuple[int, object]] = []
        applier = StreamApplier(self.store, lambda m, s: self.applied.append((m.id, s)), page)
        applier.start(cursor)
        return applier

    def test_next_message_is_applied_at_once(self):
        """The message just above the cursor is applied without a read."""
        applier = self.make([1, 2])
        self.assertTrue(applier.offer(msg(1), "conn"))
        self.assertTrue(applier.offer(msg(2)))
        self.assertEqual(self.applied, [(1, "conn"), (2, None)])
        self.assertEqual(self.store.reads, [])
        self.assertFalse(applier.offer(msg(2)), "applied twice")
        self.assertEqual(len(self.applied), 2)

    def test_a_gap_is_read_back_before_the_message_above_it(self):
        """A message above a gap waits; the gap is read from the database and
        applied first; what arrives meanwhile waits its turn; late copies of
        messages already applied are dropped."""
        applier = self.make([1, 2, 3, 4, 5])
        self.assertFalse(applier.offer(msg(4), "mine"))
        self.assertEqual(self.applied, [])
        self.assertFalse(applier.offer(msg(5)))  # held while the read runs
        self.assertFalse(applier.offer(msg(2)))
        self.assertEqual(self.store.answer(), (0, 3))
        self.assertEqual(self.applied, [(1, None), (2, None), (3, None), (4, "mine"), (5, None)])
        self.assertFalse(applier.offer(msg(3)))
        self.assertEqual(len(self.applied), 5)
        self.assertEqual(applier.cursor, 5)

    def test_ids_never_stored_do_not_stop_the_stream(self):
        """A gap the database holds nothing for (an id a duplicate used) is
        passed once read."""
        applier = self.make([1, 4])
        applier.offer(msg(1))
        applier.offer(msg(4))
        self.assertEqual(self.store.answer(), (1, 3))
        self.assertEqual([i for i, _ in self.applied], [1, 4])

    def test_long_gaps_are_read_page_by_page(self):
        """A gap longer than a page is read in several pages, in order."""
        applier = self.make(list(range(1, 11)), page=3)
        applier.offer(msg(10))
        while self.store.reads:
            self.store.answer()
        self.assertEqual([i for i, _ in self.applied], list(range(1, 11)))

    def test_poll_applies_what_was_never_published(self):
        """poll reads the stream head and applies every message up to it that
        no publication brought (a node died between commit and publish)."""
        applier = self.make([1, 2, 3])
        applier.offer(msg(1))
        polled = applier.poll()
        self.assertNoResult(polled)
        self.assertEqual(self.store.answer(), (1, 3))
        self.assertEqual(self.successResultOf(polled), 3)
        self.assertEqual([i for i, _ in self.applied], [1, 2, 3])

    def test_a_failed_read_is_retried_by_the_next_offer_or_poll(self):
        """When the database does not answer, nothing is skipped: the held
        messages wait and the next poll reads the gap again."""
        applier = self.make([1, 2, 3])
        applier.offer(msg(3))
        _, _, _, d = self.store.reads.pop(0)
        d.errback(RuntimeError("database away"))
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.applied, [])
        polled = applier.poll()
        self.store.answer()
        self.successResultOf(polled)
        self.assertEqual([i for i, _ in self.applied], [1, 2, 3])

    def test_messages_offered_before_the_start_are_kept(self):
        """A node's own commits offered before its first poll set the cursor
        are applied, not taken for old ones."""
        self.store = FakeStore([1, 2])
        applied = []
        applier = StreamApplier(self.store, lambda m, s: applied.append(m.id))
        applier.offer(msg(2), "mine")
        polled = applier.poll()
        while self.store.reads:
            self.store.answer()
        self.successResultOf(polled)
        self.assertEqual(applied, [2])
