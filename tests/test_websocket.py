"""End to end over real TCP: the WebSocket side of the protocol (sections 3-7, 9)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import sqlite3

import autobahn.websocket.protocol as autobahn_protocol
import jwt
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.xormasker import create_xor_masker as native_masker
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from wsserver.store import is_postgres
from wsserver.websocket import (
    OPTIONS_NOT_FORMATTED,
    UNMASK_NATIVE_FROM,
    ExpiryWatch,
    Unmasker,
    skip_unlogged_option_dumps,
    text_frame,
    use_fast_unmasking,
)

from .support import VECTORS, LiveServer, connect_ws, sign_message, vector_key, within


def upgrade_headers(**extra: str) -> dict:
    headers = {
        b"connection": [b"Upgrade"],
        b"upgrade": [b"websocket"],
        b"sec-websocket-version": [b"13"],
        b"sec-websocket-key": [base64.b64encode(os.urandom(16))],
    }
    for name, value in extra.items():
        headers[name.replace("_", "-").encode()] = [value.encode()]
    return headers


class Base(unittest.TestCase):
    env: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LiveServer(self, dict(self.env))
        self.alice_key, self.alice_token = yield self.server.user("alice", vector_key("alice"))
        self.bob_key, self.bob_token = yield self.server.user("bob", vector_key("bob"))

    def connect(self, token, **kwargs):
        return self.server.connect(token, testcase=self, **kwargs)

    def count(self):
        return self.server.store.count_messages()

    @defer.inlineCallbacks
    def delivered(self, sender, ack):
        """The delivery state the sender learns for ``ack``'s message: the ack
        itself on one node; on several (section 11) the ack may say pending,
        and then a status frame for it must follow."""
        if self.server.multi_node and ack["status"] == "pending":
            status = yield sender.next_of("status")
            self.assertEqual(status["id"], ack["id"])
            return status
        return ack

    @defer.inlineCallbacks
    def refused_upgrade(self, query="", **headers):
        client = self.server.http()
        resp = yield within(
            client.get(self.server.base + "/ws" + query, headers=upgrade_headers(**headers))
        )
        body = json.loads((yield resp.content()))
        return resp.code, body["error"]["code"]

    @defer.inlineCallbacks
    def assertStillWorks(self, client, to="bob"):
        """The connection is open: a valid message is acked."""
        client.send_json({"to": to, "content": "still here"})
        ack = yield client.next_of("ack")
        self.assertEqual(ack["content"], "still here")


class DirectMessageTests(Base):
    @defer.inlineCallbacks
    def test_signed_direct_message_is_acked_after_commit_and_delivered(self):
        """A signed message to an online user arrives verified and delivered; the ack
        carries the same id and the row is in the database when the ack arrives."""
        alice = yield self.connect(self.alice_token)
        bob = yield self.connect(self.bob_token)
        sig = sign_message(self.alice_key, "alice", "bob", "hello bob", "n-1")
        alice.send_json({"to": "bob", "content": "hello bob", "signature": sig, "nonce": "n-1"})
        ack = yield alice.next_of("ack")
        stored = yield self.server.store.get_message(ack["id"])
        self.assertEqual((stored.content, stored.verification), ("hello bob", "verified"))
        got = yield bob.next_of("message")
        self.assertEqual(got["id"], ack["id"])
        self.assertEqual((got["from"], got["to"], got["content"]), ("alice", "bob", "hello bob"))
        self.assertEqual((got["verification"], got["status"]), ("verified", "delivered"))
        self.assertEqual((got["signature"], got["nonce"]), (sig, "n-1"))
        told = yield self.delivered(alice, ack)
        self.assertEqual(told["status"], "delivered")

    @defer.inlineCallbacks
    def test_vector_messages_are_verified_end_to_end(self):
        """Every message vector from alice or bob is accepted as verified."""
        alice = yield self.connect(self.alice_token)
        bob = yield self.connect(self.bob_token)
        clients = {"alice": alice, "bob": bob}
        for vec in VECTORS["messages"]:
            clients[vec["from"]].send_json(
                {
                    "to": vec["to"],
                    "content": vec["content"],
                    "signature": vec["signature"],
                    "nonce": vec["nonce"],
                }
            )
            ack = yield clients[vec["from"]].next_of("ack")
            self.assertEqual(ack["verification"], "verified", vec)
            self.assertEqual(ack["nonce"], vec["nonce"] or None)

    @defer.inlineCallbacks
    def test_unsigned_message(self):
        """No signature: verification unsigned, signature and nonce null."""
        alice = yield self.connect(self.alice_token)
        alice.send_json({"to": "bob", "content": "plain"})
        ack = yield alice.next_of("ack")
        self.assertEqual(
            (ack["verification"], ack["signature"], ack["nonce"]), ("unsigned", None, None)
        )
        self.assertEqual(ack["status"], "pending")

    @defer.inlineCallbacks
    def test_token_in_query_string(self):
        """?token= works like the Authorization header."""
        alice = yield connect_ws(
            self.server.ws_base + f"?token={self.alice_token}", None, testcase=self
        )
        yield self.assertStillWorks(alice)

    @defer.inlineCallbacks
    def test_offline_recipient_gets_pending_in_order_and_sender_is_told(self):
        """Messages to an offline user stay pending, arrive in id order on connect, and
        the connected sender gets a status frame for each."""
        alice = yield self.connect(self.alice_token)
        acks = []
        for i in range(3):
            alice.send_json({"to": "bob", "content": f"m{i}", "nonce": f"p-{i}"})
            acks.append((yield alice.next_of("ack")))
        self.assertEqual([a["status"] for a in acks], ["pending"] * 3)
        bob = yield self.connect(self.bob_token)
        got = yield bob.take(3, "message")
        self.assertEqual([g["id"] for g in got], [a["id"] for a in acks])
        self.assertEqual([g["content"] for g in got], ["m0", "m1", "m2"])
        statuses = yield alice.take(3, "status")
        self.assertEqual(sorted(s["id"] for s in statuses), [a["id"] for a in acks])
        self.assertEqual({s["status"] for s in statuses}, {"delivered"})
        stored = yield self.server.settled(acks[0]["id"], lambda m: m.status == "delivered")
        self.assertEqual(stored.status, "delivered")

    @defer.inlineCallbacks
    def test_every_device_receives(self):
        """A direct message reaches every connection of its recipient."""
        alice = yield self.connect(self.alice_token)
        bob1 = yield self.connect(self.bob_token)
        bob2 = yield self.connect(self.bob_token)
        alice.send_json({"to": "bob", "content": "both"})
        a = yield bob1.next_of("message")
        b = yield bob2.next_of("message")
        self.assertEqual(a["id"], b["id"])

    @defer.inlineCallbacks
    def test_message_to_self_reaches_every_own_connection(self):
        """Writing to oneself reaches all own connections, the sending one included."""
        a1 = yield self.connect(self.alice_token)
        a2 = yield self.connect(self.alice_token)
        a1.send_json({"to": "alice", "content": "note"})
        m1 = yield a1.next_of("message")
        m2 = yield a2.next_of("message")
        ack = yield a1.next_of("ack")
        self.assertEqual(m1["id"], m2["id"])
        self.assertEqual((ack["id"], ack["status"]), (m1["id"], "delivered"))


class BroadcastTests(Base):
    @defer.inlineCallbacks
    def test_broadcast_reaches_everyone_but_the_sending_connection(self):
        """A broadcast goes to every other open connection (the sender's other devices
        too); the ack says delivered with the number of connections."""
        a1 = yield self.connect(self.alice_token)
        a2 = yield self.connect(self.alice_token)
        bob = yield self.connect(self.bob_token)
        a1.send_json({"to": "broadcast", "content": "hello all"})
        ack = yield a1.next_of("ack")
        self.assertEqual(ack["to"], "broadcast")
        for client in (a2, bob):
            got = yield client.next_of("message")
            self.assertEqual((got["id"], got["to"]), (ack["id"], "broadcast"))
        told = yield self.delivered(a1, ack)
        self.assertEqual((told["status"], told["recipients"]), ("delivered", 2))
        self.assertEqual([f for f in a1.received if f["type"] == "message"], [])
        stored = yield self.server.settled(
            ack["id"], lambda m: (m.status, m.recipients) == ("delivered", 2)
        )
        self.assertEqual((stored.status, stored.recipients), ("delivered", 2))

    @defer.inlineCallbacks
    def test_broadcast_with_nobody_listening(self):
        """With no other connection a broadcast is delivered to 0 recipients."""
        alice = yield self.connect(self.alice_token)
        alice.send_json({"to": "broadcast", "content": "anyone?"})
        ack = yield alice.next_of("ack")
        told = yield self.delivered(alice, ack)
        self.assertEqual((told["status"], told["recipients"]), ("delivered", 0))


class RecoveryTests(Base):
    @defer.inlineCallbacks
    def test_since_replays_direct_and_broadcast_in_order(self):
        """Reconnecting with since gets every later direct message and broadcast, in id
        order, before live traffic."""
        alice = yield self.connect(self.alice_token)
        bob = yield self.connect(self.bob_token)
        alice.send_json({"to": "bob", "content": "seen"})
        seen = yield bob.next_of("message")
        yield alice.next_of("ack")
        yield bob.close_and_wait()
        sent = []
        for content, to in (("d1", "bob"), ("b1", "broadcast"), ("d2", "bob")):
            alice.send_json({"to": to, "content": content})
            sent.append((yield alice.next_of("ack"))["id"])
        bob2 = yield self.connect(self.bob_token, since=seen["id"])
        alice.send_json({"to": "bob", "content": "live"})
        live_ack = yield alice.next_of("ack")
        got = yield bob2.take(4, "message")
        self.assertEqual([g["id"] for g in got], [*sent, live_ack["id"]])
        self.assertEqual([g["content"] for g in got], ["d1", "b1", "d2", "live"])

    @defer.inlineCallbacks
    def test_since_zero_replays_history_and_own_broadcasts(self):
        """since=0 replays every direct message to the user and every broadcast, the
        user's own included."""
        bob = yield self.connect(self.bob_token)
        bob.send_json({"to": "broadcast", "content": "mine"})
        yield bob.next_of("ack")
        alice = yield self.connect(self.alice_token)
        alice.send_json({"to": "bob", "content": "to bob"})
        yield bob.next_of("message")
        again = yield self.connect(self.bob_token, since=0)
        got = yield again.take(2, "message")
        self.assertEqual([g["content"] for g in got], ["mine", "to bob"])

    @defer.inlineCallbacks
    def test_bad_since_is_refused_before_the_upgrade(self):
        """since that is not a non-negative integer is 400 invalid_request."""
        for query in ("?since=abc", "?since=-1", "?since=1.5", "?since=", "?since=1&since=2"):
            code, err = yield self.refused_upgrade(query, authorization=f"Bearer {self.bob_token}")
            self.assertEqual((code, err), (400, "invalid_request"), query)


