"""Account events: changes to accounts every node acts on at once.

A deletion (``DELETE /auth/users/{id}`` or ``wsserver-admin delete-user``), a
key revocation (a ``revoke`` entry of the key log) and a sign-out
(``POST /auth/logout``, one token or all) are recorded as an event in the
database's ``account_events`` table, in the same transaction as the change.
Every node polls that table every ``interval`` seconds (one indexed query by
id, on SQLite and on PostgreSQL alike, with or without a broker) and hands
each new event to the handlers registered for its kind; the node that made
the change also hands it to them at once (``apply_now``), so its own
connections do not wait for the poll.  Handlers are idempotent: that node
sees the event again when it polls.  Ids become visible in commit order on
both engines (SQLite has one writer; PostgreSQL's writers lock the table), so
"id > the last seen" misses none.

The handlers: ``DeletedUsers`` forgets the user in the caches (keys, known
recipients), closes the user's connections on this node with 4003, waits
until what this node queued has been committed, and deletes what it stored
from or to the user after the deletion (by id, above the stream head the
event carries).  ``KeyRevoked`` drops the user's cached keys and closes the
connections that logged in with that key (4003).  ``SignedOut`` refuses the
token from now on and closes its connections (4004); ``SignedOutAll`` drops
the user's cached token generation and closes every connection of the user
whose token is of an older generation (4004).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .messages import group_frame
from .store.groups import REMOVED

_log = Logger()

INTERVAL = 0.5  # seconds between polls: every node acts within a second
PAGE = 100  # events read per query

DELETED = "deleted"

Handler = Callable[[str, "str | None"], Any]


class AccountEvents:
    """Polls the store's account events and dispatches them by kind."""

    def __init__(
        self,
        store: Any,
        clock: IReactorTime,
        interval: float = INTERVAL,
        prime: Callable[[], Any] | None = None,
    ) -> None:
        """``prime`` (it may return a Deferred) loads what the handlers keep
        current from then on (the signed-out tokens): it runs once the newest
        event was noted, so that no change falls between the two; a failure
        is retried at the next poll."""
        self._store = store
        self._clock = clock
        self._interval = interval
        self._handlers: dict[str, list[Handler]] = {}
        self._last: int | None = None
        self._prime = prime
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = clock
        self._stopped = False
        self.handled = 0  # events handled so far

    def on(self, kind: str, handler: Handler) -> None:
        """Call ``handler(user_id, detail)`` (it may return a Deferred) for each
        new event of ``kind``."""
        self._handlers.setdefault(kind, []).append(handler)

    @defer.inlineCallbacks
    def apply_now(self, kind: str, user_id: str, detail: str | None) -> Any:
        """Hand a change this node just made to the handlers of its kind, without
        waiting for the poll (which hands it over again); a handler's failure is
        logged, not raised."""
        for handler in self._handlers.get(kind, []):
            try:
                yield defer.maybeDeferred(handler, user_id, detail)
            except Exception:
                _log.failure("applying the account change {kind}", kind=kind)

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Note the newest event (what came before concerns no connection of
        this node), then poll every ``interval`` seconds."""
        if self._loop.running or self._stopped:
            return
        try:
            self._last = yield self._store.last_account_event()
            yield self._primed()
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
    def _primed(self) -> Any:
        if self._prime is not None:
            yield defer.maybeDeferred(self._prime)
            self._prime = None

    @defer.inlineCallbacks
    def _poll(self) -> Any:
        if self._last is None:
            self._last = yield self._store.last_account_event()
        yield self._primed()
        while True:
            events = yield self._store.account_events(self._last, PAGE)
            for event_id, user_id, kind, detail in events:
                for handler in self._handlers.get(kind, []):
                    yield defer.maybeDeferred(handler, user_id, detail)
                self._last = event_id
                self.handled += 1
            if len(events) < PAGE:
                return


class _Closing:
    """A handler that tells the node's ``Authenticator`` and closes connections
    of this node (through the WebSocket factory) with ``close_code``."""

    def __init__(self, auth: Any, factory: Any, close_code: int) -> None:
        self._auth = auth
        self._factory = factory
        self._close_code = close_code


class KeyRevoked(_Closing):
    """What a node does when a key was revoked (protocol section 12): detail is
    the key_id."""

    def __call__(self, user_id: str, detail: str | None) -> None:
        self._auth.key_revoked(user_id)
        if detail:
            closed = self._factory.close_key(user_id, detail, self._close_code, "key revoked")
            _log.info(
                "key revoked for {user}: {closed} connections closed", user=user_id, closed=closed
            )


class SignedOut(_Closing):
    """A token was signed out (``POST /auth/logout``): detail is its jti."""

    def __call__(self, user_id: str, detail: str | None) -> None:
        if detail:
            self._auth.signed_out(detail)
            closed = self._factory.close_token(user_id, detail, self._close_code, "signed out")
            _log.info("signed out a token of {user}: {closed} closed", user=user_id, closed=closed)


class SignedOutAll(_Closing):
    """Every token of a user was signed out (``POST /auth/logout?all=true``):
    detail is the user's new token generation."""

    def __call__(self, user_id: str, detail: str | None) -> None:
        self._auth.signed_out_all(user_id)
        gen = int(detail) if detail and detail.isdigit() else None
        closed = self._factory.close_older(user_id, gen, self._close_code, "signed out")
        _log.info("signed out {user} everywhere: {closed} closed", user=user_id, closed=closed)


