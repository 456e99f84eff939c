"""Section 13's parts together, end to end, through the real paths only
(HTTP endpoints and WebSocket frames, no rows written by the test): a group
made with ``POST /groups`` and its messages in ``GET /messages`` for each
member, windows of removed and later members (history, live, ``since``),
``GET /conversations`` across direct, group and broadcast entries, presence
under the default ``PRESENCE=contacts`` after a real direct message or
group, read receipts of real messages, and an account deletion seen from
the others' groups, conversations and history.  Runs in the four suite
modes (tests/support.py ``suite_mode``)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from nacl.signing import SigningKey
from twisted.internet import defer
from twisted.trial import unittest

from wsserver import keylog

from .support import b64, eventually, sign_message, within
from .test_presence import EPOCH, eventually_deferred, live_server

TEAM = "#team"
TEAM_PATH = "/groups/%23team"
LIMITS = {
    "MESSAGE_RATE_LIMIT": "1000",
    "MESSAGE_BURST_LIMIT": "1000",
    "AUTH_RATE_LIMIT": "1000",
    "AUTH_BURST_LIMIT": "1000",
}


def ids(page: dict) -> list[int]:
    return [m["id"] for m in page["messages"]]


class Base(unittest.TestCase):
    timeout = 180
    names = ("alice", "bob", "carol", "dave")

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield live_server(self, LIMITS)
        self.tokens: dict[str, str] = {}
        self.keys: dict[str, SigningKey] = {}
        for name in self.names:
            self.keys[name], self.tokens[name] = yield self.server.user(name)

    @defer.inlineCallbacks
    def call(self, method: str, path: str, name: str, body: Any = None) -> Any:
        """One request with ``name``'s token; fire with (status, parsed body)."""
        kwargs: dict[str, Any] = {"headers": {"Authorization": f"Bearer {self.tokens[name]}"}}
        if body is not None:
            kwargs["json"] = body
        resp = yield within(self.server.http().request(method, self.server.base + path, **kwargs))
        content = yield resp.content()
        return resp.code, json.loads(content) if content else None

    @defer.inlineCallbacks
    def connect(self, name: str, **kwargs: Any) -> Any:
        conn = yield self.server.connect(self.tokens[name], testcase=self, **kwargs)
        return conn

    @defer.inlineCallbacks
    def make_team(self, members: tuple = ("bob", "carol")) -> Any:
        code, body = yield self.call(
            "POST", "/groups", "alice", {"group_id": TEAM, "name": "Team", "members": list(members)}
        )
        self.assertEqual(code, 201, body)
        return body

    @defer.inlineCallbacks
    def send(self, client: Any, sender: str, to: str, content: str, signed: bool = False) -> Any:
        """Send a message (signed by ``sender``'s key if asked); fire with its ack."""
        frame: dict[str, Any] = {"to": to, "content": content}
        if signed:
            nonce = "n-" + "".join(c for c in content if c.isalnum())
            frame["nonce"] = nonce
            frame["signature"] = sign_message(self.keys[sender], sender, to, content, nonce)
        client.send_json(frame)
        ack = yield client.next_of("ack")
        return ack

    @defer.inlineCallbacks
    def page(self, name: str, peer: str, query: str = "") -> Any:
        """GET /messages?with=peer as ``name`` (200 asserted); fire with the body."""
        code, body = yield self.call("GET", f"/messages?with={quote(peer, safe='')}{query}", name)
        self.assertEqual(code, 200, body)
        return body

    @defer.inlineCallbacks
    def all_ids(self, name: str, peer: str, limit: int = 2) -> Any:
        """Every message id of ``name``'s conversation with ``peer``, read page
        by page (``limit`` each) with before/more; newest first."""
        seen: list[int] = []
        query = f"&limit={limit}"
        while True:
            body = yield self.page(name, peer, query)
            self.assertLessEqual(len(body["messages"]), limit)
            seen += ids(body)
            if not body["more"]:
                return seen
            self.assertEqual(len(body["messages"]), limit)
            query = f"&limit={limit}&before={seen[-1]}"

    @defer.inlineCallbacks
    def conversations(self, name: str) -> Any:
        code, body = yield self.call("GET", "/conversations", name)
        self.assertEqual(code, 200, body)
        return [(c["with"], c["last_id"]) for c in body["conversations"]]

    @defer.inlineCallbacks
    def marker(self, client: Any, name: str, text: str) -> Any:
        """A note to self from ``client``, fired once it came back: every
        message handed to this connection before it has arrived; fail on a
        group message before it (replayed notes to self are let by)."""
        client.send_json({"to": name, "content": text})
        while True:
            frame = yield client.next_of("message")
            if frame["to"] == name and frame["content"] == text:
                return frame
            if frame["to"].startswith("#") and frame["from"] != name:
                self.fail(f"{name} got {frame!r} before its marker")

    @defer.inlineCallbacks
    def delete_account(self, name: str) -> Any:
        """DELETE /auth/users/{name} signed by their registration key."""
        key = self.keys[name]
        body = {
            "key_id": keylog.key_id(bytes(key.verify_key)),
            "signature": b64(key.sign(keylog.delete_string(name, 1).encode()).signature),
        }
        resp = yield within(
            self.server.http(fresh=True).request(
                "DELETE", f"{self.server.base}/auth/users/{name}", json=body
            )
        )
        content = yield resp.content()
        self.assertEqual((resp.code, json.loads(content)), (200, {"deleted": True}))

    @defer.inlineCallbacks
    def group_event(self, client: Any, event: str, user_id: str) -> Any:
        """The next ``group`` frame about ``event`` of ``user_id``."""
        while True:
            frame = yield client.next_of("group")
            if (frame["event"], frame["user_id"]) == (event, user_id):
                return frame


