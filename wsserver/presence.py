"""Presence (protocol section 13): who watches whom on this node, and coalescing.

A connection sends ``{"type": "watch", "users": [...]}``; ``PresenceHub``
answers with one ``presence`` frame per listed user at once, then one per
change.  The broker tells the hub of changes (``changed``: a user's first
connection in the cluster opened, or their last one closed) and answers
``presence_of`` (the state now); the store answers ``contacts_among`` (who
may be watched under ``PRESENCE=contacts``).

Coalescing (docs/protocol.md section 15, "Presence"): watchers see at most
one frame per user per ``INTERVAL``; an ``offline`` is held for ``GRACE``
and dropped when the user is back online meanwhile, so a connection that
opens and closes fast sends watchers nothing, or one pair per interval.
What watchers were last sent (``sent``) is what a new watcher is told too.

Under ``contacts`` the users a connection may see are decided at its
``watch`` and again when contacts may have gone (``contacts_changed``: a
group member left or was removed) and, as a backstop, for
``CONTACTS_PER_RECHECK`` watchers at each ``RECHECK`` in turn: a user no longer
a contact is withdrawn and reported offline since the epoch.  What the hub
keeps of a user goes when nobody on this node watches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .messages import MAX_WATCH, dumps, format_timestamp

_log = Logger()

CONTACTS = "contacts"
EVERYONE = "everyone"
OFF = "off"
POLICIES = (CONTACTS, EVERYONE, OFF)

GRACE = 1.0  # seconds an offline is held before watchers hear of it
INTERVAL = 1.0  # seconds between two frames about one user
RECHECK = 10.0  # seconds between two reads of the watched users' state
# Each recheck also asks the store again who may be watched for this many
# watching users, in turn: a backstop only (group and account events
# withdraw at once), so an idle node's database gets at most 2 such queries a
# second however many users watch, never one per watcher at once.
CONTACTS_PER_RECHECK = 20
NEVER = 0  # the ``since`` (ms) of a user never seen online: 1970-01-01T00:00:00.000Z

State = tuple[bool, int]  # (online, since in ms)


def presence_frame(user: str, online: bool, since_ms: int) -> bytes:
    """A ``presence`` frame."""
    return dumps(
        {"type": "presence", "user": user, "online": online, "since": format_timestamp(since_ms)}
    )


class _Watched:
    """One watched user: the state the broker reported, what watchers were sent."""

    __slots__ = ("conns", "sent", "sent_at", "state", "timer")

    def __init__(self) -> None:
        self.conns: set[Any] = set()
        self.state: State | None = None  # None until first known
        self.sent: State | None = None
        self.sent_at = float("-inf")
        self.timer: Any = None


class PresenceHub:
    """The watchers of this node's connections (see the module's docstring).

    ``source(users)`` fires with ``{user: (online, since_ms)}`` for each;
    ``contacts(user, candidates)`` fires with the set of candidates ``user``
    may watch under ``contacts``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        policy: str,
        source: Callable[[list[str]], defer.Deferred],
        contacts: Callable[[str, list[str]], defer.Deferred],
        grace: float = GRACE,
        interval: float = INTERVAL,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown presence policy {policy!r}")
        self.policy = policy
        self._clock = clock
        self._source = source
        self._contacts = contacts
        self._grace = grace
        self._interval = interval
        self._users: dict[str, _Watched] = {}
        self._watching: dict[Any, tuple[str, ...]] = {}  # conn -> users it may see
        self._turns: dict[Any, int] = {}  # conn -> its latest watch frame's number
        self._contacts_turn = 0  # where the backstop goes on among the watchers
        self._rechecker = LoopingCall(self.recheck)
        self._rechecker.clock = clock

    # -- connections ----------------------------------------------------------------

    def watch(self, conn: Any, users: list[str]) -> defer.Deferred:
        """Replace ``conn``'s list with ``users`` (valid ids, at most
        ``MAX_WATCH``) and send their state; fires once sent."""
        if self.policy != OFF and not self._rechecker.running:
            self._rechecker.start(RECHECK, now=False)
        turn = self._turns.get(conn, 0) + 1
        self._turns[conn] = turn
        wanted = list(dict.fromkeys(users))
        me = conn.user_id
        if self.policy == OFF:
            allowed_d = defer.succeed(set())
        elif self.policy == EVERYONE:
            allowed_d = defer.succeed(set(wanted))
        else:
            others = [u for u in wanted if u != me]
            allowed_d = self._contacts(me, others) if others else defer.succeed(set())
            allowed_d.addCallback(lambda found: set(found) | ({me} & set(wanted)))

        def states(allowed: set[str]) -> Any:
            seen = [u for u in wanted if u in allowed]
            d = self._source(seen) if seen else defer.succeed({})
            return d.addCallback(lambda found: (allowed, found))

        def answer(result: tuple[set[str], dict[str, State]]) -> None:
            allowed, found = result
            if self._turns.get(conn) != turn or not conn.live:
                return  # a later watch replaced this one, or the connection closed
            self._drop(conn)
            seen = tuple(u for u in wanted if u in allowed)
            if seen:
                self._watching[conn] = seen
            for user in seen:
                entry = self._users.get(user)
                if entry is None:
                    entry = self._users[user] = _Watched()
                entry.conns.add(conn)
                self._learn(user, entry, found.get(user, (False, NEVER)))
            for user in wanted:
                entry = self._users.get(user) if user in allowed else None
                online, since = entry.sent if entry and entry.sent else (False, NEVER)
                conn.notify(presence_frame(user, online, since))

        d = allowed_d.addCallback(states)
        d.addCallback(answer)
        return d

    def forget(self, conn: Any) -> None:
        """``conn`` closed."""
        self._turns.pop(conn, None)
        self._drop(conn)

    def _drop(self, conn: Any) -> None:
        for user in self._watching.pop(conn, ()):
            self._unwatch(conn, user)

    def _unwatch(self, conn: Any, user: str) -> None:
        """``conn`` no longer watches ``user``; with nobody watching, what
        the hub kept of ``user`` goes (the hub's memory is its watchers')."""
        entry = self._users.get(user)
        if entry is None:
            return
        entry.conns.discard(conn)
        if not entry.conns:
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            del self._users[user]

    def watched(self) -> int:
        """The number of users watched by this node's connections."""
        return len(self._users)

    # -- contacts that went away -------------------------------------------------------

    def contacts_changed(self, users: Iterable[str]) -> defer.Deferred:
        """Contacts among ``users`` may be gone (one left a group, or was
        removed): decide again, under ``contacts``, the lists of these users'
        connections and of the connections watching one of them.  Fires once
        decided."""
        if self.policy != CONTACTS:
            return defer.succeed(None)
        touched = set(users)
        conns = [
            conn
            for conn, seen in self._watching.items()
            if conn.user_id in touched or not touched.isdisjoint(seen)
        ]
        return self._check_contacts(conns)

    def _check_contacts(self, conns: list[Any]) -> defer.Deferred:
        """Ask the store again which users ``conns`` may see (one question
        per watcher) and withdraw the others (``_withdraw``)."""
        by_user: dict[str, list[Any]] = {}
        for conn in conns:
            by_user.setdefault(conn.user_id, []).append(conn)
        asked = []
        for me, mine in by_user.items():
            users = sorted({u for c in mine for u in self._watching.get(c, ()) if u != me})
            if not users:
                continue
            turns = {conn: self._turns.get(conn) for conn in mine}
            # The store takes at most MAX_WATCH candidates a question; one
            # user's connections may watch more between them.
            parts = [
                self._contacts(me, users[start : start + MAX_WATCH])
                for start in range(0, len(users), MAX_WATCH)
            ]
            d = defer.gatherResults(parts, consumeErrors=True)
            d.addCallback(lambda found: set().union(*found))
            d.addCallback(self._withdraw, turns)
            asked.append(d)
        d = defer.gatherResults(asked, consumeErrors=True)
        d.addErrback(lambda f: _log.warn("rechecking presence contacts failed: {why}", why=f.value))
        return d

    def _withdraw(self, allowed: Any, turns: dict[Any, int | None]) -> None:
        """Each connection of ``turns`` stops watching what it may no longer
        see (outside ``allowed``, itself excepted) and is told that user is
        offline since the epoch, as a user never allowed appears.  A
        connection that sent another ``watch`` meanwhile is left to it."""
        allowed = set(allowed)
        for conn, turn in turns.items():
            seen = self._watching.get(conn)
            if self._turns.get(conn) != turn or not seen or not conn.live:
                continue
            gone = [u for u in seen if u != conn.user_id and u not in allowed]
            if not gone:
                continue
            kept = tuple(u for u in seen if u not in gone)
            if kept:
                self._watching[conn] = kept
            else:
                del self._watching[conn]
            for user in gone:
                self._unwatch(conn, user)
                conn.notify(presence_frame(user, False, NEVER))

    # -- changes -----------------------------------------------------------------

    def changed(self, user: str, online: bool, since_ms: int) -> None:
        """The broker's news: ``user`` is now ``online`` (or not) since ``since_ms``."""
        entry = self._users.get(user)
        if entry is not None:
            self._learn(user, entry, (online, since_ms))

    def _learn(self, user: str, entry: _Watched, state: State) -> None:
        if entry.state is not None and state[1] < entry.state[1]:
            return  # older news than what is known (nodes publish independently)
        entry.state = state
        if entry.sent is None:
            entry.sent = state  # the first state known: nothing to coalesce yet
            return
        if entry.timer is not None and entry.timer.active():
            return  # the timer sends the state as it stands then
        if entry.sent[0] == state[0]:
            return
        now = self._clock.seconds()
        delay = self._grace if not state[0] else max(0.0, entry.sent_at + self._interval - now)
        if delay <= 0:
            self._send(user, entry)
        else:
            entry.timer = self._clock.callLater(delay, self._send, user, entry)

    def _send(self, user: str, entry: _Watched) -> None:
        entry.timer = None
        if self._users.get(user) is not entry or entry.state is None or entry.sent is None:
            return
        if entry.state[0] == entry.sent[0]:
            return  # back as it was (an on/off pair inside the grace): nothing to say
        entry.sent = entry.state
        entry.sent_at = self._clock.seconds()
        frame = presence_frame(user, *entry.state)
        for conn in list(entry.conns):
            conn.notify(frame)

    def forget_user(self, user: str) -> None:
        """``user`` was deleted: whoever watches them is told once that they
        are offline since the epoch (as a user never seen) and stops
        watching them, whatever the policy; a later watch finds them never
        seen (the broker forgot them too)."""
        entry = self._users.get(user)
        if entry is None:
            return
        frame = presence_frame(user, False, NEVER)
        for conn in list(entry.conns):
            kept = tuple(u for u in self._watching.get(conn, ()) if u != user)
            if kept:
                self._watching[conn] = kept
            else:
                self._watching.pop(conn, None)
            self._unwatch(conn, user)
            conn.notify(frame)

    # -- life --------------------------------------------------------------------

    def recheck(self) -> defer.Deferred | None:
        """Ask the broker again about the watched users: in a cluster, a node
        that died never said its users went offline (their leases expire).
        Under ``contacts``, ask the store again who may still be watched (a
        contact can go without a group event reaching this node: an account
        deleted, a row changed by hand)."""
        users = list(self._users)
        if not users:
            return None
        d = self._source(users)

        def got(found: dict[str, State]) -> None:
            for user, state in found.items():
                self.changed(user, *state)

        d.addCallback(got)
        d.addErrback(
            lambda f: _log.warn("rechecking presence failed: {why}", why=f.getErrorMessage())
        )
        if self.policy != CONTACTS or not self._watching:
            return d
        conns = list(self._watching)
        start = self._contacts_turn % len(conns)
        turn = (conns[start:] + conns[:start])[:CONTACTS_PER_RECHECK]
        self._contacts_turn = start + len(turn)
        return defer.gatherResults([d, self._check_contacts(turn)])

    def stop(self) -> None:
        if self._rechecker.running:
            self._rechecker.stop()
        for entry in self._users.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
