"""Keys per device, the key log, sign-out and deletion (protocol section 12),
end to end over HTTP and WebSocket on a real server.

Every test runs on the in-process server and, like the other end-to-end
files, on a two-node cluster (``WSSERVER_TEST_CLUSTER=1``), on PostgreSQL
(``WSSERVER_TEST_DATABASE=postgresql``) and on ``--workers 2``.  HTTP goes to
the first node; WebSocket clients go to each node in turn, so a change made
through one node is seen closing connections on the other.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from nacl.signing import SigningKey
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from wsserver import keylog
from wsserver.messages import b64decode

from .support import (
    DEADLINE,
    VECTORS,
    LiveServer,
    MemoryLink,
    b64,
    eventually,
    public_b64,
    sign_message,
    vector_key,
    within,
)

KEYLOG = VECTORS["keylog"]


def kid(key: SigningKey) -> str:
    """The key_id of a signing key's public key."""
    return keylog.key_id(bytes(key.verify_key))


class Base(unittest.TestCase):
    timeout = 120
    env: dict[str, str] = {}

    def setUp(self) -> None:
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "100000", **self.env})

    # -- HTTP ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict | None = None,
        base: str | None = None,
        fresh: bool = False,
    ) -> Any:
        """Any request (to the first node, or to ``base``; on a connection of
        its own with ``fresh``); fire with (status, parsed body)."""
        client = self.server.http(fresh=fresh)
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(body, bytes):
            kwargs["data"] = body
            kwargs["headers"] = {"Content-Type": ["application/json"], **(headers or {})}
        elif body is not None:
            kwargs["json"] = body
        resp = yield within(client.request(method, (base or self.server.base) + path, **kwargs))
        content = yield resp.content()
        return resp.code, json.loads(content) if content else None

    def error(self, result: tuple[int, Any]) -> tuple[int, str]:
        code, body = result
        return code, (body or {}).get("error", {}).get("code")

    @defer.inlineCallbacks
    def log(self, user_id: str) -> Any:
        """The user's key log as GET .../keylog answers it (200 asserted)."""
        code, body = yield self.server.get(f"/auth/users/{user_id}/keylog")
        self.assertEqual(code, 200, body)
        return body

    @defer.inlineCallbacks
    def stored(self, user_id: str) -> Any:
        """What the server shows of a user: (GET users/{id}, GET .../keylog)."""
        user = yield self.server.get(f"/auth/users/{user_id}")
        log = yield self.server.get(f"/auth/users/{user_id}/keylog")
        return user, log

    @defer.inlineCallbacks
    def entry(
        self,
        user_id: str,
        action: str,
        key: SigningKey | bytes,
        by: SigningKey,
        name: str | None = None,
        seq: int | None = None,
        new: SigningKey | None = None,
    ) -> Any:
        """A POST .../keylog body for the next entry of the user's log as it is
        now (or at ``seq``), signed by ``by`` (and, for an add, by the new key
        or ``new``)."""
        body = yield self.log(user_id)
        entries = [keylog.entry_from_json(e) for e in body["entries"]]
        state = keylog.replay(user_id, entries)
        public = bytes(key.verify_key) if isinstance(key, SigningKey) else key
        at = state.next_seq if seq is None else seq
        string = keylog.entry_string(user_id, at, action, public, state.head)
        signed = string.encode("utf-8")
        post = {
            "seq": at,
            "action": action,
            "public_key": b64(public),
            "name": name,
            "by": kid(by),
            "signature": b64(by.sign(signed).signature),
            "key_signature": None,
        }
        if action == keylog.ADD:
            post["key_signature"] = b64((new or key).sign(signed).signature)
        return post

    @defer.inlineCallbacks
    def append(self, user_id: str, body: dict) -> Any:
        """POST the entry; fire with (status, body)."""
        result = yield self.server.post(f"/auth/users/{user_id}/keylog", body)
        return result

    @defer.inlineCallbacks
    def add_key(self, user_id: str, by: SigningKey, name: str = "laptop") -> Any:
        """Add a fresh key to the user's log (201 asserted); fire with it."""
        new = SigningKey.generate()
        body = yield self.entry(user_id, keylog.ADD, new, by, name)
        code, answer = yield self.append(user_id, body)
        self.assertEqual(code, 201, answer)
        return new

    @defer.inlineCallbacks
    def revoke(self, user_id: str, key: SigningKey, by: SigningKey) -> Any:
        body = yield self.entry(user_id, keylog.REVOKE, key, by)
        code, answer = yield self.append(user_id, body)
        self.assertEqual(code, 201, answer)
        return answer

    @defer.inlineCallbacks
    def login(self, user_id: str, key: SigningKey, key_id: str | None = None) -> Any:
        """Log in with ``key``; fire with (status, body) of the verify step."""
        code, body = yield self.server.post("/auth/login", {"user_id": user_id})
        self.assertEqual(code, 200, body)
        login = {
            "user_id": user_id,
            "challenge": body["challenge"],
            "signature": b64(key.sign(body["challenge"].encode("utf-8")).signature),
        }
        if key_id is not None:
            login["key_id"] = key_id
        result = yield self.server.post("/auth/login?verify=true", login)
        return result

    @defer.inlineCallbacks
    def token(self, user_id: str, key: SigningKey, key_id: str | None = None) -> Any:
        code, body = yield self.login(user_id, key, key_id)
        self.assertEqual(code, 200, body)
        return body["token"]

    def logout(self, token: str, everywhere: bool = False) -> defer.Deferred:
        path = "/auth/logout?all=true" if everywhere else "/auth/logout"
        return self.request("POST", path, headers={"Authorization": [f"Bearer {token}"]})

    @defer.inlineCallbacks
    def ws_refuses(self, token: str) -> Any:
        """/ws refuses the token with 401 unauthorized before the upgrade (a
        plain GET with the token: an accepted token would get 426).

        On one server the refusal is immediate.  On several nodes a node other
        than the one that handled the change refuses once it applied the
        account event, within about a second (docs/protocol.md section 11);
        the connections closed on "every node" do not show that each node did
        (with ``--workers 2`` the kernel may have put both on one worker).  So
        there the test asks each node in turn, each time on a fresh connection
        (the kernel spreads those over the workers), until eight answers in a
        row from each node are refusals; a 426 before that means that node has
        not applied the event yet."""
        headers = {"Authorization": [f"Bearer {token}"]}
        bases = self.server.node_bases
        needed = 8 * len(bases) if self.server.multi_node else 1
        deadline = time.monotonic() + DEADLINE
        refusals = asked = 0
        while refusals < needed:
            base = bases[asked % len(bases)]
            asked += 1
            result = yield self.request("GET", "/ws", headers=headers, base=base, fresh=True)
            if self.error(result) == (401, "unauthorized"):
                refusals += 1
                continue
            self.assertTrue(self.server.multi_node, f"not refused: {result}")
            # That node has not applied the event yet: it accepts the token.
            self.assertEqual(self.error(result), (426, "upgrade_required"))
            self.assertLess(time.monotonic(), deadline, "not every node refuses the token")
            refusals = 0
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def ws_accepts(self, token: str) -> Any:
        result = yield self.request("GET", "/ws", headers={"Authorization": [f"Bearer {token}"]})
        self.assertEqual(self.error(result), (426, "upgrade_required"))

    def connect(self, token: str, node: int | None = None) -> defer.Deferred:
        return self.server.connect(token, node=node, testcase=self)

    @defer.inlineCallbacks
    def on_every_node(self, token: str) -> Any:
        """One connection on each node (one on a single server)."""
        count = len(self.server._ws_bases) if self.server.mode != "workers" else 2
        clients = []
        for node in range(count):
            client = yield self.connect(token, node if self.server.mode != "workers" else None)
            clients.append(client)
        return clients

    @defer.inlineCallbacks
    def still_open(self, client: Any, user_id: str) -> Any:
        """The connection is open: a message to oneself is acked."""
        client.send_json({"to": user_id, "content": "still here"})
        ack = yield client.next_of("ack")
        self.assertEqual(ack["content"], "still here")


