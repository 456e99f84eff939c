"""Hostile input against a real server (real TCP, in-process): every bad input gets
its documented answer, nothing stored changes, and the logs stay clean."""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

import jwt
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest

from wsserver.auth import IAT_LEEWAY

from .support import LiveServer, ServerLog, b64, connect_ws, public_b64, vector_key, within

LONE = "\ud800"  # json.dumps writes it as the escape \ud800, a lone surrogate


def surrogate_json(obj: dict) -> bytes:
    """``obj`` as JSON text, ASCII only, lone surrogates written as escapes."""
    return json.dumps(obj).encode("ascii")


class InvalidUnicodeTests(unittest.TestCase):
    """A lone surrogate in any JSON string is refused as documented, never a crash."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "1000"})
        self.alice_key, self.alice_token = yield self.server.user("alice", vector_key("alice"))
        yield self.server.user("bob", vector_key("bob"))

    @defer.inlineCallbacks
    def post_raw(self, path: str, body: bytes):
        client = self.server.http()
        resp = yield within(
            client.post(
                self.server.base + path,
                data=body,
                headers={b"content-type": [b"application/json"]},
            )
        )
        return resp.code, json.loads((yield resp.content()))

    @defer.inlineCallbacks
    def test_frame_fields_with_a_lone_surrogate_are_invalid_message(self):
        """content, to, nonce, signature, type and from holding a lone surrogate are each
        answered with a system invalid_message frame; nothing is stored; the same
        connection then sends a message that is acked and delivered."""
        alice = yield self.server.connect(self.alice_token, testcase=self)
        before = yield self.server.store.count_messages()
        good = {"to": "bob", "content": "x", "nonce": "u-1"}
        for name in ("content", "to", "nonce", "signature", "type", "from"):
            alice.sendMessage(surrogate_json({**good, name: "a" + LONE}))
            frame = yield alice.next_of("system")
            self.assertEqual(frame["code"], "invalid_message", name)
            self.assertIn(name, frame["content"])
        after = yield self.server.store.count_messages()
        self.assertEqual(after, before)
        alice.send_json({"to": "bob", "content": "still here"})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["content"], "still here")
        self.assertIsNone(alice.close_code)

    @defer.inlineCallbacks
    def test_content_holding_u0000_is_refused_and_spoils_no_one_elses_message(self):
        """Content holding U+0000 (PostgreSQL's text cannot store it; it once made
        the whole batch fail there) is a system invalid_message on every engine;
        nothing is stored for it, and messages sent at the same moment, by the
        same user and by another, are acked and stored."""
        bob_token = yield self.server.login("bob", vector_key("bob"))
        alice = yield self.server.connect(self.alice_token, testcase=self)
        bob = yield self.server.connect(bob_token, testcase=self)
        before = yield self.server.store.count_messages()
        bob.send_json({"to": "alice", "content": "from bob", "nonce": "b-1"})
        alice.send_json({"to": "bob", "content": "nul\x00here", "nonce": "a-1"})
        alice.send_json({"to": "bob", "content": "after", "nonce": "a-2"})
        refusal = yield alice.next_of("system")
        self.assertEqual((refusal["code"], refusal.get("nonce")), ("invalid_message", "a-1"))
        self.assertIn("U+0000", refusal["content"])
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["content"], "after")
        ack = yield bob.next_of("ack")
        self.assertEqual(ack["content"], "from bob")
        after = yield self.server.store.count_messages()
        self.assertEqual(after, before + 2)

    @defer.inlineCallbacks
    def test_registration_fields_with_a_lone_surrogate_are_400_naming_the_field(self):
        """username, user_id and public_key holding a lone surrogate are 400
        invalid_request naming the field, and no user is created."""
        good = {
            "user_id": "carol",
            "username": "Carol",
            "public_key": public_b64(vector_key("bob")),
        }
        for name in ("username", "user_id", "public_key"):
            code, body = yield self.post_raw(
                "/auth/register", surrogate_json({**good, name: "Car" + LONE})
            )
            self.assertEqual((code, body["error"]["code"]), (400, "invalid_request"), name)
            self.assertIn(name, body["error"]["message"])
        code, body = yield self.server.get("/auth/users/carol")
        self.assertEqual((code, body["error"]["code"]), (404, "unknown_user"))
        code, _ = yield self.server.post("/auth/register", good)
        self.assertEqual(code, 201)

    @defer.inlineCallbacks
    def test_login_fields_with_a_lone_surrogate_are_400_naming_the_field(self):
        """Both login steps answer 400 invalid_request naming user_id, challenge or
        signature when it holds a lone surrogate; a proper login then still works."""
        sig = b64(b"\x00" * 64)
        cases = [
            ("/auth/login", {"user_id": "alice" + LONE}, "user_id"),
            ("/auth/login?verify=true", {"user_id": "al" + LONE, "signature": sig}, "user_id"),
            (
                "/auth/login?verify=true",
                {"user_id": "alice", "signature": sig, "challenge": "c" + LONE},
                "challenge",
            ),
            ("/auth/login?verify=true", {"user_id": "alice", "signature": LONE}, "signature"),
        ]
        for path, body, name in cases:
            code, out = yield self.post_raw(path, surrogate_json(body))
            self.assertEqual((code, out["error"]["code"]), (400, "invalid_request"), body)
            self.assertIn(name, out["error"]["message"])
        token = yield self.server.login("alice", self.alice_key)
        self.assertEqual(token.count("."), 2)


class _Raw(protocol.Protocol):
    """Sends one raw request; collects one response (its Content-Length, or up to
    the close), then hangs up."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return
        found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if found:
            complete = len(body) >= int(found.group(1))
        elif re.search(rb"(?im)^transfer-encoding:\s*chunked\s*$", head):
            complete = body.endswith(b"0\r\n\r\n")
        else:
            complete = head.startswith(b"HTTP/1.1 101")
        if complete and not self.done.called:
            self.done.callback(self.data)
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(self.data)


