"""wsserver-client and section 13, end to end: history (paged, oldest first,
every message checked locally), conversations, groups, sending to a group,
read receipts in listen and chat, presence with who and in chat.  The CLI
runs as processes (the working tree's code) against a LiveServer."""

from __future__ import annotations

import signal
import time
from typing import Any

from nacl.signing import SigningKey
from twisted.internet import defer
from twisted.trial import unittest

from wsserver import cli
from wsserver import client as wc
from wsserver.store.reads import ALREADY_READ, READ

from .support import within
from .test_cli import WAIT, ServedCase


class ConversationsCliTests(ServedCase):
    @defer.inlineCallbacks
    def users(self, *names: str) -> Any:
        """Register each user with a key file USER.key in the CLI's folder."""
        for name in names:
            key = SigningKey.generate()
            wc.save_key(key, str(self.dir / f"{name}.key"))
            yield self.server.register(name, key)

    @defer.inlineCallbacks
    def send_as(self, user: str, to: str, *texts: str) -> Any:
        """Send signed messages as ``user`` with the library; their ids."""
        client = wc.Client(self.url, user, wc.load_key(str(self.dir / f"{user}.key")))
        yield client.connect()
        ids = []
        try:
            for text in texts:
                ids.append((yield client.send(to, text))["id"])
        finally:
            yield client.close()
        return ids

    @defer.inlineCallbacks
    def ok(self, *args: str, user: str = "alice") -> Any:
        code, out, err = yield self.cli(*args, user=user)
        self.assertEqual(code, 0, err)
        return out

    @defer.inlineCallbacks
    def fails(self, *args: str, user: str = "alice") -> Any:
        """The command exits 1 with one human line and prints nothing; the line."""
        code, out, err = yield self.cli(*args, user=user)
        self.assertEqual((code, out), (1, ""), err)
        return self.assertOneHumanLine(err)

    @defer.inlineCallbacks
    def line_with(self, proc: Any, text: str) -> Any:
        """The next stdout line of ``proc`` holding ``text`` (others are skipped)."""
        while True:
            line = yield within(proc.lines.get(), WAIT)
            if text in line:
                return line

    def tamper(self, sql: str) -> defer.Deferred:
        """Change the stored messages behind the server's back (both stores)."""
        return self.server.store._run(lambda txn: txn.execute(sql))

    @defer.inlineCallbacks
    def test_history_pages_oldest_first_and_flags_what_does_not_check(self):
        """history prints a page oldest first, each message marked as listen
        marks it, with a hint naming the command for the older page while
        there is one; a message whose content was changed in the store, and
        one naming a key its sender's log does not hold, are INVALID (the
        latter with a warning); conversations lists the peer."""
        yield self.users("alice", "bob")
        one, two, three = yield self.send_as("alice", "bob", "one", "two", "three")
        (four,) = yield self.send_as("bob", "alice", "four")
        code, out, err = yield self.cli("history", "--with", "alice", "--limit", "2", user="bob")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        self.assertRegex(lines[0], rf"^\[\S+Z\] alice \[verified\] #{three}: three$")
        self.assertRegex(lines[1], rf"^\[\S+Z\] bob \[verified\] #{four}: four$")
        hint = f"wsserver-client --user bob history --with alice --before {three} --limit 2"
        self.assertEqual(err, f"wsserver-client: older messages: {hint}\n")
        code, out, err = yield self.cli(*hint.split()[1:], user="bob")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            [line.split("#")[-1] for line in out.splitlines()],
            [
                f"{one}: one",
                f"{two}: two",
            ],
        )
        self.assertEqual(
            (yield self.ok("conversations", user="bob")).split()[1:],
            ["alice", "last", f"#{four}"],
        )

        yield self.tamper(f"UPDATE messages SET content = 'two, changed' WHERE id = {two}")
        yield self.tamper(f"UPDATE messages SET key_id = '{'A' * 43}' WHERE id = {one}")
        code, out, err = yield self.cli("history", "--with", "alice", user="bob")
        self.assertEqual(code, 0, err)
        marks = [line.split("] ", 1)[1] for line in out.splitlines()]
        self.assertEqual(
            marks,
            [
                f"alice [INVALID] #{one}: one",
                f"alice [INVALID] #{two}: two, changed",
                f"alice [verified] #{three}: three",
                f"bob [verified] #{four}: four",
            ],
        )
        self.assertIn(f"warning: message #{one} from alice is signed with key {'A' * 43}", err)

    @defer.inlineCallbacks
    def test_groups_create_add_remove_leave_list_and_their_errors(self):
        """group create/add/remove/leave/list/show print what they did; a
        refusal (not_owner, unknown_group, group_exists, not_a_member, an
        unknown member) is one line naming its code, exit 1."""
        yield self.users("alice", "bob", "carol", "dave")
        out = yield self.ok("group", "create", "team", "--name", "The Team", "bob")
        self.assertEqual(out, "created #team (The Team): owner alice, 2 members: alice, bob\n")
        out = yield self.ok("group", "add", "#team", "carol")
        self.assertEqual(
            out, "added carol to #team (The Team): owner alice, 3 members: alice, bob, carol\n"
        )
        line = yield self.fails("group", "add", "team", "dave", user="bob")
        self.assertIn("not_owner: only the group's owner can add members", line)
        line = yield self.fails("group", "show", "team", user="dave")
        self.assertIn("unknown_group", line)
        self.assertIn("'group list' shows yours", line)
        line = yield self.fails("group", "create", "team")
        self.assertIn("group_exists", line)
        line = yield self.fails("group", "add", "team", "nobody")
        self.assertIn("unknown_user: no such user: nobody", line)
        self.assertNotIn("register", line)
        line = yield self.fails("group", "add", "team", "not a user")
        self.assertIn("is not a user id", line)
        out = yield self.ok("group", "list", user="bob")
        self.assertEqual(out, "#team (The Team): owner alice, 3 members: alice, bob, carol\n")
        self.assertEqual(
            (yield self.ok("group", "remove", "team", "carol")), "removed carol from #team\n"
        )
        line = yield self.fails("group", "remove", "team", "carol")
        self.assertIn("not_a_member", line)
        self.assertEqual((yield self.ok("group", "leave", "#team", user="bob")), "left #team\n")
        code, out, err = yield self.cli("group", "list", user="bob")
        self.assertEqual((code, out, err), (0, "", "wsserver-client: you are in no group\n"))
        out = yield self.ok("group", "show", "team")
        self.assertEqual(out, "#team (The Team): owner alice, 1 member: alice\n")

    @defer.inlineCallbacks
    def test_a_group_message_reaches_members_and_read_receipts_come_back(self):
        """send --to '#team' is received by every member, marked with the group
        and verified; bob's listen sends a read receipt that alice's listen
        shows ('read by bob'); carol's listen --no-receipts sends none; the
        group's history and alice's conversations show it."""
        yield self.users("alice", "bob", "carol")
        yield self.ok("group", "create", "team", "bob", "carol")
        listens = {}
        for user, extra in (("alice", ()), ("bob", ()), ("carol", ("--no-receipts",))):
            listens[user] = self.spawn("listen", *extra, user=user)
            yield listens[user].err_line(f"listening as {user}")
        out = yield self.ok("send", "--to", "#team", "hello team")
        msg_id = int(out.split()[0])
        for user in ("bob", "carol"):
            line = yield self.line_with(listens[user], "hello team")
            self.assertRegex(
                line, rf"^\[\S+Z\] alice \(#team\) \[verified\] #{msg_id}: hello team$"
            )
        line = yield self.line_with(listens["alice"], "read by")
        self.assertEqual(line, f"your message #{msg_id} was read by bob")
        listens["carol"].transport.signalProcess(signal.SIGTERM)
        yield within(listens["carol"].ended, WAIT)
        # carol sent no read: recording hers now is the first.
        outcome = yield self.server.store.record_read("carol", msg_id, int(time.time() * 1000))
        self.assertEqual(outcome[0], READ)
        outcome = yield self.server.store.record_read("bob", msg_id, int(time.time() * 1000))
        self.assertEqual(outcome[0], ALREADY_READ)
        out = yield self.ok("history", "--with", "#team", user="carol")
        self.assertRegex(out, rf"^\[\S+Z\] alice \(#team\) \[verified\] #{msg_id}: hello team\n$")
        # alice's page of her own message says who read it, in their order
        out = yield self.ok("history", "--with", "#team")
        self.assertRegex(
            out,
            rf"^\[\S+Z\] alice \(#team\) \[verified\] #{msg_id}: hello team"
            r"  \(read by bob, carol\)\n$",
        )
        out = yield self.ok("conversations")
        self.assertEqual(out.split()[1:], ["#team", "last", f"#{msg_id}"])
        line = yield self.fails("send", "--to", "#other", "anyone?")
        self.assertIn("not_a_member", line)

    @defer.inlineCallbacks
    def test_chat_shows_the_partner_coming_and_going_and_reading(self):
        """chat --with bob says bob's presence in its banner, a line when bob
        comes online and when he goes offline, and 'read by bob' for what his
        listen shows."""
        yield self.users("alice", "bob")
        # bob wrote to alice (PRESENCE=contacts: only then may she watch him)
        yield self.send_as("bob", "alice", "hi alice")
        (first,) = yield self.send_as("alice", "bob", "are you there?")
        chat = self.spawn("chat", "--with", "bob")
        banner = yield within(chat.lines.get(), WAIT)
        self.assertRegex(
            banner, r"^chatting with bob \(bob is offline since \S+Z\); end with Ctrl-D$"
        )
        listen = self.spawn("listen", user="bob")
        wanted = {"bob came online", f"your message #{first} was read by bob"}
        seen = set()
        while not wanted <= seen:  # in either order, with its "delivered" status
            seen.add((yield within(chat.lines.get(), WAIT)))
        extra = {line for line in seen - wanted if not line.endswith(": hi alice")}
        self.assertEqual(extra, {f"your message #{first} is delivered"})
        chat.transport.write(b"good\n")
        echo = yield within(chat.lines.get(), WAIT)
        second = int(echo.strip().strip("()").split()[0].lstrip("#"))
        line = yield self.line_with(chat, "read by")
        self.assertEqual(line, f"your message #{second} was read by bob")
        listen.transport.signalProcess(signal.SIGTERM)
        self.assertEqual((yield self.line_with(chat, "offline")), "bob went offline")
        chat.transport.closeStdin()
        self.assertEqual((yield within(chat.ended, WAIT)), 0, chat.err)

    @defer.inlineCallbacks
    def test_chat_watches_again_when_the_partner_first_writes(self):
        """bob never wrote to alice: her chat's banner says he is offline or
        not visible, though his listen is on; his first message makes her
        chat watch again (under contacts he is visible from then), and 'bob
        came online' follows (a new user saw the chat stay silent)."""
        yield self.users("alice", "bob")
        listen = self.spawn("listen", "--no-receipts", user="bob")
        yield listen.err_line("listening as bob")
        chat = self.spawn("chat", "--with", "bob")
        banner = yield within(chat.lines.get(), WAIT)
        self.assertEqual(
            banner,
            "chatting with bob (bob is offline, or not visible to you until they"
            " write to you); end with Ctrl-D",
        )
        yield self.send_as("bob", "alice", "now you see me")
        self.assertEqual((yield self.line_with(chat, "came online")), "bob came online")
        listen.transport.signalProcess(signal.SIGTERM)
        yield within(listen.ended, WAIT)
        chat.transport.closeStdin()
        self.assertEqual((yield within(chat.ended, WAIT)), 0, chat.err)

    @defer.inlineCallbacks
    def test_who(self):
        """who prints each user's presence, in the order asked: online since
        when, offline since when, or just offline for one never seen (or not
        visible); a bad id is one line, exit 1."""
        yield self.users("alice", "bob", "carol")
        yield self.send_as("bob", "alice", "hi")  # bob wrote to alice: she may watch him
        listen = self.spawn("listen", user="bob")
        yield listen.err_line("listening as bob")
        out = yield self.ok("who", "carol", "bob")
        lines = out.splitlines()
        self.assertEqual(lines[0], "carol: offline")
        self.assertRegex(lines[1], r"^bob: online since \d{4}-\d\d-\d\dT[\d:.]+Z$")
        listen.transport.signalProcess(signal.SIGTERM)
        yield within(listen.ended, WAIT)
        # The server holds an offline for a second (it may be a reconnect).
        for _ in range(WAIT):
            out = yield self.ok("who", "bob")
            if "offline" in out:
                break
        self.assertRegex(out, r"^bob: offline since \d{4}-\d\d-\d\dT[\d:.]+Z\n$")
        line = yield self.fails("who", "#team")
        self.assertIn("is not a user id", line)

    @defer.inlineCallbacks
    def test_receipts_for_a_long_replay_leave_room_for_sending(self):
        """chat replays 16 waiting messages and marks each read, paced, so that
        the rate limit (5/s, burst 10: reads and messages alike) never refuses
        a receipt nor the line typed at once; all of alice's receipts reach
        her.  (Two senders: each stays within its own burst.)"""
        yield self.users("alice", "bob", "carol")
        ids = yield self.send_as("alice", "bob", *(f"message {n}" for n in range(8)))
        yield self.send_as("carol", "bob", *(f"message {n}" for n in range(8, 16)))
        listen = self.spawn("listen")
        yield listen.err_line("listening as alice")
        chat = self.spawn("chat", "--with", "alice", user="bob")
        yield self.line_with(chat, "chatting with alice")
        chat.transport.write(b"all read\n")
        echo = yield self.line_with(chat, "(#")
        self.assertRegex(echo, r"^  \(#\d+ (pending|delivered)\)$")
        receipts = []
        while len(receipts) < len(ids):
            receipts.append((yield self.line_with(listen, "was read by bob")))
        self.assertEqual(receipts, [f"your message #{i} was read by bob" for i in ids])
        chat.transport.closeStdin()
        self.assertEqual((yield within(chat.ended, WAIT)), 0, chat.err)
        self.assertNotIn("rate_limited", chat.out.decode() + chat.err.decode())


