"""The broker of a single process: routing inside one node.

The broker knows every open connection by user.  After the store has
committed a message it hands the frame (serialized once) to each recipient
connection, records ``delivered`` and tells the sender.  When a connection
opens it replays what the user missed, in id order, before live traffic.

The cluster's broker (``redis.py``) builds on it for the connections of its
own node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..messages import (
    BROADCAST,
    DELIVERED,
    PENDING,
    Message,
    message_frame,
    read_frame,
    status_frame,
)
from ..metrics import DISCARD, Metrics
from ..store import Store
from . import Connection, IBroker

_log = Logger()

REPLAY_PAGE = 256


@implementer(IBroker)
class LocalBroker:
    """The broker of a single process."""

    metrics: Metrics = DISCARD  # the node's metrics (set by tap.py)
    # Told (user, online, since_ms) when a user's presence changes (the
    # presence hub's ``changed``; set by the ServerFactory).
    presence_listener: Callable[[str, bool, int], None] | None = None

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        prepare: Callable[[bytes], bytes] = lambda payload: payload,
        max_per_user: int = 16,
    ) -> None:
        self._store = store
        self._clock = clock
        self._prepare = prepare
        self._max_per_user = max_per_user
        self._users: dict[str, list[Connection]] = {}
        self._seen: dict[str, tuple[bool, int]] = {}  # user -> (online, since ms) here

    @property
    def clock(self) -> IReactorTime:
        """The clock this broker schedules on."""
        return self._clock

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def attach(self, conn: Connection) -> bool:
        conns = self._users.setdefault(conn.user_id, [])
        if len(conns) >= self._max_per_user:
            return False
        conns.append(conn)
        if len(conns) == 1:
            self._went(conn.user_id, True)
        return True

    def detach(self, conn: Connection) -> None:
        conns = self._users.get(conn.user_id)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._users[conn.user_id]
                self._went(conn.user_id, False)

    def connections(self) -> Iterator[Connection]:
        for conns in list(self._users.values()):
            yield from list(conns)

    def count(self) -> int:
        """The number of attached connections."""
        return sum(len(c) for c in self._users.values())

    def users(self) -> int:
        """The number of users with an attached connection."""
        return len(self._users)

    # -- presence and read receipts (protocol section 13) -------------------------

    def _went(self, user_id: str, online: bool) -> None:
        """``user_id``'s first connection here opened (or their last closed)."""
        since = self._now_ms()
        self._seen[user_id] = (online, since)
        if self.presence_listener is not None:
            self.presence_listener(user_id, online, since)

    def presence_of(self, users: list[str]) -> defer.Deferred:
        """Fire with ``{user: (online, since_ms)}``; since 0 for a user never
        seen (since this process started)."""
        return defer.succeed({u: self._seen.get(u, (False, 0)) for u in users})

    def read_receipt(self, msg_id: int, sender: str, reader: str, ms: int) -> None:
        """``reader`` read ``msg_id`` (recorded): tell the sender's connections."""
        conns = self._users.get(sender)
        if conns:
            payload = read_frame(msg_id, reader, ms)
            for conn in list(conns):
                conn.notify(payload)

    def _hand_out(self, sender: Connection | None, msg: Message) -> int:
        """Hand ``msg`` (its frame made once) to this process's connections of
        its recipients (every one but ``sender``'s for a broadcast); return how
        many took it."""
        reached = 0
        if msg.recipient == BROADCAST:
            frame = self._prepare(message_frame(msg))
            for conns in self._users.values():
                for conn in conns:
                    if conn is not sender and conn.deliver(msg.id, frame):
                        reached += 1
        else:
            conns = self._users.get(msg.recipient)
            if not conns:
                # Not connected to this process (in a cluster: most often
                # connected to another node): no frame to make.
                return 0
            frame = self._prepare(message_frame(msg))
            for conn in list(conns):
                if conn.deliver(msg.id, frame):
                    reached += 1
        self.metrics.delivered_live += reached
        return reached

    def publish(self, sender: Connection | None, msg: Message) -> Message:
        reached = self._hand_out(sender, msg)
        if msg.recipient == BROADCAST:
            msg.status = DELIVERED
            msg.recipients = reached
            self._store.mark_broadcast(msg.id, reached)
            return msg
        if reached:
            msg.status = DELIVERED
            self._store.mark_delivered([msg.id])
        return msg

    def _tell_senders(self, delivered: list[Message]) -> None:
        now = self._now_ms()
        for msg in delivered:
            payload = None
            for conn in self._users.get(msg.sender, ()):
                payload = payload or status_frame(msg.id, DELIVERED, now)
                conn.notify(payload)

    @defer.inlineCallbacks
    def replay(self, conn: Connection, since: int | None) -> Any:
        after = 0
        try:
            while conn.live:
                page = yield self._store.replay_page(conn.user_id, since, after, REPLAY_PAGE)
                was_pending = []
                for msg in page:
                    if not conn.live:
                        break
                    taken = conn.deliver(msg.id, self._prepare(message_frame(msg)), replayed=True)
                    self.metrics.delivered_replay += taken
                    if taken and msg.status == PENDING and msg.recipient == conn.user_id:
                        was_pending.append(msg)
                    # Write no faster than the client reads: a replay never
                    # fills the outbox by itself.
                    yield conn.writable()
                if was_pending:
                    self._store.mark_delivered([m.id for m in was_pending])
                    self._tell_senders(was_pending)
                if len(page) < REPLAY_PAGE:
                    break
                after = page[-1].id
        finally:
            conn.replay_finished()