@defer.inlineCallbacks
def raw_http(server: LiveServer, request: bytes):
    """Send ``request`` as it is; fire with (status, headers, body) of the answer."""
    proto = _Raw(request)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    yield within(endpoints.connectProtocol(endpoint, proto))
    data = yield within(proto.done)
    head, _, body = data.partition(b"\r\n\r\n")
    if re.search(rb"(?im)^transfer-encoding:\s*chunked\s*$", head):
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            chunks.append(rest[: int(size, 16)])
            rest = rest[int(size, 16) + 2 :]
        body = b"".join(chunks)
    lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def ws_request(target: bytes, *extra: bytes) -> bytes:
    """A complete RFC 6455 upgrade request for ``target``, plus ``extra`` header lines."""
    return b"\r\n".join(
        [
            b"GET " + target + b" HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)),
            *extra,
            b"",
            b"",
        ]
    )


class TokenInTheLogTests(unittest.TestCase):
    """The token never reaches a log, however the query string spells it."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "1000"})
        self.key, self.token = yield self.server.user("alice", vector_key("alice"))
        self.signature_part = self.token.rsplit(".", 1)[1]

    def assertNoToken(self, lines: list[str]) -> None:
        leaks = [line[:300] for line in lines if self.signature_part in line]
        self.assertEqual(leaks, [], "the token's signature is in these log lines")

    def spellings(self) -> list[bytes]:
        """Every way Twisted's query parser reads a ``token`` parameter."""
        t = self.token.encode("ascii")
        encoded = t.replace(b".", b"%2E")
        return [
            b"token=" + t,
            b"since=0;token=" + t,
            b"%74oken=" + t,
            b"t%6Fk%65n=" + t,
            b"token=" + encoded,
            b"a=1&;&token=" + t + b";b=2",
        ]

    @defer.inlineCallbacks
    def test_refused_upgrades_never_log_the_token(self):
        """A /ws request carrying a live token in any spelling, refused for a bad
        since, a repeated token, a foreign Origin or a missing upgrade, is answered
        as documented and no log line shows the token; the access log shows the
        request with token=<redacted>."""
        log = ServerLog(self, self.server, fields=True)
        t = self.token.encode("ascii")
        for query in self.spellings():
            refusals = [
                (b"/ws?since=x;" + query, (), 400),
                (b"/ws?" + query + b"&token=" + t, (), 401),
                (b"/ws?" + query, (b"Origin: https://evil.example",), 403),
            ]
            for target, extra, status in refusals:
                code, _, body = yield raw_http(self.server, ws_request(target, *extra))
                self.assertEqual(code, status, target)
                self.assertNotIn(t, body)
            plain = b"GET /ws?" + query + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            code, _, _ = yield raw_http(self.server, plain)
            self.assertEqual(code, 426, query)
        lines = yield log.lines()
        self.assertNoToken(lines)
        logged = "/ws?since=<redacted>&token=<redacted>"
        self.assertTrue(any(logged in line for line in lines), lines)

    @defer.inlineCallbacks
    def test_accepted_upgrades_never_log_the_token(self):
        """A WebSocket opened with the token in each spelling works, and no log line
        shows the token."""
        log = ServerLog(self, self.server, fields=True)
        for query in self.spellings():
            url = f"{self.server.ws_base}?{query.decode('ascii')}"
            client = yield connect_ws(url, None)
            client.send_json({"to": "alice", "content": "hi"})
            frame = yield client.next_of("ack")
            self.assertEqual(frame["content"], "hi")
            yield client.close_and_wait()
        lines = yield log.lines()
        self.assertTrue(any("connected: alice" in line for line in lines), lines)
        self.assertNoToken(lines)

    @defer.inlineCallbacks
    def test_other_paths_never_log_the_token(self):
        """A token sent in the query of any other path (where it means nothing) is not
        logged either, in any spelling; nor is one in the Referer header."""
        log = ServerLog(self, self.server, fields=True)
        t = self.token.encode("ascii")
        for query in self.spellings():
            for path in (b"/auth/login", b"/nope", b"/health", b"/auth/users/alice"):
                request = (
                    b"GET " + path + b"?" + query + b" HTTP/1.1\r\nHost: x\r\n"
                    b"Referer: http://127.0.0.1/?" + query + b"\r\nConnection: close\r\n\r\n"
                )
                code, _, body = yield raw_http(self.server, request)
                self.assertIn(code, (200, 404, 405), path)
                self.assertNotIn(t, body)
        lines = yield log.lines()
        self.assertNoToken(lines)
        self.assertTrue(any("/health?token=<redacted>" in line for line in lines))


