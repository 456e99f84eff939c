"""``wsserver-client``: the command-line client.

    wsserver-client --user alice keygen
    wsserver-client --user alice register --name "Alice"
    wsserver-client --user alice send --to bob "hello"
    wsserver-client --user bob listen
    wsserver-client --user bob chat --to alice

Global options fall back to WSSERVER_URL, WSSERVER_USER, WSSERVER_KEY and
WSSERVER_CAFILE.  Commands that need a token log in by themselves.  Every
failure is one line on stderr naming the server and, where there is one, the
fix, and exit status 1; listen and chat say on stderr when they reconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import unicodedata
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer, task, threads
from twisted.internet.protocol import Protocol

from .client import (
    Client,
    ConnectionProblem,
    ServerError,
    generate_key,
    load_key,
    public_key_b64,
    save_key,
)
from .messages import is_user_id

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 10.0  # seconds for each HTTP answer
PROBE_TIMEOUT = 5.0  # seconds for each look that names a fix (in a thread)


class UsageError(Exception):
    """A problem with the command line or the local files."""


# What a message's later lines start with: never "[", so no line of a
# message's text can pass for the start of another message.
CONTINUATION = "    | "
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control (C0, DEL, C1), format (bidi overrides and isolates, zero-width and
# invisible characters), line/paragraph separators and lone surrogates.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}
_KEPT = {"\u200d"}  # zero-width joiner: joins emoji, hides nothing on its own


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe(text: Any, multiline: bool = False) -> str:
    """``text`` (from another party: content, ids, names, server messages)
    made harmless for a terminal: every control, format, bidi and separator
    character is shown as a Python-style escape (``\\x1b``, ``\\u202e``), so
    nothing can move the cursor, set the title or reorder what is shown.  With
    ``multiline`` a newline starts a continuation line (CONTINUATION) instead
    of being escaped, so a multi-line message stays readable yet none of its
    lines can pass for a line of its own."""
    parts = []
    for ch in str(text):
        if ch == "\n" and multiline:
            parts.append("\n" + CONTINUATION)
        elif ch not in _KEPT and unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            parts.append(_escape(ch))
        else:
            parts.append(ch)
    return "".join(parts)


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """One line on stderr: what the client is doing (reconnecting, listening)."""
    sys.stderr.write(f"wsserver-client: {safe(text)}\n")
    sys.stderr.flush()


def mark(verified: bool | None) -> str:
    return {True: "verified", False: "INVALID", None: "UNSIGNED"}[verified]


def describe(frame: dict, verified: bool | None) -> str:
    """A received message: time, sender, signature mark, content, every field
    made safe (see safe()); later lines of a multi-line content are indented
    continuation lines."""
    to = " (broadcast)" if frame.get("to") == "broadcast" else ""
    return (
        f"[{safe(frame['timestamp'])}] {safe(frame['from'])}{to} [{mark(verified)}] "
        f"#{safe(frame['id'])}: {safe(frame['content'], multiline=True)}"
    )


def _user(args: argparse.Namespace) -> str:
    if not args.user:
        raise UsageError("--user (or WSSERVER_USER) is required")
    if not is_user_id(args.user):
        raise UsageError(
            f"{args.user!r} is not a user id: 1 to 64 of the letters A-Z a-z, digits and _ . -"
        )
    return args.user


def make_client(args: argparse.Namespace) -> Client:
    user = _user(args)
    path = args.key or f"{user}.key"
    keygen = f"wsserver-client {f'--key {path}' if args.key else f'--user {user}'} keygen"
    try:
        key = load_key(path)
    except FileNotFoundError:
        raise UsageError(f"no key file {path}: run '{keygen}' first") from None
    except ValueError as exc:
        raise UsageError(f"{exc}; 'wsserver-client keygen' makes one") from None
    except OSError as exc:
        raise UsageError(f"cannot read the key file {path}: {_os_text(exc)}") from None
    if args.cafile and not os.path.isfile(args.cafile):
        raise UsageError(f"--cafile {args.cafile}: no such file")
    try:
        return Client(args.server, user, key, cafile=args.cafile, timeout=TIMEOUT)
    except ValueError as exc:
        raise UsageError(f"--server {shown_url(args.server)}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read --cafile {args.cafile}: {_os_text(exc)}") from None
    except Exception:  # OpenSSL's error for a file that is not a PEM certificate
        raise UsageError(_not_a_certificate(args.cafile, args.server)) from None


def _not_a_certificate(cafile: str, server: str) -> str:
    """Why ``cafile`` cannot be used to trust ``server``, in one line."""
    try:
        with open(cafile, "rb") as f:
            holds = f.read(1 << 20)
    except OSError:
        holds = b""
    what = ""
    if b"PRIVATE KEY-----" in holds:
        what = " (it holds a private key)"
    return (
        f"--cafile {cafile}: not a PEM certificate{what}: expected the certificate of "
        f"the authority that signed {shown_url(server)}'s certificate, a file starting "
        f"-----BEGIN CERTIFICATE-----"
    )


def shown_url(url: str) -> str:
    """``url`` without any user name or password, to print."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _os_text(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def cmd_keygen(args: argparse.Namespace, reactor: Any) -> Any:
    if not args.user and not args.key:
        raise UsageError("--user or --key (or WSSERVER_USER / WSSERVER_KEY) is required")
    if args.user:
        _user(args)  # refuse now an id that register would refuse later
    path = args.key or f"{args.user}.key"
    key = generate_key()
    try:
        save_key(key, path)
    except FileExistsError:
        raise UsageError(f"{path} already exists: not overwriting a key") from None
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        raise UsageError(
            f"cannot write {path}: the directory {folder} does not exist "
            f"(create it first, e.g. mkdir -m 700 {folder})"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {_os_text(exc)}") from None
    out(public_key_b64(key))
    return defer.succeed(None)


@defer.inlineCallbacks
def cmd_register(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    try:
        user = yield client.register(args.name)
    except ServerError as err:
        if err.code != "user_exists":
            raise
        # Registered already: with this key (a repeated command: fine), or
        # with another one (someone else's id, or a lost key).
        record = yield client.lookup(client.user_id)
        if record.get("public_key") != public_key_b64(client.key):
            raise ServerError(
                "user_exists",
                f"{client.user_id} is already registered with another key; choose another user id",
            ) from None
        out(
            f"{client.user_id} is already registered with this key "
            f"(as {safe(record.get('username'))}): nothing to do"
        )
        return
    out(
        f"registered {safe(user['user_id'])} ({safe(user['username'])}) "
        f"with key {safe(user['public_key'])}"
    )


@defer.inlineCallbacks
def cmd_login(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    token = yield client.login()
    out(safe(token))


@defer.inlineCallbacks
def cmd_send(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    # Giving up fails the message itself, which is what is reported.
    _report_reconnects(client).addErrback(lambda _: None)
    yield client.connect()
    try:
        ack = yield client.send(args.to, args.text)
    finally:
        yield client.close()
    out(f"{safe(ack['id'])} {safe(ack['status'])}")


def _print_frames(client: Client, as_json: bool) -> None:
    def message(frame: dict, verified: bool | None) -> None:
        if as_json:
            out(json.dumps({**frame, "verified_locally": verified}))
        else:
            out(describe(frame, verified))

    def other(frame: dict) -> None:
        if as_json:
            out(json.dumps({**frame, "verified_locally": None}))
        elif frame["type"] == "status":
            out(f"your message #{safe(frame['id'])} is {safe(frame['status'])}")
        else:
            out(f"system: {safe(frame.get('code'))}: {safe(frame.get('content'))}")

    client.on_message = message
    client.on_status = other
    client.on_system = other


def _report_reconnects(client: Client) -> defer.Deferred:
    """Say on stderr when the connection drops and comes back; the Deferred
    returned fails when the client gives up (it cannot go on)."""
    gave_up: defer.Deferred = defer.Deferred()
    connects = [0]

    def retry(delay: float, why: str) -> None:
        note(f"{client.server}: {why}; reconnecting in {delay:g} s")

    def connected() -> None:
        connects[0] += 1
        if connects[0] > 1:
            note(f"{client.server}: connected again")

    client.on_retry = retry
    client.on_connect = connected
    client.on_give_up = gave_up.errback
    return gave_up


@defer.inlineCallbacks
def cmd_listen(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    _print_frames(client, args.json)
    gave_up = _report_reconnects(client)
    yield client.connect(since=args.since)
    note(f"listening as {client.user_id} on {client.server}; Ctrl-C ends")
    yield gave_up  # runs until interrupted, or fails when the client gives up


class _Lines(Protocol):
    """Standard input, line by line, for chat."""

    def __init__(self, on_line: Any, on_end: defer.Deferred) -> None:
        self._buffer = b""
        self._on_line = on_line
        self._on_end = on_end

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._on_line(line.decode("utf-8", "replace").rstrip("\r"))

    def connectionLost(self, reason: Any = None) -> None:
        if self._buffer.strip():
            self._on_line(self._buffer.decode("utf-8", "replace"))
        if not self._on_end.called:
            self._on_end.callback(None)


@defer.inlineCallbacks
def cmd_chat(args: argparse.Namespace, reactor: Any) -> Any:
    from twisted.internet.stdio import StandardIO

    client = make_client(args)
    _print_frames(client, as_json=False)
    gave_up = _report_reconnects(client)
    yield client.connect()
    out(f"chatting with {args.to}; end with Ctrl-D")
    sending: list[defer.Deferred] = []
    refused: list[BaseException] = []

    def not_sent(failure: Any) -> defer.Deferred:
        refused.append(failure.value)
        return explain(failure.value, args).addCallback(lambda line: out(f"  not sent: {line}"))

    def line(text: str) -> None:
        if not text.strip():
            return
        d = client.send(args.to, text)
        d.addCallbacks(lambda ack: out(f"  (#{safe(ack['id'])} {safe(ack['status'])})"), not_sent)
        sending.append(d)

    ended: defer.Deferred = defer.Deferred()

    def give_up(failure: Any) -> None:
        if not ended.called:
            ended.errback(failure)

    gave_up.addErrback(give_up)
    StandardIO(_Lines(line, ended), reactor=reactor)
    yield ended
    yield defer.DeferredList(sending)
    yield client.close()
    if refused:  # each was shown as it happened; the status tells a script
        raise UsageError(f"{len(refused)} of {len(sending)} messages not sent")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsserver-client", description="Talk to a wsserver from the command line."
    )
    p.add_argument(
        "--server",
        default=os.environ.get("WSSERVER_URL", DEFAULT_URL),
        help=f"server URL [WSSERVER_URL, default {DEFAULT_URL}]",
    )
    p.add_argument(
        "--user", default=os.environ.get("WSSERVER_USER"), help="your user id [WSSERVER_USER]"
    )
    p.add_argument(
        "--key",
        default=os.environ.get("WSSERVER_KEY"),
        help="your private key file [WSSERVER_KEY, default USER.key]",
    )
    p.add_argument(
        "--cafile",
        default=os.environ.get("WSSERVER_CAFILE"),
        help="CA certificate(s) to trust for https [WSSERVER_CAFILE]",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("keygen", help="make a key file (mode 0600) and print the public key")
    reg = sub.add_parser("register", help="register your public key")
    reg.add_argument("--name", required=True, help="your display name")
    sub.add_parser("login", help="log in and print a token (for scripts and curl)")
    send = sub.add_parser("send", help="send one signed message; exit 0 once acknowledged")
    send.add_argument("--to", required=True, help="recipient user id, or 'broadcast'")
    send.add_argument("text", help="the message")
    listen = sub.add_parser("listen", help="print messages as they arrive")
    listen.add_argument(
        "--json", action="store_true", help="one JSON object per frame, with verified_locally"
    )
    listen.add_argument("--since", type=int, help="also replay messages after this id")
    chat = sub.add_parser("chat", help="type lines to send, see replies")
    chat.add_argument("--to", required=True, help="who to chat with")
    return p


COMMANDS = {
    "keygen": cmd_keygen,
    "register": cmd_register,
    "login": cmd_login,
    "send": cmd_send,
    "listen": cmd_listen,
    "chat": cmd_chat,
}


def failure_line(err: BaseException, args: argparse.Namespace) -> str:
    """One human line for any failure: never a Python repr; what the server
    or the network said is made safe for a terminal (see safe())."""
    return safe(_failure_text(err, args))


def explain(err: BaseException, args: argparse.Namespace) -> defer.Deferred:
    """failure_line(), run in a thread: naming the fix for a connection
    problem may take blocking looks at the server (a TLS handshake, a plain
    GET), which must not stall the reactor."""
    return threads.deferToThread(failure_line, err, args)


def _failure_text(err: BaseException, args: argparse.Namespace) -> str:
    if isinstance(err, UsageError):
        return str(err)
    server = shown_url(args.server).rstrip("/")
    if isinstance(err, ServerError):
        line = f"{server}: {err.code}: {err.message}"
        if err.code == "unknown_user":
            line += f" (register it first: wsserver-client --user {args.user} register --name NAME)"
        elif err.code == "invalid_signature" and err.status == 401:
            line += f" ({args.user} is registered there with another key)"
        return line
    if isinstance(err, ConnectionProblem):
        fix = _fix(err, args)
        if err.kind == "timeout" and "plain HTTP" in fix:  # what the timeout meant
            return f"{err.server}: the server does not speak TLS here{fix}"
        return f"{err}{fix}"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{server}: {text}"


def _fix(err: ConnectionProblem, args: argparse.Namespace) -> str:
    """The fix for a connection problem, as the end of its line ('' if none)."""
    parts = urlsplit(err.server)
    host, secure = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if err.kind == "refused":
        return f": is the server running, on port {port}?"
    if err.kind == "tls_untrusted":
        if args.cafile:
            return f": {args.cafile} does not hold the certificate authority that signed it"
        return ": if a private certificate authority signed it, pass its certificate with --cafile"
    if err.kind == "tls_not_tls" or (err.kind == "timeout" and secure and speaks_http(host, port)):
        return f": it speaks plain HTTP, use http://{where}"
    if err.kind == "tls_hostname":
        names = certificate_names(host, port)
        if names:
            shown = ", ".join(names)
            return f" (it is for {shown}): use such a name in the URL, https://{names[0]}:{port}"
        return ""
    if err.kind == "closed" and not secure and speaks_tls(host, port):
        return f": it speaks HTTPS, use https://{where}"
    return ""


def _tls_certificate(host: str, port: int) -> bytes | None:
    """The certificate (DER) ``host:port`` presents in a TLS handshake, read
    without verifying it; None when no handshake completes.  Blocking (up to
    PROBE_TIMEOUT): run it off the reactor thread, as explain() does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError, UnicodeError):
        return None


def certificate_names(host: str, port: int) -> list[str]:
    """The names a server's certificate is for (read without verifying it),
    to tell a user which host name to use; [] when they cannot be read."""
    der = _tls_certificate(host, port)
    if der is None:
        return []
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    names = sans.get_values_for_type(x509.DNSName)
    return names + [str(a) for a in sans.get_values_for_type(x509.IPAddress)]


def speaks_tls(host: str, port: int) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificate not checked):
    to tell an http:// URL pointed at an HTTPS server."""
    return _tls_certificate(host, port) is not None


def speaks_http(host: str, port: int) -> bool:
    """Whether ``host:port`` answers a plain HTTP request: to tell an https://
    URL pointed at a plain-HTTP server (which may wait for a line that the TLS
    handshake never sends)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as conn:
            conn.sendall(b"GET /health HTTP/1.0\r\nHost: " + host.encode("idna") + b"\r\n\r\n")
            return conn.recv(5) == b"HTTP/"
    except (OSError, UnicodeError):
        return False


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    def run(reactor: Any) -> defer.Deferred:
        d = defer.maybeDeferred(COMMANDS[args.command], args, reactor)

        def failed(failure: Any) -> defer.Deferred:
            def report(line: str) -> None:
                sys.stderr.write(f"wsserver-client: {line}\n")
                raise SystemExit(1)

            return explain(failure.value, args).addCallback(report)

        return d.addErrback(failed)

    task.react(run)


if __name__ == "__main__":
    main()
