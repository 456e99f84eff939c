"""The broker of a cluster node: live traffic between nodes through Redis.

A node delivers to its own connections exactly as ``LocalBroker`` does, but
every committed message goes through a ``StreamApplier``, so that each node
hands messages to its connections in id order whichever node stored them.
After its commit a node applies its own messages and publishes them on one
Redis channel (a reactor turn's messages as one publication); every node
offers what it receives to its applier, which reads any gap back from the
database.  Once a second every node polls the stream head in the database
and reads back what it has not seen: that covers a node that died between
commit and publish, and live delivery while Redis is away.

Besides messages, the channel carries delivery status (a node that handed a
pending direct message to one of its connections tells every node, so the
sender's connections anywhere get their ``status`` frame) and broadcast
tallies (each node reports how many of its connections a broadcast reached;
the node that stored it adds them up and sends ``delivered`` with the
cluster-wide ``recipients``).

Redis is reached with txredisapi (Twisted-native): a ``RedisFactory`` for
commands and one for the subscription, each driven by ``ClientService``
(through ``startConnecting``) on an endpoint, reconnecting by themselves.
Commands are only sent on a connection that is up, so nothing waits for
Redis while it is away.
"""

from __future__ import annotations

import base64
import json
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import BrokerAddress, ConfigError, describe_broker, parse_broker
from ..messages import BROADCAST, DELIVERED, PENDING, Message, status_frame
from ..store import Store
from . import Connection, IBroker, resp
from .limits import LEASE_REFRESH, ask_lease, refresh_leases
from .local import LocalBroker
from .online import check_presence
from .stream import StreamApplier

_log = Logger()

POLL_INTERVAL = 1.0  # seconds between two reads of the stream head
TALLY_TIMEOUT = 2.0  # seconds a broadcast waits for the other nodes' counts
REPLY_TIMEOUT = 5  # seconds a Redis command may take before it counts as failed
TOLD_MEMORY = 10_000  # ids whose delivered status this node has sent lately


# Events travel as JSON arrays, their fields by position (half the cost of
# objects to encode and to parse, per message):
#   ["m", id, from, to, content, sig (base64) | null, nonce | null, ver, status, ms,
#    key_id | null[, group members (group messages only)]]
#   ["g", id, from, recipients, delivered]  a group message's count: tell the sender
#   ["s", id, from, recipients | null]   delivered: tell the sender
#   ["c", id, count]                      a broadcast's count on one node
#   ["p", user, online (1/0), since ms]   presence changed (``online.py``)
#   ["r", id, from, reader, ms]           read receipt: tell the sender
# The object form of earlier versions ({"t": "m", "m": {...}}, ...) is still
# read, and so is a message without its last field (``key_id``, from issue 12:
# read as null), so nodes of both versions can run side by side during an
# upgrade.


def _encode_message(msg: Message) -> list[Any]:
    event = [
        "m",
        msg.id,
        msg.sender,
        msg.recipient,
        msg.content,
        base64.b64encode(msg.signature).decode("ascii") if msg.signature else None,
        msg.nonce,
        msg.verification,
        msg.status,
        msg.created_ms,
        msg.key_id,
    ]
    if msg.group_members is not None:  # only group messages carry it
        event.append(list(msg.group_members))
    return event


def _decode_message(e: list[Any]) -> Message:
    if len(e) == 10:
        e = [*e, None]  # from a node of the version before key ids
    if len(e) == 11:
        e = [*e, None]  # from a node of the version before groups
    _, msg_id, sender, recipient, content, sig, nonce, ver, status, ms, key_id, members = e
    return Message(
        int(msg_id),
        str(sender),
        str(recipient),
        str(content),
        base64.b64decode(sig) if sig else None,
        None if nonce is None else str(nonce),
        str(ver),
        str(status),
        int(ms),
        key_id=None if key_id is None else str(key_id),
        group_members=None if members is None else tuple(str(m) for m in members),
    )


