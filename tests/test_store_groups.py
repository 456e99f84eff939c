"""The store's side of groups (protocol section 13) on SQLite and PostgreSQL:
creating, reading, adding and removing members (windows, ownership), the
membership check of ``add_message`` (``not_a_member``, members stored with
the message), cursors that never go backwards, what ``replay_page`` brings a
member (pending, ``since``, nothing after removal), the counts of
``group_status``, ``messages_between`` carrying members, and an account
deletion leaving every group.  One suite (``GroupStoreContract``) runs on
both engines."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.services import fresh_postgres_database
from wsserver import store as st
from wsserver.messages import UNSIGNED
from wsserver.store import sqlite as sq
from wsserver.store.groups import EVENT_GROUP, MAX_GROUPS_PER_USER, GroupError

SECRET = b"g" * 32
NOW = 1_700_000_000_000
USERS = ("alice", "bob", "carol", "dave")


def new(sender: str, to: str, content: str = "hi", nonce: str | None = None) -> st.NewMessage:
    return st.NewMessage(sender, to, content, None, nonce, UNSIGNED, NOW)


class GroupStoreContract:
    """What both engines must do for groups.  Subclasses define
    ``make_store()``."""

    def make_store(self) -> Any:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        for user_id in USERS:
            added = yield self.store.add_user(
                st.User(user_id, user_id.title(), bytes([len(user_id)]) * 32, NOW)
            )
            self.assertTrue(added)

    @defer.inlineCallbacks
    def send(self, sender: str, to: str, content: str = "hi", nonce: str | None = None) -> Any:
        outcome, msg = yield self.store.add_message(new(sender, to, content, nonce))
        return outcome, msg

    @defer.inlineCallbacks
    def refused(self, d: defer.Deferred, code: str) -> Any:
        try:
            yield d
        except GroupError as exc:
            self.assertEqual(exc.code, code)
            return exc
        self.fail(f"not refused ({code})")

    @defer.inlineCallbacks
    def team(self, members=("bob", "carol")) -> Any:
        group, detail = yield self.store.create_group("#team", "Team", "alice", list(members), NOW)
        return group, detail

    @defer.inlineCallbacks
    def test_create_get_and_list(self):
        """A new group has its owner first, then its members; get_group and
        user_groups show it; the id stays taken (group_exists); an unknown
        member is refused naming it, and nothing is created."""
        group, detail = yield self.team()
        self.assertEqual((group.owner, group.members), ("alice", ("alice", "bob", "carol")))
        event = json.loads(detail)
        self.assertEqual((event["g"], event["e"], event["u"]), ("#team", "added", None))
        self.assertEqual(event["to"], ["alice", "bob", "carol"])
        got = yield self.store.get_group("#team")
        self.assertEqual(got, group)
        mine = yield self.store.user_groups("bob")
        self.assertEqual([g.group_id for g in mine], ["#team"])
        none = yield self.store.user_groups("dave")
        self.assertEqual(none, [])
        yield self.refused(self.store.create_group("#team", "x", "dave", [], NOW), "group_exists")
        exc = yield self.refused(
            self.store.create_group("#other", "x", "alice", ["bob", "zed"], NOW), "unknown_user"
        )
        self.assertIn("zed", exc.message)
        missing = yield self.store.get_group("#other")
        self.assertIsNone(missing)
        events = yield self.store.account_events(0, 100)
        self.assertEqual([e[2] for e in events].count(EVENT_GROUP), 1)

    @defer.inlineCallbacks
    def test_membership_check_of_add_message(self):
        """A member's message is stored once with the members at its commit; a
        non-member's, or one to a group that does not exist, is NOT_A_MEMBER
        and stores nothing."""
        yield self.team()
        outcome, msg = yield self.send("bob", "#team")
        self.assertEqual(outcome, st.STORED)
        self.assertEqual(msg.group_members, ("alice", "bob", "carol"))
        before = yield self.store.count_messages()
        for sender, to in (("dave", "#team"), ("alice", "#nosuch")):
            outcome, msg = yield self.send(sender, to, nonce="n1")
            self.assertEqual((outcome, msg), (st.NOT_A_MEMBER, None))
        after = yield self.store.count_messages()
        self.assertEqual(after, before)
        stored = yield self.store.get_message(before)
        self.assertEqual((stored.recipient, stored.status), ("#team", "pending"))

    @defer.inlineCallbacks
    def test_rules_of_adding_and_removing(self):
        """Only the owner adds (not_owner), a non-member gets unknown_group,
        adding a member twice already_member, an unknown user unknown_user;
        removing a non-member not_a_member, another member by a non-owner
        not_owner; a member may leave; the owner leaving hands the group to
        the member added first among those left."""
        yield self.team()
        yield self.refused(self.store.add_group_member("#team", "bob", "dave", NOW), "not_owner")
        yield self.refused(
            self.store.add_group_member("#team", "dave", "dave", NOW), "unknown_group"
        )
        yield self.refused(
            self.store.add_group_member("#team", "alice", "bob", NOW), "already_member"
        )
        yield self.refused(
            self.store.add_group_member("#team", "alice", "zed", NOW), "unknown_user"
        )
        yield self.refused(
            self.store.remove_group_member("#team", "alice", "dave", NOW), "not_a_member"
        )
        yield self.refused(
            self.store.remove_group_member("#team", "bob", "carol", NOW), "not_owner"
        )
        group, _ = yield self.store.add_group_member("#team", "alice", "dave", NOW)
        self.assertEqual(group.members, ("alice", "bob", "carol", "dave"))
        group, detail = yield self.store.remove_group_member("#team", "carol", "carol", NOW)
        self.assertEqual(group.members, ("alice", "bob", "dave"))
        self.assertEqual(json.loads(detail)["to"], ["alice", "bob", "carol", "dave"])
        group, _ = yield self.store.remove_group_member("#team", "alice", "alice", NOW)
        self.assertEqual((group.owner, group.members), ("bob", ("bob", "dave")))

    @defer.inlineCallbacks
    def test_at_most_256_members(self):
        """A group of 256 (the owner and 255) takes no one more: group_full,
        and the 257th is not a member."""
        names = [f"m{i:03d}" for i in range(256)]
        for name in names:
            yield self.store.add_user(st.User(name, name, bytes([7]) * 32, NOW))
        group, _ = yield self.store.create_group("#big", "Big", "alice", names[:255], NOW)
        self.assertEqual(len(group.members), 256)
        yield self.refused(
            self.store.add_group_member("#big", "alice", names[255], NOW), "group_full"
        )
        outcome, _ = yield self.send(names[255], "#big")
        self.assertEqual(outcome, st.NOT_A_MEMBER)

    @defer.inlineCallbacks
    def test_at_most_100_groups_per_user(self):
        """A user in MAX_GROUPS_PER_USER groups can be in no more: creating a
        group with them (as owner or member) or adding them is
        too_many_groups naming them, and changes nothing; after leaving one
        they can be added again."""
        self.assertEqual(MAX_GROUPS_PER_USER, 100)
        for i in range(MAX_GROUPS_PER_USER):
            yield self.store.create_group(f"#g{i}", "G", "bob", [], NOW)
        exc = yield self.refused(
            self.store.create_group("#x", "X", "alice", ["carol", "bob"], NOW), "too_many_groups"
        )
        self.assertIn("bob", exc.message)
        self.assertIsNone((yield self.store.get_group("#x")))
        yield self.refused(self.store.create_group("#y", "Y", "bob", [], NOW), "too_many_groups")
        yield self.store.create_group("#z", "Z", "alice", ["carol"], NOW)
        yield self.refused(
            self.store.add_group_member("#z", "alice", "bob", NOW), "too_many_groups"
        )
        group = yield self.store.get_group("#z")
        self.assertEqual(group.members, ("alice", "carol"))
        yield self.store.remove_group_member("#g0", "bob", "bob", NOW)
        group, _ = yield self.store.add_group_member("#z", "alice", "bob", NOW)
        self.assertEqual(group.members, ("alice", "carol", "bob"))
        mine = yield self.store.user_groups("bob")
        self.assertEqual(len(mine), MAX_GROUPS_PER_USER)

    @defer.inlineCallbacks
    def test_user_groups_reads_every_groups_members_in_one_query(self):
        """GET /groups' store call costs two queries (the groups, then the
        members of all of them), however many groups; each group has its
        own members, the owner first."""
        for i in range(4):
            members = ["bob", "carol"] if i % 2 else ["dave", "bob"]
            yield self.store.create_group(f"#g{i}", "G", "alice", members, NOW)
        yield self.store.create_group("#g4", "G", "bob", ["dave"], NOW)
        runs: list[str] = []
        real = self.store._query

        def counting(txn: Any) -> Any:
            run = real(txn)

            def counted(text: str, args: tuple) -> list[tuple]:
                runs.append(text)
                return run(text, args)

            return counted

        self.store._query = counting
        mine = yield self.store.user_groups("bob")
        self.assertEqual(len(runs), 2, runs)
        got = [(g.group_id, g.owner, g.members) for g in mine]
        self.assertEqual(
            got,
            [
                ("#g0", "alice", ("alice", "dave", "bob")),
                ("#g1", "alice", ("alice", "bob", "carol")),
                ("#g2", "alice", ("alice", "dave", "bob")),
                ("#g3", "alice", ("alice", "bob", "carol")),
                ("#g4", "bob", ("bob", "dave")),
            ],
        )
        del self.store._query
        self.assertEqual((yield self.store.user_groups("bob")), mine)

    @defer.inlineCallbacks
    def test_members_added_at_the_same_time_keep_the_order_of_adding(self):
        """Members added in the same millisecond (or with the clock gone back)
        are listed in the order they were added, not by id: the creation's
        list order, then each add, a re-added member last."""
        group, _ = yield self.team(("dave", "carol"))
        self.assertEqual(group.members, ("alice", "dave", "carol"))
        group, _ = yield self.store.add_group_member("#team", "alice", "bob", NOW)
        self.assertEqual(group.members, ("alice", "dave", "carol", "bob"))
        yield self.store.remove_group_member("#team", "alice", "dave", NOW)
        group, _ = yield self.store.add_group_member("#team", "alice", "dave", NOW - 5)
        self.assertEqual(group.members, ("alice", "carol", "bob", "dave"))
        self.assertEqual((yield self.store.get_group("#team")), group)
        mine = yield self.store.user_groups("carol")
        self.assertEqual(mine, [group])
        group, _ = yield self.store.remove_group_member("#team", "alice", "alice", NOW)
        self.assertEqual((group.owner, group.members), ("carol", ("carol", "bob", "dave")))

    @defer.inlineCallbacks
    def test_a_removal_names_what_it_settled_for_the_senders(self):
        """carol got alice's two messages and bob's one, bob got nothing:
        removing bob settles alice's two (delivered, recipients 1: carol)
        and its event names them, newest first; bob's own, which carol got,
        is not named; a removal that settles nothing names nothing."""
        yield self.team()
        _, m1 = yield self.send("alice", "#team", "one")
        _, m2 = yield self.send("alice", "#team", "two")
        _, m3 = yield self.send("bob", "#team", "three")
        self.store.mark_group_delivered([("#team", "carol", m3.id), ("#team", "alice", m3.id)])
        self.store.mark_delivered([m3.id])
        yield self.store.drain()
        _, detail = yield self.store.remove_group_member("#team", "alice", "bob", NOW)
        self.assertEqual(json.loads(detail)["s"], [[m2.id, "alice", 1], [m1.id, "alice", 1]])
        for m in (m1, m2):
            self.assertEqual((yield self.store.get_message(m.id)).status, "delivered")
        _, detail = yield self.store.remove_group_member("#team", "alice", "carol", NOW)
        self.assertNotIn("s", json.loads(detail))

    @defer.inlineCallbacks
    def test_a_deletion_names_what_it_settled(self):
        """An account deletion's removed event names the group messages only the
        deleted member waited for, with their senders."""
        yield self.team()
        _, m1 = yield self.send("alice", "#team", "one")
        self.store.mark_group_delivered([("#team", "carol", m1.id)])
        yield self.store.drain()
        self.assertTrue((yield self.store.delete_account("bob", NOW, lambda entries: None)))
        events = yield self.store.account_events(0, 100)
        removed = [json.loads(e[3]) for e in events if e[2] == EVENT_GROUP]
        self.assertEqual([d["s"] for d in removed if d["e"] == "removed"], [[[m1.id, "alice", 1]]])

    @defer.inlineCallbacks
    def test_replay_pending_since_and_removal(self):
        """A member is replayed the group's messages above their cursor but not
        their own; with since, every message of their window above it, their
        own included; moving the cursor (never backwards) stops the pending
        replay; a removed member is replayed nothing of the group, and a
        message after the removal does not count them."""
        yield self.store.create_group("#team", "Team", "alice", ["bob"], NOW)
        _, m0 = yield self.send("alice", "#team", "zero")
        _, m1 = yield self.send("alice", "#team", "one")
        _, m2 = yield self.send("bob", "#team", "two")
        page = yield self.store.replay_page("bob", None, 0, 10)
        self.assertEqual([m.id for m in page], [m0.id, m1.id])
        page = yield self.store.replay_page("bob", m0.id, 0, 10)
        self.assertEqual([m.id for m in page], [m0.id, m1.id, m2.id])  # m0: still pending
        page = yield self.store.replay_page("bob", m0.id, m0.id, 10)
        self.assertEqual([m.id for m in page], [m1.id, m2.id])
        self.store.mark_group_delivered([("#team", "bob", m1.id)])
        yield self.store.drain()
        self.store.mark_group_delivered([("#team", "bob", m0.id)])  # never backwards
        yield self.store.drain()
        page = yield self.store.replay_page("bob", None, 0, 10)
        self.assertEqual(page, [])
        counts = yield self.store.group_status(m1.id, "#team", "alice")
        self.assertEqual(counts, (1, 0))
        counts = yield self.store.group_status(m2.id, "#team", "bob")
        self.assertEqual(counts, (0, 1))  # alice has not got bob's yet
        _, m3 = yield self.send("alice", "#team", "three")
        yield self.store.remove_group_member("#team", "bob", "bob", NOW)
        _, m4 = yield self.send("alice", "#team", "after")
        self.assertEqual(m4.group_members, ("alice",))
        page = yield self.store.replay_page("bob", 0, 0, 10)
        self.assertEqual(page, [])
        counts = yield self.store.group_status(m3.id, "#team", "alice")
        self.assertEqual(counts, (0, 0))  # bob left with it pending: no one waits
        outcome, _ = yield self.send("bob", "#team", "back?")
        self.assertEqual(outcome, st.NOT_A_MEMBER)

    @defer.inlineCallbacks
    def test_a_cursor_move_committed_after_the_removal_stays_in_the_window(self):
        """m1 was handed to bob, his cursor move queued; his removal commits
        first: the move still lands (he received m1 and may read it), but a
        move beyond his window does not."""
        yield self.team()
        _, m1 = yield self.send("alice", "#team", "one")
        yield self.store.remove_group_member("#team", "alice", "bob", NOW)
        _, m2 = yield self.send("alice", "#team", "after")
        self.store.mark_group_delivered([("#team", "bob", m1.id)])
        yield self.store.drain()
        self.assertEqual((yield self.store.record_read("bob", m1.id, NOW))[0], "read")
        self.store.mark_group_delivered([("#team", "bob", m2.id)])
        yield self.store.drain()
        self.assertEqual((yield self.store.record_read("bob", m2.id, NOW))[0], "not_received")
        counts = yield self.store.group_status(m1.id, "#team", "alice")
        self.assertEqual(counts, (1, 1))  # bob got it; carol still waits

    @defer.inlineCallbacks
    def test_a_new_window_after_readding(self):
        """A member removed and added again sees only messages from the new
        window: nothing from before, pending or with since."""
        yield self.store.create_group("#team", "Team", "alice", ["bob"], NOW)
        yield self.store.remove_group_member("#team", "alice", "bob", NOW)
        _, gone = yield self.send("alice", "#team", "while away")
        yield self.store.add_group_member("#team", "alice", "bob", NOW)
        _, back = yield self.send("alice", "#team", "welcome back")
        page = yield self.store.replay_page("bob", 0, 0, 10)
        self.assertEqual([m.id for m in page], [back.id])
        self.assertNotEqual(gone.id, back.id)

    @defer.inlineCallbacks
    def test_messages_between_carries_the_members_of_each_window(self):
        """Read back from the database, a group message names the members whose
        window holds it: bob for the one before his removal, not after."""
        yield self.team()
        _, before = yield self.send("alice", "#team", "before")
        yield self.store.remove_group_member("#team", "alice", "bob", NOW)
        _, after = yield self.send("alice", "#team", "after")
        page = yield self.store.messages_between(before.id - 1, after.id, 10)
        members = {m.id: m.group_members for m in page}
        self.assertEqual(members[before.id], ("alice", "bob", "carol"))
        self.assertEqual(members[after.id], ("alice", "carol"))

    @defer.inlineCallbacks
    def test_deletion_leaves_every_group(self):
        """Deleting an account removes it from its groups (a removed event each)
        and hands an owned group to the member added first among those left."""
        yield self.team()
        yield self.store.create_group("#solo", "Solo", "bob", [], NOW)
        done = yield self.store.delete_account("alice", NOW, lambda entries: None)
        self.assertTrue(done)
        group = yield self.store.get_group("#team")
        self.assertEqual((group.owner, group.members), ("bob", ("bob", "carol")))
        events = yield self.store.account_events(0, 100)
        removed = [json.loads(e[3]) for e in events if e[2] == EVENT_GROUP]
        self.assertIn(("#team", "removed", "alice"), [(d["g"], d["e"], d["u"]) for d in removed])
        outcome, _ = yield self.send("bob", "#team", "still here")
        self.assertEqual(outcome, st.STORED)


class SqliteGroupStoreTests(GroupStoreContract, unittest.TestCase):
    def make_store(self) -> Any:
        path = self.mktemp()
        st.prepare_database(path, lambda: SECRET)
        store = sq.Store(path, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store


class PostgresGroupStoreTests(GroupStoreContract, unittest.TestCase):
    def make_store(self) -> Any:
        url = self.url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        store = st.open_store(url, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        return store

    def connection(self, autocommit: bool = False) -> Any:
        conn = psycopg.connect(self.url, autocommit=autocommit)
        self.addCleanup(conn.close)
        return conn

    @defer.inlineCallbacks
    def test_a_removal_waits_for_a_count_in_progress(self):
        """A node counting a group message (group_status, after its cursor move
        committed) and a removal racing it: the removal waits for the count,
        then reads the cursor that count followed, so the message only the
        removed member waited for is settled.  (Without the wait both saw
        someone waiting and the message stayed pending for good.)"""
        yield self.team()
        _, msg = yield self.send("alice", "#team", "one")
        count = self.connection()  # a count in progress: the group's row shared
        count.execute("SELECT 1 FROM chat_groups WHERE group_id = '#team' FOR SHARE")
        move = self.connection()  # carol's cursor move, committed after the removal began
        move.execute(
            "UPDATE group_members SET delivered_id = %s"
            " WHERE group_id = '#team' AND user_id = 'carol'",
            (msg.id,),
        )
        d = self.store.remove_group_member("#team", "alice", "bob", NOW)
        yield self.until_waiting(d)
        self.assertFalse(d.called, "the removal did not wait for the count")
        move.commit()
        count.commit()
        _, detail = yield d
        self.assertEqual(json.loads(detail)["s"], [[msg.id, "alice", 1]])
        self.assertEqual((yield self.store.get_message(msg.id)).status, "delivered")

    @defer.inlineCallbacks
    def test_a_count_waits_for_a_removal_in_progress(self):
        """The other way round: group_status waits while a removal holds the
        group's row, then counts with the removal seen (bob no longer waits)."""
        yield self.team()
        _, msg = yield self.send("alice", "#team", "one")
        self.store.mark_group_delivered([("#team", "carol", msg.id)])
        yield self.store.drain()
        removal = self.connection()
        removal.execute("UPDATE chat_groups SET owner = owner WHERE group_id = '#team'")
        removal.execute(
            "UPDATE group_members SET removed_id = %s WHERE group_id = '#team' AND user_id = 'bob'",
            (msg.id,),
        )
        d = self.store.group_status(msg.id, "#team", "alice")
        yield self.until_waiting(d)
        self.assertFalse(d.called, "the count did not wait for the removal")
        removal.commit()
        self.assertEqual((yield d), (1, 0))

    @defer.inlineCallbacks
    def until_waiting(self, d: defer.Deferred) -> Any:
        """Until a backend of the test's database waits for a lock, or ``d`` fired."""
        watch = self.connection(autocommit=True)
        while not d.called:
            waiting = watch.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting:
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
