"""Account events: changes to accounts every node acts on at once.

``wsserver-admin delete-user`` (and, with issue 12, key revocation and
sign-out) runs in a process of its own, beside the servers; it records an
event in the database's ``account_events`` table, in the same transaction as
the change.  Every node polls that table every ``interval`` seconds (one
indexed query by id, on SQLite and on PostgreSQL alike, with or without a
broker) and hands each new event to the handlers registered for its kind.
Ids become visible in commit order on both engines (SQLite has one writer;
PostgreSQL's writers lock the table), so "id > the last seen" misses none.

``DeletedUsers`` is the handler of "deleted": it forgets the user in the
caches (key, known recipients), closes the user's connections on this node
with 4003, waits until what this node queued has been committed, and deletes
what it stored from or to the user after the deletion (by id, above the
stream head the event carries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()

INTERVAL = 1.0  # seconds between polls
PAGE = 100  # events read per query

DELETED = "deleted"

Handler = Callable[[str, "str | None"], Any]


class AccountEvents:
    """Polls the store's account events and dispatches them by kind."""

    def __init__(self, store: Any, clock: IReactorTime, interval: float = INTERVAL) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._handlers: dict[str, list[Handler]] = {}
        self._last: int | None = None
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = clock
        self._stopped = False
        self.handled = 0  # events handled so far

    def on(self, kind: str, handler: Handler) -> None:
        """Call ``handler(user_id, detail)`` (it may return a Deferred) for each
        new event of ``kind``."""
        self._handlers.setdefault(kind, []).append(handler)

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Note the newest event (what came before concerns no connection of
        this node), then poll every ``interval`` seconds."""
        if self._loop.running or self._stopped:
            return
        try:
            self._last = yield self._store.last_account_event()
        except Exception as exc:
            # Polling will start from the first event it can read.
            _log.warn("cannot read account events yet: {e}", e=str(exc))
        if not self._loop.running and not self._stopped:
            self._loop.start(self._interval, now=False).addErrback(
                lambda f: _log.failure("account events stopped", f)
            )

    def stop(self) -> None:
        """Poll no more (also when ``start`` is still reading the newest event)."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()

    def poll(self) -> defer.Deferred:
        """Read and handle every new event; a failure is logged and retried at
        the next poll (from the first event not handled)."""
        d = self._poll()
        d.addErrback(lambda f: _log.warn("account events: {e}", e=f.getErrorMessage()))
        return d

    @defer.inlineCallbacks
    def _poll(self) -> Any:
        if self._last is None:
            self._last = yield self._store.last_account_event()
            return
        while True:
            events = yield self._store.account_events(self._last, PAGE)
            for event_id, user_id, kind, detail in events:
                for handler in self._handlers.get(kind, []):
                    yield defer.maybeDeferred(handler, user_id, detail)
                self._last = event_id
                self.handled += 1
            if len(events) < PAGE:
                return


class DeletedUsers:
    """What a node does when a user was deleted (protocol section 12)."""

    def __init__(self, store: Any, auth: Any, factory: Any, close_code: int) -> None:
        self._store = store
        self._auth = auth
        self._factory = factory
        self._close_code = close_code

    @defer.inlineCallbacks
    def __call__(self, user_id: str, detail: str | None) -> Any:
        self._auth.forget(user_id)
        yield self._store.forget_user(user_id)
        closed = self._factory.close_user(user_id, self._close_code, "account deleted")
        yield self._store.drain()
        head = int(detail) if detail and detail.isdigit() else 0
        purged = yield self._store.purge_user_messages(user_id, head)
        _log.info(
            "deleted user {user}: {closed} connections closed, {purged} late messages removed",
            user=user_id,
            closed=closed,
            purged=purged,
        )


__all__ = ["DELETED", "INTERVAL", "AccountEvents", "DeletedUsers"]
