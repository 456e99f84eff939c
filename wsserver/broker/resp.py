"""Blocking Redis commands on a plain socket (RESP 2), for the few places
that talk to Redis before or outside the reactor: the start-up check of
``BROKER``, the benchmark's clean-up and the tests' helpers.  The running
broker uses txredisapi."""

from __future__ import annotations

import socket
from typing import Any


class RedisError(RuntimeError):
    """Redis answered a command with an error reply (its text)."""


def send_command(sock: socket.socket, *args: str) -> None:
    """Write one command as a RESP array of bulk strings."""
    raw = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    sock.sendall(raw.encode())


def read_reply(reader: Any) -> Any:
    """Read one reply from ``reader`` (the socket's ``makefile("rb")``): a
    status or bulk string as ``str``, an integer, None, or a list of those;
    an error reply raises ``RedisError``."""
    line = reader.readline()
    if not line:
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode("utf-8", "replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected Redis reply {line!r}")


def command(sock: socket.socket, reader: Any, *args: str) -> Any:
    """Send one command and read its reply."""
    send_command(sock, *args)
    return read_reply(reader)


__all__ = ["RedisError", "command", "read_reply", "send_command"]