class ConversationsLibraryTests(ServedCase):
    """What the library promises beyond the commands above."""

    def client(self, user: str, key: SigningKey) -> wc.Client:
        client = wc.Client(self.url, user, key)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_watch_is_sent_again_after_a_reconnect(self):
        """After the connection drops and the client reconnects by itself, the
        watch list goes out again: a presence frame comes anew."""
        alice = SigningKey.generate()
        yield self.server.register("alice", alice)
        client = self.client("alice", alice)
        frames: defer.DeferredQueue = defer.DeferredQueue()
        client.on_presence = frames.put
        yield client.connect()
        client.watch(["alice"])
        self.assertEqual((yield within(frames.get(), WAIT))["user"], "alice")
        again: defer.Deferred = defer.Deferred()
        client.on_connect = lambda: again.called or again.callback(None)
        client._conn.dropConnection(abort=True)
        yield within(again, WAIT)
        frame = yield within(frames.get(), WAIT)
        self.assertEqual((frame["user"], frame["online"]), ("alice", True))

    @defer.inlineCallbacks
    def test_reads_wait_for_the_connection_and_history_logs_in_again(self):
        """A read asked for while not connected goes out once connected again
        (the sender gets its receipt); a history request with a token the
        server refuses logs in again and answers."""
        alice, bob = SigningKey.generate(), SigningKey.generate()
        yield self.server.register("alice", alice)
        yield self.server.register("bob", bob)
        sender = self.client("alice", alice)
        receipts: defer.DeferredQueue = defer.DeferredQueue()
        sender.on_read = receipts.put
        yield sender.connect()
        ack = yield sender.send("bob", "read me")
        reader = self.client("bob", bob)
        received: defer.DeferredQueue = defer.DeferredQueue()
        reader.on_message = lambda frame, verified: received.put(frame["id"])
        yield reader.connect()
        self.assertEqual((yield within(received.get(), WAIT)), ack["id"])
        yield reader.close()
        reader.read(ack["id"])
        yield reader.connect()
        receipt = yield within(receipts.get(), WAIT)
        self.assertEqual((receipt["id"], receipt["by"]), (ack["id"], "bob"))
        reader.token = "not.a.token"
        page = yield reader.history("alice")
        self.assertEqual([(f["content"], ok) for f, ok in page.messages], [("read me", True)])
        self.assertNotEqual(reader.token, "not.a.token")


class GroupLineTests(unittest.TestCase):
    def test_a_removal_line_does_not_guess_who_acted(self):
        """listen's line for a group frame: a removal frame does not say
        whether the member left or was removed, so the line says neither."""
        frame = {"type": "group", "group_id": "#team", "user_id": "bob"}
        self.assertEqual(
            cli.group_event({**frame, "event": "removed"}),
            "group #team: bob is no longer a member",
        )
        self.assertEqual(cli.group_event({**frame, "event": "added"}), "group #team: bob was added")