class GroupEvents:
    """A group's membership changed (protocol section 13): detail is the
    JSON of ``store.groups.event_detail``; every connection on this node of
    each user it names in ``to`` gets a ``group`` frame, and the sender of
    each group message a removal settled (``s``: no member left waits for
    it) a ``status`` frame ``delivered`` on this node's connections.  The
    node that made the change hands it over at once and again when it
    polls: the random tag in the detail lets it send each frame once."""

    MEMORY = 4096  # details handled lately

    def __init__(
        self, broker: Any, contacts_changed: Callable[[list[str]], Any] | None = None
    ) -> None:
        """``contacts_changed(users)`` is told, for a removal, the removed
        member and the members: contacts among them may be gone (the
        presence hub decides again who may watch whom)."""
        self._broker = broker
        self._contacts_changed = contacts_changed
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __call__(self, user_id: str, detail: str | None) -> None:
        if not detail or detail in self._seen:
            return
        self._seen[detail] = None
        if len(self._seen) > self.MEMORY:
            self._seen.popitem(last=False)
        try:
            event = json.loads(detail)
            group_id, kind, subject = event["g"], event["e"], event["u"]
            to, ms = list(event["to"]), int(event["ms"])
            settled = [(int(i), str(s), int(n)) for i, s, n in event.get("s", ())]
        except (ValueError, KeyError, TypeError):
            _log.warn("ignored a malformed group event of {user}", user=user_id)
            return
        same = None if subject is None else group_frame(group_id, kind, subject, ms)
        for member in to:
            frame = same or group_frame(group_id, kind, member, ms)
            self._broker.notify_user(member, frame)
        for msg_id, sender, recipients in settled:
            self._broker.group_settled(msg_id, sender, recipients)
        if kind == REMOVED and self._contacts_changed is not None:
            self._contacts_changed([*to, user_id] if subject is None else [*to, subject])


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
        yield self._factory.forget_presence(user_id)  # their last-seen time goes too
        yield self._store.drain()
        head = int(detail) if detail and detail.isdigit() else 0
        purged = yield self._store.purge_user_messages(user_id, head)
        _log.info(
            "deleted user {user}: {closed} connections closed, {purged} late messages removed",
            user=user_id,
            closed=closed,
            purged=purged,
        )


__all__ = [
    "DELETED",
    "INTERVAL",
    "AccountEvents",
    "DeletedUsers",
    "GroupEvents",
    "KeyRevoked",
    "SignedOut",
    "SignedOutAll",
]
