"""wsserver: a WebSocket messaging server where every user proves who they are.

Users log in with an Ed25519 challenge-response and get a JWT; messages may be
signed and are checked by the server, stored before they are acknowledged,
and delivered to every device of their recipient.
"""

__version__ = "0.1.0"
