"""The WebSocket side: one Autobahn protocol per connection, and its factory.

A connection arrives already authenticated (web.py checks the token, the
Origin and ``since`` before the upgrade and hands the ``Session`` over
through ``ServerFactory.admit``).  Each text frame costs a rate-limit token,
is parsed, has its signature checked, is stored, is routed by the broker,
and is acknowledged only after the commit.
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Callable
from typing import Any

import autobahn.websocket.protocol as autobahn_protocol
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .auth import Authenticator, AuthError, Session, verification_of
from .broker import IBroker
from .inturn import InTurn
from .messages import (
    INVALID_SIGNATURE,
    UNSIGNED,
    VERIFIED,
    Draft,
    Message,
    ReadFrame,
    Refusal,
    WatchFrame,
    ack_frame,
    is_group_id,
    nonce_from_raw,
    parse_client_frame,
    parse_control_frame,
    system_frame,
)
from .metrics import DISCARD, Metrics
from .peers import mark_upgraded
from .presence import CONTACTS, PresenceHub
from .ratelimit import RateLimiter
from .store import DUPLICATE, NO_RECIPIENT, NOT_A_MEMBER, NewMessage, Store
from .store.reads import NOT_RECEIVED, READ

_log = Logger()

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_KEY_REVOKED = 4003  # the key was revoked or the account deleted
CLOSE_SIGNED_OUT = 4004


def text_frame(payload: bytes) -> bytes:
    """One complete, unfragmented, unmasked text frame (RFC 6455 section 5.2),
    as a server sends it.

    What Autobahn's ``prepareMessage(payload).payloadHybi`` gives, without
    building a ``PreparedMessage`` for every frame (measured: 3.5 µs of the
    ~70 µs a message costs; docs/performance.md).
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class Unmasker:
    """Removes a client frame's mask (RFC 6455 section 5.3) with whole-number
    arithmetic: one XOR over the payload read as an integer, in C.

    The interface Autobahn expects of a masker (``process`` may be called
    several times per frame with consecutive chunks; ``pointer`` counts the
    bytes done).  For the small frames of a chat server it costs a fraction of
    Autobahn's native masker, whose set-up (foreign-memory allocations)
    dominates below about 1 KiB.
    """

    __slots__ = ("_done", "_mask")

    def __init__(self, mask: bytes) -> None:
        self._mask = bytes(mask)
        self._done = 0

    def pointer(self) -> int:
        return self._done

    def reset(self) -> None:
        self._done = 0

    def process(self, data: bytes) -> bytes:
        size = len(data)
        turn = self._done & 3
        key = self._mask[turn:] + self._mask[:turn]
        key = (key * ((size >> 2) + 1))[:size]
        self._done += size
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            size, "little"
        )


# Payload bytes from which Autobahn's own masker is used.  Measured, masker
# built and one payload unmasked: 1.0 against 2.8 µs at 100 bytes, about equal
# at 1 KiB, 10.5 against 3.3 µs at 4 KiB (SIMD wins on long payloads).
UNMASK_NATIVE_FROM = 1024


def use_fast_unmasking() -> None:
    """Make Autobahn use ``Unmasker`` for payloads under ``UNMASK_NATIVE_FROM``.

    Autobahn builds a frame's masker through the module-level
    ``create_xor_masker`` of ``autobahn.websocket.protocol`` and offers no
    other hook, so this replaces that name, once, for the whole process.
    """
    native = autobahn_protocol.create_xor_masker
    if getattr(native, "wsserver_fast", False):
        return

    def create_xor_masker(mask: bytes, length: int | None = None) -> Any:
        if length is not None and length < UNMASK_NATIVE_FROM:
            return Unmasker(mask)
        return native(mask, length)

    create_xor_masker.wsserver_fast = True  # type: ignore[attr-defined]
    autobahn_protocol.create_xor_masker = create_xor_masker


# What Autobahn's per-connection dump of its options says instead, when the
# debug line that carries it is not logged.
OPTIONS_NOT_FORMATTED = "(options not formatted: Autobahn's debug logging is off)"


