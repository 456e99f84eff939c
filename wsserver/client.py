"""A Python client for wsserver (protocol v1), on Twisted and Autobahn.

It does what a careful client must: keeps the Ed25519 key, logs in with the
challenge, signs every message with a fresh nonce, checks the signature of
every message it receives against the sender's published key (cached), and
recovers: after a dropped connection it reconnects with ``since`` and resends
what was not acknowledged with the original nonces (so nothing is lost or
doubled); on close 4001 it logs in again first.

    client = Client("https://chat.example:8443", "alice", load_key("alice.key"))
    client.on_message = lambda frame, verified: print(frame["from"], frame["content"])
    yield client.login()
    yield client.connect()
    ack = yield client.send("bob", "hi")
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import os
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from service_identity import CertificateError, VerificationError
from twisted.internet import defer, endpoints, error
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers

from . import devices, keylog
from .conversations import ConversationsMixin
from .devices import CheckedLog, KeyLogNotice, SeenLogs
from .inturn import InTurn
from .keylog import KeyLogError
from .messages import LOGIN_PREFIX, b64decode, is_user_id, signing_input

_log = Logger()

KEY_PREFIX = "wsserver-ed25519-seed:"
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
SEEN_IDS = 10_000
MAX_RESPONSE_BYTES = 1 << 20  # the server's answers are small JSON objects
# A login challenge's nonce (protocol section 2): 32 bytes, unpadded base64url.
_CHALLENGE_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")


class ServerError(Exception):
    """The server refused something: ``code`` is its stable error code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class Stopped(ServerError):
    """The server closed the connection for a reason that retrying cannot
    mend (close 4003: this key was revoked or the account deleted; 4004:
    signed out): the client does not reconnect.  ``close_code`` and
    ``reason`` are the close frame's."""

    def __init__(self, code: str, message: str, close_code: int, reason: str) -> None:
        super().__init__(code, message)
        self.close_code = close_code
        self.reason = reason


def _stopped(close_code: int, reason: str | None) -> Stopped:
    reason = reason or ""
    if close_code == 4004:
        return Stopped(
            "signed_out",
            f"the server closed the connection (4004 {reason or 'signed out'}): "
            "this session was signed out; not reconnecting",
            close_code,
            reason,
        )
    deleted = "deleted" in reason
    why = "the account was deleted" if deleted else "this device's key was revoked"
    return Stopped(
        "account_deleted" if deleted else "key_revoked",
        f"the server closed the connection (4003 {reason or 'key revoked'}): {why}; "
        "not reconnecting",
        close_code,
        reason,
    )


class ConnectionProblem(Exception):
    """The server could not be reached or spoken to.

    ``kind`` says why, for a caller that wants to suggest a fix: ``refused``,
    ``dns``, ``timeout``, ``tls_untrusted`` (no trusted CA signed the
    certificate), ``tls_hostname`` (the certificate is for another name),
    ``tls_not_tls`` (an ``https://`` URL at a plain-HTTP port), ``closed``
    (closed without an answer: an ``http://`` URL at a TLS port looks so),
    ``not_wsserver`` (an answer that is not wsserver's JSON) or ``other``.
    ``str()`` is one human line naming the server.
    """

    def __init__(self, kind: str, server: str, detail: str) -> None:
        super().__init__(f"{server}: {detail}")
        self.kind = kind
        self.server = server
        self.detail = detail


def _innermost(err: Any) -> Any:
    """The first underlying exception of Agent's wrappers (which carry ``reasons``)."""
    for _ in range(10):
        if isinstance(err, Failure):
            err = err.value
        reasons = getattr(err, "reasons", None)
        if isinstance(reasons, list) and reasons:
            err = reasons[0]
            continue
        return err
    return err


# Cancelled: this client cancels a request only when it timed out.
_TIMEOUTS = (error.TimeoutError, defer.TimeoutError, TimeoutError, defer.CancelledError)
# OpenSSL's reasons when a plain-HTTP server answers a TLS handshake.
_NOT_TLS = ("wrong version", "packet length too long", "record layer failure", "http request")


