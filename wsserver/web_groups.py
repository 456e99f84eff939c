"""The HTTP side of groups (protocol section 13): ``/groups``.

``POST /groups`` creates a group, ``GET /groups`` lists the caller's,
``GET /groups/{id}`` shows one to its members, ``POST /groups/{id}/members``
adds a member (the owner), ``DELETE /groups/{id}/members/{user_id}`` removes
one (the owner, or the member themself: leaving).  Every request carries
``Authorization: Bearer <token>``, checked before anything else about the
request (its body, the ids in its path: a caller without a valid token gets
401 whatever else is wrong), and is limited per client IP like ``/auth/*``.
A group id in a path is percent-encoded (``%23team``): a path
segment that is not (a raw ``#`` never reaches a server; a segment without
the ``%23``) is 400 ``invalid_request``.

A change is an account event (``store.groups.EVENT_GROUP``), handed to
``announce`` before the answer goes out: this node sends the ``group``
frames at once, the others when they poll (wsserver/events.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web import server
from twisted.web.resource import Resource

from .auth import Authenticator
from .messages import format_timestamp, is_group_id, is_user_id, normalize_username
from .ratelimit import RateLimiter
from .store.groups import EVENT_GROUP, MAX_MEMBERS, Group, GroupError
from .web import (
    Announce,
    HttpError,
    JsonResource,
    NotFound,
    _header_token,
    _no_foreign_body,
    _Refused,
    read_json,
)

MAX_PATH_SEGMENT = 256  # bytes of a percent-encoded id, before decoding


def group_json(group: Group) -> dict[str, Any]:
    """A group as the API shows it."""
    return {
        "group_id": group.group_id,
        "name": group.name,
        "owner": group.owner,
        "members": list(group.members),
        "created_at": format_timestamp(group.created_ms),
    }


def _refused(failure: Any) -> Any:
    """A ``GroupError`` as the HTTP error of the same code."""
    failure.trap(GroupError)
    raise HttpError(failure.value.code, failure.value.message)


@dataclass(frozen=True, slots=True)
class Needs:
    """What the group resources use: the store, the authenticator (tokens),
    the clock and the node's ``announce``."""

    store: Any
    auth: Authenticator
    clock: IReactorTime
    announce: Announce


class _Authed(JsonResource):
    """A resource whose handlers need the caller: ``self._caller(request)``
    fires with the user id of the Bearer token."""

    def __init__(self, needs: Needs) -> None:
        super().__init__()
        self._needs = needs
        self._store = needs.store
        self._auth = needs.auth
        self._announce = needs.announce

    def _now_ms(self) -> int:
        return int(self._needs.clock.seconds() * 1000)

    @defer.inlineCallbacks
    def _caller(self, request: server.Request) -> Any:
        token = _header_token(request)
        if token is None:
            raise HttpError("unauthorized", "the token goes in 'Authorization: Bearer <token>'")
        session = yield self._auth.session(token)
        return session.user_id


