"""Presence (protocol section 13, decisions in docs/protocol.md section 15):
the ``watch`` frame, ``presence`` frames at once and on every change, the
three ``PRESENCE`` policies, refusals of bad ``watch`` frames, the
rate-limit token a ``watch`` costs, and coalescing (unit tests of
``PresenceHub`` on a ``task.Clock``).  The end-to-end tests run in the four
suite modes; in a cluster the watcher and the watched are on different
nodes where the mode allows it."""

from __future__ import annotations

import calendar
import itertools
import json
import sqlite3
import time
from typing import Any

import psycopg
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from wsserver import keylog
from wsserver.broker import LocalBroker
from wsserver.broker.seen import LastSeen
from wsserver.messages import MAX_WATCH, WatchFrame, parse_control_frame
from wsserver.presence import (
    CONTACTS,
    CONTACTS_PER_RECHECK,
    EVERYONE,
    GRACE,
    OFF,
    RECHECK,
    PresenceHub,
)
from wsserver.store import is_postgres

from .support import LiveServer, b64, eventually, within

EPOCH = "1970-01-01T00:00:00.000Z"  # the since of a user never seen
FAST = {"MESSAGE_RATE_LIMIT": "1000", "MESSAGE_BURST_LIMIT": "1000"}


def execute_sql(server: LiveServer, sql: str, args: tuple = ()) -> None:
    """Run one statement (``?`` placeholders) on the server's database, on a
    connection of the test's own."""
    if is_postgres(server.db):
        with psycopg.connect(server.db, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), args)
    else:
        conn = sqlite3.connect(server.db, timeout=30)
        with conn:
            conn.execute(sql, args)
        conn.close()


@defer.inlineCallbacks
def live_server(testcase: Any, env: dict[str, str]) -> Any:
    """A ``LiveServer`` whose nodes all listen to the cluster's channel: the
    ``p`` and ``r`` events published before a node subscribed are not read
    back (unlike messages), so a test waits for every node's /ready."""
    server = LiveServer(testcase, env)
    if server.mode == "cluster":
        nodes = [server.service, *server.others]
        yield eventually(lambda: all(n.broker.ready[0] for n in nodes), "every node subscribed")
    elif server.mode == "workers":
        seen: set[str] = set()

        @defer.inlineCallbacks
        def both() -> Any:
            code, body = yield server.get("/ready", client=server.http(fresh=True))
            if code == 200:
                seen.add(body["node"])
            return len(seen) >= 2

        yield eventually_deferred(both, "both workers ready")
    return server


def share_conversation(server: LiveServer, a: str, b: str) -> None:
    """Rows of ``conversations`` both ways, as the store writes them once
    ``a`` and ``b`` each sent the other a direct message."""
    for user, peer in ((a, b), (b, a)):
        execute_sql(
            server,
            "INSERT INTO conversations (user_id, peer, wrote) VALUES (?, ?, ?)",
            (user, peer, True),
        )


@defer.inlineCallbacks
def api(server: LiveServer, method: str, path: str, token: str, body: Any = None) -> Any:
    """One HTTP request with a Bearer token; fire with (status, parsed body)."""
    kwargs: dict[str, Any] = {"headers": {"Authorization": f"Bearer {token}"}}
    if body is not None:
        kwargs["json"] = body
    resp = yield within(server.http().request(method, server.base + path, **kwargs))
    content = yield resp.content()
    return resp.code, json.loads(content) if content else None


def seconds_of(stamp: str) -> float:
    """An RFC 3339 UTC stamp with milliseconds as Unix seconds."""
    whole, millis = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


def presence_of(client: Any, user: str) -> list[dict]:
    """The presence frames ``client`` received about ``user``, in order."""
    return [f for f in client.received if f["type"] == "presence" and f["user"] == user]


def first_frames(client: Any, count: int) -> Any:
    """The next ``count`` presence frames."""
    return client.take(count, "presence")


