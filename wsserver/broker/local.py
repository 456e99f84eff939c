"""The broker of a single process: routing inside one node.

The broker knows every open connection by user.  After the store has
committed a message it hands the frame (serialized once) to each recipient
connection, records ``delivered`` and tells the sender.  When a connection
opens it replays what the user missed, in id order, before live traffic.

The cluster's broker (``redis.py``) builds on it for the connections of its
own node.
"""

from __future__ import annotations

from collections import OrderedDict
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
from .seen import LastSeen

_log = Logger()

REPLAY_PAGE = 256
TOLD_GROUPS = 10_000  # group messages whose status this node told lately
FORGOTTEN_MAX = 10_000  # deleted users whose presence this node no longer records


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
        # Connections replaying now, with the group messages they took live
        # meanwhile (held until the replay ends): their cursors move then.
        self._in_replay: dict[Connection, list[Message]] = {}
        # Group messages: (recipients, delivered) last told to their senders.
        self._group_told: OrderedDict[int, tuple[int, bool]] = OrderedDict()
        self._seen = LastSeen()  # since when users were on or off, here
        # Deleted users (newest FORGOTTEN_MAX): their presence is no longer
        # recorded, so the closes of their last connections leave no trace.
        self._forgotten: OrderedDict[str, None] = OrderedDict()

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

    def notify_user(self, user_id: str, payload: bytes) -> int:
        """Send a non-message frame to every connection of ``user_id`` on this
        process; return how many were open."""
        sent = 0
        for conn in list(self._users.get(user_id, ())):
            if conn.live:
                conn.notify(payload)
                sent += 1
        return sent

    def count(self) -> int:
        """The number of attached connections."""
        return sum(len(c) for c in self._users.values())

    def users(self) -> int:
        """The number of users with an attached connection."""
        return len(self._users)

    def _hand_out_group(self, sender: Connection | None, msg: Message) -> int:
        """Hand a group message to this process's connections of its members
        (as stored with it), the sending connection excepted; move the cursor
        of each member it reached (later for a connection still replaying);
        return how many members but the sender it reached."""
        members = msg.group_members or ()
        frame: bytes | None = None
        reached = 0
        marks = []
        for member in members:
            conns = self._users.get(member)
            if not conns:
                continue
            took = False
            settled = False
            for conn in list(conns):
                if conn is sender:
                    continue
                if frame is None:
                    frame = self._prepare(message_frame(msg))
                if conn.deliver(msg.id, frame):
                    took = True
                    held = self._in_replay.get(conn)
                    if held is None:
                        settled = True
                    else:
                        held.append(msg)
            if took:
                self.metrics.delivered_live += 1
                if member != msg.sender:
                    reached += 1
            if settled and member != msg.sender:
                marks.append((msg.recipient, member, msg.id))
        if marks:
            self._store.mark_group_delivered(marks)
        return reached

    def _group_published(self, msg: Message, reached: int) -> None:
        """Set a group message's status for its sender's ack: ``recipients``
        members reached so far, ``delivered`` once that is all of them."""
        members = msg.group_members or ()
        others = len(members) - (msg.sender in members)
        msg.recipients = reached
        done = reached >= others
        msg.status = DELIVERED if done else PENDING
        self._remember_group(msg.id, reached, done)
        if done:
            self._store.mark_delivered([msg.id])
        elif reached:
            # Members reached on other nodes move their cursors in other
            # transactions: whichever node commits last counts them all, so
            # every node that moved a cursor counts after its own commit.
            self._settle_groups([msg])

    def _remember_group(self, msg_id: int, recipients: int, done: bool) -> bool:
        """Note what the sender was told of a group message; False when that
        says nothing new (fewer or as many recipients, not newly delivered)."""
        before = self._group_told.get(msg_id)
        if before is not None and recipients <= before[0] and (before[1] or not done):
            return False
        if before is not None:
            recipients = max(recipients, before[0])
            done = done or before[1]
        self._group_told[msg_id] = (recipients, done)
        self._group_told.move_to_end(msg_id)
        if len(self._group_told) > TOLD_GROUPS:
            self._group_told.popitem(last=False)
        return True

    def _group_status(self, msg_id: int, sender: str, recipients: int, done: bool) -> None:
        """Tell the sender's connections here a group message's new count."""
        if not self._remember_group(msg_id, recipients, done):
            return
        conns = self._users.get(sender, ())
        if conns:
            status = DELIVERED if done else PENDING
            payload = status_frame(msg_id, status, self._now_ms(), recipients)
            for conn in list(conns):
                conn.notify(payload)

    @defer.inlineCallbacks
    def _settle_groups(self, msgs: list[Message]) -> Any:
        """After cursor moves: read each group message's count from the
        database (the truth, whichever node moved which cursor) and tell its
        sender; mark it delivered once every member has it."""
        try:
            yield self._store.drain()
            for msg in msgs:
                recipients, waiting = yield self._store.group_status(
                    msg.id, msg.recipient, msg.sender
                )
                if waiting == 0:
                    self._store.mark_delivered([msg.id])
                self._announce_group(msg.id, msg.sender, recipients, waiting == 0)
        except Exception:
            _log.failure("reading group delivery counts failed")

    def group_settled(self, msg_id: int, sender: str, recipients: int) -> None:
        """A group message became delivered without a cursor moving (a removal
        left no member waiting for it: account events say so to every
        node): tell the sender's connections here, once."""
        self._group_status(msg_id, sender, recipients, True)

    def _announce_group(self, msg_id: int, sender: str, recipients: int, done: bool) -> None:
        """A group message's count as the database has it: to its sender's
        connections (in a cluster, on every node)."""
        self._group_status(msg_id, sender, recipients, done)

    # -- presence and read receipts (protocol section 13) -------------------------

    def _went(self, user_id: str, online: bool) -> None:
        """``user_id``'s first connection here opened (or their last closed)."""
        if user_id in self._forgotten:
            return
        since = self._now_ms()
        self._seen.record(user_id, online, since)
        if self.presence_listener is not None:
            self.presence_listener(user_id, online, since)

    def presence_of(self, users: list[str]) -> defer.Deferred:
        """Fire with ``{user: (online, since_ms)}``; since 0 for a user never
        seen (since this process started, or forgotten: ``LastSeen``)."""
        return defer.succeed({u: self._seen.get(u) for u in users})

    def forget_presence(self, user_id: str) -> defer.Deferred:
        """``user_id`` was deleted: drop their last-seen time (section 12)
        and record no more of it; watchers see them as never seen."""
        self._forgotten[user_id] = None
        if len(self._forgotten) > FORGOTTEN_MAX:
            self._forgotten.popitem(last=False)
        self._seen.forget(user_id)
        return defer.succeed(None)

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
        if msg.group_members is not None:
            self._group_published(msg, self._hand_out_group(sender, msg))
            return msg
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

    def _groups_taken(self, user_id: str, msgs: list[Message]) -> None:
        """Group messages handed to a connection of ``user_id`` by a replay (or
        held live during it): move the user's cursors, then tell the senders."""
        marks = [(m.recipient, user_id, m.id) for m in msgs if m.sender != user_id]
        if not marks:
            return
        self._store.mark_group_delivered(marks)
        self._settle_groups([m for m in msgs if m.sender != user_id and m.status == PENDING])

    @defer.inlineCallbacks
    def replay(self, conn: Connection, since: int | None) -> Any:
        after = 0
        self._in_replay[conn] = []
        try:
            while conn.live:
                page = yield self._store.replay_page(conn.user_id, since, after, REPLAY_PAGE)
                was_pending = []
                grouped = []
                for msg in page:
                    if not conn.live:
                        break
                    taken = conn.deliver(msg.id, self._prepare(message_frame(msg)), replayed=True)
                    self.metrics.delivered_replay += taken
                    if taken and msg.status == PENDING and msg.recipient == conn.user_id:
                        was_pending.append(msg)
                    elif taken and msg.recipient.startswith("#"):
                        grouped.append(msg)
                    # Write no faster than the client reads: a replay never
                    # fills the outbox by itself.
                    yield conn.writable()
                if was_pending:
                    self._store.mark_delivered([m.id for m in was_pending])
                    self._tell_senders(was_pending)
                if grouped:
                    self._groups_taken(conn.user_id, grouped)
                if len(page) < REPLAY_PAGE:
                    break
                after = page[-1].id
        finally:
            held = self._in_replay.pop(conn, [])
            conn.replay_finished()
            if held and conn.live:
                self._groups_taken(conn.user_id, held)