def _user_field(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_user_id(value):
        raise HttpError("invalid_request", f"{what} must be a user_id")
    return value


class GroupList(_Authed):
    """``/groups``: POST creates, GET lists the caller's groups."""

    isLeaf = False
    handlers = {b"GET": "get", b"POST": "post"}

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return GroupItem(self._needs, _raw_segment(request, 1))

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        caller = yield self._caller(request)
        _no_foreign_body(request)
        groups = yield self._store.user_groups(caller)
        return 200, {"groups": [group_json(g) for g in groups]}

    @defer.inlineCallbacks
    def post(self, request: Any) -> Any:
        caller = yield self._caller(request)
        body = read_json(request)
        group_id = body.get("group_id")
        if not is_group_id(group_id):
            raise HttpError(
                "invalid_request", "group_id must be '#' and 1 to 64 of A-Z a-z 0-9 _ . -"
            )
        try:
            name = normalize_username(body.get("name"))
        except ValueError as exc:
            raise HttpError(
                "invalid_request", "name: " + str(exc).replace("username", "name")
            ) from None
        members = body.get("members", [])
        if not isinstance(members, list):
            raise HttpError("invalid_request", "members must be a list of user_ids")
        if len(members) > MAX_MEMBERS - 1:
            raise HttpError(
                "invalid_request", f"a group has at most {MAX_MEMBERS} members, the owner included"
            )
        for member in members:
            _user_field(member, "each of members")
        if len(set(members)) != len(members):
            raise HttpError("invalid_request", "members lists a user twice")
        if caller in members:
            raise HttpError("invalid_request", "members must not list the caller (the owner)")
        d = self._store.create_group(group_id, name, caller, members, self._now_ms())
        group, detail = yield d.addErrback(_refused)
        yield self._announce(EVENT_GROUP, caller, detail)
        return 201, group_json(group)


def _raw_segment(request: server.Request, index: int) -> bytes:
    """The ``index``-th segment after ``/groups`` as the client sent it (Twisted
    hands ``getChild`` the decoded one)."""
    parts = request.path.split(b"?")[0].split(b"/")[2:]
    return parts[index - 1] if len(parts) >= index else b""


def _group_id(raw: bytes) -> str:
    """The group id a raw path segment names, or ``HttpError`` 400."""
    if len(raw) > MAX_PATH_SEGMENT:
        raise HttpError("invalid_request", "the group id in the path is too long")
    if not raw[:3].lower() == b"%23":
        raise HttpError(
            "invalid_request", "a group id in a path starts with '#', percent-encoded: %23"
        )
    try:
        value = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError("invalid_request", "the group id in the path is not UTF-8") from None
    if not is_group_id(value):
        raise HttpError("invalid_request", "a group id is '#' and 1 to 64 of A-Z a-z 0-9 _ . -")
    return value


class GroupItem(_Authed):
    """``/groups/{id}``: GET (members only); its child ``members``."""

    isLeaf = False
    handlers = {b"GET": "get"}

    def __init__(self, needs: Needs, raw: bytes) -> None:
        super().__init__(needs)
        self._raw = raw

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"members":
            return Members(self._needs, self._raw, _raw_segment(request, 3))
        return NotFound()

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        caller = yield self._caller(request)
        group_id = _group_id(self._raw)
        _no_foreign_body(request)
        group = yield self._store.get_group(group_id)
        if group is None or caller not in group.members:
            raise HttpError("unknown_group", f"no such group: {group_id}")
        return 200, group_json(group)


class Members(_Authed):
    """``/groups/{id}/members``: POST adds one (owner); ``/members/{user_id}``:
    DELETE removes one (owner, or themself)."""

    isLeaf = True
    handlers = {b"POST": "post", b"DELETE": "delete"}

    def __init__(self, needs: Needs, raw: bytes, user: bytes) -> None:
        super().__init__(needs)
        self._raw = raw
        self._user = user

    def render(self, request: server.Request) -> Any:
        # One segment after members at most: POST on the collection, DELETE
        # on a member.
        method = request.method
        extra = request.postpath
        if len(extra) > 1 or (method == b"POST" and extra) or (method == b"DELETE" and not extra):
            if method in (b"POST", b"DELETE") and len(extra) <= 1:
                allow = b"DELETE" if extra else b"POST"
                return _Refused(
                    HttpError("method_not_allowed", f"use {allow.decode()}", {b"allow": allow})
                ).render(request)
            return NotFound().render(request)
        # This instance serves this one request: the base class refuses a
        # leaf with a postpath, which DELETE has (the user id).
        self.isLeaf = False
        return super().render(request)

    @defer.inlineCallbacks
    def post(self, request: Any) -> Any:
        caller = yield self._caller(request)
        group_id = _group_id(self._raw)
        body = read_json(request)
        user_id = _user_field(body.get("user_id"), "user_id")
        d = self._store.add_group_member(group_id, caller, user_id, self._now_ms())
        group, detail = yield d.addErrback(_refused)
        yield self._announce(EVENT_GROUP, user_id, detail)
        return 200, group_json(group)

    @defer.inlineCallbacks
    def delete(self, request: Any) -> Any:
        caller = yield self._caller(request)
        group_id = _group_id(self._raw)
        try:
            user_id = unquote_to_bytes(self._user).decode("utf-8")
        except UnicodeDecodeError:
            user_id = ""
        _user_field(user_id, "the user_id in the path")
        _no_foreign_body(request)
        # This node's queued cursor moves first: the removal then sees every
        # member this node handed a message to (and settles what only the
        # removed member still waits for).
        yield self._store.drain()
        d = self._store.remove_group_member(group_id, caller, user_id, self._now_ms())
        _, detail = yield d.addErrback(_refused)
        yield self._announce(EVENT_GROUP, user_id, detail)
        return 200, {"group_id": group_id, "user_id": user_id, "removed": True}


class GroupsTree(GroupList):
    """``/groups``, limited per client IP (``AUTH_RATE_LIMIT``, like ``/auth``)."""

    def __init__(self, needs: Needs, limiter: RateLimiter) -> None:
        super().__init__(needs)
        self._limiter = limiter

    def getChildWithDefault(self, path: bytes, request: server.Request) -> Resource:
        refused = self._limited(request)
        return refused or super().getChildWithDefault(path, request)

    def render(self, request: server.Request) -> Any:
        refused = self._limited(request)
        if refused is not None:
            return refused.render(request)
        return super().render(request)

    def _limited(self, request: server.Request) -> Resource | None:
        # One of getChildWithDefault and render runs per request: one token.
        address = request.getClientAddress()
        wait = self._limiter.take(getattr(address, "host", str(address)))
        if not wait:
            return None
        retry = str(max(1, math.ceil(wait))).encode("ascii")
        return _Refused(HttpError("rate_limited", "too many requests", {b"retry-after": retry}))


__all__ = ["GroupsTree", "Needs", "group_json"]