class UpgradeRefusalTests(Base):
    env = {"ALLOWED_ORIGINS": "https://app.example"}

    @defer.inlineCallbacks
    def test_bad_tokens_are_401(self):
        """Missing, malformed, forged, expired, alg-none and deleted-user tokens are
        refused with 401 unauthorized before the upgrade."""
        tokens = self.server.service.auth.tokens
        secret = tokens._secret
        now = int(reactor.seconds())
        claims = {"sub": "alice", "iat": now - 100, "exp": now - 1, "iss": "wsserver", "jti": "j"}
        ghost, _ = tokens.issue("ghost")
        cases = [
            {},
            {"authorization": "Bearer not.a.jwt"},
            {"authorization": "Basic abc"},
            {"authorization": "Bearer " + jwt.encode({**claims, "exp": now + 99}, b"x" * 32)},
            {"authorization": "Bearer " + jwt.encode(claims, secret)},
            {"authorization": "Bearer " + jwt.encode({**claims, "exp": now + 99}, None, "none")},
            {"authorization": "Bearer " + ghost},
        ]
        for headers in cases:
            code, err = yield self.refused_upgrade("", **headers)
            self.assertEqual((code, err), (401, "unauthorized"), headers)
        code, err = yield self.refused_upgrade("?token=forged")
        self.assertEqual((code, err), (401, "unauthorized"))

    @defer.inlineCallbacks
    def test_origins(self):
        """A foreign or null Origin is 403; the server's own and listed ones connect."""
        auth = f"Bearer {self.alice_token}"
        for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
            code, err = yield self.refused_upgrade("", authorization=auth, origin=origin)
            self.assertEqual((code, err), (403, "forbidden_origin"), origin)
        own = f"http://127.0.0.1:{self.server.port}"
        for origin in (own, "https://app.example"):
            client = yield self.connect(self.alice_token, headers={"Origin": origin})
            yield self.assertStillWorks(client)

    @defer.inlineCallbacks
    def test_plain_get_without_upgrade(self):
        """A valid token without a WebSocket upgrade is 426 upgrade_required."""
        code, body = yield self.server.get(
            "/ws", headers={"Authorization": f"Bearer {self.alice_token}"}
        )
        self.assertEqual((code, body["error"]["code"]), (426, "upgrade_required"))


