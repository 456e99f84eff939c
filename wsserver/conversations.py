"""The client's side of protocol section 13: history, conversations, groups,
read receipts and presence, as a mixin of ``client.Client``.

    page = yield client.history("bob", limit=20)      # newest first
    for frame, verified in page.messages: ...
    if page.more: page = yield client.history("bob", before=page.oldest)
    yield client.create_group("#team", "Team", ["bob", "carol"])
    client.on_presence = lambda frame: print(frame["user"], frame["online"])
    client.watch(["bob"])
    client.read(42)

Every message of a history page is checked locally against its sender's
key for its ``key_id`` (the checked key log), exactly as a received one is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode

from twisted.internet import defer

from .messages import is_group_id, is_user_id

MAX_WATCHED = 256  # users in one watch frame (protocol section 13)
MAX_PAGE = 200  # messages in one history page
# Read receipts cost a token of the same bucket as messages (5/s, burst 10
# by default): they go out at most this many a second, so marking a long
# replay read never starves the user's own messages.
READ_INTERVAL = 0.5  # seconds between two read frames
MAX_QUEUED_READS = 1000  # the oldest waiting receipts are dropped past this


class Page(NamedTuple):
    """A page of history, newest first as the server sends it:
    ``messages`` are ``(frame, verified)`` pairs (``verified`` as for
    ``on_message``: True, False, or None when unsigned); ``more`` says an
    older page exists (ask with ``before=page.oldest``)."""

    messages: list[tuple[dict, bool | None]]
    more: bool

    @property
    def oldest(self) -> int | None:
        """The id of the page's oldest message (None for an empty page)."""
        return self.messages[-1][0]["id"] if self.messages else None


def group_id(text: str) -> str:
    """``text`` as a group id: ``team`` and ``#team`` are both ``#team``.
    ValueError when it is not one."""
    gid = text if text.startswith("#") else "#" + text
    if not is_group_id(gid):
        raise ValueError(
            f"{text!r} is not a group id: # and 1 to 64 of the letters A-Z a-z, digits and _ . -"
        )
    return gid


def _segment(value: str) -> str:
    """An id as one URL path segment (``#`` as ``%23``)."""
    return quote(value, safe="")


