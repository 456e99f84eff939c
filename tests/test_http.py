"""The HTTP API over real TCP (protocol section 2): every answer and every refusal."""

from __future__ import annotations

import json
import os
import re
import socket

from nacl.signing import SigningKey
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from wsserver.web import MAX_LOGGED_URI, access_log_line, log_safe, redacted_uri

from .support import VECTORS, LiveServer, b64, public_b64, vector_key, within

ALICE_PUB = VECTORS["users"]["alice"]["public_key"]


class HttpTests(unittest.TestCase):
    def setUp(self):
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "1000"})

    @defer.inlineCallbacks
    def raw(self, method, path, body=b"", headers=None):
        client = self.server.http()
        resp = yield within(
            client.request(method, self.server.base + path, data=body, headers=headers)
        )
        content = yield resp.content()
        return resp, json.loads(content) if content else None

    def assertError(self, code, body, expected_status, expected_code):
        self.assertEqual((code, body["error"]["code"]), (expected_status, expected_code), body)
        self.assertTrue(body["error"]["message"])

    @defer.inlineCallbacks
    def test_register_and_lookup(self):
        """Register answers 201 with the stored user; the key directory shows it."""
        code, body = yield self.server.post(
            "/auth/register",
            {
                "user_id": "alice",
                "username": "Jose\u0301",
                "public_key": ALICE_PUB.rstrip("="),
                "extra": "ignored",
            },
        )
        self.assertEqual(code, 201)
        self.assertEqual(body["username"], "Jos\u00e9")
        self.assertEqual(body["public_key"], ALICE_PUB)
        self.assertRegex(body["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        created = body["created_at"]
        code, body = yield self.server.get("/auth/users/alice")
        self.assertEqual(code, 200)
        # The registration key is the first (and only) active key (section 12).
        key = {
            "key_id": VECTORS["key_ids"][0]["key_id"],
            "public_key": ALICE_PUB,
            "name": None,
            "added_at": created,
        }
        self.assertEqual(
            body,
            {"user_id": "alice", "username": "Jos\u00e9", "public_key": ALICE_PUB, "keys": [key]},
        )

    @defer.inlineCallbacks
    def test_register_refusals_name_the_field_and_store_nothing(self):
        """Each ill-formed field is 400 invalid_request naming it; a taken id is 409 and
        the first registration is unchanged."""
        good = {"user_id": "alice", "username": "Alice", "public_key": ALICE_PUB}
        bad = [
            ({"user_id": "has space"}, "user_id"),
            ({"user_id": "broadcast"}, "user_id"),
            ({"user_id": "system"}, "user_id"),
            ({"user_id": None}, "user_id"),
            ({"username": ""}, "username"),
            ({"username": "a\x07"}, "username"),
            ({"public_key": "AAAA"}, "public_key"),
            ({"public_key": b64(b"\x01" + b"\x00" * 31)}, "public_key"),
        ]
        for change, field in bad:
            code, body = yield self.server.post("/auth/register", {**good, **change})
            self.assertError(code, body, 400, "invalid_request")
            self.assertIn(field, body["error"]["message"])
        code, body = yield self.server.post("/auth/register", good)
        self.assertEqual(code, 201)
        other = public_b64(SigningKey.generate())
        code, body = yield self.server.post(
            "/auth/register", {**good, "username": "Mallory", "public_key": other}
        )
        self.assertError(code, body, 409, "user_exists")
        code, body = yield self.server.get("/auth/users/alice")
        self.assertEqual((body["username"], body["public_key"]), ("Alice", ALICE_PUB))

    @defer.inlineCallbacks
    def test_body_refusals(self):
        """Not JSON, not an object, duplicate keys: 400; wrong type: 415; over 16 KiB: 413."""
        json_ct = {b"content-type": [b"application/json"]}
        for body in (b"{", b"[1]", b'"x"', b'{"user_id": "a", "user_id": "b"}', b"", b"\xff"):
            resp, out = yield self.raw("POST", "/auth/login", body, json_ct)
            self.assertError(resp.code, out, 400, "invalid_request")
        resp, out = yield self.raw(
            "POST", "/auth/login", b'{"user_id":"a"}', {b"content-type": [b"text/plain"]}
        )
        self.assertError(resp.code, out, 415, "unsupported_media_type")
        resp, out = yield self.raw("POST", "/auth/login", b'{"user_id":"a"}')
        self.assertError(resp.code, out, 415, "unsupported_media_type")
        big = json.dumps({"user_id": "a", "pad": "x" * 17000}).encode()
        resp, out = yield self.raw("POST", "/auth/register", big, json_ct)
        self.assertError(resp.code, out, 413, "request_too_large")
        resp, out = yield self.raw(
            "POST",
            "/auth/login",
            b'{"user_id": "a"}',
            {b"content-type": [b"application/json; charset=utf-8"]},
        )
        self.assertError(resp.code, out, 404, "unknown_user")

    @defer.inlineCallbacks
    def test_unknown_paths_and_methods(self):
        """Unknown paths are 404 not_found; wrong methods 405 with Allow."""
        for path in (
            "/nope",
            "/auth",
            "/auth/nope",
            "/auth/users/",
            "/auth/users/a/b",
            "/auth/login/x",
            "/ws/x",
        ):
            code, body = yield self.server.get(path)
            self.assertError(code, body, 404, "not_found")
        resp, body = yield self.raw("GET", "/auth/register")
        self.assertError(resp.code, body, 405, "method_not_allowed")
        self.assertEqual(resp.headers.getRawHeaders(b"allow"), [b"POST"])
        resp, body = yield self.raw("PUT", "/auth/users/alice")
        self.assertError(resp.code, body, 405, "method_not_allowed")
        self.assertEqual(resp.headers.getRawHeaders(b"allow"), [b"DELETE, GET"])
        resp, body = yield self.raw("DELETE", "/auth/users/alice/keylog")
        self.assertError(resp.code, body, 405, "method_not_allowed")
        self.assertEqual(resp.headers.getRawHeaders(b"allow"), [b"GET, POST"])
        resp, body = yield self.raw("GET", "/auth/logout")
        self.assertError(resp.code, body, 405, "method_not_allowed")
        resp, body = yield self.raw("POST", "/ws")
        self.assertError(resp.code, body, 405, "method_not_allowed")

    @defer.inlineCallbacks
    def test_unknown_user_lookup(self):
        """Looking up an id nobody registered is 404 unknown_user."""
        for path in ("/auth/users/nobody", "/auth/users/bad%20id", "/auth/users/%FF"):
            code, body = yield self.server.get(path)
            self.assertError(code, body, 404, "unknown_user")

    @defer.inlineCallbacks
    def test_login_flow_with_the_vector_key(self):
        """Challenge, sign with the vector key, get a JWT whose expiry is reported."""
        yield self.server.register("alice", vector_key("alice"))
        code, body = yield self.server.post("/auth/login", {"user_id": "alice"})
        self.assertEqual(code, 200)
        self.assertTrue(body["challenge"].startswith("wsserver-login-v1:alice:"))
        self.assertTrue(body["expires_at"].endswith("Z"))
        sig = b64(vector_key("alice").sign(body["challenge"].encode()).signature)
        code, out = yield self.server.post(
            "/auth/login?verify=true",
            {"user_id": "alice", "signature": sig, "challenge": body["challenge"]},
        )
        self.assertEqual(code, 200)
        self.assertEqual(out["token"].count("."), 2)
        self.assertTrue(out["expires_at"].endswith("Z"))
        # The challenge was used once.
        code, out = yield self.server.post(
            "/auth/login?verify=true", {"user_id": "alice", "signature": sig}
        )
        self.assertError(code, out, 401, "no_challenge")

    @defer.inlineCallbacks
    def test_login_refusals(self):
        """A wrong key is 401 invalid_signature; unknown users 404; a missing or
        ill-formed user_id, signature or verify flag 400 naming it."""
        yield self.server.register("alice", vector_key("alice"))
        code, body = yield self.server.post("/auth/login", {"user_id": "alice"})
        sig = b64(vector_key("bob").sign(body["challenge"].encode()).signature)
        code, out = yield self.server.post(
            "/auth/login?verify=true", {"user_id": "alice", "signature": sig}
        )
        self.assertError(code, out, 401, "invalid_signature")
        code, out = yield self.server.post("/auth/login", {"user_id": "nobody"})
        self.assertError(code, out, 404, "unknown_user")
        code, out = yield self.server.post(
            "/auth/login?verify=true", {"user_id": "nobody", "signature": sig}
        )
        self.assertError(code, out, 404, "unknown_user")
        code, out = yield self.server.post("/auth/login?verify=true", {"user_id": "alice"})
        self.assertError(code, out, 400, "invalid_request")
        for body in ({}, {"user_id": 5}, {"user_id": "bad id"}):
            for path in ("/auth/login", "/auth/login?verify=true"):
                code, out = yield self.server.post(path, {**body, "signature": sig})
                self.assertError(code, out, 400, "invalid_request")
                self.assertIn("user_id", out["error"]["message"])
        code, out = yield self.server.post("/auth/login?verify=maybe", {"user_id": "alice"})
        self.assertError(code, out, 400, "invalid_request")

    @defer.inlineCallbacks
    def test_health_and_info(self):
        """/health reports ok, the connection count and the node (host:pid) that
        answered; /info names the server."""
        code, body = yield self.server.get("/health")
        self.assertEqual((code, body["status"], body["connections"]), (200, "ok", 0))
        if self.server.mode == "single":
            self.assertEqual(body["node"], f"{socket.gethostname()}:{os.getpid()}")
        elif self.server.mode == "cluster":  # HTTP goes to the first node, named so
            self.assertEqual(body["node"], "test-1")
        else:  # one of the workers, each host:pid of its own process
            pids = self.server.worker_pids.values()
            self.assertIn(body["node"], [f"{socket.gethostname()}:{pid}" for pid in pids])
        code, body = yield self.server.get("/info")
        self.assertEqual((code, body["name"], body["protocol"]), (200, "wsserver", 1))

    @defer.inlineCallbacks
    def test_web_client_files(self):
        """/ and /static/* serve the web client from package data with a
        restrictive CSP; nothing else under /static/, and GET/HEAD only."""
        client = self.server.http()
        pages = {
            "/": b"text/html",
            "/static/app.js": b"text/javascript",
            "/static/chat.js": b"text/javascript",
            "/static/app.css": b"text/css",
            "/static/icon.svg": b"image/svg+xml",
        }
        for path, kind in pages.items():
            resp = yield within(client.get(self.server.base + path))
            body = yield resp.content()
            headers = resp.headers
            self.assertEqual(resp.code, 200, path)
            self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(kind), path)
            policy = headers.getRawHeaders(b"content-security-policy")[0]
            for rule in (b"default-src 'none'", b"script-src 'self'", b"connect-src 'self'"):
                self.assertIn(rule, policy)
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertEqual(resp.length, len(body))  # Twisted's client takes Content-Length
            # No outside URLs: the page loads only itself (the SVG names its XML namespace).
            outside = re.findall(rb"\b(?:https?|wss?)://[^\s\"'`]+", body)
            self.assertEqual([u for u in outside if u != b"http://www.w3.org/2000/svg"], [])
        index = yield (yield within(client.get(self.server.base + "/"))).content()
        self.assertIn(b'src="/static/app.js"', index)
        for path in ("/static/", "/static/index.html", "/static/app.js/x", "/static/../setup.cfg"):
            resp, body = yield self.raw("GET", path)
            self.assertError(resp.code, body, 404, "not_found")
        resp, body = yield self.raw("POST", "/", b"{}", {b"content-type": [b"application/json"]})
        self.assertError(resp.code, body, 405, "method_not_allowed")
        resp = yield within(client.head(self.server.base + "/static/app.js"))
        self.assertEqual(resp.code, 200)


class ServerHeaderTests(unittest.TestCase):
    """No response says which Twisted (or Autobahn) version answers."""

    @defer.inlineCallbacks
    def test_every_response_says_server_wsserver_without_a_version(self):
        """Normal answers (JSON, static page, HEAD), error answers (404, 405, 400, 413,
        401 and 426 from /ws) and the 101 of a WebSocket upgrade all carry exactly
        `Server: wsserver`."""
        server = LiveServer(self)
        _, token = yield server.user("alice")
        client = server.http()
        json_ct = {b"content-type": [b"application/json"]}
        requests = [
            ("GET", "/health", b"", None, 200),
            ("GET", "/", b"", None, 200),
            ("HEAD", "/static/app.js", b"", None, 200),
            ("GET", "/nope", b"", None, 404),
            ("DELETE", "/auth/register", b"", None, 405),
            ("POST", "/auth/login", b"{", json_ct, 400),
            ("POST", "/auth/register", b"x" * 20000, json_ct, 413),
            ("GET", "/ws", b"", None, 401),
            ("GET", "/ws", b"", {b"authorization": [b"Bearer " + token.encode()]}, 426),
        ]
        for method, path, body, headers, status in requests:
            resp = yield within(
                client.request(method, server.base + path, data=body or None, headers=headers)
            )
            yield resp.content()
            self.assertEqual(resp.code, status, path)
            self.assertEqual(resp.headers.getRawHeaders(b"server"), [b"wsserver"], path)
        ws = yield server.connect(token, testcase=self)
        self.assertEqual(ws.http_headers.get("server"), "wsserver")


class _Wire(protocol.Protocol):
    """Writes raw request bytes; keeps every byte of the answer until the close."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(self.data)


class HeadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def wire(self, server, request: bytes) -> defer.Deferred:
        """The raw bytes the server sends for ``request`` until it closes."""
        wire = _Wire(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        yield within(endpoint.connect(protocol.Factory.forProtocol(lambda: wire)))
        data = yield within(wire.lost, 30)
        return data

    @defer.inlineCallbacks
    def test_head_answers_carry_no_body_on_the_wire(self):
        """HEAD of every GET resource (web client files, JSON resources, errors)
        sends the status line and headers only: the next response on the same
        connection follows the blank line at once.  A static file's HEAD has its
        GET's Content-Length."""
        server = LiveServer(self, {"AUTH_BURST_LIMIT": "1000"})
        yield server.register("alice", vector_key("alice"))
        paths = {
            "/": 200,
            "/static/app.js": 200,
            "/static/app.css": 200,
            "/static/icon.svg": 200,
            "/info": 200,
            "/health": 200,
            "/auth/users/alice": 200,
            "/auth/users/nobody": 404,
            "/nope": 404,
            "/static/nope": 404,
            "/ws": 405,
            "/auth/login": 405,
            "/auth/register": 405,
        }
        for path, status in paths.items():
            head = f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            then = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            data = yield self.wire(server, head + then)
            headers, _, rest = data.partition(b"\r\n\r\n")
            self.assertTrue(headers.startswith(b"HTTP/1.1 %d " % status), (path, headers))
            self.assertTrue(rest.startswith(b"HTTP/1.1 200 "), (path, rest[:200]))
            self.assertIn(b'"status":"ok"', rest.replace(b" ", b""), path)
            if (path.startswith("/static/") and status == 200) or path == "/":
                get = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                body = (yield self.wire(server, get)).partition(b"\r\n\r\n")[2]
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", headers + b"\r\n")
                self.assertIsNotNone(length, (path, headers))
                self.assertEqual(int(length.group(1)), len(body), path)


class AuthRateLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_per_ip_limit_answers_429_with_retry_after(self):
        """Past the burst, /auth/* answers 429 rate_limited with Retry-After; other paths
        are not limited."""
        server = LiveServer(self, {"AUTH_RATE_LIMIT": "0.01", "AUTH_BURST_LIMIT": "3"})
        codes = []
        for _ in range(3):
            code, _ = yield server.get("/auth/users/nobody")
            codes.append(code)
        self.assertEqual(codes, [404, 404, 404])
        client = server.http()
        resp = yield within(client.get(server.base + "/auth/users/nobody"))
        body = json.loads((yield resp.content()))
        self.assertEqual((resp.code, body["error"]["code"]), (429, "rate_limited"))
        self.assertGreaterEqual(int(resp.headers.getRawHeaders(b"retry-after")[0]), 1)
        code, _ = yield server.post("/auth/register", {})
        self.assertEqual(code, 429)
        code, _ = yield server.get("/health")
        self.assertEqual(code, 200)


class AccessLogTests(unittest.TestCase):
    def test_token_is_redacted(self):
        """The logged URI is rebuilt from the parsed query: a since of digits and a
        verify flag are shown, every other value (the token's, in any spelling
        Twisted's parser reads, or a token put in since) is <redacted>, names other
        than since, verify and token are <other> (a name can carry a token too),
        what does not parse as name=value is left out, and a long path or query is
        cut to MAX_LOGGED_URI characters saying by how much."""
        cases = {
            b"/ws?token=abc.def.ghi&since=5": "/ws?token=<redacted>&since=5",
            b"/ws?since=5&token=abc": "/ws?since=5&token=<redacted>",
            b"/ws?since=5;token=abc": "/ws?since=5&token=<redacted>",
            b"/ws?%74oken=abc": "/ws?token=<redacted>",
            b"/ws?t%6Fken=a&token=b": "/ws?token=<redacted>&token=<redacted>",
            b"/ws?abc.def.ghi&x=secret": "/ws?<other>=<redacted>",
            b"/ws?since=abc.def.ghi": "/ws?since=<redacted>",
            b"/ws?token%3Dabc.def.ghi=1": "/ws?<other>=<redacted>",
            b"/auth/login?verify=abc.def": "/auth/login?verify=<redacted>",
            b"/ws?" + b"a=&" * 5000: "/ws?" + "<other>=<redacted>&" * 26 + "<other>=<redacted>...(",
            b"/x" * 300: "/x" * 256 + "...(88 more)",
            b"/auth/login?verify=true": "/auth/login?verify=true",
            b"/ws": "/ws",
            b"/ws?": "/ws?",
        }
        for uri, logged in cases.items():
            shown = redacted_uri(uri)
            if logged.endswith("...("):
                self.assertTrue(shown.startswith(logged), shown[:600])
                self.assertTrue(shown.endswith(" more)"), shown[-40:])
                self.assertLess(len(shown), 2 * MAX_LOGGED_URI)
            else:
                self.assertEqual(shown, logged, uri)

        class FakeRequest:
            method = b"GET"
            uri = b"/ws?token=secret.jwt.value"
            clientproto = b"HTTP/1.1"
            code = 101
            sentLength = 0

            def getHeader(self, name):
                return None

            def getClientAddress(self):
                class A:
                    host = "127.0.0.1"

                return A()

        line = access_log_line("[now]", FakeRequest())
        self.assertNotIn("secret", line)
        self.assertIn("/ws?token=<redacted>", line)

    def test_every_client_value_is_escaped(self):
        """Method, URI, protocol, Referer and User-Agent holding ESC, CR, LF, NUL, DEL,
        BEL, tab, C1 controls (as bytes and as UTF-8), non-ASCII bytes, quotes and
        backslashes come out as one line of printable ASCII, escaped as \\xHH, \\" and
        \\\\; plain values are unchanged."""
        hostile = b'\x1b[2J\r\n\x00\x7f\x07\t\x9b\xc2\x9b\xc3\xa9"\\'
        escaped = '\\x1b[2J\\x0d\\x0a\\x00\\x7f\\x07\\x09\\x9b\\xc2\\x9b\\xc3\\xa9\\"\\\\'
        self.assertEqual(log_safe(hostile), escaped)
        self.assertEqual(log_safe("caf\u00e9\u009b"), "caf\\xc3\\xa9\\xc2\\x9b")
        self.assertEqual(log_safe(b"Mozilla/5.0 (X11; Linux)"), "Mozilla/5.0 (X11; Linux)")

        class FakeRequest:
            method = b"GET" + hostile
            uri = b"/ws" + hostile + b"?since=1&token=" + hostile
            clientproto = b"HTTP/1.1" + hostile
            code = 400
            sentLength = 10

            def getHeader(self, name):
                return {b"referer": b"http://x/" + hostile, b"user-agent": hostile}.get(name)

            def getClientAddress(self):
                class A:
                    host = "127.0.0.1"

                return A()

        line = access_log_line("[now]", FakeRequest())
        self.assertTrue(all(" " <= ch <= "~" for ch in line), repr(line))
        self.assertEqual(line.count(escaped), 5)  # method, path, protocol, Referer, agent
        self.assertIn(f'"http://x/{escaped}"', line)
        self.assertIn("?since=1&token=<redacted>", line)