class VectorTests(Base):
    @defer.inlineCallbacks
    def test_the_vectors_end_to_end(self):
        """alice registered with the vector key; the vector entries 1 (add the
        second device) and 2 (revoke the first) posted exactly as given are
        201 each; the log read back holds the vector signatures, and rebuilt
        from what the server returns, the vector strings and prev chain; the
        vector deletion at seq 3 is 200 and the id stays taken."""
        alice = vector_key("alice")
        yield self.server.register("alice", alice)
        for vec in KEYLOG["entries"][1:]:
            body = {k: vec[k] for k in ("seq", "action", "public_key", "by", "signature")}
            body["key_signature"] = vec["key_signature"]
            body["name"] = None
            code, answer = yield self.append("alice", body)
            self.assertEqual(code, 201, answer)
            self.assertEqual(answer["seq"], vec["seq"])
            self.assertEqual(answer["signature"], vec["signature"])
            self.assertEqual(answer["key_signature"], vec["key_signature"])
            self.assertEqual(answer["key_id"], keylog.key_id(b64decode(vec["public_key"])))
        log = yield self.log("alice")
        self.assertEqual(log["user_id"], "alice")
        entries = log["entries"]
        self.assertEqual([e["seq"] for e in entries], [0, 1, 2])
        for got, vec in zip(entries, KEYLOG["entries"], strict=True):
            for field in ("action", "public_key", "by", "signature", "key_signature"):
                self.assertEqual(got[field], vec[field], (vec["seq"], field))
            self.assertRegex(got["at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertIsNone(entries[0]["name"])
        # The chain: each entry's string, rebuilt from the log as served, is the
        # vector's, and its digest is the next entry's prev.
        prev = ""
        for got, vec in zip(entries, KEYLOG["entries"], strict=True):
            self.assertEqual(vec["prev"], prev)
            string = keylog.entry_string(
                "alice", got["seq"], got["action"], b64decode(got["public_key"]), prev
            )
            self.assertEqual(string, vec["string"])
            prev = keylog.digest(string)
        state = keylog.replay("alice", [keylog.entry_from_json(e) for e in entries])
        second = KEYLOG["second_device"]["public_key"]
        self.assertEqual([b64(k) for k in state.active.values()], [second])
        code, user = yield self.server.get("/auth/users/alice")
        self.assertEqual(code, 200)
        self.assertEqual(user["public_key"], second)
        self.assertEqual([k["public_key"] for k in user["keys"]], [second])
        self.assertEqual(user["keys"][0]["key_id"], KEYLOG["delete"]["key_id"])

        delete = KEYLOG["delete"]
        self.assertEqual(delete["string"], keylog.delete_string("alice", 3))
        result = yield self.request(
            "DELETE",
            "/auth/users/alice",
            {"key_id": delete["key_id"], "signature": delete["signature"]},
        )
        self.assertEqual(result, (200, {"deleted": True}))
        for path in ("/auth/users/alice", "/auth/users/alice/keylog"):
            result = yield self.server.get(path)
            self.assertEqual(self.error(result), (404, "unknown_user"), path)
        result = yield self.server.post(
            "/auth/register",
            {"user_id": "alice", "username": "Alice", "public_key": public_b64(alice)},
        )
        self.assertEqual(self.error(result), (409, "user_exists"))

    @defer.inlineCallbacks
    def test_the_directory_lists_active_keys_oldest_first(self):
        """GET /auth/users/{id}: keys with key_id, public_key, name (null for the
        registration key), added_at; public_key is the first active key."""
        first = yield self.server.register("carol")
        second = yield self.add_key("carol", first, "laptop \u00e9")
        third = yield self.add_key("carol", second, "phone")
        code, user = yield self.server.get("/auth/users/carol")
        self.assertEqual(code, 200)
        self.assertEqual(user["public_key"], public_b64(first))
        self.assertEqual(
            [(k["key_id"], k["public_key"], k["name"]) for k in user["keys"]],
            [
                (kid(first), public_b64(first), None),
                (kid(second), public_b64(second), "laptop \u00e9"),
                (kid(third), public_b64(third), "phone"),
            ],
        )
        for key in user["keys"]:
            self.assertRegex(key["added_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        yield self.revoke("carol", first, third)
        code, user = yield self.server.get("/auth/users/carol")
        self.assertEqual(user["public_key"], public_b64(second))
        self.assertEqual([k["key_id"] for k in user["keys"]], [kid(second), kid(third)])
        log = yield self.log("carol")
        self.assertEqual(
            [e["name"] for e in log["entries"]], [None, "laptop \u00e9", "phone", None]
        )
        self.assertEqual(
            [e["by"] for e in log["entries"]], [None, kid(first), kid(second), kid(third)]
        )


class RefusalTests(Base):
    """Every refusal of section 12 with its status and code, and that nothing
    stored changed."""

    env = {"MAX_KEYS_PER_USER": "3"}

    @defer.inlineCallbacks
    def setup_alice(self) -> Any:
        """alice with two keys (registration, laptop) and a third revoked."""
        self.first = yield self.server.register("alice")
        self.second = yield self.add_key("alice", self.first)
        self.gone = yield self.add_key("alice", self.first, "old phone")
        yield self.revoke("alice", self.gone, self.second)
        self.before = yield self.stored("alice")

    @defer.inlineCallbacks
    def assertUnchanged(self) -> Any:
        now = yield self.stored("alice")
        self.assertEqual(now, self.before)

    @defer.inlineCallbacks
    def assertRefused(self, result: Any, status: int, code: str, why: Any = None) -> Any:
        self.assertEqual(self.error(result), (status, code), why or result)
        yield self.assertUnchanged()

    @defer.inlineCallbacks
    def test_malformed_bodies_are_400(self):
        """Not JSON, not an object, a missing or ill-typed field, an action that
        is not add or revoke, a bad public_key or name, a key_signature or name
        on a revoke: 400 invalid_request; wrong type 415, too large 413."""
        yield self.setup_alice()
        good = yield self.entry("alice", keylog.ADD, SigningKey.generate(), self.first, "x")
        revoke = yield self.entry("alice", keylog.REVOKE, self.second, self.first)
        path = "/auth/users/alice/keylog"
        for raw in (b"not json", b"[1]", b'{"seq": 1, "seq": 2}', b""):
            result = yield self.request("POST", path, raw)
            yield self.assertRefused(result, 400, "invalid_request", raw)
        bad_bodies = [
            {k: v for k, v in good.items() if k != "seq"},
            {**good, "seq": "4"},
            {**good, "seq": True},
            {**good, "seq": -1},
            {**good, "seq": 4.0},
            {**good, "action": "register"},
            {**good, "action": "remove"},
            {k: v for k, v in good.items() if k != "public_key"},
            {**good, "public_key": "!!"},
            {**good, "public_key": b64(b"\x00" * 31)},
            {**good, "public_key": b64(b"\x01" + b"\x00" * 31)},  # not a usable point
            {**good, "name": "x" * 65},
            {**good, "name": "tab\there"},
            {**good, "name": 5},
            {**good, "by": 5},
            {**good, "signature": 5},
            {**good, "key_signature": ["x"]},
            {**revoke, "key_signature": good["key_signature"]},
            {**revoke, "name": "laptop"},
        ]
        for body in bad_bodies:
            result = yield self.append("alice", body)
            yield self.assertRefused(result, 400, "invalid_request", body)
        result = yield self.request(
            "POST", path, json.dumps(good).encode(), {"Content-Type": ["text/plain"]}
        )
        yield self.assertRefused(result, 415, "unsupported_media_type")
        result = yield self.append("alice", {**good, "pad": "x" * 17000})
        yield self.assertRefused(result, 413, "request_too_large")

    @defer.inlineCallbacks
    def test_a_seq_that_is_not_the_next_is_keylog_conflict(self):
        """seq one behind (already taken) or one ahead: 409 keylog_conflict."""
        yield self.setup_alice()
        new = SigningKey.generate()
        for seq in (3, 5, 0):
            body = yield self.entry("alice", keylog.ADD, new, self.first, "x", seq=seq)
            result = yield self.append("alice", body)
            yield self.assertRefused(result, 409, "keylog_conflict", seq)

    @defer.inlineCallbacks
    def test_a_key_already_in_the_log_is_key_exists(self):
        """Adding an active key, or one revoked before: 409 key_exists."""
        yield self.setup_alice()
        for key in (self.second, self.gone):
            body = yield self.entry("alice", keylog.ADD, key, self.first, "again")
            result = yield self.append("alice", body)
            yield self.assertRefused(result, 409, "key_exists")

    @defer.inlineCallbacks
    def test_the_last_active_key_cannot_be_revoked(self):
        """Revoking the only active key: 409 last_key."""
        only = yield self.server.register("dave")
        self.before = yield self.stored("dave")
        body = yield self.entry("dave", keylog.REVOKE, only, only)
        result = yield self.append("dave", body)
        self.assertEqual(self.error(result), (409, "last_key"))
        self.assertEqual((yield self.stored("dave")), self.before)

    @defer.inlineCallbacks
    def test_more_keys_than_the_limit_is_too_many_keys(self):
        """MAX_KEYS_PER_USER=3: a third active key fits, a fourth is 409
        too_many_keys (revoked keys do not count)."""
        yield self.setup_alice()
        yield self.add_key("alice", self.first)
        self.before = yield self.stored("alice")
        body = yield self.entry("alice", keylog.ADD, SigningKey.generate(), self.first, "x")
        result = yield self.append("alice", body)
        yield self.assertRefused(result, 409, "too_many_keys")

    @defer.inlineCallbacks
    def test_bad_signatures_are_401(self):
        """The signature missing, malformed, by another key, or over another
        entry (prev of an older log); the key_signature missing or not by the
        new key; by naming a revoked or unknown key: 401 invalid_signature."""
        yield self.setup_alice()
        new, stranger = SigningKey.generate(), SigningKey.generate()
        good = yield self.entry("alice", keylog.ADD, new, self.first, "x")
        by_stranger = yield self.entry("alice", keylog.ADD, new, stranger, "x")
        wrong_new = yield self.entry("alice", keylog.ADD, new, self.first, "x", new=stranger)
        by_revoked = yield self.entry("alice", keylog.ADD, new, self.gone, "x")
        string = keylog.entry_string("alice", 4, "add", bytes(new.verify_key), "")
        no_prev = {
            **good,
            "signature": b64(self.first.sign(string.encode()).signature),
            "key_signature": b64(new.sign(string.encode()).signature),
        }
        cases = {
            "no signature": {k: v for k, v in good.items() if k != "signature"},
            "null signature": {**good, "signature": None},
            "not base64": {**good, "signature": "!!!"},
            "63 bytes": {**good, "signature": b64(b"\x00" * 63)},
            "another key": {**good, "signature": by_stranger["signature"]},
            "by a stranger": {**by_stranger},
            "without prev": no_prev,
            "no key_signature": {**good, "key_signature": None},
            "key_signature of another key": wrong_new,
            "by a revoked key": by_revoked,
            "by an unknown key_id": {**good, "by": "AAAAAAAAAAAAAAAA"},
            "by missing": {k: v for k, v in good.items() if k != "by"},
        }
        for why, body in cases.items():
            result = yield self.append("alice", body)
            yield self.assertRefused(result, 401, "invalid_signature", why)
        # Revoking a key that is not active is a request that makes no sense.
        body = yield self.entry("alice", keylog.REVOKE, self.gone, self.first)
        result = yield self.append("alice", body)
        yield self.assertRefused(result, 400, "invalid_request")
        # And the good one still goes in afterwards.
        code, _ = yield self.append("alice", good)
        self.assertEqual(code, 201)

    @defer.inlineCallbacks
    def test_unknown_users_are_404(self):
        """GET and POST .../keylog, GET and DELETE users/{id} of an id never
        registered (or not a user_id at all): 404 unknown_user."""
        yield self.setup_alice()
        body = yield self.entry("alice", keylog.ADD, SigningKey.generate(), self.first, "x")
        delete = {"key_id": kid(self.first), "signature": b64(b"\x00" * 64)}
        for user in ("nobody", "no%20body", "%FF", "x" * 65):
            for method, path, payload in (
                ("GET", f"/auth/users/{user}", None),
                ("GET", f"/auth/users/{user}/keylog", None),
                ("POST", f"/auth/users/{user}/keylog", body),
                ("DELETE", f"/auth/users/{user}", delete),
            ):
                result = yield self.request(method, path, payload)
                yield self.assertRefused(result, 404, "unknown_user", (method, path))
        result = yield self.request("GET", "/auth/users/alice/keylog/more")
        yield self.assertRefused(result, 404, "not_found")
        result = yield self.request("PUT", "/auth/users/alice/keylog", body)
        yield self.assertRefused(result, 405, "method_not_allowed")

    @defer.inlineCallbacks
    def test_refused_deletions_change_nothing(self):
        """A deletion signed at a wrong seq, by another key than key_id's, by a
        revoked key, or malformed: 401 invalid_signature; key_id missing: 400;
        the user, their log and their login are all still there."""
        yield self.setup_alice()
        log = yield self.log("alice")
        nxt = len(log["entries"])

        def signed(key: SigningKey, seq: int) -> str:
            return b64(key.sign(keylog.delete_string("alice", seq).encode()).signature)

        cases = {
            "seq behind": {"key_id": kid(self.first), "signature": signed(self.first, nxt - 1)},
            "seq ahead": {"key_id": kid(self.first), "signature": signed(self.first, nxt + 1)},
            "another key": {"key_id": kid(self.first), "signature": signed(self.second, nxt)},
            "revoked key": {"key_id": kid(self.gone), "signature": signed(self.gone, nxt)},
            "unknown key_id": {"key_id": "AAAAAAAAAAAAAAAA", "signature": signed(self.first, nxt)},
            "not base64": {"key_id": kid(self.first), "signature": "!!"},
            "short": {"key_id": kid(self.first), "signature": b64(b"\x01" * 10)},
        }
        for why, body in cases.items():
            result = yield self.request("DELETE", "/auth/users/alice", body)
            yield self.assertRefused(result, 401, "invalid_signature", why)
        for body in ({"signature": signed(self.first, nxt)}, {"key_id": kid(self.first)}):
            result = yield self.request("DELETE", "/auth/users/alice", body)
            yield self.assertRefused(result, 400, "invalid_request", body)
        result = yield self.request("DELETE", "/auth/users/alice", b"nope")
        yield self.assertRefused(result, 400, "invalid_request")
        yield self.token("alice", self.first)
        # The right one, by either active key, goes through.
        body = {"key_id": kid(self.second), "signature": signed(self.second, nxt)}
        result = yield self.request("DELETE", "/auth/users/alice", body)
        self.assertEqual(result, (200, {"deleted": True}))
        result = yield self.request("DELETE", "/auth/users/alice", body)
        self.assertEqual(self.error(result), (404, "unknown_user"))

    @defer.inlineCallbacks
    def test_two_appends_racing_for_one_seq(self):
        """Two different entries posted at once for the same seq (on a cluster,
        one through each node): one is 201, the other 409 keylog_conflict,
        and the log holds only the first."""
        yield self.setup_alice()
        a, b = SigningKey.generate(), SigningKey.generate()
        body_a = yield self.entry("alice", keylog.ADD, a, self.first, "a")
        body_b = yield self.entry("alice", keylog.ADD, b, self.second, "b")
        other = self.server.others[0] if self.server.others else None
        base = f"http://127.0.0.1:{other.port.getHost().port}" if other else None
        path = "/auth/users/alice/keylog"
        results = yield defer.gatherResults(
            [self.request("POST", path, body_a), self.request("POST", path, body_b, base=base)]
        )
        codes = sorted(self.error(r) for r in results)
        self.assertEqual(codes, [(201, None), (409, "keylog_conflict")])
        winner = a if results[0][0] == 201 else b
        log = yield self.log("alice")
        self.assertEqual(len(log["entries"]), len(self.before[1][1]["entries"]) + 1)
        self.assertEqual(log["entries"][-1]["key_id"], kid(winner))


class LoginTests(Base):
    @defer.inlineCallbacks
    def test_login_with_the_second_key(self):
        """Any active key logs in, with key_id or without; the token names the
        key (kid) and the generation (gen); a key_id that is not the signer's,
        or unknown, is 401 invalid_signature and consumes the challenge."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        for key_id in (None, kid(second)):
            token = yield self.token("alice", second, key_id)
            claims = jwt.decode(token, options={"verify_signature": False})
            self.assertEqual((claims["kid"], claims["gen"]), (kid(second), 0))
            yield self.ws_accepts(token)
        token = yield self.token("alice", first)
        claims = jwt.decode(token, options={"verify_signature": False})
        self.assertEqual(claims["kid"], kid(first))
        for key_id in (kid(first), "AAAAAAAAAAAAAAAA"):
            _, body = yield self.server.post("/auth/login", {"user_id": "alice"})
            signature = b64(second.sign(body["challenge"].encode()).signature)
            result = yield self.server.post(
                "/auth/login?verify=true",
                {"user_id": "alice", "signature": signature, "key_id": key_id},
            )
            self.assertEqual(self.error(result), (401, "invalid_signature"))
            result = yield self.server.post(
                "/auth/login?verify=true", {"user_id": "alice", "signature": signature}
            )
            self.assertEqual(self.error(result), (401, "no_challenge"))
        result = yield self.login("alice", second, 5)
        self.assertEqual(self.error(result), (400, "invalid_request"))

    @defer.inlineCallbacks
    def test_a_revoked_key_is_cut_off(self):
        """Revoking a key closes its connections with 4003 (on every node), its
        tokens are refused on /ws (401) and for logout, it cannot log in; the
        other key's connection and token are untouched."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        token_first = yield self.token("alice", first)
        token_second = yield self.token("alice", second)
        kept = yield self.connect(token_first)
        cut = yield self.on_every_node(token_second)
        yield self.revoke("alice", second, first)
        closed = yield defer.gatherResults([c.wait_closed() for c in cut])
        self.assertEqual(closed, [4003] * len(cut))
        yield self.ws_refuses(token_second)
        result = yield self.logout(token_second)
        self.assertEqual(self.error(result), (401, "unauthorized"))
        result = yield self.login("alice", second)
        self.assertEqual(self.error(result), (401, "invalid_signature"))
        result = yield self.login("alice", second, kid(second))
        self.assertEqual(self.error(result), (401, "invalid_signature"))
        yield self.still_open(kept, "alice")
        yield self.ws_accepts(token_first)

    @defer.inlineCallbacks
    def test_logout_signs_out_that_token_only(self):
        """POST /auth/logout closes that token's connections with 4004 (on every
        node) and refuses it from then on (401 on /ws and for logout); another
        token of the same user stays good."""
        key = yield self.server.register("alice")
        token, other = yield defer.gatherResults(
            [self.token("alice", key), self.token("alice", key)]
        )
        signed_out = yield self.on_every_node(token)
        kept = yield self.connect(other)
        result = yield self.logout(token)
        self.assertEqual(result, (200, {"signed_out": True}))
        closed = yield defer.gatherResults([c.wait_closed() for c in signed_out])
        self.assertEqual(closed, [4004] * len(signed_out))
        yield self.ws_refuses(token)
        result = yield self.logout(token)
        self.assertEqual(self.error(result), (401, "unauthorized"))
        yield self.still_open(kept, "alice")
        yield self.ws_accepts(other)

    @defer.inlineCallbacks
    def test_logout_all_signs_out_every_token_issued_until_then(self):
        """POST /auth/logout?all=true closes every connection of the user with
        4004 and refuses every older token; a login afterwards works."""
        key = yield self.server.register("alice")
        bob = yield self.server.register("bob")
        token, other = yield defer.gatherResults(
            [self.token("alice", key), self.token("alice", key)]
        )
        bob_token = yield self.token("bob", bob)
        clients = yield self.on_every_node(token)
        more = yield self.on_every_node(other)
        bob_client = yield self.connect(bob_token)
        result = yield self.logout(other, everywhere=True)
        self.assertEqual(result, (200, {"signed_out": True}))
        closed = yield defer.gatherResults([c.wait_closed() for c in clients + more])
        self.assertEqual(closed, [4004] * len(clients + more))
        for old in (token, other):
            yield self.ws_refuses(old)
        fresh = yield self.token("alice", key)
        claims = jwt.decode(fresh, options={"verify_signature": False})
        self.assertEqual(claims["gen"], 1)
        client = yield self.connect(fresh)
        yield self.still_open(client, "alice")
        yield self.still_open(bob_client, "bob")

    @defer.inlineCallbacks
    def test_logout_needs_a_bearer_token(self):
        """No Authorization header (a token in the query does not count), a
        malformed one, a forged token: 401 unauthorized; all=maybe: 400."""
        key = yield self.server.register("alice")
        token = yield self.token("alice", key)
        cases = [
            None,
            {"Authorization": ["Basic abc"]},
            {"Authorization": ["Bearer not.a.jwt"]},
        ]
        for headers in cases:
            result = yield self.request("POST", "/auth/logout", headers=headers)
            self.assertEqual(self.error(result), (401, "unauthorized"), headers)
        result = yield self.request("POST", f"/auth/logout?token={token}")
        self.assertEqual(self.error(result), (401, "unauthorized"))
        result = yield self.request(
            "POST", "/auth/logout?all=maybe", headers={"Authorization": [f"Bearer {token}"]}
        )
        self.assertEqual(self.error(result), (400, "invalid_request"))
        result = yield self.request(
            "GET", "/auth/logout", headers={"Authorization": [f"Bearer {token}"]}
        )
        self.assertEqual(self.error(result), (405, "method_not_allowed"))
        yield self.ws_accepts(token)

    @defer.inlineCallbacks
    def test_logout_reads_all_from_the_query_only(self):
        """A form body saying all=true does not sign out everywhere (it is not
        JSON: 415, nothing signed out); a JSON body is ignored."""
        key = yield self.server.register("alice")
        token = yield self.token("alice", key)
        other = yield self.token("alice", key)
        form = {
            "Authorization": [f"Bearer {token}"],
            "Content-Type": ["application/x-www-form-urlencoded"],
        }
        client = self.server.http()
        resp = yield within(
            client.request(
                "POST", self.server.base + "/auth/logout?all=false", headers=form, data=b"all=true"
            )
        )
        body = json.loads((yield resp.content()))
        self.assertEqual((resp.code, body["error"]["code"]), (415, "unsupported_media_type"))
        yield self.ws_accepts(token)
        result = yield self.request(
            "POST",
            "/auth/logout",
            body={"all": True},
            headers={"Authorization": [f"Bearer {token}"]},
        )
        self.assertEqual(result, (200, {"signed_out": True}))
        yield self.ws_refuses(token)
        yield self.ws_accepts(other)

    @defer.inlineCallbacks
    def test_a_key_added_while_the_users_keys_are_cached_can_connect(self):
        """The first device is connected (every node holds the user's keys),
        then a second key is added: its token opens /ws on every node."""
        first = yield self.server.register("alice")
        token = yield self.token("alice", first)
        yield self.on_every_node(token)
        second = yield self.add_key("alice", first)
        token2 = yield self.token("alice", second, kid(second))
        clients = yield self.on_every_node(token2)
        for client in clients:
            yield self.still_open(client, "alice")

    @defer.inlineCallbacks
    def test_deletion_closes_connections_on_every_node(self):
        """DELETE /auth/users/{id} closes the user's connections with 4003 (on
        every node); the token is refused; bob's messages to the user are
        refused as to an unknown recipient."""
        key = yield self.server.register("alice")
        bob_key = yield self.server.register("bob")
        token = yield self.token("alice", key)
        bob = yield self.connect((yield self.token("bob", bob_key)))
        clients = yield self.on_every_node(token)
        log = yield self.log("alice")
        statement = keylog.delete_string("alice", len(log["entries"]))
        body = {"key_id": kid(key), "signature": b64(key.sign(statement.encode()).signature)}
        result = yield self.request("DELETE", "/auth/users/alice", body)
        self.assertEqual(result, (200, {"deleted": True}))
        closed = yield defer.gatherResults([c.wait_closed() for c in clients])
        self.assertEqual(closed, [4003] * len(clients))
        yield self.ws_refuses(token)
        bob.send_json({"to": "alice", "content": "there?", "nonce": "n-1"})
        refused = yield bob.next_of("system")
        self.assertEqual(refused["code"], "unknown_recipient")


class TokenTests(Base):
    @defer.inlineCallbacks
    def test_a_token_without_kid_is_the_registration_keys(self):
        """A token issued before keys per device (no kid, no gen) counts as the
        registration key's at generation 0: accepted while that key is
        active, refused once it is revoked or after logout?all."""
        first = yield self.server.register("alice")
        tokens = self.server.service.auth.tokens
        old, _ = tokens.issue("alice")
        self.assertNotIn("kid", jwt.decode(old, options={"verify_signature": False}))
        yield self.ws_accepts(old)
        client = yield self.connect(old)
        second = yield self.add_key("alice", first)
        yield self.ws_accepts(old)
        yield self.revoke("alice", first, second)
        self.assertEqual((yield client.wait_closed()), 4003)
        yield self.ws_refuses(old)

    @defer.inlineCallbacks
    def test_claims_of_the_wrong_type_are_refused(self):
        """A token whose kid is not a string or whose gen is not a non-negative
        integer is refused."""
        yield self.server.register("alice")
        tokens = self.server.service.auth.tokens
        good, _ = tokens.issue("alice")
        claims = jwt.decode(good, options={"verify_signature": False})
        for change in ({"kid": 5}, {"gen": "0"}, {"gen": -1}, {"gen": True}):
            forged = jwt.encode({**claims, **change}, tokens._secret, "HS256")
            yield self.ws_refuses(forged)


class MessageTests(Base):
    @defer.inlineCallbacks
    def test_a_message_from_the_second_device_is_verified_with_its_key(self):
        """alice's second device signs with its own key: bob's frame and alice's
        ack say verified with that key_id, and so does the replay with since;
        a signature by alice's first key on that connection is
        invalid_signature (checked against the connection's key); an unsigned
        message has key_id null."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        bob_key = yield self.server.register("bob")
        alice = yield self.connect((yield self.token("alice", second, kid(second))))
        bob_token = yield self.token("bob", bob_key)
        bob = yield self.connect(bob_token)

        content = "from the laptop"
        sig = sign_message(second, "alice", "bob", content, "n-1")
        alice.send_json({"to": "bob", "content": content, "nonce": "n-1", "signature": sig})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        for frame in (ack, got):
            self.assertEqual(
                (frame["verification"], frame["key_id"], frame["signature"]),
                ("verified", kid(second), sig),
            )
        self.assertEqual(got["id"], ack["id"])

        wrong = sign_message(first, "alice", "bob", "by the first key", "n-2")
        alice.send_json(
            {"to": "bob", "content": "by the first key", "nonce": "n-2", "signature": wrong}
        )
        refused = yield alice.next_of("system")
        self.assertEqual((refused["code"], refused["nonce"]), ("invalid_signature", "n-2"))

        alice.send_json({"to": "bob", "content": "plain", "nonce": "n-3"})
        plain = yield alice.next_of("ack")
        self.assertEqual((plain["verification"], plain["key_id"]), ("unsigned", None))
        got_plain = yield bob.next_of("message")
        self.assertEqual((got_plain["id"], got_plain["key_id"]), (plain["id"], None))

        yield bob.close_and_wait()
        again = yield self.server.connect(bob_token, since=ack["id"] - 1, testcase=self)
        replayed = yield again.take(2, "message")
        self.assertEqual(
            [(f["id"], f["verification"], f["key_id"]) for f in replayed],
            [(ack["id"], "verified", kid(second)), (plain["id"], "unsigned", None)],
        )
        # The key log keeps the key after it is revoked: the message stays
        # checkable with it.
        yield self.revoke("alice", second, first)
        log = yield self.log("alice")
        keys = {e["key_id"]: e["public_key"] for e in log["entries"]}
        self.assertEqual(keys[kid(second)], public_b64(second))

    @defer.inlineCallbacks
    def test_broadcasts_carry_the_key_id(self):
        """A signed broadcast from the second device reaches the others with its
        key_id."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        bob_key = yield self.server.register("bob")
        alice = yield self.connect((yield self.token("alice", second)))
        bob = yield self.connect((yield self.token("bob", bob_key)))
        sig = sign_message(second, "alice", "broadcast", "all", "b-1")
        alice.send_json({"to": "broadcast", "content": "all", "nonce": "b-1", "signature": sig})
        ack = yield alice.next_of("ack")
        got = yield bob.next_of("message")
        self.assertEqual((ack["key_id"], got["key_id"]), (kid(second), kid(second)))


class RateLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_new_endpoints_are_rate_limited(self):
        """Past the per-IP burst, GET and POST .../keylog, DELETE users/{id} and
        POST /auth/logout answer 429 rate_limited with Retry-After."""
        server = LiveServer(self, {"AUTH_RATE_LIMIT": "0.01", "AUTH_BURST_LIMIT": "1"})
        code, _ = yield server.get("/auth/users/nobody/keylog")
        self.assertEqual(code, 404)
        client = server.http()
        for method, path in (
            ("GET", "/auth/users/nobody/keylog"),
            ("POST", "/auth/users/nobody/keylog"),
            ("DELETE", "/auth/users/nobody"),
            ("POST", "/auth/logout"),
            ("POST", "/auth/logout?all=true"),
        ):
            resp = yield within(client.request(method, server.base + path, json={}))
            body = json.loads((yield resp.content()))
            self.assertEqual((resp.code, body["error"]["code"]), (429, "rate_limited"), path)
            self.assertGreaterEqual(int(resp.headers.getRawHeaders(b"retry-after")[0]), 1)


class RaceTests(Base):
    """A connection whose token was checked just before an account change was
    handled, and that attaches just after (so the change's handler found
    nothing to close), checks its token again when it opens."""

    @defer.inlineCallbacks
    def connect_checked_before(self, token: str, change: Any) -> Any:
        """Check ``token`` as the /ws gate does, run ``change``, then open the
        connection with that session (in memory); fire with its close code."""
        service = self.server.service
        # Only the change's own application at once is left: the poll would
        # hand the change over again later and close the connection itself.
        service.account_events.stop()
        session = yield service.auth.session(token)
        yield change()
        link = MemoryLink(self, service.factory, MemoryReactorClock())
        client, _ = yield link.connect(session)
        yield eventually(lambda: client.close_code is not None, "the connection closes")
        return client.close_code

    @defer.inlineCallbacks
    def test_a_revocation_between_the_check_and_the_open(self):
        """The key revoked in between: the connection closes with 4003."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        token = yield self.token("alice", second)
        code = yield self.connect_checked_before(token, lambda: self.revoke("alice", second, first))
        self.assertEqual(code, 4003)

    @defer.inlineCallbacks
    def test_a_connection_checked_again_is_sent_nothing_first(self):
        """While its token is checked again, a connection whose key was revoked
        in between is replayed nothing: a message pending for the user does
        not reach the revoked device before it closes with 4003."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        bob_key = yield self.server.register("bob")
        token = yield self.token("alice", second)
        service = self.server.service
        service.account_events.stop()
        session = yield service.auth.session(token)
        yield self.revoke("alice", second, first)
        bob = yield self.token("bob", bob_key)
        sender = yield self.connect(bob)
        sender.send_json({"to": "alice", "content": "for alice's devices"})
        yield sender.next_of("ack")
        yield sender.close_and_wait()
        link = MemoryLink(self, service.factory, MemoryReactorClock())
        client, _ = yield link.connect(session)
        yield eventually(lambda: client.close_code is not None, "the connection closes")
        self.assertEqual(client.close_code, 4003)
        self.assertEqual(client.of("message"), [])

    @defer.inlineCallbacks
    def test_a_sign_out_between_the_check_and_the_open(self):
        """The token signed out in between: the connection closes with 4004."""
        key = yield self.server.register("alice")
        token = yield self.token("alice", key)
        code = yield self.connect_checked_before(token, lambda: self.logout(token))
        self.assertEqual(code, 4004)


class LogoutRaceTests(Base):
    @defer.inlineCallbacks
    def test_a_logout_racing_a_deletion_is_unauthorized(self):
        """The user deleted between the token's check and the sign-out's
        write (the store's write finds no user and stores nothing): POST
        /auth/logout and /auth/logout?all=true answer 401 unauthorized."""
        service = self.server.service
        store = service.auth._store
        for user_id, method, everywhere in (
            ("alice", "revoke_token", False),
            ("bob", "revoke_tokens", True),
        ):
            key = yield self.server.register(user_id)
            token = yield self.token(user_id, key)
            real = getattr(store, method)

            @defer.inlineCallbacks
            def deleted_first(*args: Any, user_id: str = user_id, real: Any = real) -> Any:
                deleted = yield store.delete_account(user_id, 1, lambda entries: None)
                self.assertTrue(deleted)
                result = yield real(*args)
                return result

            self.patch(store, method, deleted_first)
            result = yield self.logout(token, everywhere=everywhere)
            self.assertEqual(self.error(result), (401, "unauthorized"), user_id)


class LoginCacheTests(Base):
    """A login caches the keys it read for the connect that follows (on the
    node that logged in); an account change made through another node drops
    them there as its event arrives."""

    @defer.inlineCallbacks
    def login_at(self, base: str, user_id: str, key: SigningKey) -> Any:
        """A token from a login through the node at ``base``."""
        _, body = yield self.request("POST", "/auth/login", {"user_id": user_id}, base=base)
        signature = b64(key.sign(body["challenge"].encode()).signature)
        login = {"user_id": user_id, "challenge": body["challenge"], "signature": signature}
        code, answer = yield self.request("POST", "/auth/login?verify=true", login, base=base)
        self.assertEqual(code, 200, answer)
        return answer["token"]

    @defer.inlineCallbacks
    def test_a_key_revoked_after_a_login_is_refused_where_it_logged_in(self):
        """The last node logs alice in with her second key (its keys cached
        there by the login), the first node revokes that key: every node,
        the last one included, refuses the token at /ws (401)."""
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        token = yield self.login_at(self.server.node_bases[-1], "alice", second)
        yield self.revoke("alice", second, first)
        yield self.ws_refuses(token)
        yield self.ws_accepts((yield self.token("alice", first)))

    @defer.inlineCallbacks
    def test_a_user_deleted_after_a_login_is_refused_where_it_logged_in(self):
        """The last node logs alice in (her keys cached there by the login),
        the first node deletes her: every node refuses the token at /ws."""
        key = yield self.server.register("alice")
        token = yield self.login_at(self.server.node_bases[-1], "alice", key)
        log = yield self.log("alice")
        statement = keylog.delete_string("alice", len(log["entries"]))
        body = {"key_id": kid(key), "signature": b64(key.sign(statement.encode()).signature)}
        result = yield self.request("DELETE", "/auth/users/alice", body)
        self.assertEqual(result, (200, {"deleted": True}))
        yield self.ws_refuses(token)


class PropagationTests(Base):
    @defer.inlineCallbacks
    def test_the_node_that_made_the_change_applies_it_at_once(self):
        """With its account-event poll stopped, the node that handled a
        revocation or a sign-out has still closed the connections (4003,
        4004) and refuses the token before it answers."""
        service = self.server.service
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        revoked = yield self.token("alice", second)
        signed_out = yield self.token("alice", first)
        service.account_events.stop()
        cut = yield self.connect(revoked, node=0)
        out = yield self.connect(signed_out, node=0)
        yield self.revoke("alice", second, first)
        self.assertEqual((yield cut.wait_closed()), 4003)
        yield self.ws_refuses(revoked)
        result = yield self.logout(signed_out)
        self.assertEqual(result, (200, {"signed_out": True}))
        self.assertEqual((yield out.wait_closed()), 4004)
        yield self.ws_refuses(signed_out)

    @defer.inlineCallbacks
    def test_a_server_started_later_refuses_signed_out_tokens(self):
        """A server started on the database after a sign-out refuses the
        signed-out token (it loads them at start), and the other token still
        works there."""
        key = yield self.server.register("alice")
        token = yield self.token("alice", key)
        other = yield self.token("alice", key)
        result = yield self.logout(token)
        self.assertEqual(result[0], 200)
        yield self.server.stop()
        self.server = LiveServer(self, {"DATABASE": self.server.db})
        yield self.ws_refuses(token)
        yield self.ws_accepts(other)

    @defer.inlineCallbacks
    def test_a_login_through_another_node_sees_a_change_at_once(self):
        """A login through a node that has not yet heard of a revocation or a
        sign-out everywhere made through another node (its poll is stopped
        here), though it had the user's keys cached, already counts them: the
        revoked key cannot log in, and a new token has the new generation."""
        if not self.server.others:
            raise unittest.SkipTest("needs a second in-process node (WSSERVER_TEST_CLUSTER=1)")
        other = self.server.others[0]
        base = f"http://127.0.0.1:{other.port.getHost().port}"
        other.account_events.stop()
        first = yield self.server.register("alice")
        second = yield self.add_key("alice", first)
        token = yield self.token("alice", second)
        headers = {"Authorization": [f"Bearer {token}"]}
        result = yield self.request("GET", "/ws", headers=headers, base=base)
        self.assertEqual(self.error(result), (426, "upgrade_required"))  # cached there now
        yield self.revoke("alice", second, first)
        result = yield self.logout((yield self.token("alice", first)), everywhere=True)
        self.assertEqual(result[0], 200)

        @defer.inlineCallbacks
        def login(key: SigningKey) -> Any:
            _, body = yield self.request("POST", "/auth/login", {"user_id": "alice"}, base=base)
            signature = b64(key.sign(body["challenge"].encode()).signature)
            login = {"user_id": "alice", "challenge": body["challenge"], "signature": signature}
            answer = yield self.request("POST", "/auth/login?verify=true", login, base=base)
            return answer

        result = yield login(second)
        self.assertEqual(self.error(result), (401, "invalid_signature"))
        code, body = yield login(first)
        self.assertEqual(code, 200)
        claims = jwt.decode(body["token"], options={"verify_signature": False})
        self.assertEqual((claims["kid"], claims["gen"]), (kid(first), 1))