class GroupHistoryTests(Base):
    @defer.inlineCallbacks
    def test_members_page_the_groups_history_and_a_stranger_gets_404(self):
        """A group made with POST /groups; alice sends it signed and unsigned
        messages, bob one: alice, bob and carol each page the same ids newest
        first (limit 2, before/more), the frames as received live (signature,
        key_id, verification); dave, no member, gets 404 unknown_group."""
        yield self.make_team()
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        sent = []
        for i in range(4):
            ack = yield self.send(alice, "alice", TEAM, f"a{i}", signed=i % 2 == 0)
            sent.append(ack["id"])
        ack = yield self.send(bob, "bob", TEAM, "b0", signed=True)
        sent.append(ack["id"])
        yield self.marker(bob, "bob", "bob's marker")
        live = {f["id"]: f for f in bob.received if f["type"] == "message" and f["to"] == TEAM}
        self.assertEqual(sorted(live), sent[:4])
        for name in ("alice", "bob", "carol"):
            got = yield self.all_ids(name, TEAM)
            self.assertEqual(got, sorted(sent, reverse=True), name)
        newest = yield self.page("carol", TEAM, "&limit=5")
        by_id = {m["id"]: m for m in newest["messages"]}
        for msg_id, frame in live.items():
            for field in ("from", "to", "content", "signature", "key_id", "verification"):
                self.assertEqual(by_id[msg_id][field], frame[field], (msg_id, field))
        self.assertEqual(by_id[sent[0]]["verification"], "verified")
        self.assertEqual(
            by_id[sent[0]]["key_id"], keylog.key_id(bytes(self.keys["alice"].verify_key))
        )
        self.assertIsNone(by_id[sent[1]]["signature"])
        self.assertEqual(by_id[sent[4]]["from"], "bob")
        code, body = yield self.call("GET", "/messages?with=%23team", "dave")
        self.assertEqual((code, body["error"]["code"]), (404, "unknown_group"))
        code, body = yield self.call("GET", "/messages?with=%23nosuch", "alice")
        self.assertEqual((code, body["error"]["code"]), (404, "unknown_group"))

    @defer.inlineCallbacks
    def test_a_removed_member_gets_nothing_more_and_a_later_one_only_what_followed(self):
        """carol is removed after two messages: her history stops at the
        removal, she gets none of the later ones live (a marker on her open
        connection), nor without or with since on a new connection; dave,
        added later, sees only what came after his joining in history and in
        since replay; bob sees all."""
        yield self.make_team()
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        before = []
        for text in ("one", "two"):
            ack = yield self.send(alice, "alice", TEAM, text)
            before.append(ack["id"])
            got = yield carol.next_of("message")
            self.assertEqual(got["id"], ack["id"])
        code, body = yield self.call("DELETE", f"{TEAM_PATH}/members/carol", "alice")
        self.assertEqual(
            (code, body), (200, {"group_id": TEAM, "user_id": "carol", "removed": True})
        )
        yield self.group_event(carol, "removed", "carol")
        middle = yield self.send(alice, "alice", TEAM, "three")
        code, body = yield self.call("POST", f"{TEAM_PATH}/members", "alice", {"user_id": "dave"})
        self.assertEqual(code, 200, body)
        after = yield self.send(alice, "alice", TEAM, "four", signed=True)
        yield self.marker(carol, "carol", "carol's marker")
        # History: carol's window ends at the removal, dave's starts at his joining.
        got = yield self.all_ids("carol", TEAM)
        self.assertEqual(got, sorted(before, reverse=True))
        got = yield self.all_ids("dave", TEAM)
        self.assertEqual(got, [after["id"]])
        got = yield self.all_ids("bob", TEAM)
        self.assertEqual(got, [after["id"], middle["id"], *sorted(before, reverse=True)])
        # Nothing more on a new connection, with or without since.
        yield carol.close_and_wait()
        for since in (None, before[-1], 0):
            again = yield self.connect("carol", since=since)
            yield self.marker(again, "carol", f"marker since {since}")
            for frame in again.received:
                self.assertNotEqual(frame.get("to"), TEAM, (since, frame))
            yield again.close_and_wait()
        # dave: since=0 replays only the message of his window.
        dave = yield self.connect("dave", since=0)
        got = yield dave.next_of("message")
        self.assertEqual((got["id"], got["content"]), (after["id"], "four"))
        yield self.marker(dave, "dave", "dave's marker")
        # carol keeps the group in her conversations, at the last message of her window.
        listed = yield self.conversations("carol")
        self.assertIn((TEAM, before[-1]), listed)
        listed = yield self.conversations("dave")
        self.assertIn((TEAM, after["id"]), listed)


