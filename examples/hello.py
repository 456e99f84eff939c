"""Register, log in and send one signed message to yourself: protocol v1 by hand.

    python examples/hello.py [http://127.0.0.1:8080]

Uses only what ``pip install .`` installs: Twisted's HTTP client (Agent),
Autobahn and PyNaCl.  It registers a new user ``demo-<random>`` each time.
"""

import base64
import json
import os
import sys
from io import BytesIO

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from nacl.signing import SigningKey
from twisted.internet import defer, endpoints, protocol, task
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class Body(protocol.Protocol):
    """Collects a response body.  (Twisted's readBody warns, with a
    DeprecationWarning, about the transport Agent gives it for a body that
    has already arrived, so the body is read here.)"""

    def __init__(self, done):
        self.done, self.parts = done, []

    def dataReceived(self, data):
        self.parts.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response):
    done = defer.Deferred()
    response.deliverBody(Body(done))
    return done


async def post(agent, url, body):
    """POST ``body`` as JSON; return the server's JSON answer."""
    response = await agent.request(
        b"POST",
        url.encode("ascii"),
        Headers({b"Content-Type": [b"application/json"]}),
        FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8"))),
    )
    answer = json.loads(await read_body(response))
    if response.code >= 400:
        raise SystemExit(f"{url}: {answer['error']['code']}: {answer['error']['message']}")
    return answer


async def main(reactor, server="http://127.0.0.1:8080"):
    agent = Agent(reactor)
    key = SigningKey.generate()
    user = "demo-" + os.urandom(4).hex()

    # 1. register the public key, 2. sign the login challenge, get a token
    public_key = b64(bytes(key.verify_key))
    await post(
        agent,
        f"{server}/auth/register",
        {"user_id": user, "username": "Demo", "public_key": public_key},
    )
    reply = await post(agent, f"{server}/auth/login", {"user_id": user})
    signature = b64(key.sign(reply["challenge"].encode("utf-8")).signature)
    reply = await post(
        agent, f"{server}/auth/login?verify=true", {"user_id": user, "signature": signature}
    )
    token = reply["token"]

    # 3. Connect and send a signed message (to ourselves, so it comes back too).
    done = defer.Deferred()

    class Sender(WebSocketClientProtocol):
        def onOpen(self):
            to, content, nonce = user, "hello, world", "hello-1"
            # signed over "wsserver-msg-v1\n" + from + "\n" + to + "\n" + nonce + "\n" + content
            signed = f"wsserver-msg-v1\n{user}\n{to}\n{nonce}\n{content}".encode()
            frame = {
                "to": to,
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