def _decode_object(d: dict[str, Any]) -> list[Any]:
    """An event of the earlier object form, as the array form."""
    kind = d["t"]
    if kind == "m":
        m = d["m"]
        keys = ("id", "from", "to", "content", "sig", "nonce", "ver", "status", "ms", "kid")
        return ["m", *[m.get(k) for k in keys]]
    if kind == "s":
        return ["s", d["id"], d["from"], d.get("r")]
    if kind == "c":
        return ["c", d["id"], d["n"]]
    return [kind]


def check_broker(url: str, timeout: float = 10.0) -> None:
    """Raise ``ConfigError`` naming BROKER unless the Redis at ``url`` answers
    PING (after AUTH and SELECT).  Synchronous: runs before the reactor."""
    address = parse_broker(url)
    shown = describe_broker(url)
    commands: list[list[str]] = []
    if address.password is not None:
        commands.append(["AUTH", address.password])
    commands += [["SELECT", str(address.db)], ["PING"]]
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            for command in commands:
                try:
                    resp.command(sock, reader, *command)
                except resp.RedisError as exc:
                    what = str(exc).strip().split(" ")[0]
                    raise ConfigError(f"BROKER: {shown} refused {command[0]}: {what}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"BROKER: cannot reach Redis at {shown}: {reason}") from None


class _Subscriber(txredisapi.SubscriberProtocol):
    """The subscription connection: hands every publication to the broker."""

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory._wsbroker._received(message)


class _SubscriberFactory(txredisapi.RedisFactory):
    protocol = _Subscriber

    def __init__(self, broker: RedisBroker, password: str | None) -> None:
        super().__init__(None, None, 1, isLazy=True, password=password)
        self._wsbroker = broker

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn.connected and not self.disconnectCalled:
            self._wsbroker._subscriber_up(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self._wsbroker._subscriber_down()


@implementer(IBroker)
class RedisBroker(LocalBroker):
    """The broker of one node of a cluster (``BROKER=redis://...``)."""

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        url: str,
        node: str,
        prepare: Callable[[bytes], bytes] = lambda payload: payload,
        max_per_user: int = 16,
        prefix: str = "wsserver:",
        reactor: Any = None,
    ) -> None:
        super().__init__(store, clock, prepare, max_per_user)
        self._address: BrokerAddress = parse_broker(url)
        self._shown = describe_broker(url)
        self._node = node
        self._reactor = reactor if reactor is not None else clock
        # Pub/sub channels are not per Redis database: the number is part of
        # the channel's name, so clusters on one Redis never hear each other.
        self.prefix = f"{prefix}{self._address.db}:"
        self._channel = f"{self.prefix}events"
        # Every publication of this node starts so; the name is JSON-quoted,
        # so no other node's (a different name) can start the same way.
        self._own_prefix = '{"node":' + json.dumps(node) + ',"e":'
        self._applier = StreamApplier(store, self._apply)
        self._outgoing: list[dict[str, Any]] = []
        self._flush_call: Any = None
        self._tallies: dict[int, _Tally] = {}
        self._told: OrderedDict[int, None] = OrderedDict()
        self._publishing: int | None = None  # the id publish() is applying now
        self._subscribed = False
        self._caught_up = False
        self._commands: Any = None
        self._subscriber: Any = None
        self._poller = LoopingCall(self._poll)
        self._poller.clock = clock
        self._warned = False
        self._leases: dict[Connection, tuple[str, str]] = {}
        self._leaser = LoopingCall(self._refresh_leases)
        self._leaser.clock = clock
        self._cap_local = False

    # -- life -------------------------------------------------------------------

    def _endpoint(self) -> Any:
        return endpoints.HostnameEndpoint(
            self._reactor, self._address.host, self._address.port, timeout=10
        )

    def start(self) -> None:
        """Connect to Redis (commands and subscription) and start polling."""
        password = self._address.password
        self._commands = txredisapi.RedisFactory(
            f"{self._address.host}:{self._address.port}",
            self._address.db,
            1,
            isLazy=True,
            password=password,
            replyTimeout=REPLY_TIMEOUT,
        )
        self._subscriber = _SubscriberFactory(self, password)
        for factory in (self._commands, self._subscriber):
            # txredisapi fails this Deferred (nobody else waits on it) when AUTH
            # or SELECT is not answered, e.g. the node stopping as it connects:
            # handled here, not left to be logged as unhandled when collected.
            factory.deferred.addErrback(self._connect_failed)
        self._commands.startConnecting(self._endpoint())
        self._subscriber.startConnecting(self._endpoint())
        self._poller.start(POLL_INTERVAL, now=True)
        self._leaser.start(LEASE_REFRESH, now=False)

    def _connect_failed(self, f: Failure) -> None:
        if self._poller.running:  # not stopping: say so (the message names no secret)
            _log.warn("broker {url}: {why}", url=self._shown, why=f.getErrorMessage())

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop polling and close the Redis connections."""
        if self._poller.running:
            self._poller.stop()
        if self._leaser.running:
            self._leaser.stop()
        for tally in list(self._tallies.values()):
            tally.finish()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()
        for factory in (self._subscriber, self._commands):
            if factory is not None:
                yield factory.disconnect()

    def command_connection(self) -> Any:
        """The live Redis command connection, or None while Redis is away."""
        factory = self._commands
        if factory is None:
            return None
        for conn in factory.pool:
            if conn.connected:
                return conn
        return None

    @property
    def ready(self) -> tuple[bool, str]:
        """(True, "ok") when the subscription is live and caught up with the
        database; else (False, why)."""
        if not self._subscribed:
            return False, f"no subscription to {self._shown}"
        if not self._caught_up:
            return False, "catching up with the database"
        return True, "ok"

    @property
    def node(self) -> str:
        """This node's name (``NODE_NAME``)."""
        return self._node

    @property
    def applier(self) -> StreamApplier:
        """The stream applier (for tests and /ready)."""
        return self._applier

    def _subscriber_up(self, conn: Any) -> None:
        d = conn.subscribe(self._channel)

        def subscribed(_: Any) -> Any:
            # Subscribed first, then caught up from the database: nothing
            # published from now on is missed, and what was published while
            # the subscription was away is read back.
            self._subscribed = True
            self._caught_up = False
            if self._warned:
                _log.info("broker {url}: subscribed again", url=self._shown)
                self._warned = False
            return self._catch_up()

        def failed(f: Failure) -> None:
            # A connection lost while subscribing (the node stopping, or Redis
            # going) is no error: _subscriber_down noted it, and the factory
            # subscribes again when it reconnects.
            if not f.check(txredisapi.ConnectionError):
                _log.failure("subscribing to {url} failed", f, url=self._shown)

        d.addCallback(subscribed)
        d.addErrback(failed)

    def _subscriber_down(self) -> None:
        self._subscribed = False
        self._caught_up = False
        if not self._warned and self._poller.running:
            self._warned = True
            self.metrics.broker_reconnects.inc()
            _log.warn(
                "broker {url} unreachable: live traffic between nodes falls back to"
                " reading the database every {s:g} s until it is back",
                url=self._shown,
                s=POLL_INTERVAL,
            )

    def _catch_up(self) -> defer.Deferred:
        d = self._applier.poll()

        def done(_: Any) -> None:
            if self._subscribed:
                self._caught_up = True

        def failed(f: Failure) -> None:
            _log.warn("catching up with the database failed; the next poll retries")

        return d.addCallbacks(done, failed)

    def _poll(self) -> None:
        if self._subscribed and not self._caught_up:
            self._catch_up()
        else:
            self._applier.poll().addErrback(lambda f: None)

    # -- what connections see -----------------------------------------------------

    def attach(self, conn: Connection) -> bool:
        """Attach when this node's own count allows; the cluster-wide count is
        asked of Redis at once and a connection over it is closed with 1008
        (``over_cap``).  While Redis is away only this node's count applies."""
        if not super().attach(conn):
            return False
        key = f"{self.prefix}conns:{conn.user_id}"
        member = f"{self._node}/{id(conn)}"
        self._leases[conn] = (key, member)
        redis = self.command_connection()
        if redis is None:
            self._local_cap("Redis is unreachable")
            return True
        d = ask_lease(redis, key, member, self._clock.seconds(), self._max_per_user)

        def answered(granted: bool) -> None:
            if self._cap_local:
                self._cap_local = False
                _log.info("cluster-wide connection cap back")
            if not granted and conn in self._leases:
                _log.info("refused a connection of {user}: too many", user=conn.user_id)
                self.detach(conn)
                conn.over_cap()

        def failed(f: Failure) -> None:
            self._local_cap(f.getErrorMessage())

        d.addCallbacks(answered, failed)
        self._check_presence([conn.user_id]).addErrback(lambda f: None)
        return True

    def detach(self, conn: Connection) -> None:
        super().detach(conn)
        lease = self._leases.pop(conn, None)
        redis = self.command_connection()
        if lease is not None and redis is not None:
            redis.zrem(*lease).addErrback(lambda f: None)
            self._check_presence([conn.user_id]).addErrback(lambda f: None)

    # -- presence and read receipts (protocol section 13) -------------------------

    def _went(self, user_id: str, online: bool) -> None:
        if user_id in self._forgotten:
            return
        since = self._now_ms()
        self._seen.record(user_id, online, since)
        if self.command_connection() is None and self.presence_listener is not None:
            # Redis is away: this node's own view is all there is.
            self.presence_listener(user_id, online, since)

    def _check_presence(self, users: list[str]) -> defer.Deferred:
        """Ask Redis (after this node's lease commands, on the same
        connection) and publish the changes it recorded."""
        redis = self.command_connection()
        gone = [u for u in users if u in self._forgotten]
        if redis is None or len(gone) == len(users):
            return LocalBroker.presence_of(self, users)
        if gone:  # deleted: never seen, and nothing recorded for them again
            users = [u for u in users if u not in self._forgotten]
        d = check_presence(redis, self.prefix, users, self._clock.seconds())

        def found(states: dict[str, tuple[bool, int, bool]]) -> dict[str, tuple[bool, int]]:
            for user, (online, since, changed) in states.items():
                if changed:
                    if self.presence_listener is not None:
                        self.presence_listener(user, online, since)
                    self._outgoing.append(["p", user, 1 if online else 0, since])
                    self._schedule_flush()
            out = {user: (online, since) for user, (online, since, _) in states.items()}
            out.update((user, (False, 0)) for user in gone)
            return out

        return d.addCallback(found)

    def presence_of(self, users: list[str]) -> defer.Deferred:
        d = self._check_presence(users)

        def failed(f: Failure) -> Any:
            _log.warn("presence from {url} failed: {why}", url=self._shown, why=f.getErrorMessage())
            return LocalBroker.presence_of(self, users)

        return d.addErrback(failed)

    def forget_presence(self, user_id: str) -> defer.Deferred:
        """``user_id`` was deleted: drop their last-seen time here and in
        Redis (every node does it; the second delete finds nothing)."""
        LocalBroker.forget_presence(self, user_id)
        redis = self.command_connection()
        if redis is None:
            return defer.succeed(None)
        d = redis.delete(f"{self.prefix}presence:{user_id}")

        def failed(f: Failure) -> None:
            _log.warn(
                "forgetting a deleted user's presence at {url} failed: {why}",
                url=self._shown,
                why=f.getErrorMessage(),
            )

        return d.addCallbacks(lambda _: None, failed)

    def read_receipt(self, msg_id: int, sender: str, reader: str, ms: int) -> None:
        super().read_receipt(msg_id, sender, reader, ms)
        self._outgoing.append(["r", msg_id, sender, reader, ms])
        self._schedule_flush()

    def _local_cap(self, why: str) -> None:
        if not self._cap_local:
            self._cap_local = True
            _log.warn(
                "cluster-wide connection cap unavailable ({why}): each node counts its own"
                " connections until Redis is back",
                why=why,
            )

    def _refresh_leases(self) -> None:
        redis = self.command_connection()
        if redis is None:
            return
        d = refresh_leases(redis, list(self._leases.values()), self._clock.seconds())
        d.addErrback(lambda f: self._local_cap(f.getErrorMessage()))

    def publish(self, sender: Connection | None, msg: Message) -> Message:
        self._publishing = msg.id
        try:
            applied = self._applier.offer(msg, sender)
        finally:
            self._publishing = None
        if msg.group_members is not None and not applied:
            # Held behind a gap: the ack says what stands now (nobody
            # reached yet); status frames follow once it is applied.
            self._group_published(msg, 0)
        self._outgoing.append(_encode_message(msg))
        if msg.recipient == BROADCAST:
            tally = self._tallies.get(msg.id)
            if tally is None:
                tally = self._tallies[msg.id] = _Tally(self, msg)
            msg.status = PENDING
            msg.recipients = None
        self._schedule_flush()
        return msg

    def _tell_senders(self, delivered: list[Message]) -> None:
        # Replay handed pending messages over: every node tells its
        # connections of the senders.
        for msg in delivered:
            self._delivered(msg)

    # -- applying the stream ------------------------------------------------------

    def _apply(self, msg: Message, sender: Any) -> None:
        """Hand one message of the stream to this node's connections."""
        if msg.group_members is not None:
            self._apply_group(msg, sender)
            return
        reached = self._hand_out(sender, msg)
        if self._publishing != msg.id:  # another node's message: how late it is here
            self.metrics.applied(msg.created_ms, self._clock.seconds())
        if msg.recipient == BROADCAST:
            tally = self._tallies.get(msg.id)
            if tally is not None or self._publishing == msg.id:
                if tally is None:
                    tally = self._tallies[msg.id] = _Tally(self, msg)
                tally.add(self._node, reached)
            else:
                self._outgoing.append(["c", msg.id, reached])
                self._schedule_flush()
            return
        if not reached:
            return
        if msg.status == PENDING:
            msg.status = DELIVERED
            self._store.mark_delivered([msg.id])
            if self._publishing != msg.id:
                # Not answered by this commit's ack: a status frame says it.
                # The mark is written at once rather than with the next batch:
                # until it is, a reconnect to another node replays it again.
                self._store.drain().addErrback(lambda f: None)
                self._delivered(msg)
                return
        if self._publishing == msg.id:
            # The ack says delivered: no status frame for it here later.
            self._remember_told(msg.id)

    def _apply_group(self, msg: Message, sender: Any) -> None:
        """Hand a group message to this node's connections of its members; the
        ack of this node's own says the count, others' counts come from the
        database once the cursors moved (``_settle_groups``)."""
        reached = self._hand_out_group(sender, msg)
        if self._publishing == msg.id:
            self._group_published(msg, reached)
            return
        self.metrics.applied(msg.created_ms, self._clock.seconds())
        if reached:
            self._settle_groups([msg])

    def _announce_group(self, msg_id: int, sender: str, recipients: int, done: bool) -> None:
        super()._announce_group(msg_id, sender, recipients, done)
        self._outgoing.append(["g", msg_id, sender, recipients, done])
        self._schedule_flush()

    def _remember_told(self, msg_id: int) -> bool:
        """Note that the sender was told ``msg_id`` is delivered; False if it was already."""
        if msg_id in self._told:
            return False
        self._told[msg_id] = None
        if len(self._told) > TOLD_MEMORY:
            self._told.popitem(last=False)
        return True

    def _delivered(self, msg: Message) -> None:
        """Tell the sender's connections here and on every node."""
        self._notify_sender(msg.id, msg.sender, None)
        self._outgoing.append(["s", msg.id, msg.sender, None])
        self._schedule_flush()

    def _notify_sender(self, msg_id: int, sender: str, recipients: int | None) -> None:
        if not self._remember_told(msg_id):
            return
        conns = self._users.get(sender, ())
        if conns:
            payload = status_frame(msg_id, DELIVERED, self._now_ms(), recipients)
            for conn in list(conns):
                conn.notify(payload)

    # -- Redis --------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        """Publish what this reactor turn produced, as one publication."""
        events, self._outgoing = self._outgoing, []
        if not events:
            return
        tallies = [self._tallies[e[1]] for e in events if e[0] == "m" and e[1] in self._tallies]
        conn = self.command_connection()
        if conn is None:
            # Redis is away: the other nodes read these messages back from
            # the database (their poll); counts and status cannot travel.
            for tally in tallies:
                tally.expect(0)
            return
        payload = self._own_prefix + json.dumps(events, separators=(",", ":")) + "}"
        d = conn.publish(self._channel, payload)

        def published(listeners: Any) -> None:
            others = max(0, int(listeners) - (1 if self._subscribed else 0))
            for tally in tallies:
                tally.expect(others)

        def failed(f: Failure) -> None:
            _log.warn("publishing to {url} failed: {why}", url=self._shown, why=f.getErrorMessage())
            for tally in tallies:
                tally.expect(0)

        d.addCallbacks(published, failed)

    def _received(self, payload: Any) -> None:
        """One publication of some node (this one's own included)."""
        try:
            if isinstance(payload, bytes):
                payload = payload.decode("utf-8")
            if payload.startswith(self._own_prefix):
                # This node's own: it applied these before publishing them,
                # so they are not parsed again.
                return
            body = json.loads(payload)
            node = body["node"]
            events = body["e"]
        except (ValueError, KeyError, TypeError):
            _log.warn("ignored a malformed publication on {channel}", channel=self._channel)
            return
        if node == self._node:
            return
        for event in events:
            try:
                if isinstance(event, dict):
                    event = _decode_object(event)
                kind = event[0]
                if kind == "m":
                    self._applier.offer(_decode_message(event))
                elif kind == "s":
                    recipients = event[3]
                    self._notify_sender(
                        int(event[1]),
                        str(event[2]),
                        None if recipients is None else int(recipients),
                    )
                elif kind == "g":
                    self._group_status(int(event[1]), str(event[2]), int(event[3]), bool(event[4]))
                elif kind == "c":
                    tally = self._tallies.get(int(event[1]))
                    if tally is not None:
                        tally.add(node, int(event[2]))
                elif kind == "p":
                    if self.presence_listener is not None:
                        self.presence_listener(str(event[1]), bool(event[2]), int(event[3]))
                elif kind == "r":
                    LocalBroker.read_receipt(
                        self, int(event[1]), str(event[2]), str(event[3]), int(event[4])
                    )
            except (ValueError, KeyError, TypeError, IndexError):
                _log.warn("ignored a malformed event from node {node}", node=node)


class _Tally:
    """A broadcast of this node, waiting for the other nodes' counts."""

    def __init__(self, broker: RedisBroker, msg: Message) -> None:
        self._broker = broker
        self._msg = msg
        self._counts: dict[str, int] = {}
        self._expected: int | None = None
        self._done = False
        self._timer = broker._clock.callLater(TALLY_TIMEOUT, self.finish)

    def add(self, node: str, count: int) -> None:
        self._counts[node] = count
        self._check()

    def expect(self, others: int) -> None:
        """The publication reached ``others`` other nodes."""
        self._expected = others
        self._check()

    def _check(self) -> None:
        if self._expected is None or self._broker._node not in self._counts:
            return
        if len(self._counts) - 1 >= self._expected:
            self.finish()

    def finish(self) -> None:
        """Record and announce the total (also when some node never answered)."""
        if self._done:
            return
        self._done = True
        if self._timer.active():
            self._timer.cancel()
        broker = self._broker
        broker._tallies.pop(self._msg.id, None)
        total = sum(self._counts.values())
        broker._store.mark_broadcast(self._msg.id, total)
        broker._notify_sender(self._msg.id, self._msg.sender, total)
        broker._outgoing.append(["s", self._msg.id, self._msg.sender, total])
        broker._schedule_flush()


__all__ = ["POLL_INTERVAL", "RedisBroker", "check_broker"]