class ConversationListTests(Base):
    @defer.inlineCallbacks
    def test_direct_group_and_broadcast_entries_ordered_by_latest_message(self):
        """alice writes bob directly, the group (alice, bob, carol), a
        broadcast, then carol writes alice: each user's /conversations lists
        exactly their entries, newest message first, with last_id and a
        last_timestamp; dave sees only the broadcast."""
        yield self.make_team()
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        direct = yield self.send(alice, "alice", "bob", "hi bob", signed=True)
        group = yield self.send(alice, "alice", TEAM, "hi team")
        broadcast = yield self.send(alice, "alice", "broadcast", "hi all")
        back = yield self.send(carol, "carol", "alice", "hi alice")
        expected = {
            "alice": [
                ("carol", back["id"]),
                ("broadcast", broadcast["id"]),
                (TEAM, group["id"]),
                ("bob", direct["id"]),
            ],
            "bob": [("broadcast", broadcast["id"]), (TEAM, group["id"]), ("alice", direct["id"])],
            "carol": [("alice", back["id"]), ("broadcast", broadcast["id"]), (TEAM, group["id"])],
            "dave": [("broadcast", broadcast["id"])],
        }
        for name, want in expected.items():
            got = yield self.conversations(name)
            self.assertEqual(got, want, name)
        code, body = yield self.call("GET", "/conversations?limit=2", "alice")
        self.assertEqual(code, 200, body)
        self.assertEqual([c["with"] for c in body["conversations"]], ["carol", "broadcast"])
        self.assertTrue(body["conversations"][0]["last_timestamp"].endswith("Z"))
        # A later group message moves the group to the top for its members.
        later = yield self.send(carol, "carol", TEAM, "again")
        got = yield self.conversations("bob")
        self.assertEqual(got[0], (TEAM, later["id"]))
        got = yield self.conversations("alice")
        self.assertEqual(got[0], (TEAM, later["id"]))