def connection_problem(err: Any, server: str) -> ConnectionProblem:
    """Turn a network or TLS failure into a ``ConnectionProblem`` (never a repr)."""
    inner = _innermost(err)
    if isinstance(inner, ConnectionProblem):
        return inner
    if isinstance(inner, error.ConnectionRefusedError):
        return ConnectionProblem("refused", server, "connection refused")
    if isinstance(inner, error.DNSLookupError):
        host = urlsplit(server).hostname
        return ConnectionProblem("dns", server, f"the host name {host} cannot be resolved (DNS)")
    if isinstance(inner, _TIMEOUTS):
        return ConnectionProblem("timeout", server, "no answer in time (timed out)")
    if isinstance(inner, VerificationError | CertificateError):  # service_identity
        return ConnectionProblem(
            "tls_hostname",
            server,
            f"the server's certificate is not for {urlsplit(server).hostname}",
        )
    text = _ssl_text(inner)
    if text is not None:
        if "certificate verify failed" in text:
            return ConnectionProblem(
                "tls_untrusted",
                server,
                "the server's certificate is not signed by a certificate authority trusted here",
            )
        if any(marker in text for marker in _NOT_TLS):
            return ConnectionProblem("tls_not_tls", server, "the server does not speak TLS here")
        return ConnectionProblem("other", server, f"TLS failed ({text})")
    if isinstance(inner, error.ConnectionLost | error.ConnectionDone | error.ConnectionClosed):
        return ConnectionProblem("closed", server, "the connection closed without an answer")
    if isinstance(inner, error.ConnectError | OSError):
        detail = getattr(inner, "osError", None) or inner
        return ConnectionProblem("other", server, f"cannot connect ({_plain(detail)})")
    return ConnectionProblem("other", server, _plain(inner))


def _ssl_text(err: Any) -> str | None:
    """The OpenSSL reason strings of a pyOpenSSL error, or None if it is not one."""
    if type(err).__module__.split(".")[0] != "OpenSSL":
        return None
    parts = []
    for item in getattr(err, "args", ()) or ():
        if isinstance(item, list):
            parts += [str(entry[-1]) for entry in item if isinstance(entry, tuple) and entry]
        else:
            parts.append(str(item))
    return ", ".join(p for p in parts if p) or type(err).__name__


def _plain(err: Any) -> str:
    """A readable line for an exception: its message, else its class name."""
    text = str(err).strip()
    if not text or text.startswith("<") or text.startswith("["):
        return type(err).__name__
    return text.splitlines()[0]


# -- keys ------------------------------------------------------------------------


def generate_key() -> SigningKey:
    """A new Ed25519 signing key."""
    return SigningKey.generate()


