"""Routing: which connections a stored message goes to, and delivery status.

``IBroker`` is the seam between a connection and everything else that
delivers: ``LocalBroker`` (``local.py``) is the broker of one process, and
``RedisBroker`` (``redis.py``) the broker of a cluster node, which carries
live traffic, delivery status and the shared limits between nodes through
Redis.  ``tap.py`` chooses by ``BROKER``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from twisted.internet import defer
from zope.interface import Interface

from ..messages import Message


class Connection(Protocol):
    """What the broker needs of a connection (implemented in websocket.py)."""

    user_id: str

    def deliver(self, msg_id: int, frame: bytes, replayed: bool = False) -> bool:
        """Hand over a ``message`` frame, made once for every connection by the
        broker's ``prepare``; True if it was taken."""

    def notify(self, payload: bytes) -> None:
        """Send a non-message frame (a ``status``) if the connection is open."""

    def replay_finished(self) -> None:
        """Replay is over: send what arrived live meanwhile, then go live."""

    def over_cap(self) -> None:
        """The cluster-wide ``MAX_CONNECTIONS_PER_USER`` refused this connection
        after it opened (the answer comes from Redis): close it with 1008."""

    def writable(self) -> defer.Deferred:
        """Fire when the connection can take more (its transport is not full)."""

    @property
    def live(self) -> bool:
        """False once the connection is closing or closed."""


class IBroker(Interface):
    """Delivery to and from connections, wherever their users are."""

    def attach(conn: Connection) -> bool:  # noqa: N805 (zope.interface style)
        """Register an open connection; False when its user has too many."""

    def detach(conn: Connection) -> None:  # noqa: N805
        """Forget a connection that closed."""

    def publish(sender: Connection | None, msg: Message) -> Message:  # noqa: N805
        """Deliver a committed message; return it with its status now."""

    def replay(conn: Connection, since: int | None) -> defer.Deferred:  # noqa: N805
        """Send ``conn`` what its user missed (section 6), then let it go live."""

    def connections() -> Iterator[Connection]:
        """Every attached connection."""


from .local import REPLAY_PAGE, LocalBroker  # noqa: E402 (needs the names above)

__all__ = ["REPLAY_PAGE", "Connection", "IBroker", "LocalBroker"]