class PresenceTests(Base):
    @defer.inlineCallbacks
    def watch(self, client: Any, users: list[str]) -> Any:
        """Send a watch; fire with {user: (online, since is the epoch)}."""
        client.send_json({"type": "watch", "users": users})
        frames = yield client.take(len(users), "presence")
        return {f["user"]: (f["online"], f["since"] == EPOCH) for f in frames}

    @defer.inlineCallbacks
    def until_online(self, client: Any, user: str) -> Any:
        """Watch ``user`` again until they are shown online (another node's
        connection may take a moment to count in a cluster)."""
        seen: dict = {}

        @defer.inlineCallbacks
        def check() -> Any:
            seen.update((yield self.watch(client, [user])))
            return seen[user][0]

        yield eventually_deferred(check, f"{user} shown online")

    @defer.inlineCallbacks
    def test_a_stranger_is_offline_until_a_real_direct_message(self):
        """PRESENCE=contacts (the default): carol, online, is shown to alice
        offline since the epoch while they share nothing; after carol writes
        alice a direct message, alice's next watch shows carol online; when
        carol's last connection closes alice gets offline."""
        carol = yield self.connect("carol")
        carol2 = yield self.connect("carol")
        alice = yield self.connect("alice")
        states = yield self.watch(alice, ["carol"])
        self.assertEqual(states, {"carol": (False, True)})
        yield self.send(carol, "carol", "alice", "hello")
        yield self.until_online(alice, "carol")
        yield carol.close_and_wait()
        yield carol2.close_and_wait()
        while True:
            frame = yield alice.next_of("presence")
            if frame["user"] == "carol" and not frame["online"]:
                break
        self.assertNotEqual(frame["since"], EPOCH)

    @defer.inlineCallbacks
    def test_a_real_group_makes_members_contacts_and_removal_undoes_it(self):
        """dave, online, is offline to alice; once alice makes a group with
        him (POST /groups) her next watch shows him online (and he sees her);
        after he leaves the group (DELETE of himself) each is offline to the
        other again."""
        dave = yield self.connect("dave")
        alice = yield self.connect("alice")
        self.assertEqual((yield self.watch(alice, ["dave"])), {"dave": (False, True)})
        yield self.make_team(("dave",))
        yield self.until_online(alice, "dave")
        yield self.until_online(dave, "alice")
        code, body = yield self.call("DELETE", f"{TEAM_PATH}/members/dave", "dave")
        self.assertEqual(code, 200, body)
        self.assertEqual((yield self.watch(alice, ["dave"])), {"dave": (False, True)})
        self.assertEqual((yield self.watch(dave, ["alice"])), {"alice": (False, True)})


class ReceiptTests(Base):
    def reads(self, client: Any, msg_id: int) -> list[str]:
        return [
            f["by"]
            for f in client.received
            if f["type"] == "status" and f.get("status") == "read" and f["id"] == msg_id
        ]

    @defer.inlineCallbacks
    def test_reads_of_a_real_group_message_and_a_real_direct_one(self):
        """alice (two connections) sends the group (alice, bob, carol) and bob
        directly: bob and carol each read the group message twice, bob the
        direct one twice; each of alice's connections gets read by bob and by
        carol once for the group message and by bob once for the direct one;
        dave (no member) and alice herself are refused invalid_message."""
        yield self.make_team()
        alice = yield self.connect("alice")
        alice2 = yield self.connect("alice")
        bob = yield self.connect("bob")
        carol = yield self.connect("carol")
        dave = yield self.connect("dave")
        group = yield self.send(alice, "alice", TEAM, "read me", signed=True)
        direct = yield self.send(alice, "alice", "bob", "and me")
        for reader in (bob, carol):
            got = yield reader.next_of("message")
            self.assertEqual(got["id"], group["id"])
        got = yield bob.next_of("message")
        self.assertEqual(got["id"], direct["id"])
        for reader, msg_ids in ((bob, (group["id"], direct["id"])), (carol, (group["id"],))):
            for msg_id in msg_ids:
                reader.send_json({"type": "read", "id": msg_id})
                reader.send_json({"type": "read", "id": msg_id})
        for intruder in (dave, alice):
            intruder.send_json({"type": "read", "id": group["id"]})
            refusal = yield intruder.next_of("system")
            self.assertEqual(refusal["code"], "invalid_message")
        dave.send_json({"type": "read", "id": direct["id"]})
        self.assertEqual((yield dave.next_of("system"))["code"], "invalid_message")
        for conn in (alice, alice2):
            yield eventually(
                lambda c=conn: len(self.reads(c, group["id"])) == 2 and self.reads(c, direct["id"]),
                "the reads",
            )
        # A marker after the reads: nothing more came (each read once).
        yield bob.close_and_wait()
        yield self.marker(alice2, "alice", "after the reads")
        for conn in (alice, alice2):
            self.assertEqual(sorted(self.reads(conn, group["id"])), ["bob", "carol"])
            self.assertEqual(self.reads(conn, direct["id"]), ["bob"])
        self.assertEqual(self.reads(bob, group["id"]) + self.reads(carol, group["id"]), [])