class RefusalTests(Base):
    env = {"MAX_CONTENT_BYTES": "1024", "MAX_FRAME_BYTES": "4096", "MESSAGE_BURST_LIMIT": "100"}

    @defer.inlineCallbacks
    def assertRefusal(self, client, payload, code, nonce=None):
        """payload is refused with a system frame `code`; nothing is stored; the
        connection stays open."""
        before = yield self.count()
        client.sendMessage(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        frame = yield client.next_of("system")
        self.assertEqual((frame["code"], frame["from"], frame["to"]), (code, "system", "alice"))
        self.assertEqual(frame["nonce"], nonce)
        self.assertTrue(frame["content"])
        after = yield self.count()
        self.assertEqual(after, before)
        yield self.assertStillWorks(client)

    @defer.inlineCallbacks
    def test_each_refusal_keeps_the_connection(self):
        """Every documented refusal code, each with the connection kept open."""
        alice = yield self.connect(self.alice_token)
        bad_vec = VECTORS["invalid_messages"][0]
        cases = [
            (b"not json", "invalid_message", None),
            (b"[1,2]", "invalid_message", None),
            ({"content": "no to", "nonce": "r-1"}, "invalid_message", "r-1"),
            ({"to": "bob", "content": 42}, "invalid_message", None),
            ({"to": "nobody", "content": "x", "nonce": "r-2"}, "unknown_recipient", "r-2"),
            ({"to": "system", "content": "x"}, "unknown_recipient", None),
            ({"to": "bob", "content": "x" * 1025}, "message_too_large", None),
            ({"to": "bob", "content": "x", "from": "bob"}, "from_mismatch", None),
            (
                {
                    "to": bad_vec["to"],
                    "content": bad_vec["content"],
                    "nonce": bad_vec["nonce"],
                    "signature": bad_vec["signature"],
                },
                "invalid_signature",
                bad_vec["nonce"],
            ),
            ({"to": "bob", "content": "x", "signature": "***"}, "invalid_signature", None),
        ]
        for payload, code, nonce in cases:
            yield self.assertRefusal(alice, payload, code, nonce)

    @defer.inlineCallbacks
    def test_duplicate_nonce_is_acked_with_the_first_id(self):
        """Resending the same nonce, to and content answers the first ack (same id) and
        stores nothing new; a changed message with that nonce is nonce_reused."""
        alice = yield self.connect(self.alice_token)
        msg = {"to": "bob", "content": "once", "nonce": "d-1"}
        alice.send_json(msg)
        first = yield alice.next_of("ack")
        alice.send_json(msg)
        second = yield alice.next_of("ack")
        self.assertEqual(second["id"], first["id"])
        # On another connection too.
        other = yield self.connect(self.alice_token)
        other.send_json(msg)
        third = yield other.next_of("ack")
        self.assertEqual(third["id"], first["id"])
        count = yield self.count()
        self.assertEqual(count, 1)
        yield self.assertRefusal(alice, {**msg, "content": "changed"}, "nonce_reused", "d-1")
        yield self.assertRefusal(alice, {**msg, "to": "alice"}, "nonce_reused", "d-1")

    @defer.inlineCallbacks
    def test_binary_frame_closes_1003(self):
        """A binary frame closes the connection with 1003."""
        alice = yield self.connect(self.alice_token)
        alice.sendMessage(b"\x00\x01", isBinary=True)
        code = yield alice.wait_closed()
        self.assertEqual(code, 1003)

    @defer.inlineCallbacks
    def test_oversized_frame_closes_1009(self):
        """A frame over MAX_FRAME_BYTES closes the connection with 1009."""
        alice = yield self.connect(self.alice_token)
        alice.sendMessage(b'"' + b"x" * 5000 + b'"')
        code = yield alice.wait_closed()
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_invalid_utf8_closes_1007(self):
        """A text frame that is not UTF-8 closes with 1007 (RFC 6455), and a
        message right behind it in the same write is not stored."""
        alice = yield self.connect(self.alice_token)
        alice.sendMessage(b'{"to":"bob","content":"\xff"}')
        alice.sendMessage(b'{"to":"bob","content":"behind it"}')
        code = yield alice.wait_closed()
        self.assertEqual(code, 1007)
        if not self.server.multi_node:
            yield self.server.store.drain()
            count = yield self.count()
            self.assertEqual(count, 0)
        else:
            # Several nodes (maybe on PostgreSQL, maybe in other processes):
            # bob's message, acked after its commit, is the only one stored.
            bob = yield self.connect(self.bob_token)
            bob.send_json({"to": "bob", "content": "marker"})
            yield bob.next_of("ack")
            count = yield self.count()
            self.assertEqual(count, 1)

    @defer.inlineCallbacks
    def test_database_refusing_writes_answers_internal_error(self):
        """When SQLite refuses the write the sender gets internal_error and no ack, the
        connection stays open, and it works again once the database does."""
        if self.server.multi_node or is_postgres(self.server.db):
            # PRAGMA query_only is SQLite's; the trigger serves both engines.
            yield self.refusing_writes_on_several_nodes()
            return
        alice = yield self.connect(self.alice_token)
        pool = self.server.service.store._pool
        yield pool.runOperation("PRAGMA query_only = 1")
        alice.send_json({"to": "bob", "content": "lost?", "nonce": "f-1"})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("internal_error", "f-1"))
        self.assertTrue(self.flushLoggedErrors())
        yield pool.runOperation("PRAGMA query_only = 0")
        count = yield self.count()
        self.assertEqual(count, 0)
        self.assertEqual([f for f in alice.received if f["type"] == "ack"], [])
        yield self.assertStillWorks(alice)

    @defer.inlineCallbacks
    def refusing_writes_on_several_nodes(self):
        """The same promise on several nodes, whose database connections the test
        does not hold: a trigger (SQLite or PostgreSQL) makes every insert into
        messages fail, whichever node writes it, until it is dropped."""
        alice = yield self.connect(self.alice_token)
        refuse_message_inserts(self.server.db, True)
        self.addCleanup(refuse_message_inserts, self.server.db, False)
        alice.send_json({"to": "bob", "content": "lost?", "nonce": "f-1"})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("internal_error", "f-1"))
        if self.server.mode != "workers":
            self.assertTrue(self.flushLoggedErrors())  # logged by the node, here
        refuse_message_inserts(self.server.db, False)
        count = yield self.count()
        self.assertEqual(count, 0)
        self.assertEqual([f for f in alice.received if f["type"] == "ack"], [])
        yield self.assertStillWorks(alice)