def skip_unlogged_option_dumps() -> None:
    """Make Autobahn stop formatting its options for a debug line nobody logs.

    Every connection's ``_connectionMade`` builds the list of its options and
    passes ``pformat`` of it to ``self.log.debug``, a no-op unless txaio's log
    level is debug or trace (wsserver never sets it): measured ~190 µs per
    connect here, about a tenth of an authenticated connect (T11,
    docs/performance.md).  Autobahn reaches ``pformat`` through the
    module-level name of ``autobahn.websocket.protocol``; this replaces that
    name, once, for the whole process, with one that formats a list (that
    dump) only when the debug level is on, and anything else (Autobahn's
    timings, a dict) always, as before.
    """
    formatter = autobahn_protocol.pformat
    if getattr(formatter, "wsserver_lazy", False):
        return

    def pformat(obj: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(obj, list) and txaio.get_global_log_level() not in ("debug", "trace"):
            return OPTIONS_NOT_FORMATTED
        return formatter(obj, *args, **kwargs)

    pformat.wsserver_lazy = True  # type: ignore[attr-defined]
    autobahn_protocol.pformat = pformat


class ExpiryWatch:
    """Closes connections whose token expired, with one timer for all of them."""

    # The heap is rebuilt without closed connections once it holds this many
    # entries, and then at twice what it kept: without that, every connection
    # opened would stay in it until its token expired (TOKEN_TTL, an hour by
    # default), however soon it closed: memory that grew with the connect rate.
    COMPACT_AT = 1024

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, weakref.ref]] = []
        self._seq = 0
        self._call: Any = None
        self._compact_at = self.COMPACT_AT

    def add(self, conn: ServerProtocol, at: float) -> None:
        """Close ``conn`` with 4001 at ``at`` (reactor seconds) if still open."""
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, weakref.ref(conn)))
        if len(self._heap) >= self._compact_at:
            self._compact()
        elif self._heap[0][1] == self._seq:
            self._reschedule()

    def __len__(self) -> int:
        return len(self._heap)

    def _compact(self) -> None:
        """Drop the entries of connections no longer open (amortised O(1) per add)."""
        kept = []
        for entry in self._heap:
            conn = entry[2]()
            if conn is not None and conn.live:
                kept.append(entry)
        heapq.heapify(kept)
        self._heap = kept
        self._compact_at = max(self.COMPACT_AT, 2 * len(kept))
        self._reschedule()

    def _reschedule(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._heap:
            delay = max(0.0, self._heap[0][0] - self._clock.seconds())
            self._call = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            _, _, ref = heapq.heappop(self._heap)
            conn = ref()
            if conn is not None and conn.live:
                conn._close(CLOSE_TOKEN_EXPIRED, "token expired")
        self._reschedule()

    def stop(self) -> None:
        """Cancel the timer (at shutdown)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@implementer(IPushProducer)
class _Flow:
    """Told by the transport when its send buffer is full and when it drained."""

    def __init__(self, conn: ServerProtocol) -> None:
        self._conn = conn

    def pauseProducing(self) -> None:
        self._conn._paused = True

    def resumeProducing(self) -> None:
        self._conn._resumed()

    def stopProducing(self) -> None:
        self._conn._paused = True


class ServerProtocol(WebSocketServerProtocol):
    """One client connection of an authenticated user."""

    factory: ServerFactory

    def __init__(self) -> None:
        super().__init__()
        self._session: Session | None = None
        self._since: int | None = None
        self._attached = False
        self._replaying = True
        self._held: list[tuple[int, Any]] = []  # live frames that came during replay
        self._held_bytes = 0
        self._last_id = 0  # highest message id written: ids only go up per connection
        # Live frames at or below this id are not written: the client said
        # (since) it has them.  The replay is not held to it: it brings every
        # pending message whatever its id (protocol section 6).
        self._live_floor = 0
        self._paused = False
        self._unsent = 0  # bytes written while the transport said it was full
        self._judging = False  # a slowness check is scheduled
        self._waiting: list[defer.Deferred] = []
        self._closed = defer.Deferred()
        self._out: Any = None  # what _write writes to (set when the connection opens)
        self._takes = InTurn("a frame")  # frames waiting for the shared bucket, in order
        self._reads = InTurn("a frame")  # read frames (and refusals behind them), in order

    # -- what the broker sees ---------------------------------------------------

    @property
    def user_id(self) -> str:
        assert self._session is not None
        return self._session.user_id

    @property
    def live(self) -> bool:
        return self._attached and self.state == WebSocketProtocol.STATE_OPEN

    def deliver(self, msg_id: int, frame: bytes, replayed: bool = False) -> bool:
        if not self.live:
            return False
        if replayed:
            # Live frames held below this one go first: the replay's read may
            # have come after they were marked delivered, so it does not bring
            # them itself, and ids only go up on a connection.
            self._release_held(msg_id)
        elif msg_id <= self._live_floor and msg_id > self._last_id:
            # Not written: the client said (since) it has it, or it is still
            # pending and the replay brings it.  Not taken either, so nothing
            # marks it delivered for this connection (the replay, reading
            # after, would not bring it then).
            return False
        elif self._replaying:
            self._held.append((msg_id, frame))
            self._held_bytes += len(frame)
            if self._held_bytes > self.factory._max_outbox_bytes:
                # Live traffic outgrew the outbox while the replay was still
                # being written: like any slow reader, come back with since.
                self._close_slow()
            return True
        if msg_id > self._last_id:
            self._last_id = msg_id
            self._write(frame)
        return True

    def _release_held(self, below: int | None) -> None:
        """Write the held live frames with ids below ``below`` (all with None),
        in id order, each once."""
        if not self._held:
            return
        self._held.sort(key=lambda held: held[0])
        cut = len(self._held)
        if below is not None:
            cut = next((i for i, (msg_id, _) in enumerate(self._held) if msg_id >= below), cut)
        out, self._held = self._held[:cut], self._held[cut:]
        for msg_id, frame in out:
            self._held_bytes -= len(frame)
            if msg_id > self._last_id:
                self._last_id = msg_id
                self._write(frame)

    def notify(self, payload: bytes) -> None:
        if self.live:
            self._send_text(payload)

    def replay_finished(self) -> None:
        self._replaying = False
        if self.live:
            self._release_held(None)
        self._held = []
        self._held_bytes = 0

    def over_cap(self) -> None:
        if self.live:
            self._close(CLOSE_POLICY, "too many connections for this user")

    def writable(self) -> defer.Deferred:
        if not self._paused or not self.live:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def _reading(self, on: bool) -> None:
        """Start or stop reading from the client (writes still go out)."""
        transport = self.transport
        # A TLS transport wraps the TCP one, which is what reads.
        while transport is not None and not hasattr(transport, "pauseProducing"):
            transport = getattr(transport, "transport", None)
        if transport is not None:
            if on:
                transport.resumeProducing()
            else:
                transport.pauseProducing()

    def _when_closed(self) -> defer.Deferred:
        """A Deferred that fires once this connection has closed."""
        d: defer.Deferred = defer.Deferred()
        if self._closed.called:
            d.callback(None)
        else:
            self._closed.addBoth(lambda r: d.callback(None) or r)
        return d

    # -- sending ----------------------------------------------------------------

    def _send_text(self, payload: bytes) -> None:
        """Send one text frame carrying ``payload``."""
        self._write(text_frame(payload))

    def _write(self, frame: bytes) -> None:
        """Write a complete, prepared frame.

        The same bytes as Autobahn's sendPreparedMessage, without its per-write
        debug-log arguments and statistics, which cost more than the write
        itself when one broadcast goes to thousands of connections.  Nothing
        can be waiting in Autobahn's own send queue: it only queues writes
        asked for with ``sync`` or ``chopsize``, and this server asks for none.
        """
        self._out.write(frame)
        if self._paused:
            self._unsent += len(frame)
            if self._unsent > self.factory._max_outbox_bytes and not self._judging:
                # Writes leave on a later reactor turn: judge the client only
                # after the transport has had its chance to flush.
                self._judging = True
                clock = self.factory._clock
                clock.callLater(0, clock.callLater, 0, self._judge_slow)

    def _judge_slow(self) -> None:
        self._judging = False
        if self._paused and self._unsent > self.factory._max_outbox_bytes and self.live:
            self._close_slow()

    def _close_slow(self) -> None:
        self.factory._metrics.slow_closes.inc()
        _log.info("closing slow connection of {user}", user=self.user_id)
        self._close(CLOSE_TRY_LATER, "too slow: outbox full")

    def _resumed(self) -> None:
        self._paused = False
        self._unsent = 0
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _close(self, code: int, reason: str) -> None:
        """Start the closing handshake with any close code (1001, 1008, ...)."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code, reason.encode("utf-8"))
        elif self.state != WebSocketProtocol.STATE_CLOSED:
            self.dropConnection(abort=True)

    def _refuse(self, refusal: Refusal, retry_after_ms: int | None = None) -> None:
        _log.info("refused a message from {user}: {code}", user=self.user_id, code=refusal.code)
        self.factory._metrics.refused(refusal.code)
        if self.live:
            now_ms = int(self.factory._clock.seconds() * 1000)
            frame = system_frame(
                self.user_id, refusal.code, refusal.message, now_ms, refusal.nonce, retry_after_ms
            )
            self._send_text(frame)

    # -- Autobahn callbacks -----------------------------------------------------

    def onConnect(self, request: Any) -> None:
        # Authorised before the upgrade (web.py); nothing is left to decide.
        return None

    def onOpen(self) -> None:
        try:
            self._start()
        except Exception:
            _log.failure("could not open a connection")
            self._close(CLOSE_INTERNAL, "internal error")

    def _start(self) -> None:
        factory = self.factory
        if self._session is None:
            self._close(CLOSE_POLICY, "not authenticated")
            return
        if not factory._accepting:
            self._close(CLOSE_GOING_AWAY, "server shutting down")
            return
        if not factory._broker.attach(self):
            _log.info("refused a connection of {user}: too many", user=self.user_id)
            self._close(CLOSE_POLICY, "too many connections for this user")
            return
        self._attached = True
        self._out = mark_upgraded(self.transport)
        # The HTTP channel registered itself as the producer; take its place,
        # so the transport tells us when its send buffer fills up.
        self.transport.unregisterProducer()
        self.transport.registerProducer(_Flow(self), True)
        factory._expiry.add(self, self._session.expires_at)
        _log.info("connected: {user} from {peer}", user=self.user_id, peer=self.peer)
        factory._metrics.connections_opened.inc()
        auth = factory._auth
        if auth is not None and auth.epoch != self._session.epoch:
            # An account change was handled while this token was being
            # checked: it may have signed the token out or revoked its key
            # before this connection was attached, where the change's handler
            # would have closed it.  Check again; a change from now on finds
            # the connection attached.  Until the check passes the connection
            # reads nothing and is sent nothing (no replay yet): a revoked key
            # must not send or receive in the meantime.
            self._reading(False)
            recheck = auth.recheck(self._session)
            recheck.addCallbacks(self._checked_again, self._refused_after_all)
            return
        self._begin_replay()

    def _begin_replay(self) -> None:
        factory = self.factory
        replay = factory._broker.replay(self, self._since)
        factory._metrics.time_replay(replay, factory._clock)
        replay.addErrback(self._replay_failed)

    def _checked_again(self, _: Any) -> None:
        if not self.live:
            return
        self._reading(True)
        self._begin_replay()

    def _refused_after_all(self, failure: Failure) -> None:
        self._reading(True)  # to read the close reply
        if failure.check(AuthError):
            code, reason = failure.value.close or (CLOSE_KEY_REVOKED, "key revoked")
            _log.info("closing {user}: {why}", user=self.user_id, why=reason)
            self._close(code, reason)
        else:
            _log.failure("checking the token of {user} again failed", failure, user=self.user_id)
            self._close(CLOSE_INTERNAL, "internal error")

    def _replay_failed(self, failure: Failure) -> None:
        _log.failure("replay for {user} failed", failure, user=self.user_id)
        self._close(CLOSE_INTERNAL, "internal error")

    def onMessageEnd(self) -> None:
        # Autobahn's version also fires an observer event ("message"), which
        # costs two futures per frame; nothing here observes it.  It reads
        # Autobahn's message_data, message_is_binary and failedByMe, which is
        # why setup.cfg pins Autobahn below its next major version
        # (canaries: tests/test_seams.py AutobahnCanaryTests).
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.live:
            return
        self.factory._metrics.received += 1
        if isBinary:
            _log.info("closing {user}: binary frame", user=self.user_id)
            self._close(CLOSE_UNSUPPORTED, "binary frames are not supported")
            return
        try:
            # Autobahn's own incremental UTF-8 check is off: per frame it cost
            # more than this decode, which the JSON parser needs anyway.
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            _log.info("closing {user}: invalid UTF-8", user=self.user_id)
            self._close(CLOSE_INVALID_PAYLOAD, "a text frame must be UTF-8")
            return
        taken = self.factory._limiter.take(self.user_id)
        if isinstance(taken, defer.Deferred) or not self._takes.idle:
            self._take_in_turn(taken, payload, text)
            return
        self._after_take(taken, payload, text)

    def _take_in_turn(self, taken: Any, payload: bytes, text: str) -> None:
        """Handle the frame once its token's answer is in and every earlier
        frame was handled: the cluster's shared bucket answers later
        (broker/limits.py), and frames still go on in the order they came."""

        def run() -> defer.Deferred:
            d = taken if isinstance(taken, defer.Deferred) else defer.succeed(taken)
            return d.addCallback(self._after_take, payload, text)

        self._takes.run(run)

    def _after_take(self, wait: float, payload: bytes, text: str) -> None:
        """Handle a frame once its rate-limit token was asked for."""
        if not self.live:
            return
        factory = self.factory
        if wait:
            limiter = factory._limiter
            text = (
                f"rate limit exceeded: {limiter.rate:g} messages/s, burst {limiter.burst};"
                " message not sent"
            )
            self._refuse_in_turn(
                Refusal("rate_limited", text, nonce_from_raw(payload)),
                retry_after_ms=math.ceil(wait * 1000),
            )
            return
        try:
            control = parse_control_frame(text)
        except Refusal as refusal:
            self._refuse_in_turn(refusal)
            return
        if control is not None:
            self._on_control(control)
            return
        try:
            draft = parse_client_frame(text, self.user_id, factory._max_content_bytes)
            verification = verification_of(self.user_id, draft, self._session.verify_key)
            if verification == INVALID_SIGNATURE:
                raise Refusal("invalid_signature", "the signature is not valid", draft.nonce)
            if verification == UNSIGNED and factory._require_signatures:
                raise Refusal("signature_required", "messages must be signed", draft.nonce)
        except Refusal as refusal:
            self._refuse(refusal)
            return
        new = NewMessage(
            self.user_id,
            draft.recipient,
            draft.content,
            draft.signature,
            draft.nonce,
            verification,
            int(factory._clock.seconds() * 1000),
            self._session.key_id if verification == VERIFIED else None,
        )
        d = factory._store.add_message(new)
        d.addCallbacks(self._stored, self._not_stored, (draft,), None, (draft,))
        d.addErrback(self._failed_after_store)

    # -- read and watch frames (protocol section 13) ------------------------------

    def _on_control(self, frame: ReadFrame | WatchFrame) -> None:
        if isinstance(frame, WatchFrame):
            d = self.factory._presence.watch(self, list(frame.users))
            d.addErrback(self._control_failed, "watch")
            return
        # Reads go one after the other, and a refusal decided on sight waits
        # for the reads before it, so the client gets their answers in the
        # order it sent the frames.
        self._reads.run(lambda: self._on_read(frame).addErrback(self._control_failed, "read"))

    def _refuse_in_turn(self, refusal: Refusal, retry_after_ms: int | None = None) -> None:
        """``_refuse``, after the read frames still being handled (if any)."""
        if self._reads.idle:
            self._refuse(refusal, retry_after_ms)
        else:
            self._reads.run(lambda: self._refuse(refusal, retry_after_ms))

    def _on_read(self, frame: ReadFrame) -> defer.Deferred:
        store = self.factory._store
        now_ms = int(self.factory._clock.seconds() * 1000)
        # The delivered marks this node queued are committed first: a message
        # handed over a moment ago may be read at once.
        d = store.drain()
        d.addBoth(lambda _: store.record_read(self.user_id, frame.msg_id, now_ms))
        d.addCallback(self._read_recorded, frame.msg_id, now_ms)
        return d

    def _read_recorded(self, outcome: tuple[str, Any], msg_id: int, now_ms: int) -> None:
        kind, sender = outcome
        if kind == READ:
            self.factory._broker.read_receipt(msg_id, sender, self.user_id, now_ms)
        elif kind == NOT_RECEIVED:
            self._refuse(Refusal("invalid_message", f"no message {msg_id} was received by you"))

    def _control_failed(self, failure: Failure, what: str) -> None:
        _log.failure("a {what} frame of {user} failed", failure, what=what, user=self.user_id)
        self._refuse(Refusal("internal_error", f"the {what} frame could not be handled"))

    def _stored(self, outcome: tuple[str, Any], draft: Draft) -> None:
        kind, msg = outcome
        if kind == NO_RECIPIENT:
            self._refuse(Refusal("unknown_recipient", "no such recipient", draft.nonce))
        elif kind == NOT_A_MEMBER:
            self._refuse(Refusal("not_a_member", "you are not a member of this group", draft.nonce))
        elif kind == DUPLICATE:
            if msg.recipient == draft.recipient and msg.content == draft.content:
                if is_group_id(msg.recipient):
                    d = self.factory._store.group_status(msg.id, msg.recipient, msg.sender)
                    d.addCallback(self._ack_group_again, msg)
                    d.addErrback(self._failed_after_store)
                elif self.live:
                    self._send_text(ack_frame(msg))
            else:
                self._refuse(
                    Refusal("nonce_reused", "this nonce belongs to another message", draft.nonce)
                )
        else:
            self.factory._metrics.stored(msg.recipient)
            msg = self.factory._broker.publish(self, msg)
            if self.live:
                self._send_text(ack_frame(msg))

    def _ack_group_again(self, counts: tuple[int, int], msg: Message) -> None:
        """A resent group message: the first one's ack, with its members and
        recipients as they stand now (members reached, members still waiting)."""
        recipients, waiting = counts
        msg.recipients = recipients
        if waiting == 0:
            msg.status = "delivered"
        if self.live:
            self._send_text(ack_frame(msg, members=recipients + waiting))

    def _not_stored(self, failure: Failure, draft: Draft) -> None:
        # The store has logged the cause; the sender learns it was not stored.
        self._refuse(
            Refusal(
                "internal_error", "the message could not be stored; it was not sent", draft.nonce
            )
        )

    def _failed_after_store(self, failure: Failure) -> None:
        _log.failure("delivery after commit failed", failure)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._attached:
            self._attached = False
            self.factory._broker.detach(self)
            self.factory._presence.forget(self)
            _log.info("closed: {user} code={code}", user=self.user_id, code=code)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        if not self._closed.called:
            self._closed.callback(None)


class ServerFactory(WebSocketServerFactory):
    """Builds ``ServerProtocol``s and holds what they share."""

    protocol = ServerProtocol

    def __init__(
        self,
        *,
        store: Store,
        broker: IBroker,
        limiter: RateLimiter,
        clock: IReactorTime,
        max_content_bytes: int,
        max_frame_bytes: int,
        max_outbox_bytes: int,
        require_signatures: bool,
        metrics: Metrics = DISCARD,
        auth: Authenticator | None = None,
        auto_ping_interval: float = 30.0,
        auto_ping_timeout: float = 10.0,
        presence: str = CONTACTS,
    ) -> None:
        super().__init__(server="wsserver")
        # Every attribute of ours is private: Autobahn's factory (and the
        # protocol, which sees it as ``self.factory``) already uses plain names
        # such as ``server`` and ``log``, and may add more.
        self._store = store
        self._broker = broker
        self._limiter = limiter
        self._clock = clock
        self._expiry = ExpiryWatch(clock)
        self._max_content_bytes = max_content_bytes
        self._max_outbox_bytes = max_outbox_bytes
        self._require_signatures = require_signatures
        self._metrics = metrics
        self._auth = auth  # checks a token again when an account changed meanwhile
        self._accepting = True
        # Who watches whom (protocol section 13): the broker reports changes.
        self._presence = PresenceHub(
            clock,
            presence,
            lambda users: self._broker.presence_of(users),
            lambda user, candidates: self._store.contacts_among(user, candidates),
        )
        if broker is not None:
            broker.presence_listener = self._presence.changed
        self._admitting: tuple[Session, int | None] | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame_bytes,
            maxMessagePayloadSize=max_frame_bytes,
            autoPingInterval=auto_ping_interval,
            autoPingTimeout=auto_ping_timeout,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            utf8validateIncoming=False,  # onMessage decodes (and closes 1007)
            failByDrop=False,
            perMessageCompressionAccept=lambda offers: None,
            tcpNoDelay=True,
        )

    def admit(self, session: Session, since: int | None, upgrade: Callable[[], Any]) -> Any:
        """Run ``upgrade`` (which builds the protocol) for this session."""
        self._admitting = (session, since)
        try:
            return upgrade()
        finally:
            self._admitting = None

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        proto = super().buildProtocol(addr)
        if self._admitting is not None:
            proto._session, proto._since = self._admitting
            # The client has everything up to since but what is still pending,
            # which the replay brings: a live frame at or below since (a
            # publication that reached this node late, in a cluster) is not
            # written again.
            proto._live_floor = proto._since or 0
        return proto

    def presence_hub(self) -> PresenceHub:
        """Who watches whom on this node (told of group and account events)."""
        return self._presence

    def close_user(self, user_id: str, code: int, reason: str) -> int:
        """Close every connection of ``user_id`` on this node with ``code`` (an
        account event: 4003 for a deleted account); return how many."""
        return self._close_where(lambda conn: conn.user_id == user_id, code, reason)

    def close_key(self, user_id: str, key_id: str, code: int, reason: str) -> int:
        """Close the connections of ``user_id`` that logged in with ``key_id``
        (it was revoked: 4003); return how many."""
        return self._close_where(
            lambda conn: conn.user_id == user_id and conn._session.key_id == key_id, code, reason
        )

    def close_token(self, user_id: str, jti: str, code: int, reason: str) -> int:
        """Close the connections opened with the token ``jti`` (signed out:
        4004); return how many."""
        return self._close_where(
            lambda conn: conn.user_id == user_id and conn._session.jti == jti, code, reason
        )

    def close_older(self, user_id: str, gen: int | None, code: int, reason: str) -> int:
        """Close the connections of ``user_id`` whose token's generation is below
        ``gen`` (every one when None): the user signed out everywhere (4004)."""
        return self._close_where(
            lambda conn: conn.user_id == user_id and (gen is None or conn._session.gen < gen),
            code,
            reason,
        )

    def forget_presence(self, user_id: str) -> defer.Deferred:
        """``user_id`` was deleted: their last-seen time goes (section 12),
        from the watchers' view here and from the broker."""
        self._presence.forget_user(user_id)
        return self._broker.forget_presence(user_id)

    def _close_where(self, which: Callable[[Any], bool], code: int, reason: str) -> int:
        closing = [conn for conn in self._broker.connections() if which(conn)]
        for conn in closing:
            conn._close(code, reason)
        return len(closing)

    @defer.inlineCallbacks
    def shut_down(self) -> Any:
        """Stop taking frames, commit what was received, close every connection with 1001."""
        self._accepting = False
        self._expiry.stop()
        self._presence.stop()
        conns = list(self._broker.connections())
        for conn in conns:
            conn._reading(False)
        yield self._store.drain()
        closed = []
        for conn in conns:
            closed.append(conn._when_closed())
            conn._close(CLOSE_GOING_AWAY, "server shutting down")
            conn._reading(True)  # to read the close replies
        yield defer.DeferredList(closed)