class DeletionTests(Base):
    @defer.inlineCallbacks
    def test_a_deleted_account_vanishes_from_groups_conversations_and_history(self):
        """bob, a member of alice's group and her direct peer, deletes his
        account: the members get removed for him, the group lists alice and
        carol, alice's and carol's /conversations lose bob, /messages?with=bob
        is 404 unknown_user, and his group message leaves the group's
        history while alice's stays; alice's reads of his messages are
        refused invalid_message and a watch shows him offline since the
        epoch (carol, a fellow member, online)."""
        yield self.make_team()
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        bob = yield self.connect("bob")
        mine = yield self.send(alice, "alice", TEAM, "from alice")
        his = yield self.send(bob, "bob", TEAM, "from bob")
        direct = yield self.send(bob, "bob", "alice", "to alice")
        yield self.send(carol, "carol", "bob", "to bob")
        listed = yield self.conversations("alice")
        self.assertEqual(listed, [("bob", direct["id"]), (TEAM, his["id"])])
        yield self.delete_account("bob")
        self.assertEqual((yield bob.wait_closed()), 4003)
        for conn in (alice, carol):
            yield self.group_event(conn, "removed", "bob")
        code, body = yield self.call("GET", TEAM_PATH, "alice")
        self.assertEqual((code, body["members"]), (200, ["alice", "carol"]))
        for name in ("alice", "carol"):
            code, body = yield self.call("GET", "/messages?with=bob", name)
            self.assertEqual((code, body["error"]["code"]), (404, "unknown_user"), name)

        state: dict = {}

        @defer.inlineCallbacks
        def gone() -> Any:
            state["alice"] = yield self.conversations("alice")
            state["carol"] = yield self.conversations("carol")
            state["team"] = yield self.all_ids("carol", TEAM)
            return state["team"] == [mine["id"]]

        yield eventually_deferred(gone, "bob's group message gone from the history")
        self.assertEqual(state["alice"], [(TEAM, mine["id"])])
        self.assertEqual(state["carol"], [(TEAM, mine["id"])])
        # His messages can no longer be marked read, and he is hidden from
        # watches like an unknown id.
        for msg_id in (his["id"], direct["id"]):
            alice.send_json({"type": "read", "id": msg_id})
            self.assertEqual((yield alice.next_of("system"))["code"], "invalid_message")
        alice.send_json({"type": "watch", "users": ["bob", "carol"]})
        frames = yield alice.take(2, "presence")
        self.assertEqual(
            [(f["user"], f["online"], f["since"]) for f in frames],
            [("bob", False, EPOCH), ("carol", True, frames[1]["since"])],
        )


