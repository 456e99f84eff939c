"""``GET /messages`` and ``GET /conversations`` (protocol section 13,
History): a caller's conversation a page at a time, and the list of their
conversations.

Both take the token in ``Authorization: Bearer`` only and check it as the
WebSocket gate does (signed out, key revoked or account deleted: 401).
Their query is parsed here from the raw request target, strictly: each
parameter at most once, known names only, values percent-decoded as UTF-8
and then checked against their alphabet; anything else is 400
``invalid_request``.  Every request takes a token from the per-IP bucket of
``/auth/*`` (``AUTH_RATE_LIMIT``, ``AUTH_BURST_LIMIT``): 429 with
``Retry-After`` when it is empty.  Reading changes nothing stored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from twisted.internet import defer
from twisted.web import server

from .auth import Authenticator
from .messages import BROADCAST, Message, format_timestamp, is_group_id, is_user_id
from .ratelimit import RateLimiter
from .store.history import ID_MAX, PageReads
from .web import HttpError, JsonResource, _header_token

MAX_PAGE = 200  # messages of one page, and conversations of the list
DEFAULT_PAGE = 50
MAX_QUERY_BYTES = 1024  # a longer query string is refused before parsing

_DIGITS = re.compile(r"[0-9]{1,19}")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_QUERY_BYTES = re.compile(rb"[\x21-\x7e]*")  # printable ASCII but space


def parse_query(uri: bytes, allowed: frozenset[str]) -> dict[str, str]:
    """The parameters of ``uri``'s query, by name, or ``HttpError``
    ``invalid_request``: a name not in ``allowed``, a name given twice, a
    part without ``=``, an empty value, a ``%`` not followed by two hex
    digits, bytes that are not UTF-8, or control characters."""
    query = uri.partition(b"?")[2]
    if len(query) > MAX_QUERY_BYTES:
        raise HttpError("invalid_request", f"the query is longer than {MAX_QUERY_BYTES} bytes")
    if not _QUERY_BYTES.fullmatch(query):
        raise HttpError("invalid_request", "the query holds a byte that is not printable ASCII")
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split(b"&"):
        raw_name, eq, raw_value = part.partition(b"=")
        name = _decode(raw_name)
        if name not in allowed:
            raise HttpError("invalid_request", "unknown query parameter")
        if not eq or not raw_value:
            raise HttpError("invalid_request", f"{name} needs a value")
        if name in params:
            raise HttpError("invalid_request", f"{name} is given more than once")
        params[name] = _decode(raw_value)
    return params


def _decode(raw: bytes) -> str:
    """Percent-decode ``raw`` strictly (``+`` stays ``+``: no form encoding)."""
    if raw.count(b"%") != len(_PERCENT.findall(raw)):
        raise HttpError("invalid_request", "a % must be followed by two hex digits")
    data = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError("invalid_request", "the query is not UTF-8") from None
    if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in text):
        raise HttpError("invalid_request", "the query holds a control character")
    return text


def _number(params: dict[str, str], name: str, low: int, high: int, default: Any) -> Any:
    value = params.get(name)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise HttpError("invalid_request", f"{name} must be an integer from {low} to {high}")
    return int(value)


def history_frame(msg: Message, user_id: str, reads: PageReads) -> bytes:
    """A stored message as the ``message`` frame of section 3, with the
    status it has now (a message the caller sent may still be ``pending``)
    and its receipts: ``read_by`` on the caller's own direct and group
    messages, ``read`` on the others' (protocol.md section 15)."""
    if msg.sender != user_id:
        mark = b'"read":true,' if msg.id in reads.read else b'"read":false,'
    elif msg.recipient != BROADCAST:
        mark = b'"read_by":' + json.dumps(reads.readers.get(msg.id, [])).encode() + b","
    else:
        mark = b""
    head = b'{"type":"message","status":"' + msg.status.encode("ascii") + b'",'
    return head + mark + msg.encoded()[1:]


class _Authenticated(JsonResource):
    """A GET whose caller is the Bearer token's user, rate limited per IP."""

    handlers = {b"GET": "get"}

    def __init__(self, auth: Authenticator, store: Any, limiter: RateLimiter) -> None:
        super().__init__()
        self._auth = auth
        self._store = store
        self._limiter = limiter

    @defer.inlineCallbacks
    def _caller(self, request: server.Request) -> Any:
        address = request.getClientAddress()
        wait = self._limiter.take(getattr(address, "host", str(address)))
        if wait:
            self._auth.metrics.rate_limited_auth.inc()
            retry = str(max(1, math.ceil(wait))).encode("ascii")
            raise HttpError("rate_limited", "too many requests", {b"retry-after": retry})
        token = _header_token(request)
        if token is None:
            raise HttpError("unauthorized", "the token goes in 'Authorization: Bearer <token>'")
        session = yield self._auth.session(token)
        return session.user_id


class Messages(_Authenticated):
    """GET /messages?with=&before=&limit=: a page of one conversation."""

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        user_id = yield self._caller(request)
        params = parse_query(request.uri, frozenset({"with", "before", "limit"}))
        peer = params.get("with")
        if peer is None:
            raise HttpError("invalid_request", "with is required")
        if not (peer == BROADCAST or is_user_id(peer) or is_group_id(peer)):
            raise HttpError("invalid_request", "with must be a user id, a group id or broadcast")
        before = _number(params, "before", 0, ID_MAX, None)
        limit = _number(params, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        # The delivered marks this node queued are committed first, so a page
        # read just after an ack never shows an older status than the ack.
        yield self._store.drain()
        page = yield self._store.history(user_id, peer, before, limit)
        if page is None:
            if is_group_id(peer):
                raise HttpError("unknown_group", "no such group, or not one of yours")
            raise HttpError("unknown_user", "no such user")
        messages, more, reads = page
        body = b",".join(history_frame(m, user_id, reads) for m in messages)
        return 200, b'{"messages":[' + body + b'],"more":' + (b"true" if more else b"false") + b"}"


class Conversations(_Authenticated):
    """GET /conversations[?limit=]: the caller's conversations, newest first."""

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        user_id = yield self._caller(request)
        params = parse_query(request.uri, frozenset({"limit"}))
        limit = _number(params, "limit", 1, MAX_PAGE, MAX_PAGE)
        rows = yield self._store.conversations(user_id, limit)
        return 200, {
            "conversations": [
                {"with": peer, "last_id": last_id, "last_timestamp": format_timestamp(ms)}
                for peer, last_id, ms in rows
            ]
        }
