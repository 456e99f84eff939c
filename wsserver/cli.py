"""``wsserver-client``: the command-line client.

    wsserver-client --user alice keygen
    wsserver-client --user alice register --name "Alice"
    wsserver-client --user alice send --to bob "hello"
    wsserver-client --user bob listen
    wsserver-client --user bob chat --with alice
    wsserver-client --user bob history --with alice
    wsserver-client --user alice group create team --name Team bob carol
    wsserver-client --user alice send --to '#team' "hello team"
    wsserver-client --user alice who bob carol

Global options fall back to WSSERVER_URL, WSSERVER_USER, WSSERVER_KEY and
WSSERVER_CAFILE.  Commands that need a token log in by themselves.  Every
failure is one line on stderr naming the server and, where there is one, the
fix, and exit status 1; listen and chat say on stderr when they reconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import ssl
import sys
import unicodedata
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer, task, threads
from twisted.internet.protocol import Protocol

from . import devices
from .client import (
    Client,
    ConnectionProblem,
    ServerError,
    generate_key,
    load_key,
    public_key_b64,
    save_key,
)
from .conversations import MAX_PAGE, MAX_WATCHED, group_id
from .keylog import KeyLogError
from .messages import is_group_id, is_user_id

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


REWRITTEN_MARK = "UNVERIFIED: key log rewritten"


def mark(verified: bool | None) -> str:
    return {True: "verified", False: "INVALID", None: "UNSIGNED"}[verified]


def describe(frame: dict, verified: bool | None, rewritten: bool = False) -> str:
    """A received message: time, sender, signature mark, content, every field
    made safe (see safe()); later lines of a multi-line content are indented
    continuation lines.  ``rewritten``: the sender's key log was rewritten
    since this device saw it (not verified, whatever the signature)."""
    to = frame.get("to")
    to = " (broadcast)" if to == "broadcast" else f" ({safe(to)})" if is_group_id(to) else ""
    shown = REWRITTEN_MARK if rewritten and verified is not None else mark(verified)
    return (
        f"[{safe(frame['timestamp'])}] {safe(frame['from'])}{to} [{shown}] "
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


def key_path(args: argparse.Namespace) -> str:
    return args.key or f"{_user(args)}.key"


def make_client(args: argparse.Namespace) -> Client:
    user = _user(args)
    path = key_path(args)
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
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        note(f"cannot write in {folder}: the key logs seen are kept for this run only")
    try:
        seen = devices.SeenLogs(devices.seen_path(path))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot read {devices.seen_path(path)}: {_os_text(exc)}") from None
    try:
        client = Client(args.server, user, key, cafile=args.cafile, timeout=TIMEOUT, seen=seen)
        client.on_keylog_notice = show_notice
        return client
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


def show_notice(notice: devices.KeyLogNotice) -> None:
    """A key-log notice as one line on stderr: ``warning:`` for a rewritten
    log, a log that does not check, or a key without an entry; ``notice:``
    when a user's devices changed."""
    note(("warning: " if notice.serious else "notice: ") + notice.text)


def cmd_keygen(args: argparse.Namespace, reactor: Any) -> Any:
    if not args.user and not args.key:
        raise UsageError("--user or --key (or WSSERVER_USER / WSSERVER_KEY) is required")
    if args.user:
        _user(args)  # refuse now an id that register would refuse later
    path = args.key or f"{args.user}.key"
    key = _new_key_file(path)
    out(public_key_b64(key))
    return defer.succeed(None)


def _new_key_file(path: str) -> Any:
    """Make a new key and write it to ``path`` (0600, never overwriting)."""
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
    return key


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
        try:
            record = yield client.lookup(client.user_id)
        except ServerError as missing:
            if missing.code != "unknown_user":
                raise
            raise ServerError(
                "user_exists",
                f"{client.user_id} is taken (the id of a deleted account stays taken); "
                "choose another user id",
            ) from None
        keys = [k.get("public_key") for k in record.get("keys") or () if isinstance(k, dict)]
        if public_key_b64(client.key) not in [record.get("public_key"), *keys]:
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