def save_key(key: SigningKey, path: str) -> None:
    """Write the key's seed to a new file readable by its owner only (mode 0600).

    Refuses to overwrite an existing file (``FileExistsError``).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(KEY_PREFIX + base64.b64encode(bytes(key)).decode("ascii") + "\n")


def load_key(path: str) -> SigningKey:
    """Read a key written by ``save_key``."""
    with open(path, "rb") as f:
        raw = f.read(4096)
    text = raw.decode("ascii", "replace").strip()
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"{path} is not a wsserver key file")
    seed = b64decode(text[len(KEY_PREFIX) :])
    if len(seed) != 32:
        raise ValueError(f"{path} does not hold a 32-byte seed")
    return SigningKey(seed)


def public_key_b64(key: SigningKey) -> str:
    """The public key as the server wants it: standard base64."""
    return base64.b64encode(bytes(key.verify_key)).decode("ascii")


def check_signature(frame: dict, key: VerifyKey) -> bool | None:
    """Verify a received ``message`` frame: True, False, or None when unsigned."""
    signature = frame.get("signature")
    if not signature:
        return None
    data = signing_input(frame["from"], frame["to"], frame.get("nonce"), frame["content"])
    try:
        key.verify(data, b64decode(signature))
    except (BadSignatureError, ValueError):
        return False
    return True


# -- the client ------------------------------------------------------------------


_CLOSE_REASONS = {
    1001: "the server is shutting down",
    1006: "the connection was lost",
    1013: "the server closed the connection: this client fell behind",
    4001: "the session expired (logging in again)",
}


class _Conn(WebSocketClientProtocol):
    _was_open = False
    _closed_by_us: defer.Deferred | None = None
    _session = 0  # the client's session it was dialled in (Client._session)

    def onOpen(self) -> None:
        self._was_open = True
        self.factory._wsclient._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory._wsclient._frame(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Autobahn reports 1006 for a close that was not clean, even when the
        # server's close frame arrived (a loaded server that drops the TCP
        # connection late after its 4003): what the server said is what counts.
        if self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        self.factory._wsclient._closed(self, code, reason)


def _server_url(server: str) -> Any:
    """``server`` split (urlsplit), if it is a server's root URL: http:// or
    https://, a host, an optional port from 1 to 65535, no user name or
    password (wsserver logs in with a key), no path, query or fragment (the
    protocol's paths are fixed, from the root).  ValueError says what is
    expected, never repeating a password."""
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("server must be an http:// or https:// URL")
    netloc = parts.netloc.rpartition("@")[2]
    root = f"{parts.scheme}://{netloc}"
    if "@" in parts.netloc:
        raise ValueError(
            f"the server URL must not hold a user name or password (user:password@): "
            f"use {root}; you log in with your key"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        shown = netloc.rpartition(":")[2]
        raise ValueError(f"port {shown} is not a port number (1 to 65535)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"the server URL must be the server's root, without a path: use {root}")
    return parts


class Client(ConversationsMixin):
    """One user's connection to a wsserver, with login and recovery; history,
    groups, read receipts and presence come from ``ConversationsMixin``."""

    def __init__(
        self,
        server: str,
        user_id: str,
        key: SigningKey,
        *,
        cafile: str | None = None,
        reactor: Any = None,
        timeout: float = 30.0,
        seen: SeenLogs | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        parts = _server_url(server)
        self.server = server.rstrip("/")
        self.user_id = user_id
        self.key = key
        self.token: str | None = None
        self._reactor = reactor
        self._timeout = timeout  # seconds for an HTTP answer (a TLS mismatch can hang)
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._secure = parts.scheme == "https"
        self._tls = None
        if self._secure:
            trust = None
            if cafile:
                with open(cafile, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            self._tls = optionsForClientTLS(self._host, trustRoot=trust)
        self._agent = Agent(reactor, contextFactory=_Policy(self._tls))
        self._keys: dict[str, VerifyKey] = {}
        # Key logs: what this device saw before (kept by the caller, e.g. in
        # a file), and the logs checked by this process.
        self.seen = seen if seen is not None else SeenLogs()
        self._logs: dict[str, CheckedLog] = {}
        self._refetched: set[tuple[str, str]] = set()  # (user, key_id) looked up again
        # Users whose log, as last fetched, was rewritten since it was seen:
        # nothing from them verifies, and nothing is remembered, until trust().
        self._rewritten: set[str] = set()
        self._unacked: OrderedDict[str, tuple[dict, defer.Deferred]] = OrderedDict()
        self._nonces = itertools.count(1)
        self._nonce_prefix = secrets.token_hex(4)
        self._conn: _Conn | None = None
        self._wanted = False  # connect() called and close() not since
        self._connected: defer.Deferred | None = None
        self._retrying: Any = None  # the pending reconnect, if any
        self._dialing: defer.Deferred | None = None  # the TCP connect in flight
        # Bumped by close(): a dial or a connection of an earlier session
        # (connect() ... close()) is stale and must not come alive after it.
        self._session = 0
        self._opening: _Conn | None = None  # connected, its upgrade not answered yet
        self._inbox = InTurn("a received message")  # handled in the order they came
        self.last_id = 0  # highest message id received: the next since
        self._seen: set[int] = set()  # recent ids, to report each message once
        self._seen_order: deque[int] = deque()
        # Callbacks for the caller; each receives the frame (a dict).
        self.on_message: Callable[[dict, bool | None], Any] | None = None
        self.on_status: Callable[[dict], Any] | None = None
        self.on_system: Callable[[dict], Any] | None = None
        self.on_connect: Callable[[], Any] | None = None
        # on_retry(delay, why): a reconnect is scheduled in ``delay`` seconds.
        self.on_retry: Callable[[float, str], Any] | None = None
        # on_give_up(error): the client stopped reconnecting for good (not
        # after close()); messages still unacknowledged have failed with it.
        self.on_give_up: Callable[[Exception], Any] | None = None
        # on_keylog_notice(notice): a user's key log changed since this device
        # last saw it, does not check, or lacks the key of a message
        # (devices.KeyLogNotice; see docs/clients.md, the warning).
        self.on_keylog_notice: Callable[[KeyLogNotice], Any] | None = None
        self._init_conversations()  # on_presence, on_group, on_read

    @property
    def key_id(self) -> str:
        """This device's ``key_id``."""
        return keylog.key_id(bytes(self.key.verify_key))

    # -- HTTP ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def _request(
        self, method: bytes, path: str, body: dict | None = None, token: str | None = None
    ) -> Any:
        headers = Headers({b"accept": [b"application/json"]})
        if token is not None:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode("ascii"))
        producer = None
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
        try:
            response = yield self._agent.request(
                method, (self.server + path).encode("ascii"), headers, producer
            ).addTimeout(self._timeout, self._reactor)
            raw = yield _read_body(response).addTimeout(self._timeout, self._reactor)
        except Exception as err:
            raise connection_problem(err, self.server) from None
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = None
        if response.code >= 400:
            failure = data.get("error") if isinstance(data, dict) else None
            if not isinstance(failure, dict) or not isinstance(failure.get("code"), str):
                raise ConnectionProblem(
                    "not_wsserver",
                    self.server,
                    f"HTTP {response.code} on {path.split('?')[0]}: is this a wsserver?",
                )
            raise ServerError(failure["code"], str(failure.get("message", "")), response.code)
        if not isinstance(data, dict):
            raise ConnectionProblem(
                "not_wsserver",
                self.server,
                f"the answer to {path.split('?')[0]} is not JSON: is this a wsserver?",
            )
        return data

    def register(self, username: str) -> defer.Deferred:
        """Register this user's public key under ``username``."""
        return self._request(
            b"POST",
            "/auth/register",
            {"user_id": self.user_id, "username": username, "public_key": public_key_b64(self.key)},
        )

    @defer.inlineCallbacks
    def login(self) -> Any:
        """The challenge-response login; fire with the token (also kept)."""
        reply = yield self._request(b"POST", "/auth/login", {"user_id": self.user_id})
        challenge = reply.get("challenge")
        if not self._is_login_challenge(challenge):
            # Anything else could be a key-log entry or a deletion statement
            # passed off as a challenge to get this key's signature on it.
            raise ServerError(
                "invalid_challenge",
                f"the server's login challenge is not {LOGIN_PREFIX}{self.user_id}:NONCE "
                "(protocol section 2): nothing was signed; is this a wsserver?",
            )
        signature = base64.b64encode(self.key.sign(challenge.encode("utf-8")).signature)
        reply = yield self._request(
            b"POST",
            "/auth/login?verify=true",
            {
                "user_id": self.user_id,
                "challenge": challenge,
                "signature": signature.decode(),
                "key_id": self.key_id,
            },
        )
        self.token = reply["token"]
        return self.token

    def _is_login_challenge(self, challenge: object) -> bool:
        """Whether ``challenge`` is exactly a login challenge for this user
        (``wsserver-login-v1:<user_id>:`` and a 43-character base64url
        nonce), the only string login signs."""
        prefix = f"{LOGIN_PREFIX}{self.user_id}:"
        return (
            isinstance(challenge, str)
            and challenge.startswith(prefix)
            and _CHALLENGE_NONCE.fullmatch(challenge[len(prefix) :]) is not None
        )

    def lookup(self, user_id: str) -> defer.Deferred:
        """The public record of ``user_id`` from the key directory."""
        return self._request(b"GET", f"/auth/users/{user_id}")

    @defer.inlineCallbacks
    def verify_key(self, user_id: str) -> Any:
        """The published key of ``user_id`` (cached: keys do not change)."""
        key = self._keys.get(user_id)
        if key is None:
            record = yield self.lookup(user_id)
            key = VerifyKey(b64decode(record["public_key"]))
            self._keys[user_id] = key
        return key

    # -- key logs and devices (protocol section 12) -------------------------------

    def _notice(self, notice: KeyLogNotice) -> None:
        _log.info("key log of {user}: {kind}", user=notice.user_id, kind=notice.kind)
        if self.on_keylog_notice:
            self.on_keylog_notice(notice)

    @defer.inlineCallbacks
    def fetch_keylog(self, user_id: str) -> Any:
        """``user_id``'s whole key log, checked (every signature, every
        ``prev``): a ``devices.CheckedLog``; ``KeyLogError`` when it does not
        check.  Nothing is remembered."""
        if not is_user_id(user_id):
            raise KeyLogError("invalid_request", "not a user id")
        data = yield self._request(b"GET", f"/auth/users/{user_id}/keylog")
        return devices.check_log(user_id, data)

    @defer.inlineCallbacks
    def peer_log(self, user_id: str, refresh: bool = False) -> Any:
        """``user_id``'s key log, fetched and checked once per process (again
        with ``refresh``), compared with what this device saw before and
        remembered (``seen``).  Reports through ``on_keylog_notice`` a log
        that was rewritten, that does not check, or whose devices changed.
        Fires with the ``CheckedLog``, or None when the log does not check
        (then nothing from that user can be verified, and nothing is
        remembered).  A rewritten log is returned but not remembered, and
        nothing from that user verifies until ``trust(user_id)`` (see
        ``rewritten``)."""
        log = self._logs.get(user_id)
        if log is not None and not refresh:
            return log
        try:
            log = yield self.fetch_keylog(user_id)
        except KeyLogError as err:
            self._logs.pop(user_id, None)
            self._notice(devices.invalid_notice(user_id, err))
            return None
        self._remember(log)
        return log

    def _remember(self, log: CheckedLog, made: tuple[tuple, tuple] | None = None) -> None:
        """Compare ``log`` with what was seen, remember it, and report what
        changed, except this device's own doing: its own link, or ``made``
        (the keys (added, revoked) by the append it just made)."""
        notice = devices.compare(self.seen.get(self.server, log.user_id), log)
        self._logs[log.user_id] = log
        if notice is not None and notice.kind == devices.REWRITTEN:
            # What was seen stays what is remembered: the warning comes again
            # on every look until the person accepts the new log (trust()).
            self._rewritten.add(log.user_id)
            self._notice(notice)
            return
        self._rewritten.discard(log.user_id)
        self._keep(log)
        own_addition = (
            notice is not None
            and log.user_id == self.user_id
            and notice.kind == devices.DEVICES_CHANGED
            and notice.added == (self.key_id,)
            and not notice.revoked
        )
        own_append = (
            notice is not None
            and made is not None
            and notice.kind == devices.DEVICES_CHANGED
            and (notice.added, notice.revoked) == made
        )
        if notice is not None and not own_addition and not own_append:
            self._notice(notice)

    def _keep(self, log: CheckedLog) -> None:
        """Remember ``log`` as seen (in the file, if there is one)."""
        failed_before = self.seen.save_error is not None
        self.seen.put(self.server, log.user_id, devices.Seen.of(log))
        if self.seen.save_error is not None and not failed_before:
            _log.warn(
                "cannot write {path} ({error}): key logs seen are kept for this run only",
                path=self.seen.path,
                error=self.seen.save_error.strerror or str(self.seen.save_error),
            )

    def rewritten(self, user_id: str) -> bool:
        """Whether ``user_id``'s key log, as last fetched, was rewritten since
        this device saw it (and not accepted since with ``trust``)."""
        return user_id in self._rewritten

    @defer.inlineCallbacks
    def trust(self, user_id: str, log: CheckedLog | None = None) -> Any:
        """Accept ``user_id``'s key log as it is now, after checking with the
        person another way: fetch and check it (``KeyLogError`` if it does
        not check: nothing is accepted then), or take ``log`` (one
        ``fetch_keylog`` gave, shown to the person), and remember it as seen,
        so a rewritten log stops being warned about and their messages verify
        again.  Fires with the ``CheckedLog`` (its active keys are what was
        accepted)."""
        if log is None:
            log = yield self.fetch_keylog(user_id)
        elif log.user_id != user_id:
            raise ValueError(f"that is the key log of {log.user_id}, not of {user_id}")
        self._keep(log)
        self._logs[user_id] = log
        self._rewritten.discard(user_id)
        return log

    @defer.inlineCallbacks
    def check_directory(self, user_id: str) -> Any:
        """Compare the key directory's keys for ``user_id`` with their checked
        key log; report each key it lists that the log does not hold as
        active (``unknown_key``).  Fires with the notices (a list)."""
        log = yield self.peer_log(user_id)
        if log is None:
            return []
        record = yield self.lookup(user_id)
        notices = devices.directory_notices(log, record)
        for notice in notices:
            self._notice(notice)
        return notices

    @defer.inlineCallbacks
    def _own_log(self, made: tuple[tuple, tuple] | None = None, signing: bool = True) -> Any:
        """This user's key log, checked, fetched now (not cached): what an
        append or a deletion signs against.  ``KeyLogError`` if it does not
        check, or (when ``signing``) if it was rewritten since this device
        saw it: nothing is signed then.  ``made``: see ``_remember``."""
        try:
            log = yield self.fetch_keylog(self.user_id)
        except KeyLogError as err:
            raise KeyLogError(
                err.code, f"{self.user_id}'s key log does not check: {err.message}"
            ) from None
        self._remember(log, made)
        if signing and self.rewritten(self.user_id):
            raise KeyLogError(
                "keylog_rewritten",
                f"{self.user_id}'s key log was rewritten since this device saw it: not "
                f"signing anything on top of it; compare the devices another device of "
                f"yours lists with the server's, and only then accept the log here with "
                f"'wsserver-client --user {self.user_id} trust {self.user_id}'",
            )
        return log

    @defer.inlineCallbacks
    def devices(self) -> Any:
        """This user's active keys, oldest first: a list of dicts
        ``{"key_id", "name", "added_at", "this_device"}``, from the checked
        key log."""
        log = yield self._own_log(signing=False)
        return [
            {
                "key_id": kid,
                "name": log.state.names.get(kid),
                "added_at": log.added_at(kid),
                "this_device": kid == self.key_id,
            }
            for kid in log.state.active
        ]

    @defer.inlineCallbacks
    def link(self) -> Any:
        """On a new device (whose key is not yet in the log): the pairing text
        another device of the user approves (common decision 6).  Fires with
        the text; ``devices.PairingProblem`` if this key is in the log
        already."""
        log = yield self._own_log()
        if self.key_id in log.state.active:
            raise devices.PairingProblem(
                f"this key ({self.key_id}) is already one of {self.user_id}'s devices"
            )
        if self.key_id in log.state.every:
            raise devices.PairingProblem(
                f"this key ({self.key_id}) was revoked: it cannot be linked again; "
                "make a new key file"
            )
        return keylog.pairing_text(devices.pairing_for(log, self.key))

    @defer.inlineCallbacks
    def approve(self, text: str, name: str | None = None) -> Any:
        """On a device holding an active key: check a pairing text against the
        log as it stands, sign its ``add`` entry and append it.  Fires with the
        new key's ``key_id``.  ``KeyLogError`` for a text that is not one or a
        log that does not check; ``devices.PairingProblem`` for a text that
        cannot be approved (the log moved on, another user, a bad
        signature); ``ServerError`` if the server refuses the entry."""
        pairing = keylog.parse_pairing_text(text)
        name = keylog.normalize_name(name)
        log = yield self._own_log()
        body = devices.approve_body(log, pairing, self.key, name)
        yield self._request(b"POST", f"/auth/users/{self.user_id}/keylog", body)
        new_id = keylog.key_id(pairing.public_key)
        yield self._own_log(made=((new_id,), ()), signing=False)  # our own change is no news
        return new_id

    @defer.inlineCallbacks
    def revoke(self, key_id: str) -> Any:
        """Revoke one of this user's keys (a lost device, or this one): sign the
        ``revoke`` entry with this device's key and append it.  The server
        closes that key's connections with 4003 and refuses its tokens."""
        log = yield self._own_log()
        body = devices.revoke_body(log, key_id, self.key)
        yield self._request(b"POST", f"/auth/users/{self.user_id}/keylog", body)
        yield self._own_log(made=((), (key_id,)), signing=False)  # our own change is no news
        return key_id

    @defer.inlineCallbacks
    def logout(self, everywhere: bool = False, token: str | None = None) -> Any:
        """Sign out: revoke ``token`` (default: this client's, logging in first
        if it has none), or with ``everywhere`` every token of the user issued
        until now.  Their connections close with 4004."""
        if token is None:
            token = self.token if self.token is not None else (yield self.login())
        path = "/auth/logout?all=true" if everywhere else "/auth/logout"
        reply = yield self._request(b"POST", path, {}, token=token)
        if token == self.token:
            self.token = None
        return reply

    @defer.inlineCallbacks
    def delete_account(self) -> Any:
        """Delete this user's account for good, signed with this device's key
        over the deletion statement at the log's next ``seq``.  Every
        connection of the user closes with 4003; the id stays taken."""
        log = yield self._own_log()
        body = devices.delete_body(log, self.key)
        reply = yield self._request(b"DELETE", f"/auth/users/{self.user_id}", body)
        self.token = None
        return reply

    # -- WebSocket ----------------------------------------------------------------

    def connect(self, since: int | None = None) -> defer.Deferred:
        """Open the WebSocket (logging in first if needed) and keep it open.

        Fires once connected, or fails if the first attempt fails.  Until
        ``close()``, a dropped connection is reopened with ``since`` (retried
        with growing delays) and unacknowledged messages are resent.
        """
        if since is not None:
            self.last_id = max(self.last_id, since)
        self._wanted = True
        self._connected = defer.Deferred()
        self._dial(use_since=since is not None)
        return self._connected

    def _current(self, session: int) -> bool:
        """True while ``session`` is this client's and close() was not called."""
        return self._wanted and session == self._session

    @defer.inlineCallbacks
    def _dial(self, use_since: bool = True, attempt: int = 0) -> Any:
        self._retrying = None
        session = self._session
        if not self._current(session):
            return
        try:
            if self.token is None:
                yield self.login()
                if not self._current(session):
                    return  # close() came during the login
            scheme = "wss" if self._secure else "ws"
            url = f"{scheme}://{self._host}:{self._port}/ws"
            if use_since:
                url += f"?since={self.last_id}"
            factory = WebSocketClientFactory(url, headers={"Authorization": f"Bearer {self.token}"})
            factory.protocol = _Conn
            factory._wsclient = self
            factory.setProtocolOptions(autoPingInterval=20, autoPingTimeout=10)
            endpoint = self._endpoint()
            if self._tls is not None:
                endpoint = endpoints.wrapClientTLS(self._tls, endpoint)
            dialing = self._dialing = endpoint.connect(factory)
            try:
                conn = yield dialing
            finally:
                if self._dialing is dialing:
                    self._dialing = None
            conn._session = session  # before any frame: connect fires on the TCP connect
            if not self._current(session):  # close() came meanwhile
                conn.transport.abortConnection()
                return
            self._opening = conn
        except Exception as err:
            if session != self._session:
                return  # a dial close() stopped: a later connect() reports its own
            if not isinstance(err, ServerError | ConnectionProblem):
                err = connection_problem(err, self.server)
            first = self._connected is not None and not self._connected.called
            if not self._wanted and not first:
                return  # close() stopped a reconnect: nothing to report
            hopeless = isinstance(err, ServerError) and (
                err.status in (400, 401, 403, 404) or err.code == "invalid_challenge"
            )
            if first or hopeless:
                # connect() reports a server it cannot reach or a login the
                # server refuses; once connected, drops are retried instead,
                # but a refused login (the user or its key is not known
                # there any more), or a server that hands out something
                # else than a login challenge, cannot get better by retrying.
                self._give_up(err)
                return
            _log.info("reconnect failed ({error}); retrying", error=str(err))
            self._retry(attempt, err.detail if isinstance(err, ConnectionProblem) else str(err))

    def _endpoint(self) -> Any:
        try:
            address = ipaddress.ip_address(self._host)
        except ValueError:  # a name: resolve it, IPv6 and IPv4 both tried
            return endpoints.HostnameEndpoint(self._reactor, self._host, self._port)
        if address.version == 6:
            return endpoints.TCP6ClientEndpoint(self._reactor, self._host, self._port)
        return endpoints.TCP4ClientEndpoint(self._reactor, self._host, self._port)

    def _retry(self, attempt: int, why: str) -> None:
        if self._wanted and self._retrying is None:
            delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
            self._retrying = self._reactor.callLater(delay, self._dial, True, attempt + 1)
            if self.on_retry:
                self.on_retry(delay, why)

    def _give_up(self, err: Exception) -> None:
        """Stop for good: fail connect() if it is pending, else tell on_give_up;
        fail every message still waiting for its ack."""
        self._wanted = False
        if self._connected is not None and not self._connected.called:
            self._connected.errback(err)
        elif self.on_give_up:
            self.on_give_up(err)
        unacked, self._unacked = self._unacked, OrderedDict()
        for _, d in unacked.values():
            d.errback(err)

    def _opened(self, conn: _Conn) -> None:
        if self._opening is conn:
            self._opening = None
        if not self._current(conn._session):  # close() came during the upgrade
            conn.sendClose(1000)
            return
        self._conn = conn
        for frame, _ in list(self._unacked.values()):
            conn.sendMessage(json.dumps(frame).encode("utf-8"))  # same nonce: no double
        self._conversations_opened()
        if self._connected is not None and not self._connected.called:
            self._connected.callback(None)
        if self.on_connect:
            self.on_connect()

    def _closed(self, conn: Any, code: int | None, reason: str | None = None) -> None:
        if self._conn is conn:
            self._conn = None
        if self._opening is conn:
            self._opening = None
        if conn._closed_by_us is not None and not conn._closed_by_us.called:
            conn._closed_by_us.callback(code)
        if not self._current(conn._session):
            return
        if not conn._was_open:  # the server refused the upgrade itself
            if self._connected is not None and not self._connected.called:
                status = re.search(r"upgrade failed \[(\d{3})\]", reason or "")
                why = f"HTTP {status.group(1)}" if status else code
                self._give_up(
                    ServerError("upgrade_refused", f"the WebSocket upgrade failed ({why})")
                )
                return
            self.token = None  # perhaps the token: log in again on the next try
            self._retry(0, "the server refused the WebSocket upgrade (logging in again)")
            return
        if code in (4003, 4004):  # key revoked, account deleted, signed out
            self.token = None
            self._give_up(_stopped(code, reason))
            return
        if code == 4001:  # token expired: log in again, then come back
            self.token = None
        elif code == 1008:  # policy (too many connections): retrying will not help
            self._give_up(
                ServerError("policy_violation", "the server closed the connection (1008)")
            )
            return
        self._retry(0, _CLOSE_REASONS.get(code or 0, f"the connection closed ({code})"))

    def send(self, to: str, content: str, nonce: str | None = None) -> defer.Deferred:
        """Sign and send a message; fire with its ``ack`` frame.

        Fails with ``ServerError`` if the server refuses it (a ``system`` frame
        naming its nonce).  While the connection is down the message waits and
        goes out, with the same nonce, when it is back.
        """
        nonce = nonce or f"{self._nonce_prefix}-{next(self._nonces)}"
        data = signing_input(self.user_id, to, nonce, content)
        frame = {
            "to": to,
            "content": content,
            "nonce": nonce,
            "signature": base64.b64encode(self.key.sign(data).signature).decode("ascii"),
        }
        d: defer.Deferred = defer.Deferred()
        self._unacked[nonce] = (frame, d)
        if self._conn is not None and self._conn.state == _Conn.STATE_OPEN:
            self._conn.sendMessage(json.dumps(frame).encode("utf-8"))
        # else it goes out when the connection is (re)opened: see _opened
        return d

    def _send_frame(self, frame: dict) -> bool:
        """Send ``frame`` now if the connection is open; False if it is not."""
        if self._conn is None or self._conn.state != _Conn.STATE_OPEN:
            return False
        self._conn.sendMessage(json.dumps(frame).encode("utf-8"))
        return True

    def close(self) -> defer.Deferred:
        """Close the WebSocket for good (no reconnect); fire when it is closed.

        A connect or reconnect still in progress is stopped (a ``connect()``
        not yet fired fails with ``CancelledError``), so nothing stays open.
        """
        self._wanted = False
        self._session += 1
        connecting, self._connected = self._connected, None
        if connecting is not None and connecting.called:
            connecting = None
        self._stop_reads()
        if self._retrying is not None and self._retrying.active():
            self._retrying.cancel()
        self._retrying = None
        if self._dialing is not None:  # a connect in flight: stop it
            self._dialing.cancel()
        opening, self._opening = self._opening, None
        conn, self._conn = self._conn, None
        if conn is None and opening is not None and opening.state != _Conn.STATE_CLOSED:
            # Connected, the upgrade not answered: nothing to close politely.
            opening._closed_by_us = defer.Deferred()
            opening.transport.abortConnection()
            closed = opening._closed_by_us
        elif conn is None or conn.state == _Conn.STATE_CLOSED:
            closed = defer.succeed(None)
        else:
            conn._closed_by_us = closed = defer.Deferred()
            conn.sendClose(1000)
        if connecting is not None:
            connecting.errback(defer.CancelledError("close() before the connection opened"))
        return closed

    # -- frames -------------------------------------------------------------------

    def _frame(self, frame: dict) -> None:
        kind = frame.get("type")
        if self._conversation_frame(frame):
            return
        if kind == "message":
            self._inbox.run(lambda: self._message(frame))
        elif kind == "ack":
            pending = self._unacked.pop(frame.get("nonce") or "", None)
            if pending is not None:
                pending[1].callback(frame)
        elif kind == "status":
            if self.on_status:
                self.on_status(frame)
        elif kind == "system":
            pending = self._unacked.pop(frame.get("nonce") or "", None)
            if pending is not None and frame.get("code") != "internal_error":
                # A refusal of a send: reported once, by failing that send.
                pending[1].errback(ServerError(frame["code"], frame.get("content", "")))
                return
            if pending is not None:
                # Not stored: try again on the next connection, same nonce.
                self._unacked[frame["nonce"]] = pending
            if self.on_system:
                self.on_system(frame)

    @defer.inlineCallbacks
    def _message(self, frame: dict) -> Any:
        msg_id = frame["id"]
        if msg_id in self._seen:
            return  # delivered again after a server crash: reported once only
        self._seen.add(msg_id)
        self._seen_order.append(msg_id)
        if len(self._seen_order) > SEEN_IDS:
            self._seen.discard(self._seen_order.popleft())
        self.last_id = max(self.last_id, msg_id)
        verified = yield self._verify(frame)
        if self.on_message:
            self.on_message(frame, verified)

    @defer.inlineCallbacks
    def _verify(self, frame: dict) -> Any:
        """A message frame (received, or from history) checked locally: True,
        False, or None when it is unsigned."""
        if not frame.get("signature"):
            return None
        try:
            return (yield self._check(frame))
        except Exception as err:
            # No key to check against (unknown sender, unreachable
            # directory): never report such a message as verified.
            _log.info(
                "cannot check a signature from {sender}: {error}",
                sender=frame.get("from"),
                error=str(err),
            )
            return False

    @defer.inlineCallbacks
    def _check(self, frame: dict) -> Any:
        """Verify a signed message with the key its ``key_id`` names in the
        sender's checked key log (revoked keys too: the message may be older
        than the revocation).  A ``key_id`` the log does not hold is looked up
        once more (the sender may have added the device since), then
        reported; a log that does not check, or one rewritten since this
        device saw it (until ``trust``), verifies nothing.  A message with
        ``"key_id": null`` (stored before keys per device) is checked with the
        registration key (entry 0) only."""
        sender = frame["from"]
        log = yield self.peer_log(sender)
        if log is None or self.rewritten(sender):
            return False
        kid = frame.get("key_id")
        if kid is None:
            # Stored before keys per device: signed, if at all, by the
            # registration key (docs/protocol.md section 15), and only that.
            return check_signature(frame, VerifyKey(log.entries[0].public_key))
        if not isinstance(kid, str):
            return False
        raw = log.key(kid)
        if raw is None and (sender, kid) not in self._refetched:
            self._refetched.add((sender, kid))
            log = yield self.peer_log(sender, refresh=True)
            if log is None or self.rewritten(sender):
                return False
            raw = log.key(kid)
        if raw is None:
            self._notice(devices.unknown_key_notice(sender, kid, frame.get("id")))
            return False
        return check_signature(frame, VerifyKey(raw))


class _Body(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self._parts: list[bytes] = []
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        self._parts.append(data)
        if sum(map(len, self._parts)) > MAX_RESPONSE_BYTES:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if reason is None or reason.check(ResponseDone):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def _read_body(response: Any) -> defer.Deferred:
    """The whole body of a (small, bounded) HTTP response."""
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Body(done))
    return done


class _Policy(BrowserLikePolicyForHTTPS):
    """HTTPS with the client's own trust settings (a private CA, for example)."""

    def __init__(self, tls: Any) -> None:
        super().__init__()
        self._tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._tls or super().creatorForNetloc(hostname, port)