class WatchEndToEndTests(unittest.TestCase):
    """``watch`` on a live server, in every suite mode."""

    timeout = 120

    @defer.inlineCallbacks
    def test_watched_users_are_reported_at_once_and_on_every_change(self):
        """alice watches bob, carol and an unknown id (PRESENCE=everyone): three
        frames at once, all offline, bob and the unknown id since the epoch
        (never seen); bob connects (on the other node in a cluster): online,
        since about now; bob's last connection closes: offline, since later."""
        server = yield live_server(self, {**FAST, "PRESENCE": "everyone"})
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        yield server.user("carol")
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        alice.send_json({"type": "watch", "users": ["bob", "carol", "nobody", "bob"]})
        frames = yield first_frames(alice, 3)  # one per user, in the order listed
        self.assertEqual(
            [(f["user"], f["online"], f["since"]) for f in frames],
            [
                ("bob", False, EPOCH),
                ("carol", False, EPOCH),
                ("nobody", False, EPOCH),
            ],
        )
        before = time.time()
        bob = yield server.connect(bob_token, testcase=self)
        online = yield alice.next_of("presence")
        self.assertEqual((online["user"], online["online"]), ("bob", True))
        self.assertLess(abs(seconds_of(online["since"]) - before), 30)
        yield bob.close_and_wait()
        offline = yield alice.next_of("presence")
        self.assertEqual((offline["user"], offline["online"]), ("bob", False))
        self.assertGreaterEqual(seconds_of(offline["since"]), seconds_of(online["since"]))

    @defer.inlineCallbacks
    def test_a_second_watch_replaces_the_list(self):
        """After watching [bob] then [carol], bob's coming online sends alice
        nothing, carol's does (and a later frame about carol is the marker
        that bob's would have come by now)."""
        server = yield live_server(self, {**FAST, "PRESENCE": "everyone"})
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        _, carol_token = yield server.user("carol")
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        alice.send_json({"type": "watch", "users": ["bob"]})
        yield first_frames(alice, 1)
        alice.send_json({"type": "watch", "users": ["carol"]})
        (frame,) = yield first_frames(alice, 1)
        self.assertEqual(frame["user"], "carol")
        # bob, then carol, on one node (the other one in a test cluster), so
        # carol's change is published after bob's would have been.
        node = 1 if server.mode == "cluster" else None
        bob = yield server.connect(bob_token, node=node, testcase=self)
        self.addCleanup(bob.close_and_wait)
        carol = yield server.connect(carol_token, node=node, testcase=self)
        self.addCleanup(carol.close_and_wait)
        frame = yield alice.next_of("presence")
        self.assertEqual((frame["user"], frame["online"]), ("carol", True))
        self.assertEqual(len(presence_of(alice, "bob")), 1)

    @defer.inlineCallbacks
    def test_contacts_see_each_other_and_others_appear_offline(self):
        """PRESENCE=contacts (the default): alice shares a direct conversation
        with bob, and a group with dave, not with carol.  With all three
        online, alice sees bob and dave online and carol offline since the
        epoch, exactly as an unknown user; no error.  Removed from the group,
        dave appears offline on the next watch."""
        server = yield live_server(self, FAST)
        tokens = {}
        for name in ("alice", "bob", "carol", "dave"):
            _, tokens[name] = yield server.user(name)
        share_conversation(server, "alice", "bob")
        for user in ("alice", "dave"):
            execute_sql(
                server,
                "INSERT INTO group_members (group_id, user_id, joined_id, removed_id,"
                " delivered_id, added_ms) VALUES ('#team', ?, 0, NULL, 0, 0)",
                (user,),
            )
        others = []
        for name in ("bob", "carol", "dave"):
            conn = yield server.connect(tokens[name], testcase=self)
            self.addCleanup(conn.close_and_wait)
            others.append(conn)
        alice = yield server.connect(tokens["alice"], testcase=self)
        self.addCleanup(alice.close_and_wait)
        want = ["bob", "carol", "dave", "nobody", "alice"]

        @defer.inlineCallbacks
        def states() -> Any:
            alice.send_json({"type": "watch", "users": want})
            frames = yield first_frames(alice, len(want))
            return {f["user"]: (f["online"], f["since"] == EPOCH) for f in frames}

        # In a cluster the other nodes' connections may take a moment to count.
        seen = {}

        @defer.inlineCallbacks
        def settled() -> Any:
            seen.update((yield states()))
            return seen["bob"][0] and seen["dave"][0]

        yield eventually_deferred(settled, "bob and dave online for alice")
        self.assertEqual(
            seen,
            {
                "bob": (True, False),
                "carol": (False, True),
                "dave": (True, False),
                "nobody": (False, True),
                "alice": (True, False),
            },
        )
        execute_sql(server, "UPDATE group_members SET removed_id = 1 WHERE user_id = 'dave'")
        self.assertEqual((yield states())["dave"], (False, True))
        self.assertEqual([f for f in alice.received if f["type"] == "system"], [])

    @defer.inlineCallbacks
    def test_one_message_from_a_stranger_does_not_make_a_contact(self):
        """PRESENCE=contacts: dave sends alice one direct message; with both
        online, dave still sees alice offline since the epoch (she never
        wrote to him) while alice sees dave; once alice replies, dave sees
        her online."""
        server = yield live_server(self, FAST)
        tokens = {}
        for name in ("alice", "dave"):
            _, tokens[name] = yield server.user(name)
        alice = yield server.connect(tokens["alice"], testcase=self)
        self.addCleanup(alice.close_and_wait)
        dave = yield server.connect(tokens["dave"], testcase=self)
        self.addCleanup(dave.close_and_wait)
        dave.send_json({"to": "alice", "content": "hello, stranger"})
        yield dave.next_of("ack")

        @defer.inlineCallbacks
        def sees(watcher: Any, user: str) -> Any:
            watcher.send_json({"type": "watch", "users": [user]})
            frame = yield watcher.next_of("presence")
            return frame["online"], frame["since"] == EPOCH

        yield eventually_deferred(
            lambda: sees(alice, "dave").addCallback(lambda s: s == (True, False)),
            "alice sees dave online",
        )
        self.assertEqual((yield sees(dave, "alice")), (False, True))
        alice.send_json({"to": "dave", "content": "who are you?"})
        yield alice.next_of("ack")
        self.assertEqual((yield sees(dave, "alice")), (True, False))

    @defer.inlineCallbacks
    def test_a_member_removed_from_the_shared_group_is_withdrawn(self):
        """alice and dave share only #club; each watches the other (alice
        also bob, a direct contact).  alice removes dave from #club: without
        a new watch, each is told the other is offline since the epoch, and
        alice hears nothing more of dave (his going offline is not sent;
        bob's, after it, is)."""
        server = yield live_server(self, FAST)
        tokens = {}
        for name in ("alice", "bob", "dave"):
            _, tokens[name] = yield server.user(name)
        share_conversation(server, "alice", "bob")
        code, body = yield api(
            server, "POST", "/groups", tokens["alice"],
            {"group_id": "#club", "name": "Club", "members": ["dave"]},
        )  # fmt: skip
        self.assertEqual(code, 201, body)
        alice = yield server.connect(tokens["alice"], testcase=self)
        self.addCleanup(alice.close_and_wait)
        dave = yield server.connect(tokens["dave"], testcase=self)
        self.addCleanup(dave.close_and_wait)
        bob = yield server.connect(tokens["bob"], testcase=self)
        self.addCleanup(bob.close_and_wait)
        for watcher, users in ((alice, ["dave", "bob"]), (dave, ["alice"])):

            @defer.inlineCallbacks
            def all_online(watcher: Any = watcher, users: list[str] = users) -> Any:
                watcher.send_json({"type": "watch", "users": users})
                frames = yield first_frames(watcher, len(users))
                return all(f["online"] for f in frames)

            yield eventually_deferred(all_online, "the watched online")
        alice.received.clear()
        dave.received.clear()
        code, body = yield api(server, "DELETE", "/groups/%23club/members/dave", tokens["alice"])
        self.assertEqual(code, 200, body)
        # The group event withdraws at once (the recheck would, within RECHECK).
        gone = yield alice.next_of("presence", seconds=RECHECK / 2)
        self.assertEqual((gone["user"], gone["online"], gone["since"]), ("dave", False, EPOCH))
        gone = yield dave.next_of("presence", seconds=RECHECK / 2)
        self.assertEqual((gone["user"], gone["online"], gone["since"]), ("alice", False, EPOCH))
        yield dave.close_and_wait()
        yield bob.close_and_wait()
        yield eventually(
            lambda: any(not f["online"] for f in presence_of(alice, "bob")), "bob offline"
        )
        self.assertEqual(len(presence_of(alice, "dave")), 1)

    @defer.inlineCallbacks
    def test_a_deleted_user_is_withdrawn_from_their_watchers(self):
        """alice watches bob, a contact, online; bob deletes his account: his
        connection closes and alice is soon told he is offline since the
        epoch (the deletion event withdraws him; the recheck would, within
        RECHECK), as any user she may not see."""
        server = yield live_server(self, FAST)
        _, alice_token = yield server.user("alice")
        bob_key, bob_token = yield server.user("bob")
        share_conversation(server, "alice", "bob")
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        bob = yield server.connect(bob_token, testcase=self)
        self.addCleanup(bob.close_and_wait)

        @defer.inlineCallbacks
        def bob_online() -> Any:
            alice.send_json({"type": "watch", "users": ["bob"]})
            return (yield alice.next_of("presence"))["online"]

        yield eventually_deferred(bob_online, "bob online for alice")
        seen = len(presence_of(alice, "bob"))
        body = {
            "key_id": keylog.key_id(bytes(bob_key.verify_key)),
            "signature": b64(bob_key.sign(keylog.delete_string("bob", 1).encode()).signature),
        }
        resp = yield within(
            server.http(fresh=True).request("DELETE", f"{server.base}/auth/users/bob", json=body)
        )
        self.assertEqual(resp.code, 200)
        yield eventually(
            lambda: any(f["since"] == EPOCH for f in presence_of(alice, "bob")[seen:]),
            "bob hidden from alice",
            seconds=RECHECK / 2,
        )

    @defer.inlineCallbacks
    def test_watchers_end_on_the_last_state_after_flapping(self):
        """bob opens and closes a connection five times in a row (on both
        nodes in turn in a cluster), then opens one and keeps it: alice's last
        frame about bob says online; once it closes, offline."""
        server = yield live_server(self, {**FAST, "PRESENCE": "everyone"})
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        alice.send_json({"type": "watch", "users": ["bob"]})
        yield first_frames(alice, 1)
        for _ in range(5):
            bob = yield server.connect(bob_token, testcase=self)
            yield bob.close_and_wait()
        bob = yield server.connect(bob_token, testcase=self)
        self.addCleanup(bob.close_and_wait)

        def last_is(online: bool) -> bool:
            frames = presence_of(alice, "bob")
            return len(frames) > 1 and frames[-1]["online"] is online

        yield eventually(lambda: last_is(True), "bob online for alice")
        yield bob.close_and_wait()
        yield eventually(lambda: last_is(False), "bob offline for alice")

    @defer.inlineCallbacks
    def test_off_reports_everyone_offline(self):
        """PRESENCE=off: every watched user, online or not, alice herself
        included, is offline since the epoch, and stays so."""
        server = yield live_server(self, {**FAST, "PRESENCE": "off"})
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        bob = yield server.connect(bob_token, testcase=self)
        self.addCleanup(bob.close_and_wait)
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        alice.send_json({"type": "watch", "users": ["bob", "alice"]})
        frames = yield first_frames(alice, 2)
        self.assertEqual(
            [(f["user"], f["online"], f["since"]) for f in frames],
            [("bob", False, EPOCH), ("alice", False, EPOCH)],
        )

    @defer.inlineCallbacks
    def test_bad_watch_frames_are_refused_and_change_nothing(self):
        """Each bad spelling gets one ``system`` invalid_message and leaves
        the connection open and its list as it was (a change of bob is still
        reported afterwards)."""
        server = yield live_server(self, {**FAST, "PRESENCE": "everyone"})
        _, alice_token = yield server.user("alice")
        _, bob_token = yield server.user("bob")
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        alice.send_json({"type": "watch", "users": ["bob"]})
        yield first_frames(alice, 1)
        bad = [
            {"type": "watch"},
            {"type": "watch", "users": "bob"},
            {"type": "watch", "users": {"bob": 1}},
            {"type": "watch", "users": ["bob", 7]},
            {"type": "watch", "users": ["bo b"]},
            {"type": "watch", "users": ["#team"]},
            {"type": "watch", "users": [""]},
            {"type": "watch", "users": ["x" * 65]},
            {"type": "watch", "users": ["bob\n"]},
            {"type": "watch", "users": ["b\u00f6b"]},
            {"type": "watch", "users": [f"u{i}" for i in range(MAX_WATCH + 1)]},
            {"type": "watch", "users": ["bob"], "extra": 1},
            {"type": "watch", "users": None},
        ]
        for frame in bad:
            alice.send_json(frame)
            refusal = yield alice.next_of("system")
            self.assertEqual(refusal["code"], "invalid_message", frame)
        alice.sendMessage(b'{"type": "watch", "users": ["\\ud800"]}')
        self.assertEqual((yield alice.next_of("system"))["code"], "invalid_message")
        bob = yield server.connect(bob_token, testcase=self)
        self.addCleanup(bob.close_and_wait)
        frame = yield alice.next_of("presence")
        self.assertEqual((frame["user"], frame["online"]), ("bob", True))

    @defer.inlineCallbacks
    def test_a_watch_costs_one_rate_limit_token(self):
        """With a burst of 2 and a slow refill: two watch frames pass, the
        third is refused rate_limited before it is looked at."""
        server = LiveServer(
            self, {"MESSAGE_RATE_LIMIT": "0.01", "MESSAGE_BURST_LIMIT": "2", "PRESENCE": "off"}
        )
        _, alice_token = yield server.user("alice")
        alice = yield server.connect(alice_token, testcase=self)
        self.addCleanup(alice.close_and_wait)
        for _ in range(2):
            alice.send_json({"type": "watch", "users": ["bob"]})
            self.assertEqual((yield alice.next_frame())["type"], "presence")
        alice.send_json({"type": "watch", "users": ["bob"]})
        refusal = yield alice.next_of("system")
        self.assertEqual(refusal["code"], "rate_limited")


