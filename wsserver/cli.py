"""``wsserver-client``: the command-line client.

    wsserver-client --user alice keygen
    wsserver-client --user alice register --name "Alice"
    wsserver-client --user alice send --to bob "hello"
    wsserver-client --user bob listen
    wsserver-client --user bob chat --to alice

Global options fall back to WSSERVER_URL, WSSERVER_USER, WSSERVER_KEY and
WSSERVER_CAFILE.  Commands that need a token log in by themselves.  A refusal
from the server is one line with the server's code, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import Protocol

from .client import Client, ServerError, generate_key, load_key, public_key_b64, save_key

DEFAULT_URL = "http://127.0.0.1:8080"


class UsageError(Exception):
    """A problem with the command line or the local files."""


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def mark(verified: bool | None) -> str:
    return {True: "verified", False: "INVALID", None: "UNSIGNED"}[verified]


def describe(frame: dict, verified: bool | None) -> str:
    """One line for a received message: time, sender, signature mark, content."""
    to = " (broadcast)" if frame.get("to") == "broadcast" else ""
    return (
        f"[{frame['timestamp']}] {frame['from']}{to} [{mark(verified)}] #{frame['id']}: "
        f"{frame['content']}"
    )


def make_client(args: argparse.Namespace) -> Client:
    if not args.user:
        raise UsageError("--user (or WSSERVER_USER) is required")
    path = args.key or f"{args.user}.key"
    try:
        key = load_key(path)
    except FileNotFoundError:
        raise UsageError(f"no key file {path}: run 'wsserver-client keygen' first") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Client(args.server, args.user, key, cafile=args.cafile)


def cmd_keygen(args: argparse.Namespace, reactor: Any) -> Any:
    if not args.user and not args.key:
        raise UsageError("--user or --key (or WSSERVER_USER / WSSERVER_KEY) is required")
    path = args.key or f"{args.user}.key"
    key = generate_key()
    try:
        save_key(key, path)
    except FileExistsError:
        raise UsageError(f"{path} already exists: not overwriting a key") from None
    out(public_key_b64(key))
    return defer.succeed(None)


@defer.inlineCallbacks
def cmd_register(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    user = yield client.register(args.name)
    out(f"registered {user['user_id']} ({user['username']}) with key {user['public_key']}")


@defer.inlineCallbacks
def cmd_login(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    token = yield client.login()
    out(token)


@defer.inlineCallbacks
def cmd_send(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    yield client.connect()
    try:
        ack = yield client.send(args.to, args.text)
    finally:
        yield client.close()
    out(f"{ack['id']} {ack['status']}")


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
            out(f"your message #{frame['id']} is {frame['status']}")
        else:
            out(f"system: {frame.get('code')}: {frame.get('content')}")

    client.on_message = message
    client.on_status = other
    client.on_system = other


@defer.inlineCallbacks
def cmd_listen(args: argparse.Namespace, reactor: Any) -> Any:
    client = make_client(args)
    _print_frames(client, args.json)
    yield client.connect(since=args.since)
    yield defer.Deferred()  # until interrupted


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
    yield client.connect()
    out(f"chatting with {args.to}; end with Ctrl-D")
    sending: list[defer.Deferred] = []

    def line(text: str) -> None:
        if not text.strip():
            return
        d = client.send(args.to, text)
        d.addCallbacks(
            lambda ack: out(f"  (#{ack['id']} {ack['status']})"),
            lambda f: out(f"  not sent: {f.value}"),
        )
        sending.append(d)

    ended: defer.Deferred = defer.Deferred()
    StandardIO(_Lines(line, ended), reactor=reactor)
    yield ended
    yield defer.DeferredList(sending)
    yield client.close()


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


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    def run(reactor: Any) -> defer.Deferred:
        d = defer.maybeDeferred(COMMANDS[args.command], args, reactor)

        def failed(failure: Any) -> None:
            if failure.check(ServerError):
                err = failure.value
                sys.stderr.write(f"wsserver-client: {err.code}: {err.message}\n")
            elif failure.check(UsageError):
                sys.stderr.write(f"wsserver-client: {failure.value}\n")
            else:
                sys.stderr.write(f"wsserver-client: {failure.getErrorMessage()}\n")
            raise SystemExit(1)

        return d.addErrback(failed)

    task.react(run)


if __name__ == "__main__":
    main()
