"""The one place where wsserver touches an undocumented part of Twisted.

Everything else in wsserver uses Twisted's public API only (a test scans the
sources for it: tests/test_seams.py).  What is here has no public
equivalent; each function says what it relies on, and a canary test fails
the day Twisted changes it.  (Autobahn's replaced internals, the masker hook
and ``onMessageEnd``, live in websocket.py with canaries of their own.)
"""

from __future__ import annotations

from typing import Any


def release_upgraded_request(channel: Any, request: Any) -> None:
    """Let ``channel`` forget ``request``, whose connection became a WebSocket.

    Autobahn's ``WebSocketResource`` takes the transport away from the HTTP
    channel, so the upgrade request never finishes and stays in the channel's
    queue of requests while it points back at the channel: a reference cycle
    (several KiB per connection) that would wait for the cyclic collector.
    Twisted has no public call to drop a request that will never finish
    (``requestDone`` would also resume reading on a transport the channel no
    longer owns), so this removes the request from ``HTTPChannel.requests``,
    the queue it keeps in that undocumented attribute.
    """
    queue = channel.requests
    if request in queue:
        queue.remove(request)


__all__ = ["release_upgraded_request"]
