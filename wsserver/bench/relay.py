"""The ``relay`` ceiling: a bare Autobahn server that forwards each text frame to
the connection named in the client's ``X-Bench-Partner`` header.  No auth, no
parsing, no storage: what a WebSocket frame in and a frame out cost.

    python -m wsserver.bench.relay PORT

With ``WSSERVER_BENCH_LEAN_RELAY=1`` in its environment the relay takes the
one Autobahn tuning wsserver applies on connects (its option dump left
unformatted when not logged): T11 against a ceiling as lean as the server.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Relay(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        self.me = request.headers.get("x-bench-user", "")
        self.partner = request.headers.get("x-bench-partner", "")

    def onOpen(self) -> None:
        self.factory.users[self.me] = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        partner = self.factory.users.get(self.partner)
        if partner is not None:
            partner.sendMessage(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if getattr(self, "me", None) and self.factory.users.get(self.me) is self:
            del self.factory.users[self.me]


def main() -> None:
    if os.environ.get("WSSERVER_BENCH_LEAN_RELAY") == "1":
        from ..websocket import skip_unlogged_option_dumps

        skip_unlogged_option_dumps()
    factory = WebSocketServerFactory()
    factory.protocol = Relay
    factory.users = {}
    factory.setProtocolOptions(autoPingInterval=0, perMessageCompressionAccept=lambda o: None)
    port = reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
    print(f"relay listening on {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