HOSTILE = [
    b"\x1b[31mred\x1b[0m",  # ESC: terminal escape sequences
    b"a\rb",  # CR: rewrites the line on a terminal
    b"nul\x00here",
    b"del\x7f",
    b"c1\x9b2J",  # C1 CSI as one byte
    b"c1 \xc2\x9b2J",  # C1 CSI in UTF-8
    b"caf\xc3\xa9",  # non-ASCII UTF-8
    b'bell\x07 tab\t quote" backslash\\',
]


def only_printable_ascii(text: str) -> bool:
    return all(" " <= ch <= "~" or ch == "\n" for ch in text)


class ControlCharactersInTheLogTests(unittest.TestCase):
    """Nothing a client sends can put a control character into a log line."""

    def setUp(self):
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "1000"})
        self.log = ServerLog(self, self.server)

    @defer.inlineCallbacks
    def assertCleanLog(self) -> Any:
        self.lines = yield self.log.lines()
        dirty = [line[:300] for line in self.lines if not only_printable_ascii(line)]
        self.assertEqual(dirty, [], "log lines with raw control or non-ASCII characters")

    @defer.inlineCallbacks
    def test_header_and_request_line_values_are_escaped_in_the_access_log(self):
        """User-Agent, Referer, the path and the method carrying ESC, DEL, BEL, tab,
        C1 controls and non-ASCII bytes are logged escaped (\\xHH), each request on
        one line of printable ASCII (Twisted itself answers 400, unlogged, to CR and
        NUL in a header and to controls in the method; LF ends a header line)."""
        answered = 0
        for value in HOSTILE:
            requests = [
                b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: " + value + b"\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\nReferer: http://x/" + value + b"\r\n",
                b"GET /nope/" + value.replace(b" ", b"") + b" HTTP/1.1\r\nHost: x\r\n",
                b"GET\x1b[2J /health HTTP/1.1\r\nHost: x\r\n",
            ]
            for request in requests:
                code, _, _ = yield raw_http(self.server, request + b"Connection: close\r\n\r\n")
                self.assertIn(code, (200, 400, 404, 405, 501), request)
                answered += 1
        yield self.assertCleanLog()
        access = [line for line in self.lines if '" - - [' in line]
        self.assertTrue(any("\\x1b[31mred\\x1b[0m" in line for line in access), access)
        self.assertTrue(any("caf\\xc3\\xa9" in line for line in access), access)
        self.assertTrue(any("c1\\x9b2J" in line for line in access), access)
        self.assertTrue(any("del\\x7f" in line for line in access), access)
        self.assertEqual(len([line for line in access if "\n" in line.strip()]), 0)

    @defer.inlineCallbacks
    def test_a_key_log_path_holding_controls_is_logged_escaped(self):
        """POST /auth/users/<percent-encoded controls>/keylog is refused, and the
        id (which Twisted unquotes from the path) reaches the log escaped: no
        line break or escape sequence of the client's in any line."""
        body = json.dumps({"seq": 1, "action": "add", "public_key": "x"}).encode()
        for path in (b"/auth/users/a%0aforged%20line/keylog", b"/auth/users/%1b%5b2J/keylog"):
            request = (
                b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            code, _, _ = yield raw_http(self.server, request)
            self.assertEqual(code, 400, path)
        yield self.assertCleanLog()
        self.assertFalse(any(line.startswith("forged line") for line in self.lines))

    @defer.inlineCallbacks
    def test_hostile_upgrade_headers_are_refused_before_autobahn_logs_them(self):
        """An upgrade request whose WebSocket headers carry control or non-ASCII
        bytes (which Autobahn would quote in its handshake-failure log line) is
        refused 400 invalid_request by the /ws gate; nothing raw reaches the log."""
        _, token = yield self.server.user("alice", vector_key("alice"))
        auth = b"Authorization: Bearer " + token.encode("ascii")
        for value in HOSTILE:
            for header in (b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Protocol: a, ", b"X-Any: "):
                request = ws_request(b"/ws", auth, header + value)
                code, _, body = yield raw_http(self.server, request)
                self.assertEqual(code, 400, (header, value))
                if b"\r" not in value and b"\x00" not in value:  # else Twisted's own 400
                    self.assertEqual(json.loads(body)["error"]["code"], "invalid_request")
        yield self.assertCleanLog()


def versioned_request(token: str, *lines: bytes) -> bytes:
    """An upgrade request with the token and exactly ``lines`` as its version headers."""
    return b"\r\n".join(
        [
            b"GET /ws HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)),
            b"Authorization: Bearer " + token.encode("ascii"),
            *lines,
            b"",
            b"",
        ]
    )


class WebSocketVersionTests(unittest.TestCase):
    """Only RFC 6455 (version 13) is spoken."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LiveServer(self)
        _, self.token = yield self.server.user("alice")

    @defer.inlineCallbacks
    def assertUpgradeRequired(self, *lines: bytes):
        code, headers, body = yield raw_http(self.server, versioned_request(self.token, *lines))
        self.assertEqual(code, 426, lines)
        self.assertEqual(json.loads(body)["error"]["code"], "upgrade_required")
        self.assertEqual(headers.get(b"sec-websocket-version"), [b"13"])
        self.assertEqual(headers.get(b"upgrade"), [b"websocket"])

    @defer.inlineCallbacks
    def test_versions_other_than_13_are_426(self):
        """A handshake without Sec-WebSocket-Version, with 0, 7, 8, 12, 14, a list, a
        repeated header or garbage is answered 426 upgrade_required with
        Sec-WebSocket-Version: 13; version 13 still opens."""
        cases = [
            (),
            (b"Sec-WebSocket-Version: 0",),
            (b"Sec-WebSocket-Version: 7",),
            (b"Sec-WebSocket-Version: 8",),
            (b"Sec-WebSocket-Version: 12",),
            (b"Sec-WebSocket-Version: 14",),
            (b"Sec-WebSocket-Version: 13, 8",),
            (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
            (b"Sec-WebSocket-Version: thirteen",),
        ]
        for lines in cases:
            yield self.assertUpgradeRequired(*lines)
        code, headers, _ = yield raw_http(
            self.server, versioned_request(self.token, b"Sec-WebSocket-Version: 13")
        )
        self.assertEqual(code, 101)
        self.assertEqual(headers.get(b"server"), [b"wsserver"])

    @defer.inlineCallbacks
    def test_draft_handshake_with_a_foreign_origin_does_not_get_through(self):
        """A draft-era handshake (version 8), whose Origin travels as
        Sec-WebSocket-Origin and so escaped the Origin check, is refused 426."""
        yield self.assertUpgradeRequired(
            b"Sec-WebSocket-Version: 8", b"Sec-WebSocket-Origin: https://evil.example"
        )


class TokenTimeTests(unittest.TestCase):
    """The /ws gate applies the JWT time claims (auth.Tokens) to real upgrades."""

    @defer.inlineCallbacks
    def test_tokens_not_yet_valid_are_refused_at_the_gate(self):
        """A correctly signed token whose nbf is in the future, or whose iat is beyond
        the leeway ahead, is 401 unauthorized at /ws; the same claims without them
        open a WebSocket."""
        server = LiveServer(self)
        yield server.user("alice")
        tokens = server.service.auth.tokens
        now = int(reactor.seconds())
        claims = {"sub": "alice", "iat": now, "exp": now + 600, "iss": "wsserver", "jti": "j"}
        secret = tokens._secret
        for extra in ({"nbf": now + 300}, {"iat": now + IAT_LEEWAY + 300}):
            token = jwt.encode({**claims, **extra}, secret, algorithm="HS256")
            code, body = yield server.get("/ws", headers={"Authorization": f"Bearer {token}"})
            self.assertEqual((code, body["error"]["code"]), (401, "unauthorized"), extra)
        client = yield server.connect(jwt.encode(claims, secret, algorithm="HS256"), testcase=self)
        self.assertIsNone(client.close_code)