def refuse_message_inserts(db: str, refuse: bool) -> None:
    """Create (or drop) a trigger that makes every insert into messages fail."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            if refuse:
                conn.execute(
                    "CREATE OR REPLACE FUNCTION wstest_refuse() RETURNS trigger AS $$ "
                    "BEGIN RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql"
                )
                conn.execute(
                    "CREATE TRIGGER wstest_refuse BEFORE INSERT ON messages "
                    "FOR EACH STATEMENT EXECUTE FUNCTION wstest_refuse()"
                )
            else:
                conn.execute("DROP TRIGGER IF EXISTS wstest_refuse ON messages")
        return
    with contextlib.closing(sqlite3.connect(db, timeout=30, isolation_level=None)) as conn:
        if refuse:
            conn.execute(
                "CREATE TRIGGER wstest_refuse BEFORE INSERT ON messages "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
        else:
            conn.execute("DROP TRIGGER IF EXISTS wstest_refuse")


class SignatureRequiredTests(Base):
    env = {"REQUIRE_SIGNATURES": "true"}

    @defer.inlineCallbacks
    def test_unsigned_refused_signed_accepted(self):
        """With REQUIRE_SIGNATURES an unsigned message is signature_required."""
        alice = yield self.connect(self.alice_token)
        alice.send_json({"to": "bob", "content": "plain", "nonce": "s-1"})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("signature_required", "s-1"))
        sig = sign_message(self.alice_key, "alice", "bob", "signed", None)
        alice.send_json({"to": "bob", "content": "signed", "signature": sig})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["verification"], "verified")
        count = yield self.count()
        self.assertEqual(count, 1)


class RateLimitTests(Base):
    # One token per 1000 s: no refill can happen during a test, however slow
    # the machine (the refill itself is tested on a clock in test_pipeline).
    env = {"MESSAGE_RATE_LIMIT": "0.001", "MESSAGE_BURST_LIMIT": "3"}

    @defer.inlineCallbacks
    def test_over_the_limit_is_refused_and_the_connection_kept(self):
        """Past the burst each frame gets rate_limited with retry_after_ms and the
        nonce, nothing is stored, and the connection stays open."""
        alice = yield self.connect(self.alice_token)
        for i in range(5):
            alice.send_json({"to": "bob", "content": f"m{i}", "nonce": f"r-{i}"})
        frames = yield alice.take(5)
        kinds = sorted((f["type"], f.get("code")) for f in frames)
        self.assertEqual(kinds, [("ack", None)] * 3 + [("system", "rate_limited")] * 2)
        limited = [f for f in frames if f["type"] == "system"]
        self.assertEqual({f["nonce"] for f in limited}, {"r-3", "r-4"})
        self.assertTrue(all(990_000 < f["retry_after_ms"] <= 1_000_000 for f in limited))
        self.assertIn("0.001 messages/s, burst 3", limited[0]["content"])
        count = yield self.count()
        self.assertEqual(count, 3)
        alice.send_json({"to": "bob", "content": "still there?", "nonce": "r-5"})
        frame = yield alice.next_frame()
        self.assertEqual((frame.get("code"), frame.get("nonce")), ("rate_limited", "r-5"))

    @defer.inlineCallbacks
    def test_bucket_is_shared_by_connections_and_survives_reconnect(self):
        """All of a user's connections share one bucket; reconnecting does not refill it."""
        a1 = yield self.connect(self.alice_token)
        a2 = yield self.connect(self.alice_token)
        for client in (a1, a2, a1):
            client.send_json({"to": "bob", "content": "x"})
            yield client.next_of("ack")
        yield a1.close_and_wait()
        a3 = yield self.connect(self.alice_token)
        a3.send_json({"to": "bob", "content": "x"})
        frame = yield a3.next_frame()
        self.assertEqual(frame.get("code"), "rate_limited")


