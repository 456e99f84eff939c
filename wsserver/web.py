"""The HTTP side: a plain twisted.web ``Resource`` tree.

``/`` and ``/static/*`` (the web client), ``/auth/register``, ``/auth/login``,
``/auth/logout``, ``/auth/users/{id}`` (GET, DELETE) and its ``keylog`` (GET,
POST), ``/info``, ``/health``, and ``/ws``, the gate that checks Origin,
``since`` and the token before handing the connection to Autobahn.  Every
error is one JSON shape whose ``code`` maps to a status through
``ERROR_STATUS``.

A change to an account made here (a key revoked, a sign-out, a deletion) is
handed to ``announce`` before the answer goes out: the node applies it to its
own connections at once (closing them with 4003 or 4004); the other nodes
learn it from the account events (wsserver/events.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from . import __version__
from .auth import Authenticator, AuthError, Change, public_user
from .internals import release_upgraded_request
from .keylog import entry_json
from .messages import InvalidJSON, dumps, format_timestamp, loads_object
from .ratelimit import RateLimiter
from .websocket import ServerFactory

_log = Logger()

MAX_BODY_BYTES = 16 * 1024

ERROR_STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "invalid_signature": 401,
    "no_challenge": 401,
    "forbidden_origin": 403,
    "not_found": 404,
    "unknown_user": 404,
    "unknown_group": 404,
    "method_not_allowed": 405,
    "user_exists": 409,
    "keylog_conflict": 409,
    "key_exists": 409,
    "last_key": 409,
    "too_many_keys": 409,
    "group_exists": 409,
    "already_member": 409,
    "group_full": 409,
    "too_many_groups": 409,
    "not_owner": 403,
    "not_a_member": 404,
    "request_too_large": 413,
    "unsupported_media_type": 415,
    "upgrade_required": 426,
    "rate_limited": 429,
    "internal_error": 500,
}

_PHRASES = {426: b"Upgrade Required"}  # Twisted knows the others
# Query parameters the access log names, and the values it shows of them: a
# ``since`` of digits, a ``verify`` flag.  Every other value (the token's,
# however it is spelt, or a token put where a number belongs) is REDACTED,
# and every other name is OTHER_PARAM (a name can hold a token too).
_SHOWN_VALUES = {
    b"since": re.compile(rb"[0-9]{1,18}"),
    b"verify": re.compile(rb"(?i)true|false|1|0|yes|no"),
}
_NAMED_PARAMS = frozenset({*_SHOWN_VALUES, b"token"})
REDACTED = "<redacted>"
OTHER_PARAM = "<other>"
# At most this many characters of a path and of a rebuilt query reach a log
# line; a longer one is cut and says by how much.
MAX_LOGGED_URI = 512
_TRUE = {b"true", b"1", b"yes"}
_FALSE = {b"false", b"0", b"no"}


class HttpError(Exception):
    """An HTTP refusal: ``code`` from ``ERROR_STATUS`` and a message for people."""

    def __init__(self, code: str, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


# The Server header of every response (the WebSocket factory sends the same on
# its 101): the name, never a version an attacker could match to a flaw.
SERVER_HEADER = b"wsserver"


class _Gone:
    """Set when ``notifyFinish()`` fails: the client went away before the answer.

    Holds no reference to the request, so a request that never finishes (a
    WebSocket upgrade) is not kept alive by its own notification.
    """

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False

    def __call__(self, failure: Failure) -> None:
        self.gone = True


class LimitedRequest(server.Request):
    """A request that keeps at most ``MAX_BODY_BYTES`` of its body in memory,
    answers with ``Server: wsserver`` instead of Twisted's name and version,
    and knows (through the public ``notifyFinish``) when its client is gone."""

    body_too_large = False
    _body_seen = 0

    def write(self, data: bytes) -> None:
        # Every response's first write sends the headers (finish() writes b""
        # when nothing was written), after Twisted set Server: TwistedWeb/x.y.
        if not self.startedWriting:
            self.setHeader(b"server", SERVER_HEADER)
        super().write(data)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gone = _Gone()
        self.notifyFinish().addErrback(self._gone)

    @property
    def gone(self) -> bool:
        """True once the connection closed before the response was finished."""
        return self._gone.gone

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > MAX_BODY_BYTES:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


# Bytes a log line may hold as they are: printable ASCII but the quote and the
# backslash, which escape the rest (Apache's convention: \" \\ \xHH).
_PLAIN_BYTES = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_BYTE_ESCAPES = [
    chr(b) if _PLAIN_BYTES.fullmatch(bytes((b,))) else f"\\x{b:02x}" for b in range(256)
]
_BYTE_ESCAPES[0x22] = '\\"'
_BYTE_ESCAPES[0x5C] = "\\\\"


def log_safe(value: bytes | str) -> str:
    """``value`` as one line of printable ASCII for a log: every control
    character (C0, DEL, C1), every non-ASCII byte, ``"`` and ``\\`` escaped.

    A ``str`` is escaped as its UTF-8 bytes.  Nothing a client sends can then
    move a terminal's cursor, rewrite a line or forge another line.
    """
    raw = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else value
    if _PLAIN_BYTES.fullmatch(raw):
        return raw.decode("ascii")
    return "".join([_BYTE_ESCAPES[b] for b in raw])


def redacted_uri(uri: bytes) -> str:
    """``uri`` as the logs show it: the path, and the query rebuilt from what
    Twisted's parser makes of it (``&`` and ``;`` separators, percent-encoded
    names), naming only ``since``, ``verify`` and ``token`` and showing only
    a ``since`` of digits and a ``verify`` flag; each part at most
    ``MAX_LOGGED_URI`` characters.

    So no spelling of a ``token`` parameter, nor any value or name the server
    does not read, reaches a log; what cannot be parsed as ``name=value`` is
    left out.
    """
    path, sep, query = uri.partition(b"?")
    shown = _cut(log_safe(path))
    if sep:
        pairs = []
        for name, values in http.parse_qs(query, 1).items():
            shown_name = name.decode("ascii") if name in _NAMED_PARAMS else OTHER_PARAM
            pattern = _SHOWN_VALUES.get(name)
            for value in values:
                ok = pattern is not None and pattern.fullmatch(value)
                text = value.decode("ascii") if ok else REDACTED
                pairs.append(f"{shown_name}={text}")
        shown += "?" + _cut("&".join(pairs))
    return shown


def _cut(text: str) -> str:
    if len(text) <= MAX_LOGGED_URI:
        return text
    return f"{text[:MAX_LOGGED_URI]}...({len(text) - MAX_LOGGED_URI} more)"


def access_log_line(timestamp: str, request: http.Request) -> str:
    """A combined-log-format line that never shows a token, and in which every
    value the client chose is escaped by ``log_safe``."""
    referrer = request.getHeader(b"referer") or b"-"
    agent = request.getHeader(b"user-agent") or b"-"
    line = '"{ip}" - - {ts} "{method} {uri} {proto}" {code} {length} "{ref}" "{agent}"'.format(
        ip=request.getClientAddress().host if request.getClientAddress() else "-",
        ts=timestamp,
        method=log_safe(request.method),
        uri=redacted_uri(request.uri),
        proto=log_safe(request.clientproto),
        code=request.code,
        length=request.sentLength or "-",
        ref=redacted_uri(referrer),
        agent=log_safe(agent),
    )
    return line


def _finish(
    request: server.Request, status: int, body: dict | bytes, headers: dict | None = None
) -> None:
    if request.finished or (isinstance(request, LimitedRequest) and request.gone):
        return
    request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(body if isinstance(body, bytes) else dumps(body))  # bytes: JSON already
    request.finish()


def _finish_error(request: server.Request, code: str, message: str, headers: dict | None = None):
    _finish(request, ERROR_STATUS[code], {"error": {"code": code, "message": message}}, headers)


def _answer_failure(request: server.Request, failure: Failure) -> None:
    if failure.check(HttpError):
        err = failure.value
        _finish_error(request, err.code, err.message, err.headers)
    elif failure.check(AuthError):
        _finish_error(request, failure.value.code, failure.value.message)
    else:
        _log.failure(
            "unexpected error answering {method} {path}",
            failure,
            method=log_safe(request.method),
            path=redacted_uri(request.path),
        )
        _finish_error(request, "internal_error", "internal error")


def read_json(request: LimitedRequest) -> dict[str, Any]:
    """The request's JSON object body, or ``HttpError`` (413, 415, 400)."""
    if request.body_too_large:
        raise HttpError("request_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise HttpError("unsupported_media_type", "the body must be application/json")
    request.content.seek(0)
    try:
        return loads_object(request.content.read())
    except InvalidJSON as exc:
        raise HttpError("invalid_request", f"the body is {exc}") from None


class JsonResource(Resource):
    """Dispatches on the method to ``GET``/``POST`` handlers returning a body or Deferred.

    A handler returns ``(status, body)``; raising ``HttpError`` or
    ``AuthError`` answers with the error shape.
    """

    isLeaf = True
    handlers: dict[bytes, str] = {}

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return NotFound()

    def render(self, request: server.Request) -> Any:
        if self.isLeaf and request.postpath:
            return NotFound().render(request)
        method = b"GET" if request.method == b"HEAD" else request.method
        name = self.handlers.get(method)
        if name is None:
            allowed = b", ".join(sorted(self.handlers))
            _finish_error(
                request, "method_not_allowed", f"use {allowed.decode()}", {b"allow": allowed}
            )
            return server.NOT_DONE_YET
        d = defer.maybeDeferred(getattr(self, name), request)
        d.addCallback(lambda result: _finish(request, result[0], result[1]))
        d.addErrback(lambda failure: _answer_failure(request, failure))
        return server.NOT_DONE_YET


class NotFound(JsonResource):
    """Every unknown path."""

    def render(self, request: server.Request) -> Any:
        _finish_error(request, "not_found", "no such resource")
        return server.NOT_DONE_YET


class _Refused(JsonResource):
    """Answers one fixed error (used for the rate limit)."""

    def __init__(self, error: HttpError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: server.Request) -> Any:
        _finish_error(request, self._error.code, self._error.message, self._error.headers)
        return server.NOT_DONE_YET


class Info(JsonResource):
    """GET /info: what this server is."""

    handlers = {b"GET": "get"}

    def get(self, request: server.Request) -> tuple[int, dict]:
        return 200, {"name": "wsserver", "version": __version__, "protocol": 1}


# The web client's files, served with a policy that lets the page load only
# itself and talk only to this server (WebSocket included).
PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


def load_static() -> dict[str, tuple[bytes, bytes]]:
    """The web client's files (package data), by name: (content type, bytes)."""
    files = {}
    for entry in resources.files("wsserver").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix in _STATIC_TYPES:
            files[entry.name] = (_STATIC_TYPES[suffix], entry.read_bytes())
    return files


class StaticFile(Resource):
    """One file of the web client, held in memory (a few KiB in all)."""

    isLeaf = True

    def __init__(self, content_type: bytes, body: bytes) -> None:
        super().__init__()
        self._type = content_type
        self._body = body

    def render(self, request: server.Request) -> Any:
        if request.postpath:
            return NotFound().render(request)
        if request.method not in (b"GET", b"HEAD"):
            _finish_error(request, "method_not_allowed", "use GET", {b"allow": b"GET, HEAD"})
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"content-security-policy", PAGE_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        if request.method == b"HEAD":
            # Twisted sets Content-Length from a GET body; a HEAD gets no body
            # (returning one would only make Twisted log a warning and drop it).
            request.setHeader(b"content-length", b"%d" % len(self._body))
            return b""
        return self._body


class StaticDir(Resource):
    """/static/: the web client's script and style sheet, nothing else."""

    def __init__(self, files: dict[str, tuple[bytes, bytes]]) -> None:
        super().__init__()
        for name, (content_type, body) in files.items():
            if name != "index.html":
                self.putChild(name.encode("ascii"), StaticFile(content_type, body))

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return NotFound()

    def render(self, request: server.Request) -> Any:
        return NotFound().render(request)


class Health(JsonResource):
    """GET /health: the process is up and serving."""

    handlers = {b"GET": "get"}

    def __init__(self, status: Callable[[], dict]) -> None:
        super().__init__()
        self._status = status

    def get(self, request: server.Request) -> tuple[int, dict]:
        return 200, {"status": "ok", **self._status()}


class Ready(JsonResource):
    """GET /ready (protocol section 11): 200 when this node can serve, else 503
    naming the failing check.  ``checks`` fires with (node name, {check: "ok" or
    why not})."""

    handlers = {b"GET": "get"}

    def __init__(self, checks: Callable[[], defer.Deferred]) -> None:
        super().__init__()
        self._checks = checks

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        node, checks = yield self._checks()
        ready = all(value == "ok" for value in checks.values())
        return (200 if ready else 503), {"ready": ready, "node": node, "checks": checks}


class Register(JsonResource):
    """POST /auth/register."""

    handlers = {b"POST": "post"}

    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self._auth = auth

    @defer.inlineCallbacks
    def post(self, request: LimitedRequest) -> Any:
        user = yield self._auth.register(read_json(request))
        _log.info("registered {user}", user=user.user_id)
        body = public_user(user)
        body["created_at"] = format_timestamp(user.created_ms)
        return 201, body


class Login(JsonResource):
    """POST /auth/login (a challenge) and POST /auth/login?verify=true (a token)."""

    handlers = {b"POST": "post"}

    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self._auth = auth

    @defer.inlineCallbacks
    def post(self, request: LimitedRequest) -> Any:
        flag = (request.args.get(b"verify") or [b"false"])[0].lower()
        if flag not in _TRUE | _FALSE:
            raise HttpError("invalid_request", "verify must be true or false")
        body = read_json(request)
        if flag in _TRUE:
            try:
                token, exp = yield self._auth.login(body)
            except AuthError as err:
                _log.info("login refused: {code}", code=err.code)
                self._auth.metrics.login(err.code)
                raise
            _log.info("logged in {user}", user=body.get("user_id"))
            self._auth.metrics.login("ok")
            return 200, {"token": token, "expires_at": format_timestamp(exp * 1000)}
        challenge, expires_ms = yield self._auth.challenge(body)
        return 200, {"challenge": challenge, "expires_at": format_timestamp(expires_ms)}


# Hands an account change this node made to its handlers (events.AccountEvents
# .apply_now); fires once they ran.
Announce = Callable[[str, str, "str | None"], Any]


def _no_announce(kind: str, user_id: str, detail: str | None) -> None:
    return None


def _path_user(raw: bytes) -> str:
    """The user_id a path segment names (``unknown_user`` when it cannot be one)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("unknown_user", "no such user") from None


class UserKey(JsonResource):
    """GET /auth/users/{user_id} (the user and their active keys), DELETE (the
    account, signed by one of its keys); its child ``keylog``."""

    isLeaf = False
    handlers = {b"GET": "get", b"DELETE": "delete"}

    def __init__(self, auth: Authenticator, user_id: bytes, announce: Announce) -> None:
        super().__init__()
        self._auth = auth
        self._user_id = user_id
        self._announce = announce

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if path == b"keylog":
            return KeyLog(self._auth, self._user_id, self._announce)
        return NotFound()

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        user, keys = yield self._auth.directory(_path_user(self._user_id))
        return 200, public_user(user, keys)

    @defer.inlineCallbacks
    def delete(self, request: LimitedRequest) -> Any:
        body = read_json(request)
        kind, user_id, detail = yield self._auth.delete_account(_path_user(self._user_id), body)
        _log.info("deleted account {user}", user=user_id)
        yield self._announce(kind, user_id, detail)
        return 200, {"deleted": True}


class KeyLog(JsonResource):
    """GET /auth/users/{user_id}/keylog (the whole log, oldest first) and POST
    (append an entry; no token: the entry's signatures are the authority)."""

    handlers = {b"GET": "get", b"POST": "post"}

    def __init__(self, auth: Authenticator, user_id: bytes, announce: Announce) -> None:
        super().__init__()
        self._auth = auth
        self._user_id = user_id
        self._announce = announce

    @defer.inlineCallbacks
    def get(self, request: server.Request) -> Any:
        user_id = _path_user(self._user_id)
        entries = yield self._auth.key_log(user_id)
        shown = [entry_json(user_id, e, format_timestamp(e.at_ms)) for e in entries]
        return 200, {"user_id": user_id, "entries": shown}

    @defer.inlineCallbacks
    def post(self, request: LimitedRequest) -> Any:
        body = read_json(request)
        user_id = _path_user(self._user_id)
        try:
            entry, change = yield self._auth.append_entry(user_id, body)
        except AuthError as err:
            # The id comes from the path (unquoted): escaped, it cannot forge a line.
            _log.info(
                "key log entry refused for {user}: {code}", user=log_safe(user_id), code=err.code
            )
            raise
        _log.info(
            "key log of {user}: entry {seq} {action} {key}",
            user=user_id,
            seq=entry.seq,
            action=entry.action,
            key=entry.key_id,
        )
        if change is not None:
            yield self._announce(*change)
        return 201, entry_json(user_id, entry, format_timestamp(entry.at_ms))


def _no_foreign_body(request: LimitedRequest) -> None:
    """Refuse a body that is not JSON (section 2: 413, 415) on an endpoint
    that reads none; a JSON body is ignored."""
    if request.body_too_large:
        raise HttpError("request_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")
    request.content.seek(0, 2)
    if request.content.tell() == 0:
        return
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise HttpError("unsupported_media_type", "the body must be application/json")


class Logout(JsonResource):
    """POST /auth/logout[?all=true]: the token in ``Authorization: Bearer``
    only; any body is ignored."""

    handlers = {b"POST": "post"}

    def __init__(self, auth: Authenticator, announce: Announce) -> None:
        super().__init__()
        self._auth = auth
        self._announce = announce

    @defer.inlineCallbacks
    def post(self, request: server.Request) -> Any:
        # From the query only: Twisted merges a form-encoded body into
        # request.args, and a body must not decide a sign-out everywhere.
        values = http.parse_qs(request.uri.partition(b"?")[2], 1).get(b"all") or [b"false"]
        flag = values[0].lower()
        if len(values) != 1 or flag not in _TRUE | _FALSE:
            raise HttpError("invalid_request", "all must be true or false")
        _no_foreign_body(request)
        token = _header_token(request)
        if token is None:
            raise HttpError("unauthorized", "the token goes in 'Authorization: Bearer <token>'")
        change: Change = yield self._auth.logout(token, flag in _TRUE)
        _log.info("signed out {user} ({how})", user=change[1], how=change[0])
        yield self._announce(*change)
        return 200, {"signed_out": True}


class Users(Resource):
    """/auth/users/: one child per user_id."""

    def __init__(self, auth: Authenticator, announce: Announce) -> None:
        super().__init__()
        self._auth = auth
        self._announce = announce

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return UserKey(self._auth, path, self._announce) if path else NotFound()

    def render(self, request: server.Request) -> Any:
        return NotFound().render(request)


class AuthTree(Resource):
    """/auth/: every request below it is rate limited per client IP."""

    def __init__(
        self, auth: Authenticator, limiter: RateLimiter, announce: Announce = _no_announce
    ) -> None:
        super().__init__()
        self._auth = auth
        self._limiter = limiter
        self.putChild(b"register", Register(auth))
        self.putChild(b"login", Login(auth))
        self.putChild(b"logout", Logout(auth, announce))
        self.putChild(b"users", Users(auth, announce))

    def getChildWithDefault(self, path: bytes, request: server.Request) -> Resource:
        address = request.getClientAddress()
        wait = self._limiter.take(getattr(address, "host", str(address)))
        if wait:
            self._auth.metrics.rate_limited_auth.inc()
            retry = str(max(1, math.ceil(wait))).encode("ascii")
            return _Refused(HttpError("rate_limited", "too many requests", {b"retry-after": retry}))
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return NotFound()

    def render(self, request: server.Request) -> Any:
        return NotFound().render(request)


def _header_token(request: server.Request) -> str | None:
    raw = request.getHeader(b"authorization")
    if raw is None:
        return None
    scheme, _, token = raw.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HttpError("unauthorized", "the Authorization header must be 'Bearer <token>'")
    return token.strip()


_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


def _check_printable(request: server.Request) -> None:
    """Refuse an upgrade whose request target or any header holds a byte that is
    not printable ASCII (``HttpError`` 400 naming it).

    Autobahn parses the handshake again after this gate and quotes header values
    in its own log lines when it fails one (a bad ``Sec-WebSocket-Key``, a
    duplicate protocol, ...), unescaped; so those values must be harmless before
    it sees them.  A WebSocket handshake has no use for anything else.
    """
    if not _PRINTABLE.fullmatch(request.uri):
        raise HttpError("invalid_request", "the request target must be printable ASCII")
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            if not _PRINTABLE.fullmatch(value):
                header = log_safe(name)
                raise HttpError("invalid_request", f"the {header} header must be printable ASCII")


WEBSOCKET_VERSION = b"13"  # RFC 6455; the drafts before it are not spoken
_UPGRADE_HEADERS = {b"upgrade": b"websocket", b"sec-websocket-version": WEBSOCKET_VERSION}


def _upgrade_refusal(request: server.Request) -> str | None:
    """Why this request is not an RFC 6455 upgrade (a 426), or None if it is.

    Only version 13: the drafts before it carry the origin in
    ``Sec-WebSocket-Origin``, which the Origin check above never sees.
    """
    if (request.getHeader(b"upgrade") or b"").strip().lower() != b"websocket":
        return "this endpoint speaks WebSocket only"
    versions = request.requestHeaders.getRawHeaders(b"sec-websocket-version") or []
    if [v.strip() for v in versions] != [WEBSOCKET_VERSION]:
        return "only WebSocket version 13 (RFC 6455) is supported"
    return None


class WebSocketGate(Resource):
    """/ws: refuses bad Origin, ``since`` or token before the upgrade."""

    isLeaf = True

    def __init__(
        self,
        factory: ServerFactory,
        auth: Authenticator,
        allowed_origins: frozenset[str],
        secure: bool,
    ) -> None:
        super().__init__()
        self._factory = factory
        self._auth = auth
        self._origins = allowed_origins
        self._scheme = "https" if secure else "http"
        self._upgrade = WebSocketResource(factory)

    def _check(self, request: server.Request) -> tuple[str, int | None]:
        """Return (token, since) or raise ``HttpError``."""
        if request.postpath:
            raise HttpError("not_found", "no such resource")
        if request.method != b"GET":
            raise HttpError("method_not_allowed", "use GET", {b"allow": b"GET"})
        _check_printable(request)
        raw_origin = request.getHeader(b"origin")
        if raw_origin is not None:
            origin = raw_origin.decode("latin-1").strip().lower()
            host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
            if origin not in self._origins and origin != f"{self._scheme}://{host}":
                raise HttpError("forbidden_origin", "this Origin may not open a WebSocket here")
        since = None
        raw_since = request.args.get(b"since")
        if raw_since is not None:
            if len(raw_since) != 1 or not re.fullmatch(rb"[0-9]{1,18}", raw_since[0]):
                raise HttpError("invalid_request", "since must be a non-negative integer")
            since = int(raw_since[0])
        token = _header_token(request)
        if token is None:
            tokens = request.args.get(b"token") or []
            if len(tokens) != 1 or not tokens[0]:
                raise HttpError("unauthorized", "a token is required")
            token = tokens[0].decode("ascii", "replace")
        return token, since

    def render(self, request: server.Request) -> Any:
        try:
            token, since = self._check(request)
        except HttpError as err:
            _log.info("refused a WebSocket upgrade: {code}", code=err.code)
            _finish_error(request, err.code, err.message, err.headers)
            return server.NOT_DONE_YET
        d = self._auth.session(token)
        d.addCallback(self._admit, request, since)
        d.addErrback(self._refuse, request)
        return server.NOT_DONE_YET

    def _admit(self, session: Any, request: LimitedRequest, since: int | None) -> None:
        if request.gone or request.channel is None or request.channel.transport is None:
            return
        refusal = _upgrade_refusal(request)
        if refusal is not None:
            _finish_error(request, "upgrade_required", refusal, _UPGRADE_HEADERS)
            return
        channel = request.channel
        result = self._factory.admit(session, since, lambda: self._upgrade.render(request))
        if result is not server.NOT_DONE_YET and not request.finished:
            request.write(result)
            request.finish()
        elif channel.transport is None:
            # The WebSocket took the connection over: this request never
            # finishes, and with its channel it forms a reference cycle that
            # would wait (several KiB per connection) for the cyclic collector.
            release_upgraded_request(channel, request)

    def _refuse(self, failure: Failure, request: server.Request) -> None:
        if failure.check(AuthError):
            _log.info("refused a WebSocket upgrade: unauthorized")
            _finish_error(request, "unauthorized", failure.value.message)
        else:
            _answer_failure(request, failure)


def build_root(
    auth: Authenticator,
    auth_limiter: RateLimiter,
    ws_gate: WebSocketGate,
    status: Callable[[], dict],
    ready: Callable[[], defer.Deferred] | None = None,
    announce: Announce = _no_announce,
    store: Any = None,
    groups: Resource | None = None,
) -> Resource:
    """The whole resource tree; ``announce`` applies an account change made here
    to this node at once (``events.AccountEvents.apply_now``); ``store`` serves
    history (without it, none: tests that build a bare tree); ``groups`` is
    ``/groups`` (web_groups.py, which builds on this module)."""
    from .web_history import Conversations, Messages  # it builds on this module

    root = _Root()
    files = load_static()
    root.putChild(b"", StaticFile(*files["index.html"]))
    root.putChild(b"static", StaticDir(files))
    root.putChild(b"info", Info())
    root.putChild(b"auth", AuthTree(auth, auth_limiter, announce))
    root.putChild(b"ws", ws_gate)
    root.putChild(b"health", Health(status))
    if store is not None:
        root.putChild(b"messages", Messages(auth, store, auth_limiter))
        root.putChild(b"conversations", Conversations(auth, store, auth_limiter))
    if ready is not None:
        root.putChild(b"ready", Ready(ready))
    if groups is not None:
        root.putChild(b"groups", groups)
    return root


class _Root(Resource):
    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return NotFound()


def build_site(root: Resource, timeout: float = 60.0) -> server.Site:
    """A Site with bounded bodies and an access log that hides tokens."""
    site = server.Site(root, timeout=timeout, logFormatter=access_log_line)
    site.requestFactory = LimitedRequest
    site.displayTracebacks = False
    return site
