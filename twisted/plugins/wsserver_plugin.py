"""The twistd plugin: ``twistd wsserver`` runs ``wsserver.tap.makeService``."""

from twisted.application.service import ServiceMaker

wsserver = ServiceMaker(
    "wsserver",
    "wsserver.tap",
    "A secure WebSocket messaging server (Ed25519 logins, signed messages).",
    "wsserver",
)
