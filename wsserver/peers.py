"""Per-address caps on TCP connections, applied the moment one is accepted.

One client address may hold at most ``max_connections`` connections, of which
at most ``max_handshakes`` not yet upgraded to a WebSocket (plain HTTP
requests, TLS handshakes, WebSocket handshakes in progress).  A connection
over either cap is closed at once, before a byte of it is read: a flood of
half-open handshakes from one host cannot starve everyone else.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

_log = Logger()


class _Counted(ProtocolWrapper):
    """A connection counted against its peer's caps."""

    host = ""
    counted = False
    upgraded = False

    def makeConnection(self, transport: Any) -> None:
        self.host = _host(transport.getPeer())
        if not self.factory.admit(self.host):
            _log.info("refused a connection from {host}: too many", host=self.host)
            self.transport = transport
            transport.abortConnection()
            return
        self.counted = True
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.counted:
            super().dataReceived(data)

    def mark_upgraded(self) -> None:
        """This connection is now a WebSocket: it no longer counts as a handshake."""
        if self.counted and not self.upgraded:
            self.upgraded = True
            self.factory.upgraded(self.host)

    def connectionLost(self, reason: Any) -> None:
        if not self.counted:
            return  # refused: the wrapped protocol never saw this connection
        self.counted = False
        self.factory.released(self.host, self.upgraded)
        super().connectionLost(reason)


def _host(address: Any) -> str:
    return getattr(address, "host", None) or str(address)


class PeerLimits(WrappingFactory):
    """Wraps the site's factory; counts connections per client address."""

    protocol = _Counted

    def __init__(self, wrapped: Any, max_connections: int, max_handshakes: int) -> None:
        super().__init__(wrapped)
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self._open: dict[str, int] = {}
        self._handshaking: dict[str, int] = {}

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host``; False if it is over a cap."""
        if (
            self._open.get(host, 0) >= self.max_connections
            or self._handshaking.get(host, 0) >= self.max_handshakes
        ):
            return False
        self._open[host] = self._open.get(host, 0) + 1
        self._handshaking[host] = self._handshaking.get(host, 0) + 1
        return True

    def upgraded(self, host: str) -> None:
        _decrement(self._handshaking, host)

    def released(self, host: str, upgraded: bool) -> None:
        _decrement(self._open, host)
        if not upgraded:
            _decrement(self._handshaking, host)

    def counts(self, host: str) -> tuple[int, int]:
        """(open connections, handshakes in progress) of ``host``."""
        return self._open.get(host, 0), self._handshaking.get(host, 0)


def _decrement(counts: dict[str, int], host: str) -> None:
    left = counts.get(host, 0) - 1
    if left > 0:
        counts[host] = left
    else:
        counts.pop(host, None)


def mark_upgraded(transport: Any) -> Any:
    """Tell the ``_Counted`` wrapper under ``transport`` (if any) it became a WebSocket.

    Returns what the WebSocket should write to: ``transport`` itself, or, when
    that is the counting wrapper (plain TCP), the TCP transport under it, so
    that every frame written skips a layer that only passes it on.
    """
    seen = 0
    current = transport
    while current is not None and seen < 8:
        if isinstance(current, _Counted):
            current.mark_upgraded()
            return current.transport if current is transport else transport
        current = current.__dict__.get("transport")
        seen += 1
    return transport