def _look_at_log(client: Client, user_id: str) -> defer.Deferred:
    """Fetch and check ``user_id``'s key log, and the key directory against
    it, so a change since this device last saw it, or a key without an
    entry, is said (on stderr) before anything is sent to them.  Any failure
    here is left to the command itself to meet and report."""
    if user_id == "broadcast" or user_id.startswith("#"):
        return defer.succeed(None)
    return client.check_directory(user_id).addErrback(lambda _: None)


@defer.inlineCallbacks
def cmd_send(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    yield _look_at_log(client, args.to)
    # Giving up fails the message itself, which is what is reported.
    _report_reconnects(client).addErrback(lambda _: None)
    yield client.connect()
    try:
        ack = yield client.send(args.to, args.text)
    finally:
        yield client.close()
    out(f"{safe(ack['id'])} {safe(ack['status'])}")


def _print_frames(client: Client, as_json: bool, receipts: bool = True) -> None:
    """Print what arrives (listen, chat); with ``receipts``, send a ``read``
    for every message shown that another user sent (docs/protocol.md
    section 15, "The Python client and section 13")."""

    def message(frame: dict, verified: bool | None) -> None:
        if as_json:
            out(json.dumps({**frame, "verified_locally": verified}))
        else:
            out(describe(frame, verified, client.rewritten(frame.get("from"))))
        if receipts and frame.get("from") != client.user_id and isinstance(frame.get("id"), int):
            client.read(frame["id"])

    def other(frame: dict) -> None:
        if as_json:
            out(json.dumps({**frame, "verified_locally": None}))
        elif frame["type"] == "status" and frame.get("status") == "read":
            out(f"your message #{safe(frame['id'])} was read by {safe(frame.get('by'))}")
        elif frame["type"] == "status":
            out(f"your message #{safe(frame['id'])} is {safe(frame['status'])}")
        elif frame["type"] == "group":
            out(group_event(frame))
        else:
            out(f"system: {safe(frame.get('code'))}: {safe(frame.get('content'))}")

    client.on_message = message
    client.on_status = other
    client.on_read = other
    client.on_group = other
    client.on_system = other


def group_event(frame: dict) -> str:
    """A ``group`` frame as a line: ``#team: bob was added``.  A ``removed``
    frame does not say who acted (the member left, or the owner removed
    them), so its line does not either."""
    event = {"added": "was added", "removed": "is no longer a member"}.get(frame.get("event"))
    what = event or f"event {safe(frame.get('event'))}"
    return f"group {safe(frame.get('group_id'))}: {safe(frame.get('user_id'))} {what}"


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


def _close_on_shutdown(client: Client, reactor: Any) -> None:
    """Ctrl-C or SIGTERM: close the connection on purpose before the reactor
    stops, so its loss is not taken for a dropped connection (no "reconnecting"
    line on the way out)."""
    reactor.addSystemEventTrigger("before", "shutdown", client.close)


@defer.inlineCallbacks
def cmd_listen(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    _close_on_shutdown(client, reactor)
    _print_frames(client, args.json, receipts=not args.no_receipts)
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
    _close_on_shutdown(client, reactor)
    _print_frames(client, as_json=False, receipts=not args.no_receipts)
    gave_up = _report_reconnects(client)
    yield _look_at_log(client, args.to)
    yield client.connect()
    state = ""
    if is_user_id(args.to) and args.to not in ("broadcast", client.user_id):
        # The partner's presence is in the banner, then a line on each change.
        first = _show_partner(client, args.to)
        client.watch([args.to])
        _watch_again_when_heard(client, args.to)
        shown = yield first.addTimeout(TIMEOUT, reactor).addErrback(lambda _: None)
        if shown == "offline":  # never seen, or not visible (yet) to this user
            shown = "offline, or not visible to you until they write to you"
        state = f" ({safe(args.to)} is {shown})" if shown else ""
    out(f"chatting with {safe(args.to)}{state}; end with Ctrl-D")
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


def _watch_again_when_heard(client: Client, partner: str) -> None:
    """chat: the partner's first message makes them visible under
    PRESENCE=contacts (the server decides at a watch), so the watch is sent
    again then, once."""
    shown = client.on_message
    heard: list[bool] = []

    def message(frame: dict, verified: bool | None) -> None:
        if shown is not None:
            shown(frame, verified)
        if frame.get("from") == partner and not heard:
            heard.append(True)
            client.watch([partner])

    client.on_message = message


def presence_text(frame: dict) -> str:
    """``online since T``, ``offline since T``, or ``offline`` when the
    server knows no time (never seen online, unknown, or not visible)."""
    since = frame.get("since")
    if frame.get("online") is True:
        return f"online since {safe(since)}"
    if not since or str(since).startswith("1970-01-01T00:00:00"):
        return "offline"
    return f"offline since {safe(since)}"


def _show_partner(client: Client, partner: str) -> defer.Deferred:
    """chat: a line each time the partner comes online or goes offline (a
    reconnect's repeat is skipped).  The Deferred returned fires with the
    first state known (presence_text), for the banner."""
    last: list[bool] = []
    first: defer.Deferred = defer.Deferred()

    def presence(frame: dict) -> None:
        if frame.get("user") != partner:
            return
        online = frame.get("online") is True
        if not last:
            if not first.called:
                first.callback(presence_text(frame))
        elif last[-1] != online:
            out(f"{safe(partner)} {'came online' if online else 'went offline'}")
        last[:] = [online]

    client.on_presence = presence
    return first


# -- history, conversations, groups, presence (protocol section 13) -------------------


def _peer(text: str) -> str:
    if is_user_id(text) or is_group_id(text):
        return text
    raise UsageError(f"{text!r} is not a user id, a group id (#team) or broadcast")


@defer.inlineCallbacks
def cmd_history(args: argparse.Namespace, reactor: Any) -> Any:
    peer = _peer(args.with_)
    if args.limit is not None and not 1 <= args.limit <= MAX_PAGE:
        raise UsageError(f"--limit must be from 1 to {MAX_PAGE}")
    if args.before is not None and args.before < 0:
        raise UsageError("--before must be a message id (0 or more)")
    client = make_client(args)
    try:
        page = yield client.history(peer, before=args.before, limit=args.limit)
    except ServerError as err:
        if err.code != "unknown_user":
            raise
        raise ServerError(err.code, f"no such user: {peer}", err.status) from None
    for frame, verified in reversed(page.messages):  # oldest first, like a chat
        if args.json:
            out(json.dumps({**frame, "verified_locally": verified}))
        else:
            line = describe(frame, verified, client.rewritten(frame.get("from")))
            readers = frame.get("read_by")
            if isinstance(readers, list) and readers:  # own messages: who read them
                line += f"  (read by {', '.join(safe(r) for r in readers)})"
            out(line)
    if not page.messages:
        note(f"no messages with {peer}" + (f" before #{args.before}" if args.before else ""))
    if page.more:
        limit = f" --limit {args.limit}" if args.limit is not None else ""
        # --user too, so that the line works pasted as it is (the user may
        # have come from WSSERVER_USER, which another shell may not have).
        note(
            f"older messages: wsserver-client --user {shlex.quote(client.user_id)} history"
            f" --with {shlex.quote(peer)} --before {page.oldest}{limit}"
        )


@defer.inlineCallbacks
def cmd_conversations(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    items = yield client.conversations()
    for item in items:
        out(
            f"{safe(item.get('last_timestamp'))}  {safe(item.get('with'))}  "
            f"last #{safe(item.get('last_id'))}"
        )
    if not items:
        note("no conversations yet")


def _group_line(group: dict) -> str:
    members = group.get("members") or []
    count = f"{len(members)} member{'s' if len(members) != 1 else ''}"
    return (
        f"{safe(group.get('group_id'))} ({safe(group.get('name'))}): owner "
        f"{safe(group.get('owner'))}, {count}: {', '.join(safe(m) for m in members)}"
    )


def _group_arg(text: str) -> str:
    try:
        return group_id(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _user_arg(text: str) -> str:
    if not is_user_id(text):
        raise UsageError(f"{text!r} is not a user id")
    return text


@defer.inlineCallbacks
def cmd_group(args: argparse.Namespace, reactor: Any) -> Any:
    action = args.group_command
    gid = _group_arg(args.group_id) if action != "list" else None
    user = _user_arg(args.member) if action in ("add", "remove") else None
    members = [_user_arg(m) for m in args.members] if action == "create" else []
    client = make_client(args)
    if action == "create":
        group = yield client.create_group(gid, args.name or gid[1:], members)
        out(f"created {_group_line(group)}")
    elif action == "add":
        group = yield client.add_member(gid, user)
        out(f"added {user} to {_group_line(group)}")
    elif action == "remove":
        yield client.remove_member(gid, user)
        out(f"removed {user} from {gid}")
    elif action == "leave":
        yield client.leave(gid)
        out(f"left {gid}")
    elif action == "show":
        out(_group_line((yield client.group(gid))))
    else:
        groups = yield client.groups()
        for group in groups:
            out(_group_line(group))
        if not groups:
            note("you are in no group")


@defer.inlineCallbacks
def cmd_who(args: argparse.Namespace, reactor: Any) -> Any:
    users = list(dict.fromkeys(_user_arg(u) for u in args.users))
    if len(users) > MAX_WATCHED:
        raise UsageError(f"at most {MAX_WATCHED} users at once")
    client = make_client(args)
    seen: dict[str, dict] = {}
    all_seen: defer.Deferred = defer.Deferred()

    def presence(frame: dict) -> None:
        user = frame.get("user")
        if user in users and user not in seen:
            seen[user] = frame
            if len(seen) == len(users) and not all_seen.called:
                all_seen.callback(None)

    client.on_presence = presence
    yield client.connect()
    try:
        client.watch(users)
        try:
            yield all_seen.addTimeout(TIMEOUT, reactor)
        except defer.TimeoutError:
            raise ConnectionProblem(
                "timeout", client.server, "no presence answer in time (timed out)"
            ) from None
    finally:
        yield client.close()
    for user in users:
        out(f"{user}: {presence_text(seen[user])}")


# -- devices, sign-out, deletion (protocol section 12) ------------------------------


@defer.inlineCallbacks
def cmd_devices(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    keys = yield client.devices()
    yield client.check_directory(client.user_id)
    for k in keys:
        which = "this device " if k["this_device"] else "other device"
        out(f"{k['key_id']}  {safe(k['added_at'] or '-')}  {which}  {safe(k['name'] or '-')}")


@defer.inlineCallbacks
def cmd_trust(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    user = args.user_id
    if not is_user_id(user):
        raise UsageError(f"{user!r} is not a user id")
    log = yield client.fetch_keylog(user)
    for kid in log.state.active:
        which = ""
        if user == client.user_id:
            which = "this device   " if kid == client.key_id else "other device  "
        added = log.added_at(kid) or "-"
        out(f"{kid}  {safe(added)}  {which}{safe(log.state.names.get(kid) or '-')}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(
                f"nothing accepted: compare these key ids with {user}'s own list "
                f"(wsserver-client devices), then run again with --yes"
            )
        answer = yield threads.deferToThread(
            input,
            f"Are these {user}'s devices, as {user} told you another way? Type yes to trust "
            f"this key log: ",
        )
        if answer.strip() != "yes":
            raise UsageError("not confirmed: nothing accepted")
    yield client.trust(user, log)
    out(
        f"trusted {user}'s key log as it is now ({len(log.entries)} entries, "
        f"{len(log.state.active)} active keys): it is what this device compares with from now on"
    )


@defer.inlineCallbacks
def cmd_link(args: argparse.Namespace, reactor: Any) -> Any:
    user = _user(args)
    path = key_path(args)
    if not os.path.exists(path):
        _new_key_file(path)
        note(f"made a new key file {path} for this device")
    client = make_client(args)
    try:
        text = yield client.link()
    except devices.PairingProblem as err:
        if client.key_id in (d["key_id"] for d in (yield client.devices())):
            out(f"key_id {client.key_id}")
            note(f"{err}: nothing to link")
            return
        raise
    key_option = f" --key {args.key}" if args.key else ""
    out(text)
    out(f"key_id {client.key_id}")
    note(
        f"on a device that holds one of {user}'s keys, run: wsserver-client --user {user} "
        f"approve {text} --name NAME  (it prints the key_id {client.key_id}: compare)"
    )
    note(f"then, here: wsserver-client --user {user}{key_option} listen (or send, chat)")


@defer.inlineCallbacks
def cmd_approve(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    new_id = yield client.approve(args.pairing_text, args.name)
    out(f"added {new_id}")


@defer.inlineCallbacks
def cmd_revoke(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    yield client.revoke(args.key_id)
    out(f"revoked {args.key_id}")
    if args.key_id == client.key_id:
        note("that was this device's key: it can no longer log in")


@defer.inlineCallbacks
def cmd_logout(args: argparse.Namespace, reactor: Any) -> Any:
    token = args.token or os.environ.get("WSSERVER_TOKEN") or None
    if token is None and not args.all:
        raise UsageError(
            "logout signs out one token: give it with --token or WSSERVER_TOKEN "
            "(the one 'login' printed), or use --all to sign out every session"
        )
    client = make_client(args)
    yield client.logout(everywhere=args.all, token=token)
    out("signed out everywhere" if args.all else "signed out")


@defer.inlineCallbacks
def cmd_delete_account(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("delete-account asks on a terminal; in a script add --yes")
        answer = yield threads.deferToThread(
            input,
            f"This deletes the account {client.user_id} on {shown_url(args.server)} for good: "
            f"its keys and its messages. Type the user id to confirm: ",
        )
        if answer.strip() != client.user_id:
            raise UsageError("not confirmed: nothing was deleted")
    yield client.delete_account()
    out(f"deleted {client.user_id}")


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
    send.add_argument(
        "--to", required=True, help="recipient user id, a group id ('#team'), or 'broadcast'"
    )
    send.add_argument("text", help="the message")
    listen = sub.add_parser("listen", help="print messages as they arrive")
    listen.add_argument(
        "--json", action="store_true", help="one JSON object per frame, with verified_locally"
    )
    listen.add_argument("--since", type=int, help="also replay messages after this id")
    no_receipts = "do not send read receipts for the messages shown"
    listen.add_argument("--no-receipts", action="store_true", help=no_receipts)
    chat = sub.add_parser("chat", help="type lines to send, see replies")
    chat.add_argument(
        "--with",
        "--to",
        dest="to",
        metavar="ID",
        required=True,
        help="who to chat with (a user or '#group')",
    )
    chat.add_argument("--no-receipts", action="store_true", help=no_receipts)
    history = sub.add_parser(
        "history", help="print a page of a conversation, oldest first, each message checked"
    )
    history.add_argument(
        "--with",
        dest="with_",
        metavar="PEER",
        required=True,
        help="a user id, a group id ('#team') or broadcast",
    )
    history.add_argument(
        "--before", type=int, metavar="ID", help="only messages older than this id"
    )
    history.add_argument(
        "--limit", type=int, metavar="N", help=f"at most this many (1 to {MAX_PAGE}, default 50)"
    )
    history.add_argument(
        "--json", action="store_true", help="one JSON object per message, with verified_locally"
    )
    sub.add_parser("conversations", help="list your conversations, most recent first")
    group = sub.add_parser("group", help="create, change, leave and list groups")
    actions = group.add_subparsers(dest="group_command", required=True)
    create = actions.add_parser("create", help="create a group that you own")
    create.add_argument("group_id", metavar="ID", help="the group id (team or '#team')")
    create.add_argument("--name", help="its display name (default: the id without #)")
    create.add_argument("members", metavar="MEMBER", nargs="*", help="user ids to add")
    for name, text in (("add", "add a member (owner only)"), ("remove", "remove a member")):
        change = actions.add_parser(name, help=text)
        change.add_argument("group_id", metavar="ID")
        change.add_argument("member", metavar="USER")
    actions.add_parser("leave", help="leave a group").add_argument("group_id", metavar="ID")
    actions.add_parser("show", help="a group's owner and members").add_argument(
        "group_id", metavar="ID"
    )
    actions.add_parser("list", help="the groups you are in")
    who = sub.add_parser("who", help="print whether these users are online, and since when")
    who.add_argument("users", metavar="USER", nargs="+")
    sub.add_parser("devices", help="list your active keys (devices), marking this one")
    trust = sub.add_parser(
        "trust",
        help="accept a user's key log as it is now (after a warning, once you have "
        "checked their devices with them)",
    )
    trust.add_argument("user_id", metavar="USER", help="whose key log (yours too)")
    trust.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    sub.add_parser(
        "link",
        help="on a new device: make its key if needed and print a pairing text to approve",
    )
    approve = sub.add_parser(
        "approve", help="on a device with an active key: add the new device of a pairing text"
    )
    approve.add_argument("pairing_text", metavar="PAIRING-TEXT", help="what link printed")
    approve.add_argument("--name", help="a label for the new device (up to 64 characters)")
    # A key_id is base64url: it may start with "-" (1 in 64), which must not
    # read as an option, so revoke takes none ("+h" is its help).
    revoke = sub.add_parser(
        "revoke", help="revoke a device's key (its connections close)", prefix_chars="+"
    )
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key_id, as devices shows it")
    logout = sub.add_parser("logout", help="sign out a token, or every session with --all")
    logout.add_argument("--all", action="store_true", help="sign out every session of the user")
    logout.add_argument("--token", help="the token to sign out [WSSERVER_TOKEN]")
    delete = sub.add_parser("delete-account", help="delete your account for good (asks first)")
    delete.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    return p


COMMANDS = {
    "keygen": cmd_keygen,
    "register": cmd_register,
    "login": cmd_login,
    "send": cmd_send,
    "listen": cmd_listen,
    "chat": cmd_chat,
    "history": cmd_history,
    "conversations": cmd_conversations,
    "group": cmd_group,
    "who": cmd_who,
    "devices": cmd_devices,
    "trust": cmd_trust,
    "link": cmd_link,
    "approve": cmd_approve,
    "revoke": cmd_revoke,
    "logout": cmd_logout,
    "delete-account": cmd_delete_account,
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
        if err.code == "unknown_user" and err.message.startswith("no such user:"):
            pass  # a member or peer that is not registered: the message names it
        elif err.code == "unknown_user":
            line += f" (register it first: wsserver-client --user {args.user} register --name NAME)"
        elif err.code == "unknown_group":
            line += " (no such group, or you are not in it: 'group list' shows yours)"
        elif err.code == "invalid_signature" and err.status == 401:
            line += (
                f" (this key is not an active key of {args.user} there: "
                "registered with another key, or revoked)"
            )
        return line
    if isinstance(err, KeyLogError):
        return f"{server}: {err.code}: {err.message}"
    if isinstance(err, devices.PairingProblem):
        return f"{server}: {err}"
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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``group create ID --name N MEMBER...`` may give its
    members after the option (argparse alone takes them only before it)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        if getattr(args, "group_command", None) != "create" or any(
            e.startswith("-") for e in extra
        ):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.members += extra
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)

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