class ConnectionLimitTests(Base):
    env = {"MAX_CONNECTIONS_PER_USER": "2"}

    @defer.inlineCallbacks
    def test_extra_connection_closed_1008(self):
        """One connection over MAX_CONNECTIONS_PER_USER is closed with 1008; the others
        keep working."""
        a1 = yield self.connect(self.alice_token)
        yield self.connect(self.alice_token)
        try:
            a3 = yield self.connect(self.alice_token)
        except ConnectionError as exc:
            self.assertIn("1008", str(exc))
        else:
            code = yield a3.wait_closed()
            self.assertEqual(code, 1008)
        yield self.assertStillWorks(a1)


class TokenExpiryTests(Base):
    env = {"TOKEN_TTL": "2"}

    @defer.inlineCallbacks
    def test_token_expiry_closes_4001(self):
        """When the token expires the server closes the connection with 4001 (end
        to end; the exact moment is tested on a clock in test_pipeline)."""
        for _attempt in range(10):
            token = yield self.server.login("alice", self.alice_key)
            try:
                alice = yield self.connect(token)
                break
            except ConnectionError:
                continue  # the machine was slower than the 2 s the token lives
        else:
            self.fail("no connection within the token's life in 10 attempts")
        code = yield alice.wait_closed(seconds=30)
        self.assertEqual(code, 4001)