class ConversationsMixin:
    """History, groups, receipts and presence for ``Client`` (which provides
    ``_request``, ``login``, ``token``, ``_verify``, ``_send_frame`` and
    ``_reactor``)."""

    def _init_conversations(self) -> None:
        # on_presence(frame): {"type": "presence", "user", "online", "since"}.
        self.on_presence: Callable[[dict], Any] | None = None
        # on_group(frame): {"type": "group", "group_id", "event", "user_id", ...}.
        self.on_group: Callable[[dict], Any] | None = None
        # on_read(frame): {"type": "status", "id", "status": "read", "by", ...};
        # without it such frames go to on_status like other statuses.
        self.on_read: Callable[[dict], Any] | None = None
        self._watching: list[str] | None = None  # sent again on every reconnect
        self._reads: deque[int] = deque(maxlen=MAX_QUEUED_READS)
        self._read_timer: Any = None

    # -- HTTP ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def _authed(self, method: bytes, path: str, body: dict | None = None) -> Any:
        """A request with this client's token, logging in first if it has
        none, and once again if the server says the token is no longer good
        (expired, or signed out elsewhere)."""
        if self.token is None:
            yield self.login()
        try:
            return (yield self._request(method, path, body, token=self.token))
        except Exception as err:  # client.ServerError: not imported, client imports this
            if getattr(err, "status", None) != 401:
                raise
        yield self.login()
        return (yield self._request(method, path, body, token=self.token))

    @defer.inlineCallbacks
    def history(self, with_: str, before: int | None = None, limit: int | None = None) -> Any:
        """A page of this user's conversation with ``with_`` (a user id, a
        group id or ``broadcast``): a ``Page``, newest first, each message
        checked against its sender's key.  ``ServerError`` (``unknown_user``,
        ``unknown_group``, ``invalid_request``) when the server refuses."""
        if not (is_user_id(with_) or is_group_id(with_)):
            raise ValueError(f"{with_!r} is not a user id, a group id or broadcast")
        query = [("with", with_)]
        if before is not None:
            query.append(("before", str(int(before))))
        if limit is not None:
            if not 1 <= int(limit) <= MAX_PAGE:
                raise ValueError(f"limit must be from 1 to {MAX_PAGE}")
            query.append(("limit", str(int(limit))))
        reply = yield self._authed(b"GET", "/messages?" + urlencode(query, quote_via=quote))
        frames = [m for m in reply.get("messages") or () if isinstance(m, dict)]
        checked = []
        for frame in frames:
            checked.append((frame, (yield self._verify(frame))))
        return Page(checked, bool(reply.get("more")))

    @defer.inlineCallbacks
    def conversations(self, limit: int | None = None) -> Any:
        """This user's conversations, most recent first: a list of
        ``{"with", "last_id", "last_timestamp"}``."""
        path = "/conversations" + (f"?limit={int(limit)}" if limit is not None else "")
        reply = yield self._authed(b"GET", path)
        return [c for c in reply.get("conversations") or () if isinstance(c, dict)]

    def create_group(self, group_id: str, name: str, members: Iterable[str] = ()) -> defer.Deferred:
        """Create a group owned by this user, with ``members`` besides it;
        fires with the group (``{"group_id", "name", "owner", "members",
        "created_at"}``)."""
        body = {"group_id": group_id, "name": name, "members": list(members)}
        return self._authed(b"POST", "/groups", body)

    def group(self, group_id: str) -> defer.Deferred:
        """One group this user is in (``unknown_group`` otherwise)."""
        return self._authed(b"GET", f"/groups/{_segment(group_id)}")

    @defer.inlineCallbacks
    def groups(self) -> Any:
        """The groups this user is in: a list of groups."""
        reply = yield self._authed(b"GET", "/groups")
        return [g for g in reply.get("groups") or () if isinstance(g, dict)]

    def add_member(self, group_id: str, user_id: str) -> defer.Deferred:
        """Add ``user_id`` to a group this user owns; fires with the group."""
        path = f"/groups/{_segment(group_id)}/members"
        return self._authed(b"POST", path, {"user_id": user_id})

    def remove_member(self, group_id: str, user_id: str) -> defer.Deferred:
        """Remove ``user_id`` from a group (the owner may remove anyone, a
        member themself)."""
        path = f"/groups/{_segment(group_id)}/members/{_segment(user_id)}"
        return self._authed(b"DELETE", path)

    def leave(self, group_id: str) -> defer.Deferred:
        """Leave a group."""
        return self.remove_member(group_id, self.user_id)

    # -- WebSocket: read receipts and presence ------------------------------------

    def read(self, msg_id: int) -> None:
        """Tell the sender that message ``msg_id`` was read (a ``read``
        frame).  Receipts wait while the connection is down and go out at
        most one per READ_INTERVAL; the server answers nothing, or a
        ``system`` frame ``invalid_message`` (on_system) for a message this
        user never received."""
        self._reads.append(int(msg_id))
        self._pump_reads()

    def _pump_reads(self) -> None:
        if self._read_timer is not None or not self._reads:
            return
        if not self._send_frame({"type": "read", "id": self._reads[0]}):
            return  # not connected: sent after the next connect
        self._reads.popleft()
        self._read_timer = self._reactor.callLater(READ_INTERVAL, self._read_tick)

    def _read_tick(self) -> None:
        self._read_timer = None
        self._pump_reads()

    def _stop_reads(self) -> None:
        if self._read_timer is not None and self._read_timer.active():
            self._read_timer.cancel()
        self._read_timer = None

    def watch(self, users: Iterable[str]) -> None:
        """Watch these users' presence (replacing the list; empty stops):
        the server sends one ``presence`` frame per user at once and on every
        change (on_presence).  The list is sent again after a reconnect."""
        users = list(users)
        if len(users) > MAX_WATCHED:
            raise ValueError(f"at most {MAX_WATCHED} users can be watched")
        for user in users:
            if not is_user_id(user):
                raise ValueError(f"{user!r} is not a user id")
        self._watching = users
        self._send_frame({"type": "watch", "users": users})

    def _conversations_opened(self) -> None:
        """A connection opened: send the watch list again, resume receipts."""
        if self._watching is not None:
            self._send_frame({"type": "watch", "users": self._watching})
        self._pump_reads()

    def _conversation_frame(self, frame: dict) -> bool:
        """Dispatch a section 13 frame; False if ``frame`` is none of them."""
        kind = frame.get("type")
        if kind == "presence":
            if self.on_presence:
                self.on_presence(frame)
        elif kind == "group":
            if self.on_group:
                self.on_group(frame)
        elif kind == "status" and frame.get("status") == "read" and self.on_read:
            self.on_read(frame)
        else:
            return False
        return True
