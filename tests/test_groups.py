"""Groups end to end (protocol section 13): the HTTP API, delivery to every
member's connections on every node (not to the sending connection), pending
messages on connect, ``since``, the ack's ``members``/``recipients`` and
later ``status`` frames, ``not_a_member``, ``group`` event frames, removal,
leaving, the owner's rules and every bad input.  Runs in the four suite
modes (tests/support.py ``suite_mode``)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from wsserver import keylog

from .support import LiveServer, b64, within
from .test_presence import eventually_deferred

TEAM = "#team"
TEAM_PATH = "/groups/%23team"


@defer.inlineCallbacks
def api(server: LiveServer, method: str, path: str, token: str | None, body: Any = None) -> Any:
    """One request with a Bearer token; fire with (status, parsed body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        if isinstance(body, bytes):
            kwargs["data"] = body
            headers["Content-Type"] = "application/json"
        else:
            kwargs["json"] = body
    resp = yield within(server.http().request(method, server.base + path, **kwargs))
    content = yield resp.content()
    return resp.code, json.loads(content) if content else None


@defer.inlineCallbacks
def status_until(client: Any, msg_id: int, recipients: int) -> Any:
    """The ``status`` frames of ``msg_id`` until one says ``recipients``;
    fire with that one."""
    while True:
        frame = yield client.next_of("status")
        if frame["id"] == msg_id and frame.get("recipients") == recipients:
            return frame


@defer.inlineCallbacks
def group_event(client: Any, event: str, user_id: str) -> Any:
    """The next ``group`` frame about ``event`` of ``user_id`` (a node that did
    not make a change sends its frames when it polls the account events, so
    the frames of an earlier change, the creation's, may come first)."""
    while True:
        frame = yield client.next_of("group")
        if (frame["event"], frame["user_id"]) == (event, user_id):
            return frame


@defer.inlineCallbacks
def delivered_status(client: Any, msg_id: int) -> Any:
    """The first ``status`` frame saying ``msg_id`` is delivered."""
    while True:
        frame = yield client.next_of("status")
        if frame["id"] == msg_id and frame["status"] == "delivered":
            return frame


@defer.inlineCallbacks
def raw_request(server: LiveServer, method: str, path: str, authorization: str | None, body: Any):
    """One request with the ``Authorization`` header as given (None: none);
    fire with (status, parsed body)."""
    headers = {} if authorization is None else {"Authorization": authorization}
    kwargs: dict[str, Any] = {"headers": headers}
    if isinstance(body, bytes):
        kwargs["data"] = body
        headers["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    resp = yield within(server.http().request(method, server.base + path, **kwargs))
    content = yield resp.content()
    return resp.code, json.loads(content) if content else None


@defer.inlineCallbacks
def next_message(client: Any) -> Any:
    frame = yield client.next_of("message")
    return frame


class GroupTestCase(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LiveServer(
            self,
            {
                "MESSAGE_RATE_LIMIT": "1000",
                "MESSAGE_BURST_LIMIT": "1000",
                "AUTH_RATE_LIMIT": "1000",
                "AUTH_BURST_LIMIT": "1000",
            },
        )
        self.tokens, self.keys = {}, {}
        for name in ("alice", "bob", "carol", "dave"):
            self.keys[name], self.tokens[name] = yield self.server.user(name)

    @property
    def other(self) -> int | None:
        """The second node of a test cluster (None: one node, or workers,
        where the kernel picks)."""
        return 1 if len(self.server.node_bases) > 1 else None

    def connect(self, name: str, node: int | None = None, **kwargs: Any) -> defer.Deferred:
        return self.server.connect(self.tokens[name], node=node, testcase=self, **kwargs)

    def call(self, method: str, path: str, name: str | None, body: Any = None) -> Any:
        return api(self.server, method, path, self.tokens[name] if name else None, body)

    @defer.inlineCallbacks
    def make_team(self, members=("bob", "carol")) -> Any:
        code, body = yield self.call(
            "POST", "/groups", "alice", {"group_id": TEAM, "name": "Team", "members": list(members)}
        )
        self.assertEqual(code, 201, body)
        return body

    @defer.inlineCallbacks
    def marker(self, client: Any, name: str, text: str) -> Any:
        """Send a note to self from ``client`` and fire once ``client`` got it back:
        every message stored before it was handed out before it, on this node."""
        client.send_json({"to": name, "content": text})
        while True:
            frame = yield client.next_of("message")
            if frame["to"] == name and frame["content"] == text:
                return frame
            self.fail(f"{name} got {frame!r} before its marker")


class DeliveryTests(GroupTestCase):
    @defer.inlineCallbacks
    def test_every_member_on_every_node_but_not_the_sending_connection(self):
        """A group message reaches every connection of every member (on both
        nodes in a cluster) and the sender's other connection, never the
        sending one; the ack says members 2, and recipients reaches 2 with
        status delivered (in the ack or a later status frame)."""
        group = yield self.make_team()
        self.assertEqual(group["members"], ["alice", "bob", "carol"])
        self.assertEqual(group["owner"], "alice")
        a1 = yield self.connect("alice", node=0)
        a2 = yield self.connect("alice", node=self.other)
        bob = yield self.connect("bob", node=self.other)
        carol = yield self.connect("carol", node=0)
        a1.send_json({"to": TEAM, "content": "hello team", "nonce": "g-1"})
        ack = yield a1.next_of("ack")
        self.assertEqual(ack["to"], TEAM)
        self.assertEqual(ack["members"], 2)
        for client in (a2, bob, carol):
            got = yield next_message(client)
            self.assertEqual((got["id"], got["from"], got["to"]), (ack["id"], "alice", TEAM))
            self.assertEqual(got["content"], "hello team")
        if ack["recipients"] != 2:
            self.assertEqual(ack["status"], "pending")
            final = yield status_until(a1, ack["id"], 2)
            self.assertEqual(final["status"], "delivered")
        else:
            self.assertEqual(ack["status"], "delivered")
        yield self.marker(a1, "alice", "marker")
        # The sending connection got the ack, never the message itself.
        to_team = [f for f in a1.received if f["type"] == "message" and f["to"] == TEAM]
        self.assertEqual(to_team, [])

    @defer.inlineCallbacks
    def test_pending_for_an_offline_member_then_delivered_on_connect(self):
        """With bob offline the ack says members 1, recipients 0, pending; bob
        gets the message when he connects, and alice a status frame delivered
        with recipients 1; the stored message is delivered."""
        yield self.make_team(("bob",))
        alice = yield self.connect("alice")
        alice.send_json({"to": TEAM, "content": "while you were away"})
        ack = yield alice.next_of("ack")
        self.assertEqual((ack["members"], ack["recipients"], ack["status"]), (1, 0, "pending"))
        bob = yield self.connect("bob")
        got = yield next_message(bob)
        self.assertEqual((got["id"], got["content"]), (ack["id"], "while you were away"))
        status = yield status_until(alice, ack["id"], 1)
        self.assertEqual(status["status"], "delivered")
        stored = yield self.server.settled(ack["id"], lambda m: m.status == "delivered")
        self.assertEqual(stored.status, "delivered")
        # Delivered once: a new connection without since gets nothing again.
        yield bob.close_and_wait()
        bob2 = yield self.connect("bob")
        yield self.marker(bob2, "bob", "nothing pending")

    @defer.inlineCallbacks
    def test_a_resent_group_message_is_acked_with_its_counts(self):
        """alice resends a group message (same nonce, same frame), once with
        bob away and again, on a new connection, after he received it: each
        resend's ack is the first one's (same id, nothing stored twice) with
        members and recipients as they stand (1 and 0 pending, then 1 and 1
        delivered); a tester found them missing."""
        yield self.make_team(("bob",))
        alice = yield self.connect("alice")
        frame = {"to": TEAM, "content": "once", "nonce": "resend-1"}
        alice.send_json(frame)
        first = yield alice.next_of("ack")
        alice.send_json(frame)
        again = yield alice.next_of("ack")
        self.assertEqual(
            (again["id"], again["members"], again["recipients"], again["status"]),
            (first["id"], 1, 0, "pending"),
        )
        bob = yield self.connect("bob")
        got = yield next_message(bob)
        self.assertEqual(got["id"], first["id"])
        yield status_until(alice, first["id"], 1)
        yield alice.close_and_wait()
        alice = yield self.connect("alice")
        state: dict = {}

        @defer.inlineCallbacks
        def counted() -> Any:
            alice.send_json(frame)
            state["ack"] = yield alice.next_of("ack")
            return state["ack"]["status"] == "delivered"

        yield eventually_deferred(counted, "the resend's ack says delivered")
        ack = state["ack"]
        self.assertEqual((ack["id"], ack["members"], ack["recipients"]), (first["id"], 1, 1))
        page = yield self.call("GET", "/messages?with=%23team", "alice")
        self.assertEqual([m["id"] for m in page[1]["messages"]], [first["id"]])

    @defer.inlineCallbacks
    def test_since_replays_the_groups_messages_own_included(self):
        """A member reconnecting with since gets every group message above it,
        their own included; without since only what is pending for them."""
        yield self.make_team(("bob",))
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        alice.send_json({"to": TEAM, "content": "one"})
        first = yield alice.next_of("ack")
        yield next_message(bob)
        bob.send_json({"to": TEAM, "content": "two"})
        second = yield bob.next_of("ack")
        yield next_message(alice)
        yield bob.close_and_wait()
        again = yield self.connect("bob", since=first["id"] - 1)
        frames = [(yield next_message(again)), (yield next_message(again))]
        self.assertEqual([f["id"] for f in frames], [first["id"], second["id"]])
        fresh = yield self.connect("bob")
        yield self.marker(fresh, "bob", "nothing pending")

    @defer.inlineCallbacks
    def test_a_non_member_is_refused_and_nothing_is_stored(self):
        """dave (no member) writing to the group, and anyone writing to a group
        that does not exist, get system not_a_member with the nonce; nothing
        is stored; a malformed group id is unknown_recipient."""
        yield self.make_team()
        dave = yield self.connect("dave")
        before = yield self.server.store.count_messages()
        for to in (TEAM, "#nosuch"):
            dave.send_json({"to": to, "content": "let me in", "nonce": "n-" + to[1:]})
            refusal = yield dave.next_of("system")
            self.assertEqual((refusal["code"], refusal["nonce"]), ("not_a_member", "n-" + to[1:]))
        dave.send_json({"to": "#bad id", "content": "x"})
        refusal = yield dave.next_of("system")
        self.assertEqual(refusal["code"], "unknown_recipient")
        after = yield self.server.store.count_messages()
        self.assertEqual(after, before)

    @defer.inlineCallbacks
    def test_signed_group_message_is_verified(self):
        """A message to a group signed over that ``to`` is stored verified."""
        from .support import sign_message

        key = yield self.server.register("erin")
        token = yield self.server.login("erin", key)
        code, _ = yield api(
            self.server, "POST", "/groups", token, {"group_id": "#signed", "name": "S"}
        )
        self.assertEqual(code, 201)
        erin = yield self.server.connect(token, testcase=self)
        sig = sign_message(key, "erin", "#signed", "signed hi", "s-1")
        erin.send_json({"to": "#signed", "content": "signed hi", "nonce": "s-1", "signature": sig})
        ack = yield erin.next_of("ack")
        self.assertEqual(ack["verification"], "verified")
        self.assertEqual((ack["members"], ack["recipients"], ack["status"]), (0, 0, "delivered"))


class MembershipTests(GroupTestCase):
    @defer.inlineCallbacks
    def test_events_and_removal_stops_delivery(self):
        """Adding dave sends every member (dave too) a group event 'added';
        removing bob sends 'removed' to the members and to bob; a message
        after the removal reaches dave and not bob."""
        yield self.make_team(("bob",))
        bob = yield self.connect("bob")
        dave = yield self.connect("dave")
        code, body = yield self.call("POST", TEAM_PATH + "/members", "alice", {"user_id": "dave"})
        self.assertEqual(code, 200, body)
        self.assertEqual(body["members"], ["alice", "bob", "dave"])
        for client in (bob, dave):
            event = yield group_event(client, "added", "dave")
            self.assertEqual(event["group_id"], TEAM)
        code, body = yield self.call("DELETE", TEAM_PATH + "/members/bob", "alice")
        self.assertEqual(code, 200, body)
        for client in (bob, dave):
            event = yield group_event(client, "removed", "bob")
            self.assertEqual(event["group_id"], TEAM)
        alice = yield self.connect("alice")
        alice.send_json({"to": TEAM, "content": "after bob left"})
        ack = yield alice.next_of("ack")
        self.assertEqual(ack["members"], 1)
        got = yield next_message(dave)
        self.assertEqual(got["id"], ack["id"])
        # bob: nothing of the group, now or when he reconnects.
        alice.send_json({"to": "bob", "content": "direct"})
        direct = yield next_message(bob)
        self.assertEqual(direct["from"], "alice")
        yield bob.close_and_wait()
        again = yield self.connect("bob", since=0)
        frames = []
        while True:
            frame = yield next_message(again)
            frames.append(frame)
            if frame["content"] == "direct":
                break
        self.assertNotIn(ack["id"], [f["id"] for f in frames])
        again.send_json({"to": TEAM, "content": "still here?", "nonce": "x-1"})
        refusal = yield again.next_of("system")
        self.assertEqual(refusal["code"], "not_a_member")

    @defer.inlineCallbacks
    def test_leave_and_owner_handover(self):
        """A member may leave (DELETE of themself); the owner leaving hands the
        group to the member added first among those left."""
        yield self.make_team()
        code, _ = yield self.call("DELETE", TEAM_PATH + "/members/carol", "carol")
        self.assertEqual(code, 200)
        code, body = yield self.call("DELETE", TEAM_PATH + "/members/alice", "alice")
        self.assertEqual(code, 200, body)
        code, body = yield self.call("GET", TEAM_PATH, "bob")
        self.assertEqual((code, body["owner"], body["members"]), (200, "bob", ["bob"]))
        code, body = yield self.call("GET", TEAM_PATH, "alice")
        self.assertEqual((code, body["error"]["code"]), (404, "unknown_group"))

    @defer.inlineCallbacks
    def test_owner_rules_and_visibility(self):
        """Only the owner adds or removes others (403 not_owner); a non-member
        sees 404 unknown_group; GET /groups lists the caller's groups."""
        yield self.make_team(("bob",))
        code, body = yield self.call("POST", TEAM_PATH + "/members", "bob", {"user_id": "dave"})
        self.assertEqual((code, body["error"]["code"]), (403, "not_owner"))
        code, body = yield self.call("DELETE", TEAM_PATH + "/members/alice", "bob")
        self.assertEqual((code, body["error"]["code"]), (403, "not_owner"))
        for path in (TEAM_PATH, "/groups/%23nosuch"):
            code, body = yield self.call("GET", path, "dave")
            self.assertEqual((code, body["error"]["code"]), (404, "unknown_group"))
        code, body = yield self.call("POST", TEAM_PATH + "/members", "dave", {"user_id": "dave"})
        self.assertEqual((code, body["error"]["code"]), (404, "unknown_group"))
        code, body = yield self.call("GET", "/groups", "bob")
        self.assertEqual([g["group_id"] for g in body["groups"]], [TEAM])
        code, body = yield self.call("GET", "/groups", "dave")
        self.assertEqual((code, body), (200, {"groups": []}))

    @defer.inlineCallbacks
    def test_a_deleted_account_leaves_its_groups(self):
        """Deleting the owner's account removes them from the group: the
        members get 'removed' (within the account events' second), the group
        passes to the member added first, and it goes on working."""
        yield self.make_team(("bob", "carol"))
        bob = yield self.connect("bob")
        key = self.keys["alice"]
        statement = keylog.delete_string("alice", 1).encode("utf-8")
        body = {
            "key_id": keylog.key_id(bytes(key.verify_key)),
            "signature": b64(key.sign(statement).signature),
        }
        code, answer = yield self.call("DELETE", "/auth/users/alice", None, body)
        self.assertEqual(code, 200, answer)
        event = yield group_event(bob, "removed", "alice")
        self.assertEqual(event["group_id"], TEAM)
        code, group = yield self.call("GET", TEAM_PATH, "bob")
        self.assertEqual((group["owner"], group["members"]), ("bob", ["bob", "carol"]))
        bob.send_json({"to": TEAM, "content": "carry on"})
        ack = yield bob.next_of("ack")
        self.assertEqual(ack["members"], 1)


class SettledTests(GroupTestCase):
    @defer.inlineCallbacks
    def test_a_removal_or_leave_that_settles_a_message_tells_its_sender(self):
        """alice (on the other node in a cluster) sends while bob is offline:
        carol gets it, it waits for bob; alice removing bob settles it, and
        alice's connection gets status delivered, recipients 1.  Then with
        carol offline, a message waits for her alone; carol leaving settles
        it: delivered, recipients 0."""
        yield self.make_team(("bob", "carol"))
        alice = yield self.connect("alice", node=self.other)
        carol = yield self.connect("carol", node=0)
        alice.send_json({"to": TEAM, "content": "bob is away"})
        ack = yield alice.next_of("ack")
        self.assertEqual((ack["members"], ack["status"]), (2, "pending"))
        yield next_message(carol)
        code, _ = yield self.call("DELETE", TEAM_PATH + "/members/bob", "alice")
        self.assertEqual(code, 200)
        status = yield delivered_status(alice, ack["id"])
        self.assertEqual(status["recipients"], 1)
        yield carol.close_and_wait()
        alice.send_json({"to": TEAM, "content": "carol is away"})
        second = yield alice.next_of("ack")
        self.assertEqual((second["members"], second["status"]), (1, "pending"))
        code, _ = yield self.call("DELETE", TEAM_PATH + "/members/carol", "carol")
        self.assertEqual(code, 200)
        status = yield delivered_status(alice, second["id"])
        self.assertEqual(status["recipients"], 0)
        stored = yield self.server.settled(second["id"], lambda m: m.status == "delivered")
        self.assertEqual(stored.status, "delivered")

    @defer.inlineCallbacks
    def test_a_deletion_that_settles_a_message_tells_its_sender(self):
        """bob, offline, deletes his account with alice's message waiting for
        him alone: alice (on the other node in a cluster) gets status
        delivered, recipients 1."""
        yield self.make_team(("bob", "carol"))
        alice = yield self.connect("alice", node=self.other)
        carol = yield self.connect("carol", node=0)
        alice.send_json({"to": TEAM, "content": "bob never gets this"})
        ack = yield alice.next_of("ack")
        yield next_message(carol)
        key = self.keys["bob"]
        statement = keylog.delete_string("bob", 1).encode("utf-8")
        body = {
            "key_id": keylog.key_id(bytes(key.verify_key)),
            "signature": b64(key.sign(statement).signature),
        }
        code, answer = yield self.call("DELETE", "/auth/users/bob", None, body)
        self.assertEqual(code, 200, answer)
        status = yield delivered_status(alice, ack["id"])
        self.assertEqual(status["recipients"], 1)

    @defer.inlineCallbacks
    def test_a_removed_member_cannot_read_what_he_never_received(self):
        """bob, offline, is removed with alice's message inside his window
        but never handed to him: his read of it is invalid_message, and
        alice hears of no read; carol, who got it, may read it."""
        yield self.make_team(("bob", "carol"))
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        alice.send_json({"to": TEAM, "content": "not for bob after all"})
        ack = yield alice.next_of("ack")
        yield next_message(carol)
        code, _ = yield self.call("DELETE", TEAM_PATH + "/members/bob", "alice")
        self.assertEqual(code, 200)
        bob = yield self.connect("bob")
        bob.send_json({"type": "read", "id": ack["id"]})
        refusal = yield bob.next_of("system")
        self.assertEqual(refusal["code"], "invalid_message")
        carol.send_json({"type": "read", "id": ack["id"]})
        while True:
            frame = yield alice.next_of("status")
            if frame.get("status") == "read":
                break
        self.assertEqual((frame["id"], frame["by"]), (ack["id"], "carol"))


class LimitTests(GroupTestCase):
    @defer.inlineCallbacks
    def test_a_user_in_100_groups_cannot_be_put_in_more(self):
        """bob in 100 groups: alice creating a group with him, adding him, and
        bob creating one are each 409 too_many_groups; GET /groups lists his
        100, each with its members."""
        yield self.make_team(("carol",))
        for i in range(99):
            code, body = yield self.call(
                "POST", "/groups", "bob", {"group_id": f"#g{i:02d}", "name": "G"}
            )
            self.assertEqual(code, 201, body)
        code, body = yield self.call(
            "POST", "/groups", "alice", {"group_id": "#x", "name": "X", "members": ["bob"]}
        )
        self.assertEqual(code, 201, body)
        cases = [
            ("POST", "/groups", "alice", {"group_id": "#y", "name": "Y", "members": ["bob"]}),
            ("POST", "/groups", "bob", {"group_id": "#z", "name": "Z"}),
            ("POST", TEAM_PATH + "/members", "alice", {"user_id": "bob"}),
        ]
        for method, path, who, body in cases:
            code, answer = yield self.call(method, path, who, body)
            self.assertEqual((code, answer["error"]["code"]), (409, "too_many_groups"), body)
        code, body = yield self.call("GET", TEAM_PATH, "alice")
        self.assertEqual(body["members"], ["alice", "carol"])
        code, body = yield self.call("GET", "/groups", "bob")
        self.assertEqual(len(body["groups"]), 100)
        x = [g for g in body["groups"] if g["group_id"] == "#x"]
        self.assertEqual(x[0]["members"], ["alice", "bob"])


class BadInputTests(GroupTestCase):
    @defer.inlineCallbacks
    def test_no_valid_token_is_401_whatever_else_is_wrong(self):
        """Without a valid Bearer token every /groups request is 401
        unauthorized, even with a bad body or a bad id in its path."""
        yield self.make_team(("bob",))
        spellings = [None, "Bearer", "Basic " + self.tokens["alice"], "Bearer not-a-token"]
        requests = [
            ("POST", "/groups", b"[1]"),
            ("POST", "/groups", {"group_id": "team", "name": ""}),
            ("GET", "/groups/team", None),
            ("GET", "/groups/%23%FF", None),
            ("POST", "/groups/team/members", {"user_id": "bad id"}),
            ("POST", TEAM_PATH + "/members", b"not json"),
            ("DELETE", TEAM_PATH + "/members/%0A", None),
            ("DELETE", "/groups/bad/members/bob", None),
        ]
        for authorization in spellings:
            for method, path, body in requests:
                code, answer = yield raw_request(self.server, method, path, authorization, body)
                self.assertEqual(
                    (code, answer["error"]["code"]), (401, "unauthorized"), (authorization, path)
                )
        code, body = yield self.call("GET", TEAM_PATH, "alice")
        self.assertEqual(body["members"], ["alice", "bob"])

    @defer.inlineCallbacks
    def test_every_bad_input_gets_its_documented_error_and_changes_nothing(self):
        """Each bad request to /groups gets the documented status and code, and
        the group is as before (members, owner)."""
        yield self.make_team(("bob",))
        long_id = "#" + "a" * 65
        cases = [
            ("POST", "/groups", "alice", {"group_id": "team", "name": "x"}, 400, "invalid_request"),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": long_id, "name": "x"},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#a\nb", "name": "x"},
                400,
                "invalid_request",
            ),
            ("POST", "/groups", "alice", {"group_id": "#ok", "name": ""}, 400, "invalid_request"),
            # NaN is no JSON (Python's decoder took it; a tester's find)
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#nan", "name": "x", "extra": float("nan")},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "a\x07"},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "n" * 129},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "x", "members": "bob"},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "x", "members": ["bob", "bob"]},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "x", "members": ["alice"]},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "x", "members": [f"u{i}" for i in range(256)]},
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/groups",
                "alice",
                {"group_id": "#ok", "name": "x", "members": ["nobody"]},
                404,
                "unknown_user",
            ),
            ("POST", "/groups", "alice", {"group_id": TEAM, "name": "again"}, 409, "group_exists"),
            ("POST", "/groups", None, {"group_id": "#ok", "name": "x"}, 401, "unauthorized"),
            ("POST", "/groups", "alice", b"[1]", 400, "invalid_request"),
            ("GET", "/groups/team", "alice", None, 400, "invalid_request"),
            ("GET", "/groups/%23" + "a" * 65, "alice", None, 400, "invalid_request"),
            ("GET", "/groups/%23a%0Ab", "alice", None, 400, "invalid_request"),
            ("GET", "/groups/%23%FF", "alice", None, 400, "invalid_request"),
            ("POST", TEAM_PATH + "/members", "alice", {"user_id": "bob"}, 409, "already_member"),
            ("POST", TEAM_PATH + "/members", "alice", {"user_id": "nobody"}, 404, "unknown_user"),
            (
                "POST",
                TEAM_PATH + "/members",
                "alice",
                {"user_id": "bad id"},
                400,
                "invalid_request",
            ),
            ("POST", TEAM_PATH + "/members", "alice", {}, 400, "invalid_request"),
            ("DELETE", TEAM_PATH + "/members/carol", "alice", None, 404, "not_a_member"),
            ("DELETE", TEAM_PATH + "/members/%0A", "alice", None, 400, "invalid_request"),
            ("DELETE", TEAM_PATH + "/members", "alice", None, 405, "method_not_allowed"),
            ("PUT", TEAM_PATH, "alice", None, 405, "method_not_allowed"),
        ]
        for method, path, who, body, status, code in cases:
            got, answer = yield self.call(method, path, who, body)
            self.assertEqual((got, answer["error"]["code"]), (status, code), (method, path, body))
        code, body = yield self.call("GET", TEAM_PATH, "alice")
        self.assertEqual((body["owner"], body["members"]), ("alice", ["alice", "bob"]))
        code, body = yield self.call("GET", "/groups", "alice")
        self.assertEqual([g["group_id"] for g in body["groups"]], [TEAM])
