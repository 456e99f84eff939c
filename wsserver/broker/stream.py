"""Applying the cluster's message stream strictly in id order.

Every node of a cluster hands each committed message to its own connections
in id order, whichever node stored it.  Messages reach a node three ways:
its own commits, the broker's publications (Redis pub/sub, at most once and
in the order nodes publish, not the order they commit) and reads from the
database.  ``StreamApplier`` merges them: it keeps the id up to which it has
applied everything (the cursor); a message just above the cursor is applied
at once, and one further above first makes it read the gap back from the
database (every id below a committed message is committed too: ids are
allocated in commit order), holding later arrivals until the gap is filled.
A periodic ``poll`` of the stream head covers a publication that never came
(a node that died between its commit and its publish, a lost subscription).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..messages import Message

_log = Logger()

READ_PAGE = 256


class StreamApplier:
    """Applies messages once each, in increasing id order, reading gaps back.

    ``apply(msg, sender)`` is called for every message above the cursor, in
    id order; ``sender`` is what ``offer`` was given with it (the sending
    connection, for a node's own commits), or None for a message read back
    from the database.  ``store`` needs ``messages_between`` and
    ``stream_head``.
    """

    def __init__(
        self, store: Any, apply: Callable[[Message, Any], None], page: int = READ_PAGE
    ) -> None:
        self._store = store
        self._apply = apply
        self._page = page
        self.cursor = 0
        self._held: list[tuple[int, int, Message, Any]] = []  # heap by id
        self._seq = 0
        self._reading = False
        self._waiting: list[tuple[int, defer.Deferred]] = []  # (id, fired once applied)
        self._started = False

    @property
    def started(self) -> bool:
        """True once the cursor was set (``start``)."""
        return self._started

    def start(self, cursor: int) -> None:
        """Begin at ``cursor``: messages up to it count as applied."""
        self.cursor = max(self.cursor, cursor)
        self._started = True

    def offer(self, msg: Message, sender: Any = None) -> bool:
        """Apply ``msg`` in its turn; True when it was applied now, False when it
        is held (a gap below it is being read) or was applied before."""
        if msg.id <= self.cursor:
            return False
        if not self._started or self._reading or self._held:
            self._hold(msg, sender)
            if self._started and not self._reading:
                self._next()
            return False
        if msg.id == self.cursor + 1:
            self._apply_one(msg, sender)
            return True
        self._hold(msg, sender)
        self._read(msg.id - 1)
        return False

    def poll(self) -> defer.Deferred:
        """Read the stream head and everything up to it not applied yet; fires
        (with the head) once the cursor has reached it.  Fails when the
        database did not answer."""
        d = self._store.stream_head()

        def got(head: int) -> Any:
            if not self._started:
                # Messages offered before the first poll are not behind us.
                first = self._held[0][0] - 1 if self._held else head
                self.start(min(head, first))
            return self.caught_up_to(head).addCallback(lambda _: head)

        return d.addCallback(got)

    def caught_up_to(self, msg_id: int) -> defer.Deferred:
        """Fire once every message up to ``msg_id`` has been applied (starting a
        read of the gap if nothing is under way)."""
        if msg_id <= self.cursor:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((msg_id, d))
        if not self._reading:
            self._read(msg_id)
        return d

    # -- inside -------------------------------------------------------------------

    def _hold(self, msg: Message, sender: Any) -> None:
        self._seq += 1
        heapq.heappush(self._held, (msg.id, self._seq, msg, sender))

    def _apply_one(self, msg: Message, sender: Any) -> None:
        self.cursor = msg.id
        try:
            self._apply(msg, sender)
        except Exception:
            _log.failure("applying message {id} failed", id=msg.id)
        self._fire_waiting()

    def _fire_waiting(self) -> None:
        if not self._waiting:
            return
        done = [d for at, d in self._waiting if at <= self.cursor]
        self._waiting = [(at, d) for at, d in self._waiting if at > self.cursor]
        for d in done:
            d.callback(None)

    def _next(self) -> None:
        """Apply held messages that are next; read the gap below the first other."""
        while self._held:
            msg_id, _, msg, sender = self._held[0]
            if msg_id <= self.cursor:
                heapq.heappop(self._held)
            elif msg_id == self.cursor + 1:
                heapq.heappop(self._held)
                self._apply_one(msg, sender)
            else:
                self._read(msg_id - 1)
                return
        wanted = max((at for at, _ in self._waiting), default=0)
        if wanted > self.cursor:
            self._read(wanted)

    def _read(self, upto: int) -> None:
        """Read (cursor, upto] back from the database and apply it."""
        self._reading = True
        after = self.cursor
        d = self._store.messages_between(after, upto, self._page)
        d.addCallbacks(self._got, self._read_failed, (after, upto), None, (after, upto))

    def _got(self, page: list[Message], after: int, upto: int) -> None:
        self._reading = False
        held = {msg_id: (msg, sender) for msg_id, _, msg, sender in self._held}
        for msg in page:
            if msg.id > self.cursor:
                # The held copy carries the sending connection (and the status
                # its node saw): prefer it to the row.
                mine = held.get(msg.id)
                self._apply_one(*(mine or (msg, None)))
        if len(page) < self._page:
            # (after, upto] is complete: ids missing from it were never stored
            # (a duplicate's id, say).
            self.cursor = max(self.cursor, upto)
            self._fire_waiting()
        elif after == self.cursor:  # pragma: no cover (a full page always moves)
            return
        else:
            self._read(upto)
            return
        self._next()

    def _read_failed(self, failure: Failure, after: int, upto: int) -> None:
        self._reading = False
        _log.failure(
            "reading messages {after}..{upto} back failed; the next poll retries",
            failure,
            after=after,
            upto=upto,
        )
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(failure)


__all__ = ["READ_PAGE", "StreamApplier"]
