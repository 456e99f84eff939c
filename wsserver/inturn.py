"""``InTurn``: actions run one after the other, each once the one before it
is done (Twisted only; the server's frames and the client's received
messages use it)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

_log = Logger()


class InTurn:
    """Runs actions one after the other, each once the one before it is done
    (an action may return a Deferred).  A loop over a queue, not a chain of
    Deferreds (nor Twisted's ``DeferredLock``, which releases into the next
    waiter from inside the last one's callback): a long queue of actions that
    finish at once costs no stack, where a chain recursed once per link and
    overflowed it after about 120."""

    # Every connection holds two (its frames' turns and its reads'), most of
    # them idle: slots, and the queue made on first use (an empty deque is
    # 760 bytes; the two of them were 1.7 KiB of an idle connection's ~13).
    __slots__ = ("_queue", "_running", "_what")

    def __init__(self, what: str) -> None:
        self._what = what  # for the log line of an action that failed
        self._queue: deque[Callable[[], Any]] | None = None
        self._running = False

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return not self._running and not self._queue

    def run(self, action: Callable[[], Any]) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(action)
        if not self._running:
            self._next()

    def _next(self) -> None:
        self._running = True
        while self._queue:
            d = defer.maybeDeferred(self._queue.popleft())
            d.addErrback(lambda f: _log.failure("handling {what} failed", f, what=self._what))
            # Whether the action's whole chain is done (``d.called`` is not
            # enough: a fired Deferred may still wait on one its callback
            # returned).  Done now: the loop goes on; done later: it resumes
            # the loop then.
            state = {"now": True, "done": False}

            def done(_: Any, state: dict = state) -> None:
                state["done"] = True
                if not state["now"]:
                    self._next()

            d.addBoth(done)
            state["now"] = False
            if not state["done"]:
                return
        self._running = False