@defer.inlineCallbacks
def eventually_deferred(check: Any, what: str, seconds: float = 30.0) -> Any:
    """Run ``check`` (a Deferred-returning function) until it fires true, as
    ``support.eventually`` polls a condition."""
    deadline = time.monotonic() + seconds
    while not (yield check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        yield task.deferLater(reactor, 0.05, lambda: None)


# -- PresenceHub on a task.Clock ------------------------------------------------------


class FakeConn:
    """A connection as the hub sees it: frames it was sent, decoded."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.live = True
        self.frames: list[tuple[str, bool, str]] = []

    def notify(self, payload: bytes) -> None:
        frame = json.loads(payload)
        self.frames.append((frame["user"], frame["online"], frame["since"]))


class HubTests(unittest.TestCase):
    """Coalescing and policies of ``PresenceHub`` (GRACE 1 s, INTERVAL 1 s)."""

    def setUp(self):
        self.clock = task.Clock()
        self.state: dict[str, tuple[bool, int]] = {}
        self.contacts: set[str] = set()

    def hub(self, policy: str = EVERYONE) -> PresenceHub:
        def source(users: list[str]) -> defer.Deferred:
            return defer.succeed({u: self.state.get(u, (False, 0)) for u in users})

        def contacts(user: str, candidates: list[str]) -> defer.Deferred:
            return defer.succeed({c for c in candidates if c in self.contacts})

        hub = PresenceHub(self.clock, policy, source, contacts, grace=1.0, interval=1.0)
        self.addCleanup(hub.stop)
        return hub

    def slow_hub(self) -> tuple[PresenceHub, list[tuple[defer.Deferred, set[str]]]]:
        """A hub under contacts whose store answers only when the test fires
        each question's Deferred (``pending``: (Deferred, candidates))."""
        pending: list[tuple[defer.Deferred, set[str]]] = []

        def slow_contacts(user: str, candidates: list[str]) -> defer.Deferred:
            d: defer.Deferred = defer.Deferred()
            pending.append((d, set(candidates)))
            return d

        hub = PresenceHub(
            self.clock, CONTACTS, lambda users: defer.succeed({}), slow_contacts, 1.0, 1.0
        )
        self.addCleanup(hub.stop)
        return hub, pending

    def change(self, hub: PresenceHub, user: str, online: bool) -> None:
        ms = int(self.clock.seconds() * 1000)
        self.state[user] = (online, ms)
        hub.changed(user, online, ms)

    def test_an_offline_is_held_for_the_grace_and_an_online_goes_at_once(self):
        """online at once; offline only once the grace has passed."""
        hub, conn = self.hub(), FakeConn("alice")
        hub.watch(conn, ["bob"])
        self.clock.advance(5)
        self.change(hub, "bob", True)
        self.assertEqual([f[1] for f in conn.frames], [False, True])
        self.clock.advance(5)
        self.change(hub, "bob", False)
        self.clock.advance(0.9)
        self.assertEqual(len(conn.frames), 2)
        self.clock.advance(0.2)
        self.assertEqual(conn.frames[-1], ("bob", False, "1970-01-01T00:00:10.000Z"))

    def test_a_quick_reconnect_sends_watchers_nothing(self):
        """bob online, then off and on again inside the grace: no frame."""
        hub, conn = self.hub(), FakeConn("alice")
        self.change(hub, "bob", True)
        hub.watch(conn, ["bob"])
        self.clock.advance(5)
        for _ in range(3):
            self.change(hub, "bob", False)
            self.clock.advance(0.3)
            self.change(hub, "bob", True)
            self.clock.advance(0.3)
        self.clock.advance(10)
        self.assertEqual(conn.frames, [("bob", True, "1970-01-01T00:00:00.000Z")])

    def test_flapping_sends_at_most_one_frame_per_interval_and_ends_right(self):
        """bob flaps every 0.1 s for 20 s (on 0.05 s, off 0.05 s): watchers get
        at most one frame per second (21 at most), and end on his last state."""
        hub, conn = self.hub(), FakeConn("alice")
        hub.watch(conn, ["bob"])
        for _ in range(200):
            self.change(hub, "bob", True)
            self.clock.advance(0.05)
            self.change(hub, "bob", False)
            self.clock.advance(0.05)
        self.clock.advance(5)
        self.assertLessEqual(len(conn.frames) - 1, 21)
        self.assertEqual(conn.frames[-1][1], False)
        # Each frame says something new.
        changes = conn.frames[1:]
        self.assertTrue(all(a[1] != b[1] for a, b in itertools.pairwise(changes)))

    def test_steady_flapping_is_not_reported_at_all_when_each_offline_is_short(self):
        """On for 0.5 s, off for 0.2 s, 50 times: bob is online throughout for
        his watchers (each offline is shorter than the grace)."""
        hub, conn = self.hub(), FakeConn("alice")
        hub.watch(conn, ["bob"])
        for _ in range(50):
            self.change(hub, "bob", True)
            self.clock.advance(0.5)
            self.change(hub, "bob", False)
            self.clock.advance(0.2)
        self.change(hub, "bob", True)
        self.clock.advance(5)
        self.assertEqual([f[1] for f in conn.frames], [False, True])

    def test_older_news_is_ignored(self):
        """A change with an older since than what is known changes nothing (a
        node's late publication)."""
        hub, conn = self.hub(), FakeConn("alice")
        hub.watch(conn, ["bob"])
        self.clock.advance(5)
        self.change(hub, "bob", True)
        hub.changed("bob", False, 1000)
        self.clock.advance(5)
        self.assertEqual([f[1] for f in conn.frames], [False, True])

    def test_a_new_watcher_is_told_what_the_others_were_told(self):
        """While bob's offline is held, a new watcher hears online (what the
        watchers know), then the offline with everyone."""
        hub, first, second = self.hub(), FakeConn("alice"), FakeConn("carol")
        self.change(hub, "bob", True)
        hub.watch(first, ["bob"])
        self.clock.advance(5)
        self.change(hub, "bob", False)
        hub.watch(second, ["bob"])
        self.assertEqual(second.frames[-1][1], True)
        self.clock.advance(2)
        self.assertEqual(first.frames[-1][1], False)
        self.assertEqual(second.frames[-1][1], False)

    def test_forget_and_replacement_stop_the_frames(self):
        """A closed connection, and a list replaced, hear nothing more."""
        hub, closed, moved = self.hub(), FakeConn("alice"), FakeConn("carol")
        hub.watch(closed, ["bob"])
        hub.watch(moved, ["bob"])
        hub.watch(moved, ["dave"])
        hub.forget(closed)
        self.assertEqual(hub.watched(), 1)
        self.change(hub, "bob", True)
        self.clock.advance(5)
        self.assertEqual(len(closed.frames), 1)
        self.assertEqual([f[0] for f in moved.frames], ["bob", "dave"])

    def test_contacts_policy_hides_non_contacts_and_off_hides_all(self):
        """contacts: a non-contact appears offline since the epoch and its
        changes are not sent; the watcher herself and contacts are seen.
        off: everyone offline."""
        self.state = {"bob": (True, 5000), "carol": (True, 6000), "alice": (True, 7000)}
        self.contacts = {"bob"}
        hub, conn = self.hub(CONTACTS), FakeConn("alice")
        hub.watch(conn, ["bob", "carol", "alice"])
        self.assertEqual(
            conn.frames,
            [
                ("bob", True, "1970-01-01T00:00:05.000Z"),
                ("carol", False, "1970-01-01T00:00:00.000Z"),
                ("alice", True, "1970-01-01T00:00:07.000Z"),
            ],
        )
        self.clock.advance(5)
        self.change(hub, "carol", False)
        self.clock.advance(5)
        self.assertEqual(len(conn.frames), 3)
        off, other = self.hub(OFF), FakeConn("alice")
        off.watch(other, ["bob", "alice"])
        self.assertEqual([f[1:] for f in other.frames], [(False, "1970-01-01T00:00:00.000Z")] * 2)

    def test_a_change_nobody_announced_is_found_by_the_recheck(self):
        """A node that died never says its users went offline: the hub asks
        the broker again every RECHECK seconds and reports what changed."""
        hub, conn = self.hub(), FakeConn("alice")
        self.state["bob"] = (True, 1000)
        hub.watch(conn, ["bob"])
        self.clock.advance(30)
        self.state["bob"] = (False, 30_000)  # changed where no event was sent
        self.clock.pump([GRACE] * int(RECHECK / GRACE + 2))
        self.assertEqual(conn.frames[-1], ("bob", False, "1970-01-01T00:00:30.000Z"))

    def test_a_later_watch_wins_over_one_still_answering(self):
        """The first watch's contacts answer comes after the second watch's:
        only the second list is kept and answered."""
        hub, pending = self.slow_hub()
        conn = FakeConn("alice")
        hub.watch(conn, ["bob"])
        hub.watch(conn, ["carol"])
        pending[1][0].callback(pending[1][1])
        pending[0][0].callback(pending[0][1])
        self.assertEqual([f[0] for f in conn.frames], ["carol"])
        self.assertEqual(hub.watched(), 1)

    def test_a_contact_gone_is_withdrawn_and_reported_offline(self):
        """contacts: bob stops being alice's contact; told so, the hub asks
        again for alice's connections (not carol's, who watches nobody
        concerned), withdraws bob (offline since the epoch) and sends her
        nothing more of him; dave, still a contact, stays."""
        asked: list[str] = []
        self.state = {"bob": (True, 5000), "dave": (True, 6000), "erin": (True, 7000)}
        self.contacts = {"bob", "dave", "erin"}
        hub, alice, carol = self.hub(CONTACTS), FakeConn("alice"), FakeConn("carol")
        hub.watch(alice, ["bob", "dave", "alice"])
        hub.watch(carol, ["erin"])
        inner = hub._contacts
        hub._contacts = lambda user, candidates: (asked.append(user), inner(user, candidates))[1]
        self.contacts.discard("bob")
        hub.contacts_changed(["bob", "zed"])
        self.assertEqual(asked, ["alice"])
        self.assertEqual(alice.frames[-1], ("bob", False, "1970-01-01T00:00:00.000Z"))
        self.assertEqual(len(alice.frames), 4)
        self.clock.advance(10)
        self.change(hub, "bob", False)
        self.change(hub, "dave", False)
        self.clock.advance(5)
        self.assertEqual(alice.frames[4:], [("dave", False, "1970-01-01T00:00:10.000Z")])
        self.assertEqual(hub.watched(), 3)  # dave, alice, erin

    def test_the_watched_user_losing_contacts_is_withdrawn_from_the_watcher(self):
        """Told that bob's contacts changed, the hub also decides again for
        the connections of bob himself."""
        self.state = {"alice": (True, 5000)}
        self.contacts = {"alice"}
        hub, bob = self.hub(CONTACTS), FakeConn("bob")
        hub.watch(bob, ["alice"])
        self.contacts = set()
        hub.contacts_changed(["bob"])
        self.assertEqual(bob.frames[-1], ("alice", False, "1970-01-01T00:00:00.000Z"))
        self.assertEqual(hub.watched(), 0)

    def test_one_user_watching_many_is_asked_about_in_parts(self):
        """alice's two connections watch 256 users each (400 between them):
        the store is asked at most MAX_WATCH candidates at a time, and the
        answers together decide (u0 gone, from the first part; u399 gone,
        from the second)."""
        self.contacts = {f"u{i}" for i in range(400)}
        asked: list[int] = []
        hub = self.hub(CONTACTS)
        inner = hub._contacts

        def contacts(user: str, candidates: list[str]) -> defer.Deferred:
            asked.append(len(candidates))
            return inner(user, candidates)

        hub._contacts = contacts
        first, second = FakeConn("alice"), FakeConn("alice")
        hub.watch(first, [f"u{i}" for i in range(0, 256)])
        hub.watch(second, [f"u{i}" for i in range(144, 400)])
        self.assertEqual(hub.watched(), 400)
        self.contacts -= {"u0", "u399"}
        asked.clear()
        hub.contacts_changed(["alice"])
        self.assertEqual(sorted(asked), [144, 256])
        self.assertEqual(first.frames[-1], ("u0", False, "1970-01-01T00:00:00.000Z"))
        self.assertEqual(second.frames[-1], ("u399", False, "1970-01-01T00:00:00.000Z"))
        self.assertEqual(hub.watched(), 398)

    def test_the_periodic_recheck_withdraws_contacts_gone(self):
        """No event came (a row changed by hand): the recheck asks the store
        again about CONTACTS_PER_RECHECK watchers each time, in turn (not all
        at once: a query per watcher), and withdraws bob from each."""
        watchers = CONTACTS_PER_RECHECK * 2 + 5
        self.state = {"bob": (True, 5000)}
        self.contacts = {"bob"}
        hub = self.hub(CONTACTS)
        asked: list[str] = []
        inner = hub._contacts
        hub._contacts = lambda user, candidates: (asked.append(user), inner(user, candidates))[1]
        conns = [FakeConn(f"w{i}") for i in range(watchers)]
        for conn in conns:
            hub.watch(conn, ["bob"])
        asked.clear()
        self.contacts = set()
        per_turn = []
        for _ in range(3):
            self.clock.advance(RECHECK)
            per_turn.append(len(asked))
            asked.clear()
        self.assertEqual(per_turn, [CONTACTS_PER_RECHECK, CONTACTS_PER_RECHECK, 5])
        epoch = ("bob", False, "1970-01-01T00:00:00.000Z")
        self.assertEqual([c.frames[-1] for c in conns], [epoch] * watchers)
        self.assertEqual(hub.watched(), 0)

    def test_everyone_and_off_need_no_recheck_of_contacts(self):
        """Under everyone, nobody is withdrawn (nor the store asked)."""
        self.state = {"bob": (True, 5000)}
        hub, alice = self.hub(EVERYONE), FakeConn("alice")
        hub._contacts = lambda user, candidates: self.fail("the store was asked")
        hub.watch(alice, ["bob"])
        hub.contacts_changed(["bob", "alice"])
        self.clock.advance(RECHECK * 2)
        self.assertEqual(alice.frames, [("bob", True, "1970-01-01T00:00:05.000Z")])

    def test_a_watch_sent_meanwhile_decides_instead_of_the_recheck(self):
        """The recheck's answer comes after alice sent another watch: the
        later watch decides, the answer changes nothing."""
        hub, pending = self.slow_hub()
        alice = FakeConn("alice")
        hub.watch(alice, ["bob"])
        pending[0][0].callback({"bob"})
        hub.contacts_changed(["bob"])
        hub.watch(alice, ["bob"])
        pending[1][0].callback(set())  # the recheck: bob gone
        pending[2][0].callback({"bob"})  # the new watch: bob back
        self.assertEqual(alice.frames, [("bob", False, "1970-01-01T00:00:00.000Z")] * 2)
        self.assertEqual(hub.watched(), 1)

    def test_a_deleted_user_is_withdrawn_from_every_watcher_once(self):
        """forget_user (an account deletion): each watcher of bob is told
        once that he is offline since the epoch and stops watching him,
        whatever the policy; later news of bob sends nothing."""
        for policy in (EVERYONE, CONTACTS):
            self.state = {"bob": (True, 5000), "carol": (True, 6000)}
            self.contacts = {"bob", "carol"}
            hub = self.hub(policy)
            alice, dave = FakeConn("alice"), FakeConn("dave")
            hub.watch(alice, ["bob", "carol"])
            hub.watch(dave, ["bob"])
            hub.forget_user("bob")
            epoch = ("bob", False, "1970-01-01T00:00:00.000Z")
            self.assertEqual((alice.frames[-1], dave.frames[-1]), (epoch, epoch), policy)
            self.assertEqual(hub.watched(), 1, policy)  # carol, still watched by alice
            before = (len(alice.frames), len(dave.frames))
            hub.changed("bob", False, 9000)
            hub.contacts_changed(["bob"])
            self.clock.advance(RECHECK * 3)
            self.assertEqual((len(alice.frames), len(dave.frames)), before, policy)
            hub.stop()

    def test_the_hub_forgets_users_nobody_watches(self):
        """What the hub keeps per user (state, what was sent, a held
        offline) goes once nobody watches that user: replaced lists, closed
        connections and withdrawn contacts leave nothing behind."""
        self.contacts = {f"u{i}" for i in range(100)}
        hub = self.hub(CONTACTS)
        conns = [FakeConn(f"w{i}") for i in range(10)]
        for i, conn in enumerate(conns):
            hub.watch(conn, [f"u{j}" for j in range(i * 10, i * 10 + 10)])
        for i in range(100):
            self.change(hub, f"u{i}", True)
        self.clock.advance(5)
        for i in range(100):
            self.change(hub, f"u{i}", False)  # offlines held: timers pending
        self.assertEqual(hub.watched(), 100)
        for conn in conns[:4]:
            hub.watch(conn, [])
        for conn in conns[4:7]:
            hub.forget(conn)
        self.assertEqual(hub.watched(), 30)
        self.contacts = set()
        hub.contacts_changed([f"u{i}" for i in range(100)])
        self.assertEqual((hub.watched(), hub._users, hub._watching), (0, {}, {}))
        self.assertEqual(self.clock.getDelayedCalls(), [hub._rechecker.call])
        for conn in conns:
            hub.forget(conn)
        self.assertEqual(hub._turns, {})


class WatchParsingTests(unittest.TestCase):
    """``parse_control_frame`` for ``watch``."""

    def test_a_good_watch(self):
        """Up to MAX_WATCH ids, duplicates kept (the hub drops them), empty allowed."""
        self.assertEqual(
            parse_control_frame('{"type":"watch","users":["a","b","a"]}'),
            WatchFrame(("a", "b", "a")),
        )
        self.assertEqual(parse_control_frame('{"type":"watch","users":[]}'), WatchFrame(()))
        many = ",".join(f'"u{i}"' for i in range(MAX_WATCH))
        self.assertEqual(
            len(parse_control_frame(f'{{"type":"watch","users":[{many}]}}').users), 256
        )

    def test_messages_are_not_control_frames(self):
        """A message (no type, or type message) is left to parse_client_frame."""
        for text in ('{"to":"bob","content":"type"}', '{"type":"message","to":"b","content":""}'):
            self.assertIsNone(parse_control_frame(text))


class PresenceSettingTests(unittest.TestCase):
    """The PRESENCE setting (section 15)."""

    def test_values_and_a_bad_one(self):
        """contacts by default; everyone and off (any case) accepted; any
        other value stops the start with one line naming PRESENCE."""
        from wsserver.config import ConfigError, load

        self.assertEqual(load({}, {}).presence, CONTACTS)
        self.assertEqual(load({}, {"PRESENCE": " Everyone "}).presence, EVERYONE)
        self.assertEqual(load({"presence": "off"}, {"PRESENCE": "everyone"}).presence, OFF)
        with self.assertRaises(ConfigError) as caught:
            load({}, {"PRESENCE": "friends"})
        self.assertEqual(str(caught.exception), "PRESENCE: must be contacts, everyone or off")


class LastSeenTests(unittest.TestCase):
    """What a node remembers of since when users were on or off is bounded:
    online users, and at most ``limit`` offline ones (the oldest forgotten)."""

    def test_offline_users_beyond_the_limit_are_forgotten_oldest_first(self):
        """Three remembered: the first two of five offline users are
        forgotten (never seen: since 0); online users are all kept; going
        online again takes a user out of the offline ones."""
        seen = LastSeen(limit=3)
        for i in range(5):
            seen.record(f"u{i}", True, 1000 + i)
        self.assertEqual(len(seen), 5)
        for i in range(5):
            seen.record(f"u{i}", False, 2000 + i)
        self.assertEqual(len(seen), 3)
        self.assertEqual([seen.get(f"u{i}") for i in range(5)], [
            (False, 0), (False, 0), (False, 2002), (False, 2003), (False, 2004),
        ])  # fmt: skip
        seen.record("u2", True, 3000)
        seen.record("u9", True, 3001)
        self.assertEqual(
            (seen.get("u2"), seen.get("u9"), len(seen)), ((True, 3000), (True, 3001), 4)
        )
        seen.record("u2", False, 4000)
        seen.record("u9", False, 4001)
        self.assertEqual(len(seen), 3)
        self.assertEqual(seen.get("u3"), (False, 0))
        self.assertEqual(seen.get("u9"), (False, 4001))

    def test_the_broker_forgets_offline_users_beyond_the_limit(self):
        """A LocalBroker whose users connect and leave keeps at most the
        limit of offline users: the last to leave is known, the first is
        answered as never seen."""
        clock = task.Clock()
        broker = LocalBroker(None, clock)
        broker._seen = LastSeen(limit=10)
        conns = [FakeConn(f"u{i}") for i in range(50)]
        for conn in conns:
            self.assertTrue(broker.attach(conn))
        self.assertEqual(len(broker._seen), 50)
        clock.advance(7)
        for conn in conns:
            broker.detach(conn)
        self.assertEqual(len(broker._seen), 10)
        states = self.successResultOf(broker.presence_of(["u0", "u49"]))
        self.assertEqual(states, {"u0": (False, 0), "u49": (False, 7000)})