class _Conn:
    """What ExpiryWatch needs of a connection: ``live`` and ``_close``."""

    def __init__(self) -> None:
        self.live = True
        self.closed_with: int | None = None

    def _close(self, code: int, reason: str) -> None:
        self.live = False
        self.closed_with = code


class ExpiryWatchTests(unittest.TestCase):
    """One timer closes expired connections; closed ones do not pile up."""

    def test_closed_connections_do_not_stay_until_their_token_expires(self):
        """10,000 connections opened and closed long before their tokens expire
        leave at most twice the open ones (or COMPACT_AT) behind, and the ones
        still open are closed with 4001 at their expiry, in order."""
        clock = task.Clock()
        watch = ExpiryWatch(clock)
        kept = [_Conn() for _ in range(50)]
        for i, conn in enumerate(kept):
            watch.add(conn, 3600.0 + i)
        for _ in range(10_000):
            conn = _Conn()
            watch.add(conn, 3600.0)
            conn.live = False  # closed by its client at once
        self.assertLessEqual(len(watch), ExpiryWatch.COMPACT_AT)
        clock.advance(3600.0 + 24)
        self.assertEqual([c.closed_with for c in kept[:25]], [4001] * 25)
        self.assertEqual([c.closed_with for c in kept[25:]], [None] * 25)
        clock.advance(100)
        self.assertEqual([c.closed_with for c in kept], [4001] * 50)
        self.assertEqual(len(watch), 0)
        watch.stop()


