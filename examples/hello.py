"""Register, log in and send one signed message to yourself: protocol v1 by hand.

    python examples/hello.py [http://127.0.0.1:8080]

Needs the project's test extra (treq) besides the server's own dependencies.
"""

import base64
import json
import os
import sys

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from nacl.signing import SigningKey
from twisted.internet import defer, endpoints, task


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


async def main(reactor, server="http://127.0.0.1:8080"):
    key = SigningKey.generate()
    user = "demo-" + os.urandom(4).hex()

    # 1. Register the public key.
    await treq.post(
        f"{server}/auth/register",
        json={"user_id": user, "username": "Demo", "public_key": b64(bytes(key.verify_key))},
    )
    # 2. Ask for a challenge, sign it, get a token.
    reply = await (await treq.post(f"{server}/auth/login", json={"user_id": user})).json()
    signature = b64(key.sign(reply["challenge"].encode("utf-8")).signature)
    reply = await (
        await treq.post(
            f"{server}/auth/login?verify=true", json={"user_id": user, "signature": signature}
        )
    ).json()
    token = reply["token"]

    # 3. Connect and send a signed message (to ourselves, so it comes back too).
    done = defer.Deferred()

    class Sender(WebSocketClientProtocol):
        def onOpen(self):
            content, nonce = "hello, world", "hello-1"
            signed = f"wsserver-msg-v1\n{user}\n{user}\n{nonce}\n{content}".encode()
            frame = {
                "to": user,
                "content": content,
                "nonce": nonce,
                "signature": b64(key.sign(signed).signature),
            }
            self.sendMessage(json.dumps(frame).encode("utf-8"))

        def onMessage(self, payload, is_binary):
            frame = json.loads(payload)
            print(frame["type"], frame.get("id"), frame.get("status"), frame.get("verification"))
            if frame["type"] == "ack":
                self.sendClose(1000)

        def onClose(self, was_clean, code, reason):
            done.callback(code)

    ws_url = server.replace("http", "ws", 1) + "/ws"
    factory = WebSocketClientFactory(ws_url, headers={"Authorization": f"Bearer {token}"})
    factory.protocol = Sender
    await endpoints.clientFromString(reactor, f"tcp:{factory.host}:{factory.port}").connect(factory)
    await done


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