class WindowTests(Base):
    @defer.inlineCallbacks
    def test_a_readded_member_has_only_the_new_window_and_reads_follow_windows(self):
        """carol reads a message of her first window while in the group and
        after her removal (accepted: alice hears of it once); a message sent
        while she was out is refused invalid_message; re-added, her history
        holds only the new window (section 15, Groups: re-adding starts a new
        window), and a message of it is readable."""
        yield self.make_team()
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        first = yield self.send(alice, "alice", TEAM, "first")
        yield carol.next_of("message")
        code, _ = yield self.call("DELETE", f"{TEAM_PATH}/members/carol", "carol")
        self.assertEqual(code, 200)
        away = yield self.send(alice, "alice", TEAM, "away")
        carol.send_json({"type": "read", "id": away["id"]})
        self.assertEqual((yield carol.next_of("system"))["code"], "invalid_message")
        carol.send_json({"type": "read", "id": first["id"]})
        frame = yield alice.next_of("status")
        while frame.get("status") != "read":
            frame = yield alice.next_of("status")
        self.assertEqual((frame["id"], frame["by"]), (first["id"], "carol"))
        code, body = yield self.call("POST", f"{TEAM_PATH}/members", "alice", {"user_id": "carol"})
        self.assertEqual(code, 200, body)
        back = yield self.send(alice, "alice", TEAM, "back")
        got = yield carol.next_of("message")
        self.assertEqual(got["id"], back["id"])
        self.assertEqual((yield self.all_ids("carol", TEAM)), [back["id"]])
        listed = yield self.conversations("carol")
        self.assertIn((TEAM, back["id"]), listed)

    @defer.inlineCallbacks
    def test_removing_the_last_waiting_member_makes_a_message_delivered(self):
        """bob offline, carol online: alice's group message is pending with
        recipients 1 of 2; removing bob leaves nobody waiting, so the stored
        message is delivered (section 15, Groups: a member removed before
        receiving it no longer counts as waiting) and bob, reconnecting, does
        not get it."""
        yield self.make_team()
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        ack = yield self.send(alice, "alice", TEAM, "only carol")
        yield carol.next_of("message")
        code, _ = yield self.call("DELETE", f"{TEAM_PATH}/members/bob", "alice")
        self.assertEqual(code, 200)
        stored = yield self.server.settled(ack["id"], lambda m: m.status == "delivered")
        self.assertEqual(stored.status, "delivered")
        page = yield self.page("alice", TEAM)
        self.assertEqual(page["messages"][0]["status"], "delivered")
        bob = yield self.connect("bob", since=0)
        yield self.marker(bob, "bob", "bob's marker")

    @defer.inlineCallbacks
    def test_a_deletion_settles_what_only_the_deleted_member_waited_for(self):
        """bob offline, carol online: alice's group message waits for bob; bob
        deletes his account (he leaves every group): the stored message is
        delivered and carol's history shows it so."""
        yield self.make_team()
        alice = yield self.connect("alice")
        carol = yield self.connect("carol")
        ack = yield self.send(alice, "alice", TEAM, "bob never reads this")
        yield carol.next_of("message")
        yield self.delete_account("bob")
        stored = yield self.server.settled(ack["id"], lambda m: m.status == "delivered")
        self.assertEqual(stored.status, "delivered")
        page = yield self.page("carol", TEAM)
        self.assertEqual(
            [(m["id"], m["status"]) for m in page["messages"]], [(ack["id"], "delivered")]
        )


class DeletedPresenceTests(Base):
    """With ``PRESENCE=everyone`` (no contact check to hide a deleted user), a
    deletion takes the user's last-seen time with it (section 12)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield live_server(self, {**LIMITS, "PRESENCE": "everyone"})
        self.tokens = {}
        self.keys = {}
        for name in self.names:
            self.keys[name], self.tokens[name] = yield self.server.user(name)

    @defer.inlineCallbacks
    def test_a_deleted_user_goes_offline_for_watchers_and_is_never_seen_after(self):
        """carol watches bob while he is online; bob deletes his account (his
        connection closes 4003): carol is told at once that bob is offline
        since the epoch (no new watch needed); a first watch of dave's and
        carol's next one report bob the same, as a user never seen (before:
        carol heard nothing and later watches got the time his connection
        closed)."""
        bob = yield self.connect("bob")
        carol = yield self.connect("carol")
        carol.send_json({"type": "watch", "users": ["bob"]})
        frame = yield carol.next_of("presence")
        self.assertEqual((frame["user"], frame["online"]), ("bob", True))
        yield self.delete_account("bob")
        self.assertEqual((yield bob.wait_closed()), 4003)
        frame = yield carol.next_of("presence")
        self.assertEqual((frame["user"], frame["online"], frame["since"]), ("bob", False, EPOCH))
        dave = yield self.connect("dave")
        for watcher in (dave, carol):
            state: dict = {}

            @defer.inlineCallbacks
            def never_seen(watcher: Any = watcher, state: dict = state) -> Any:
                # on another node the deletion may not have been applied yet
                watcher.send_json({"type": "watch", "users": ["bob"]})
                state["frame"] = yield watcher.next_of("presence")
                return state["frame"]["since"] == EPOCH

            yield eventually_deferred(never_seen, "bob reported as never seen")
            self.assertEqual((state["frame"]["user"], state["frame"]["online"]), ("bob", False))
