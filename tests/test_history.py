"""History (protocol section 13): ``GET /messages`` and ``GET
/conversations`` end to end on a real server.

Like the other end-to-end files these run on the in-process server, on
PostgreSQL (``WSSERVER_TEST_DATABASE=postgresql``), on a two-node cluster
(``WSSERVER_TEST_CLUSTER=1``) and on ``--workers 2``: messages are sent
through WebSocket connections to each node in turn, history is read over
HTTP from the first.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.internet import defer
from twisted.trial import unittest

from wsserver import keylog

from .support import LiveServer, b64, sign_message, suite_mode, within


def kid(key: Any) -> str:
    """The key_id of a signing key's public key."""
    return keylog.key_id(bytes(key.verify_key))


class Base(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = LiveServer(
            self, {"AUTH_BURST_LIMIT": "100000", "MESSAGE_BURST_LIMIT": "1000"}
        )

    @defer.inlineCallbacks
    def get(self, path: str, token: str | None, raw: bytes | None = None) -> Any:
        """GET ``path`` (or the raw request target ``raw``) with ``token`` as
        Bearer; fire with (status, parsed body)."""
        headers = {"Authorization": [f"Bearer {token}"]} if token else {}
        client = self.server.http()
        url = self.server.base.encode() + raw if raw is not None else self.server.base + path
        resp = yield within(client.get(url, headers=headers))
        content = yield resp.content()
        return resp.code, json.loads(content) if content else None

    def error(self, result: tuple[int, Any]) -> tuple[int, str | None]:
        code, body = result
        return code, (body or {}).get("error", {}).get("code")

    @defer.inlineCallbacks
    def send(self, conn: Any, to: str, content: str, **extra: Any) -> Any:
        """Send a message; fire with its ack."""
        conn.send_json({"to": to, "content": content, **extra})
        ack = yield conn.next_of("ack")
        return ack

    @defer.inlineCallbacks
    def page(self, token: str, peer: str, query: str = "") -> Any:
        """GET /messages?with=peer&query (200 asserted); fire with the body."""
        code, body = yield self.get(f"/messages?with={quote(peer, safe='')}{query}", token)
        self.assertEqual(code, 200, body)
        return body


class PagesTests(Base):
    @defer.inlineCallbacks
    def test_a_direct_conversation_pages_newest_first_both_ways(self) -> None:
        """Both directions of alice and bob's messages come back newest first,
        as the message frames bob received (signature, key_id and
        verification included), paged with before/limit and more; a third
        user's message to bob is not in the page; bob sees the same pages."""
        alice_key, alice_token = yield self.server.user("alice")
        _, bob_token = yield self.server.user("bob")
        _, carol_token = yield self.server.user("carol")
        alice = yield self.server.connect(alice_token)
        bob = yield self.server.connect(bob_token)
        carol = yield self.server.connect(carol_token)
        sig = sign_message(alice_key, "alice", "bob", "signed", "s-1")
        signed = yield self.send(alice, "bob", "signed", nonce="s-1", signature=sig)
        received = yield bob.next_of("message")
        acks = [signed]
        for i in range(4):
            who, to = (bob, "alice") if i % 2 else (alice, "bob")
            ack = yield self.send(who, to, f"m{i}")
            acks.append(ack)
        yield self.send(carol, "bob", "not theirs")
        ids = [a["id"] for a in acks]

        first = yield self.page(alice_token, "bob", "&limit=3")
        self.assertEqual([m["id"] for m in first["messages"]], ids[::-1][:3])
        self.assertTrue(first["more"])
        second = yield self.page(alice_token, "bob", f"&limit=3&before={ids[2]}")
        self.assertEqual([m["id"] for m in second["messages"]], ids[1::-1])
        self.assertFalse(second["more"])
        whole = yield self.page(bob_token, "alice")
        self.assertEqual([m["id"] for m in whole["messages"]], ids[::-1])
        self.assertFalse(whole["more"])
        oldest = whole["messages"][-1]
        self.assertEqual(oldest["type"], "message")
        self.assertIn(oldest["status"], ("pending", "delivered"))
        self.assertEqual(oldest["read"], False)  # bob's page: alice's message, unread
        self.assertEqual(
            {k: v for k, v in oldest.items() if k not in ("status", "read")},
            {k: v for k, v in received.items() if k != "status"},
        )
        self.assertEqual((oldest["verification"], oldest["signature"]), ("verified", sig))
        empty = yield self.page(alice_token, "bob", f"&before={ids[0]}")
        self.assertEqual(empty, {"messages": [], "more": False})

    @defer.inlineCallbacks
    def test_notes_to_self_and_broadcast(self) -> None:
        """``with`` the caller's own id is their notes to self only; ``with=
        broadcast`` is every broadcast, whoever sent it."""
        _, alice_token = yield self.server.user("alice")
        _, bob_token = yield self.server.user("bob")
        alice = yield self.server.connect(alice_token)
        bob = yield self.server.connect(bob_token)
        note = yield self.send(alice, "alice", "a note")
        yield self.send(alice, "bob", "to bob")
        b1 = yield self.send(alice, "broadcast", "all 1")
        b2 = yield self.send(bob, "broadcast", "all 2")
        notes = yield self.page(alice_token, "alice")
        self.assertEqual([m["id"] for m in notes["messages"]], [note["id"]])
        casts = yield self.page(bob_token, "broadcast")
        self.assertEqual([m["id"] for m in casts["messages"]], [b2["id"], b1["id"]])

    @defer.inlineCallbacks
    def test_a_page_shows_the_receipts(self) -> None:
        """After bob reads alice's first message (a read frame), alice's page
        says read_by ["bob"] on it and [] on the second, and bob's page says
        read true and false on them; alice's broadcast carries neither."""
        _, alice_token = yield self.server.user("alice")
        _, bob_token = yield self.server.user("bob")
        alice = yield self.server.connect(alice_token)
        bob = yield self.server.connect(bob_token)
        first = yield self.send(alice, "bob", "one")
        second = yield self.send(alice, "bob", "two")
        cast = yield self.send(alice, "broadcast", "all")
        for _ in range(2):
            yield bob.next_of("message")
        bob.send_json({"type": "read", "id": first["id"]})
        status = yield alice.next_of("status")
        while status["status"] != "read":  # delivered ones first on several nodes
            status = yield alice.next_of("status")
        self.assertEqual((status["id"], status["by"]), (first["id"], "bob"))
        page = yield self.page(alice_token, "bob")
        marks = {m["id"]: (m.get("read_by"), m.get("read")) for m in page["messages"]}
        self.assertEqual(marks, {first["id"]: (["bob"], None), second["id"]: ([], None)})
        page = yield self.page(bob_token, "alice")
        marks = {m["id"]: (m.get("read_by"), m.get("read")) for m in page["messages"]}
        self.assertEqual(marks, {first["id"]: (None, True), second["id"]: (None, False)})
        page = yield self.page(alice_token, "broadcast")
        self.assertEqual([m["id"] for m in page["messages"]], [cast["id"]])
        self.assertNotIn("read_by", page["messages"][0])
        self.assertNotIn("read", page["messages"][0])

    @defer.inlineCallbacks
    def test_a_page_read_right_after_a_delivered_ack_says_delivered(self) -> None:
        """alice's message to bob (connected to the same node) is acked
        delivered; a page asked at once says delivered too, never pending (the
        node's queued delivered mark is committed before the page is read; a
        tester saw pending for 0.1 s).  In a test cluster both connect to the
        first node, which the page is asked of; with --workers 2 the kernel
        picks the worker of each connection and request, so the promise is
        only the node's own (protocol.md section 15)."""
        if suite_mode() == "workers":
            raise unittest.SkipTest("which worker answers the page is the kernel's choice")
        _, alice_token = yield self.server.user("alice")
        _, bob_token = yield self.server.user("bob")
        alice = yield self.server.connect(alice_token, node=0)
        bob = yield self.server.connect(bob_token, node=0)
        for i in range(5):
            ack = yield self.send(alice, "bob", f"at once {i}")
            self.assertEqual(ack["status"], "delivered")
            page = yield self.page(alice_token, "bob", "&limit=1")
            self.assertEqual(
                [(m["id"], m["status"]) for m in page["messages"]], [(ack["id"], "delivered")]
            )
        yield bob.next_of("message")

    @defer.inlineCallbacks
    def test_reading_history_changes_no_status(self) -> None:
        """A message to bob while he is offline stays pending after bob (and
        alice) read it in history, and is then delivered when he connects."""
        _, alice_token = yield self.server.user("alice")
        _, bob_token = yield self.server.user("bob")
        alice = yield self.server.connect(alice_token)
        ack = yield self.send(alice, "bob", "while away")
        for token in (bob_token, alice_token):
            page = yield self.page(token, "bob" if token == alice_token else "alice")
            self.assertEqual(
                [(m["id"], m["status"]) for m in page["messages"]], [(ack["id"], "pending")]
            )
        stored = yield self.server.settled(ack["id"], lambda m: True)
        self.assertEqual(stored.status, "pending")
        bob = yield self.server.connect(bob_token)
        got = yield bob.next_of("message")
        self.assertEqual(got["id"], ack["id"])

    @defer.inlineCallbacks
    def test_the_default_page_is_50_and_the_largest_200(self) -> None:
        """Without ``limit`` a page holds 50 messages (more: true when a 51st
        exists); ``limit=200`` brings up to 200."""
        _, token = yield self.server.user("alice")
        alice = yield self.server.connect(token)
        for i in range(51):
            alice.send_json({"to": "alice", "content": f"n{i}"})
        acks = yield alice.take(51, "ack")
        page = yield self.page(token, "alice")
        self.assertEqual(len(page["messages"]), 50)
        self.assertTrue(page["more"])
        self.assertEqual(page["messages"][-1]["id"], acks[1]["id"])
        page = yield self.page(token, "alice", "&limit=200")
        self.assertEqual((len(page["messages"]), page["more"]), (51, False))


class ConversationsTests(Base):
    @defer.inlineCallbacks
    def test_the_list_is_most_recent_first(self) -> None:
        """GET /conversations lists each peer once with its newest message id
        and timestamp, the most recent first, notes to self and broadcast
        included; ``limit`` cuts it; a user with no message has an empty list."""
        _, alice_token = yield self.server.user("alice")
        yield self.server.user("bob")
        yield self.server.user("carol")
        _, dave_token = yield self.server.user("dave")
        alice = yield self.server.connect(alice_token)
        yield self.send(alice, "bob", "1")
        yield self.send(alice, "carol", "2")
        last_bob = yield self.send(alice, "bob", "3")
        cast = yield self.send(alice, "broadcast", "4")
        note = yield self.send(alice, "alice", "5")
        code, body = yield self.get("/conversations", alice_token)
        self.assertEqual(code, 200, body)
        rows = body["conversations"]
        self.assertEqual(
            [(r["with"], r["last_id"]) for r in rows],
            [
                ("alice", note["id"]),
                ("broadcast", cast["id"]),
                ("bob", last_bob["id"]),
                ("carol", last_bob["id"] - 1),
            ],
        )
        self.assertEqual(rows[0]["last_timestamp"], note["timestamp"])
        _, body = yield self.get("/conversations?limit=2", alice_token)
        self.assertEqual(len(body["conversations"]), 2)
        _, body = yield self.get("/conversations", dave_token)
        self.assertEqual([r["with"] for r in body["conversations"]], ["broadcast"])

    @defer.inlineCallbacks
    def test_a_deleted_peer_leaves_the_list_and_is_unknown(self) -> None:
        """Once bob deleted his account alice's list no longer names him and
        GET /messages?with=bob is 404 unknown_user."""
        _, alice_token = yield self.server.user("alice")
        bob_key = yield self.server.register("bob")
        yield self.server.user("carol")
        alice = yield self.server.connect(alice_token)
        yield self.send(alice, "bob", "1")
        yield self.send(alice, "carol", "2")
        _, body = yield self.get("/conversations", alice_token)
        self.assertEqual([r["with"] for r in body["conversations"]], ["carol", "bob"])
        statement = keylog.delete_string("bob", 1).encode()
        resp = yield within(
            self.server.http().delete(
                self.server.base + "/auth/users/bob",
                json={"key_id": kid(bob_key), "signature": b64(bob_key.sign(statement).signature)},
            )
        )
        self.assertEqual((resp.code, (yield resp.json())), (200, {"deleted": True}))
        _, body = yield self.get("/conversations", alice_token)
        self.assertEqual([r["with"] for r in body["conversations"]], ["carol"])
        result = yield self.get("/messages?with=bob", alice_token)
        self.assertEqual(self.error(result), (404, "unknown_user"))


class RateLimitTests(Base):
    def setUp(self) -> None:
        self.server = LiveServer(self, {"AUTH_BURST_LIMIT": "5", "AUTH_RATE_LIMIT": "0.001"})
        if self.server.mode == "workers":
            raise unittest.SkipTest(
                "with --workers 2 each worker has its own per-IP bucket for HTTP and the"
                " kernel picks the worker of each connection: the count is not the test's"
            )

    @defer.inlineCallbacks
    def test_history_takes_from_the_per_ip_bucket_of_auth(self) -> None:
        """GET /messages and /conversations take tokens from the same per-IP
        bucket as /auth/*: once it is empty they are 429 rate_limited with
        Retry-After (the registration and the login took three of five)."""
        _, token = yield self.server.user("alice")
        code, _ = yield self.get("/conversations", token)
        self.assertEqual(code, 200)
        code, _ = yield self.get("/messages?with=alice", token)
        self.assertEqual(code, 200)
        client = self.server.http()
        for path in ("/messages?with=alice", "/conversations"):
            resp = yield within(
                client.get(self.server.base + path, headers={"Authorization": [f"Bearer {token}"]})
            )
            body = json.loads((yield resp.content()))
            self.assertEqual((resp.code, body["error"]["code"]), (429, "rate_limited"))
            self.assertTrue(resp.headers.hasHeader(b"retry-after"))


class RefusalsTests(Base):
    @defer.inlineCallbacks
    def test_without_a_valid_token_401(self) -> None:
        """No token, a token in the query, another scheme, a forged token and
        a signed-out token are each 401 unauthorized, on both endpoints."""
        _, token = yield self.server.user("alice")
        _, other = yield self.server.user("bob")
        client = self.server.http()
        resp = yield within(
            client.post(
                self.server.base + "/auth/logout", headers={"Authorization": [f"Bearer {other}"]}
            )
        )
        yield resp.content()
        self.assertEqual(resp.code, 200)
        for path in ("/messages?with=alice", "/conversations"):
            result = yield self.get(path, None)
            self.assertEqual(self.error(result), (401, "unauthorized"), path)
            result = yield self.get(path + ("&" if "?" in path else "?") + f"token={token}", None)
            self.assertEqual(self.error(result), (401, "unauthorized"), path)
            result = yield self.get(path, token[:-4] + "AAAA")
            self.assertEqual(self.error(result), (401, "unauthorized"), path)
            result = yield self.get(path, other)
            self.assertEqual(self.error(result), (401, "unauthorized"), path)

    @defer.inlineCallbacks
    def test_bad_parameters_are_400_invalid_request(self) -> None:
        """Every bad spelling of a parameter is 400 invalid_request: missing,
        repeated, empty, unknown, non-digit, signed, out of range, huge,
        broken percent-encoding, invalid UTF-8, control characters, a
        malformed peer id."""
        _, token = yield self.server.user("alice")
        bad = [
            b"/messages",
            b"/messages?with=alice&with=alice",
            b"/messages?with=",
            b"/messages?with",
            b"/messages?with=alice&limit=",
            b"/messages?with=alice&limit=0",
            b"/messages?with=alice&limit=201",
            b"/messages?with=alice&limit=%2B5",
            b"/messages?with=alice&limit=+5",
            b"/messages?with=alice&limit=-1",
            b"/messages?with=alice&limit=1.5",
            b"/messages?with=alice&limit=5&limit=5",
            b"/messages?with=alice&before=x",
            b"/messages?with=alice&before=99999999999999999999999",
            b"/messages?with=alice&before=9223372036854775808",
            b"/messages?with=alice&other=1",
            b"/messages?with=%ZZ",
            b"/messages?with=al%",
            b"/messages?with=%C3%28",
            b"/messages?with=%FF",
            b"/messages?with=ali%0Ace",
            b"/messages?with=ali%00ce",
            b"/messages?with=%C2%85",
            b"/messages?with=al+ice",
            b"/messages?with=%23",
            b"/messages?with=%23" + b"g" * 65,
            b"/messages?with=" + b"a" * 2000,
            b"/conversations?limit=0",
            b"/conversations?limit=201",
            b"/conversations?with=alice",
        ]
        for raw in bad:
            result = yield self.get("", token, raw=raw)
            self.assertEqual(self.error(result), (400, "invalid_request"), raw)

    @defer.inlineCallbacks
    def test_unknown_peers_are_404(self) -> None:
        """A user id nobody registered is 404 unknown_user; a group that does
        not exist is 404 unknown_group."""
        _, token = yield self.server.user("alice")
        result = yield self.get("/messages?with=nobody", token)
        self.assertEqual(self.error(result), (404, "unknown_user"))
        result = yield self.get("/messages?with=%23team", token)
        self.assertEqual(self.error(result), (404, "unknown_group"))