class FramingTests(unittest.TestCase):
    """The server's own frame building and unmasking, against Autobahn's."""

    def test_text_frame_is_autobahns_prepared_frame(self):
        """text_frame gives the bytes of prepareMessage().payloadHybi at every
        length encoding (7-bit, 16-bit, 64-bit)."""
        factory = WebSocketServerFactory()
        for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
            self.assertEqual(text_frame(payload), factory.prepareMessage(payload).payloadHybi, size)

    def test_unmasker_matches_the_definition_in_any_chunks(self):
        """Unmasker XORs byte i with mask[i % 4] (RFC 6455 5.3), across calls
        that split a frame anywhere, as Autobahn's native masker does."""
        rng = random.Random(7)
        for _ in range(300):
            mask = bytes(rng.getrandbits(8) for _ in range(4))
            size = rng.choice([0, 1, 3, 4, 5, 125, 126, 1000, 4095, rng.randrange(5000)])
            data = bytes(rng.getrandbits(8) for _ in range(size))
            expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            cuts = sorted(rng.sample(range(size + 1), min(3, size + 1)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
            ours, theirs = Unmasker(mask), native_masker(mask, size)
            self.assertEqual(b"".join(ours.process(p) for p in pieces), expected)
            self.assertEqual(b"".join(theirs.process(p) for p in pieces), expected)
            self.assertEqual(ours.pointer(), size)

    def test_option_dumps_are_formatted_only_when_logged(self):
        """With txaio's log level above debug, Autobahn's per-connection dump
        of its options (a list) is not formatted; at debug it is, as before;
        anything else (its timings, a dict) always is; installing twice
        changes nothing; a connection still opens and works."""
        original = autobahn_protocol.pformat
        self.addCleanup(setattr, autobahn_protocol, "pformat", original)
        level = txaio.get_global_log_level()
        self.addCleanup(txaio.set_global_log_level, level)
        skip_unlogged_option_dumps()
        installed = autobahn_protocol.pformat
        skip_unlogged_option_dumps()
        self.assertIs(autobahn_protocol.pformat, installed)
        options = [("autoPingInterval", 0, "WebSocketServerFactory")]
        txaio.set_global_log_level("info")
        self.assertEqual(installed(options), OPTIONS_NOT_FORMATTED)
        self.assertEqual(installed({"a": 1}), original({"a": 1}))
        txaio.set_global_log_level("debug")
        self.assertEqual(installed(options), original(options))
        txaio.set_global_log_level("info")
        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)  # runs _connectionMade, which dumps
        self.assertEqual(proto.autoPingInterval, factory.autoPingInterval)

    def test_use_fast_unmasking_routes_by_size(self):
        """Small frames get Unmasker, large ones Autobahn's masker; installing
        twice changes nothing."""
        original = autobahn_protocol.create_xor_masker
        self.addCleanup(setattr, autobahn_protocol, "create_xor_masker", original)
        use_fast_unmasking()
        installed = autobahn_protocol.create_xor_masker
        use_fast_unmasking()
        self.assertIs(autobahn_protocol.create_xor_masker, installed)
        self.assertIsInstance(installed(b"abcd", 100), Unmasker)
        self.assertNotIsInstance(installed(b"abcd", UNMASK_NATIVE_FROM), Unmasker)
