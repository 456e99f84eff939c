"""The client's side of the key log without a server: checking a whole log,
remembering it, the notices (rewritten, forged, unknown key, new device), the
pairing halves, and verifying messages with the key their key_id names."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from nacl.signing import SigningKey
from twisted.internet import defer
from twisted.trial import unittest

from wsserver import client as wc
from wsserver import devices, keylog
from wsserver.keylog import Entry, KeyLogError
from wsserver.messages import b64decode, b64encode, signing_input

from .support import VECTORS

LOG = VECTORS["keylog"]
ALICE = SigningKey(bytes.fromhex(VECTORS["users"]["alice"]["secret_seed_hex"]))
SECOND = SigningKey(bytes.fromhex(LOG["second_device"]["secret_seed_hex"]))
SERVER = "http://127.0.0.1:1"


def kid(key: SigningKey) -> str:
    return keylog.key_id(bytes(key.verify_key))


class LogBuilder:
    """A user's key log as the server would serve it, signed with real keys."""

    def __init__(self, user_id: str, first: SigningKey) -> None:
        self.user_id = user_id
        self.state = keylog.LogState()
        self.entries: list[dict] = []
        self._append(Entry(0, keylog.REGISTER, bytes(first.verify_key)))

    def _append(self, entry: Entry) -> None:
        keylog.apply(self.state, self.user_id, entry)
        self.entries.append(
            keylog.entry_json(self.user_id, entry, f"2026-12-07T03:00:{entry.seq:02d}.000Z")
        )

    def add(self, new: SigningKey, by: SigningKey, name: str | None = None) -> LogBuilder:
        seq, pub = self.state.next_seq, bytes(new.verify_key)
        string = keylog.entry_string(self.user_id, seq, keylog.ADD, pub, self.state.head)
        self._append(
            Entry(
                seq,
                keylog.ADD,
                pub,
                name,
                kid(by),
                by.sign(string.encode()).signature,
                new.sign(string.encode()).signature,
            )
        )
        return self

    def revoke(self, old: SigningKey, by: SigningKey) -> LogBuilder:
        seq, pub = self.state.next_seq, bytes(old.verify_key)
        string = keylog.entry_string(self.user_id, seq, keylog.REVOKE, pub, self.state.head)
        self._append(
            Entry(seq, keylog.REVOKE, pub, None, kid(by), by.sign(string.encode()).signature)
        )
        return self

    def json(self) -> dict:
        return {"user_id": self.user_id, "entries": [dict(e) for e in self.entries]}


def vector_log() -> dict:
    """The shared vectors' log of alice (register, add the second device,
    revoke the first), in the JSON shape of GET .../keylog."""
    return {
        "user_id": LOG["user_id"],
        "entries": [
            {
                **{k: e[k] for k in ("seq", "action", "public_key", "by")},
                "signature": e["signature"],
                "key_signature": e["key_signature"],
                "key_id": keylog.key_id(b64decode(e["public_key"])),
                "name": None,
                "at": None,
            }
            for e in LOG["entries"]
        ],
    }


class CheckLogTests(unittest.TestCase):
    def test_the_vectors_log_checks_and_keeps_revoked_keys(self):
        """The vectors' whole log checks; the revoked first key is no longer
        active but stays known (old messages stay checkable)."""
        log = devices.check_log("alice", vector_log())
        self.assertEqual(list(log.state.active), [kid(SECOND)])
        self.assertEqual(log.key(kid(ALICE)), bytes(ALICE.verify_key))
        self.assertEqual(log.next_seq, 3)
        self.assertEqual(log.heads[0], LOG["entries"][1]["prev"])
        self.assertEqual(log.heads[1], LOG["entries"][2]["prev"])

    def test_a_forged_entry_does_not_check(self):
        """An entry whose signature is not by the key it names, a broken prev
        chain, a key_id shown for another key, the log of another user, and
        signatures on entry 0: each is refused with a code."""
        forged = vector_log()
        forged["entries"][1]["signature"] = forged["entries"][2]["signature"]
        with self.assertRaises(KeyLogError) as caught:
            devices.check_log("alice", forged)
        self.assertEqual(caught.exception.code, "invalid_signature")

        # A key the server slips in, "by" alice's key but signed by itself.
        mallory = SigningKey.generate()
        inserted = LogBuilder("alice", ALICE).json()
        string = keylog.entry_string(
            "alice",
            1,
            keylog.ADD,
            bytes(mallory.verify_key),
            keylog.digest(LOG["entries"][0]["string"]),
        )
        sig = mallory.sign(string.encode()).signature
        entry = Entry(1, keylog.ADD, bytes(mallory.verify_key), None, kid(ALICE), sig, sig)
        inserted["entries"].append(keylog.entry_json("alice", entry))
        with self.assertRaises(KeyLogError) as caught:
            devices.check_log("alice", inserted)
        self.assertEqual(caught.exception.code, "invalid_signature")

        dropped = vector_log()
        del dropped["entries"][1]  # the revoke's prev no longer follows
        with self.assertRaises(KeyLogError):
            devices.check_log("alice", dropped)

        lying = vector_log()
        lying["entries"][1]["key_id"] = kid(ALICE)
        with self.assertRaises(KeyLogError):
            devices.check_log("alice", lying)

        with self.assertRaises(KeyLogError):
            devices.check_log("bob", vector_log())
        signed0 = vector_log()
        signed0["entries"][0]["by"] = kid(ALICE)
        with self.assertRaises(KeyLogError):
            devices.check_log("alice", signed0)
        for empty in ({"user_id": "alice", "entries": []}, {"user_id": "alice"}, []):
            with self.assertRaises(KeyLogError):
                devices.check_log("alice", empty)

    def test_unsigned_fields_as_the_page_judges_them(self):
        """A device name is not signed: one with control or format characters,
        an over-long one or one that is not a string does not make the log
        fail (kept as a label, cut to 64 characters, or no name); a key_id
        shown as null is refused (one left out is not)."""
        for name, kept in (
            ("lap\x1b[2Jtop\u202e", "lap\x1b[2Jtop\u202e"),
            ("x" * 100, "x" * 63 + "\u2026"),
            (5, None),
            ("", None),
        ):
            log = vector_log()
            log["entries"][1]["name"] = name
            checked = devices.check_log("alice", log)
            self.assertEqual(checked.state.names[kid(SECOND)], kept)
        nulled = vector_log()
        nulled["entries"][1]["key_id"] = None
        with self.assertRaises(KeyLogError) as caught:
            devices.check_log("alice", nulled)
        self.assertIn("entry 1 shows a key_id", caught.exception.message)
        left_out = vector_log()
        del left_out["entries"][1]["key_id"]
        devices.check_log("alice", left_out)
        for not_an_entry in ([1], ["x"]):
            with self.assertRaises(KeyLogError):
                devices.check_log("alice", {"user_id": "alice", "entries": not_an_entry})


class CompareTests(unittest.TestCase):
    def setUp(self):
        self.builder = LogBuilder("bob", ALICE)
        self.seen = devices.Seen.of(devices.check_log("bob", self.builder.json()))

    def test_first_sight_and_no_change_say_nothing(self):
        """A log never seen before (trust on first use) and the same log again
        give no notice."""
        log = devices.check_log("bob", self.builder.json())
        self.assertIsNone(devices.compare(None, log))
        self.assertIsNone(devices.compare(self.seen, log))

    def test_a_new_device_and_a_revoked_one_are_a_mild_notice(self):
        """Keys added or revoked since last seen: devices_changed, naming them."""
        self.builder.add(SECOND, ALICE, "laptop")
        notice = devices.compare(self.seen, devices.check_log("bob", self.builder.json()))
        self.assertEqual(notice.kind, devices.DEVICES_CHANGED)
        self.assertFalse(notice.serious)
        self.assertEqual(notice.added, (kid(SECOND),))
        self.assertIn("laptop", notice.text)
        seen = devices.Seen.of(devices.check_log("bob", self.builder.json()))
        self.builder.revoke(ALICE, SECOND)
        notice = devices.compare(seen, devices.check_log("bob", self.builder.json()))
        self.assertEqual((notice.kind, notice.revoked), (devices.DEVICES_CHANGED, (kid(ALICE),)))

    def test_a_rewritten_log_is_serious(self):
        """A log that still checks but does not start with what was seen (an
        entry replaced, or entries removed) is 'rewritten'."""
        self.builder.add(SECOND, ALICE, "laptop")
        seen = devices.Seen.of(devices.check_log("bob", self.builder.json()))
        other = LogBuilder("bob", ALICE).add(SigningKey.generate(), ALICE, "phone")
        notice = devices.compare(seen, devices.check_log("bob", other.json()))
        self.assertEqual(notice.kind, devices.REWRITTEN)
        self.assertTrue(notice.serious)
        shorter = devices.check_log("bob", LogBuilder("bob", ALICE).json())
        self.assertEqual(devices.compare(seen, shorter).kind, devices.REWRITTEN)
        # Re-registered from scratch with another key: entry 0 differs.
        fresh = devices.check_log("bob", LogBuilder("bob", SigningKey.generate()).json())
        self.assertEqual(devices.compare(self.seen, fresh).kind, devices.REWRITTEN)


class DirectoryTests(unittest.TestCase):
    def test_a_directory_key_the_log_does_not_hold_as_active(self):
        """The directory's keys are compared with the checked log: a key it
        lists that the log never added, or revoked, is an unknown_key notice."""
        log = devices.check_log("alice", vector_log())
        second = b64encode(bytes(SECOND.verify_key))
        honest = {"public_key": second, "keys": [{"public_key": second}]}
        self.assertEqual(devices.directory_notices(log, honest), [])
        stray = b64encode(bytes(SigningKey.generate().verify_key))
        revoked = b64encode(bytes(ALICE.verify_key))
        record = {"public_key": revoked, "keys": [{"public_key": second}, {"public_key": stray}]}
        notices = devices.directory_notices(log, record)
        self.assertEqual([n.kind for n in notices], [devices.UNKNOWN_KEY] * 2)
        self.assertIn(kid(ALICE), notices[0].text)


class SeenLogsTests(unittest.TestCase):
    def test_the_file_is_private_round_trips_and_is_per_server(self):
        """The remembered logs live in a 0600 file, load back, and are kept
        per server; a file that is not ours is refused with a clear line."""
        path = self.mktemp()
        seen = devices.SeenLogs(path)
        record = devices.Seen.of(devices.check_log("alice", vector_log()))
        seen.put(SERVER, "alice", record)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = devices.SeenLogs(path)
        self.assertEqual(again.get(SERVER, "alice"), record)
        self.assertIsNone(again.get("http://elsewhere:1", "alice"))
        Path(path).write_text("not json")
        with self.assertRaises(ValueError) as caught:
            devices.SeenLogs(path)
        self.assertIn("delete it", str(caught.exception))
        self.assertEqual(devices.seen_path("keys/a.key"), "keys/a.key.keylogs.json")

    def test_two_runs_sharing_the_file_keep_what_each_remembered(self):
        """A long run (listen) loaded the file before another run (send)
        remembered carol; listen then remembers dave: carol stays in the
        file, and listen now knows her too.  The lock file beside it is 0600."""
        path = self.mktemp()
        listen, send = devices.SeenLogs(path), devices.SeenLogs(path)
        carol = devices.Seen(3, "HEADcarol", ("k1", "k2"), {})
        dave = devices.Seen(1, "HEADdave", ("k3",), {})
        send.put(SERVER, "carol", carol)
        listen.put(SERVER, "dave", dave)
        again = devices.SeenLogs(path)
        self.assertEqual((again.get(SERVER, "carol"), again.get(SERVER, "dave")), (carol, dave))
        self.assertEqual(listen.get(SERVER, "carol"), carol)
        self.assertEqual(stat.S_IMODE(os.stat(path + ".lock").st_mode), 0o600)
        # A file that is no longer ours is left alone (kept in memory).
        Path(path).write_text("not json")
        listen.put(SERVER, "erin", dave)
        self.assertIsInstance(listen.save_error, OSError)
        self.assertEqual(Path(path).read_text(), "not json")
        self.assertEqual(listen.get(SERVER, "erin"), dave)

    def test_concurrent_processes_lose_nothing(self):
        """Four processes remembering 25 users each at the same time, each
        from a copy of the file loaded before any wrote: all 100 end up in
        the file (the lock and the re-read; without the lock some are lost)."""
        import subprocess
        import sys

        path = self.mktemp()
        script = (
            "import sys\n"
            "from wsserver import devices\n"
            "seen = devices.SeenLogs(sys.argv[1])\n"
            "sys.stdin.readline()\n"
            "for i in range(25):\n"
            "    user = f'{sys.argv[2]}{i}'\n"
            "    seen.put('http://s', user, devices.Seen(1, 'H' + user, ('k',), {}))\n"
            "assert seen.save_error is None, seen.save_error\n"
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, path, name],
                stdin=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(devices.__file__).parents[1])},
            )
            for name in "abcd"
        ]
        for proc in procs:  # all loaded (or about to): go
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            proc.stdin.close()
            self.assertEqual(proc.wait(timeout=120), 0)
        users = devices.SeenLogs(path)._data["http://s"]
        self.assertEqual(len(users), 100)

    def test_a_file_that_cannot_be_written_keeps_them_in_memory(self):
        """Where the file cannot be written, what was seen is kept for the run
        (and the error noted once) rather than failing every check."""
        seen = devices.SeenLogs(os.path.join(self.mktemp(), "missing", "a.keylogs.json"))
        record = devices.Seen.of(devices.check_log("alice", vector_log()))
        seen.put(SERVER, "alice", record)
        self.assertIsInstance(seen.save_error, OSError)
        self.assertEqual(seen.get(SERVER, "alice"), record)


class PairingTests(unittest.TestCase):
    def setUp(self):
        self.builder = LogBuilder("alice", ALICE)
        self.log = devices.check_log("alice", self.builder.json())

    def test_both_halves_make_an_entry_the_log_accepts(self):
        """The new device's pairing text, approved by the old device, is an add
        entry that checks (both signatures, seq and prev)."""
        text = keylog.pairing_text(devices.pairing_for(self.log, SECOND))
        body = devices.approve_body(self.log, keylog.parse_pairing_text(text), ALICE, "laptop")
        self.assertEqual((body["by"], body["name"], body["seq"]), (kid(ALICE), "laptop", 1))
        state = keylog.replay("alice", [keylog.entry_from_json(e) for e in self.log_entries()])
        keylog.apply(state, "alice", keylog.entry_from_json(body))
        self.assertIn(kid(SECOND), state.active)

    def log_entries(self) -> list[dict]:
        return self.builder.json()["entries"]

    def test_what_cannot_be_approved(self):
        """A text made before the log moved on, for another user, with a bad
        signature, for a key already in the log, or approved by a key that is
        not active: each is a PairingProblem saying what to do."""
        pairing = devices.pairing_for(self.log, SECOND)
        third = SigningKey.generate()
        moved = devices.check_log("alice", LogBuilder("alice", ALICE).add(third, ALICE).json())
        with self.assertRaises(devices.PairingProblem) as caught:
            devices.approve_body(moved, pairing, ALICE, None)
        self.assertIn("make a new one on the new device", str(caught.exception))
        bob_log = devices.check_log("bob", LogBuilder("bob", ALICE).json())
        with self.assertRaises(devices.PairingProblem):
            devices.approve_body(bob_log, pairing, ALICE, None)
        bad = keylog.Pairing("alice", 1, pairing.public_key, bytes(64))
        with self.assertRaises(devices.PairingProblem):
            devices.approve_body(self.log, bad, ALICE, None)
        mine = devices.pairing_for(self.log, ALICE)
        with self.assertRaises(devices.PairingProblem):
            devices.approve_body(self.log, mine, ALICE, None)
        with self.assertRaises(devices.PairingProblem):
            devices.approve_body(self.log, pairing, third, None)

    def test_revoke_and_delete_bodies(self):
        """The revoke entry checks; the last key is not revoked; the deletion
        signature is the vectors' one."""
        self.builder.add(SECOND, ALICE)
        log = devices.check_log("alice", self.builder.json())
        body = devices.revoke_body(log, kid(ALICE), SECOND)
        state = keylog.replay("alice", [keylog.entry_from_json(e) for e in log_json(log)])
        keylog.apply(state, "alice", keylog.entry_from_json(body))
        self.assertEqual(list(state.active), [kid(SECOND)])
        after = devices.check_log("alice", vector_log())
        with self.assertRaises(devices.PairingProblem):
            devices.revoke_body(after, kid(SECOND), SECOND)
        with self.assertRaises(devices.PairingProblem):
            devices.revoke_body(after, kid(ALICE), SECOND)  # already revoked
        self.assertEqual(
            devices.delete_body(after, SECOND),
            {"key_id": LOG["delete"]["key_id"], "signature": LOG["delete"]["signature"]},
        )


def log_json(log: devices.CheckedLog) -> list[dict]:
    return [keylog.entry_json(log.user_id, e) for e in log.entries]


class FakeServer:
    """Serves the key logs a test sets, in place of the HTTP API."""

    def __init__(self) -> None:
        self.logs: dict[str, dict] = {}
        self.fetches: list[str] = []

    def request(self, method: bytes, path: str, body=None, token=None):
        user = path.split("/")[3]
        self.fetches.append(user)
        return defer.succeed(json.loads(json.dumps(self.logs[user])))


def signed_frame(key: SigningKey, sender: str, msg_id: int, content: str = "hi") -> dict:
    sig = key.sign(signing_input(sender, "carol", "n1", content)).signature
    return {
        "type": "message",
        "id": msg_id,
        "from": sender,
        "to": "carol",
        "content": content,
        "nonce": "n1",
        "signature": b64encode(sig),
        "key_id": kid(key),
        "timestamp": "2026-12-07T03:00:00.000Z",
    }


class ClientNoticeTests(unittest.TestCase):
    """The library's checks on received messages, with the key logs served by
    a stand-in for the HTTP API (the end-to-end tests use a real server)."""

    def make(self, seen: devices.SeenLogs | None = None) -> tuple[wc.Client, list, list]:
        c = wc.Client(SERVER, "carol", SigningKey.generate(), seen=seen)
        c._request = self.fake.request
        got: list = []
        notices: list = []
        c.on_message = lambda frame, verified: got.append((frame["id"], verified))
        c.on_keylog_notice = notices.append
        return c, got, notices

    def setUp(self):
        self.fake = FakeServer()
        self.bob = LogBuilder("bob", ALICE)
        self.fake.logs["bob"] = self.bob.json()

    @defer.inlineCallbacks
    def test_messages_are_verified_with_the_key_their_key_id_names(self):
        """A message signed by bob's second device is verified with that key; after
        the key is revoked, an old message signed by it still verifies; a
        message whose signature is by another key than its key_id is not."""
        self.bob.add(SECOND, ALICE, "laptop")
        self.fake.logs["bob"] = self.bob.json()
        c, got, notices = self.make()
        yield c._message(signed_frame(SECOND, "bob", 1))
        yield c._message(signed_frame(ALICE, "bob", 2))
        self.bob.revoke(SECOND, ALICE)
        self.fake.logs["bob"] = self.bob.json()
        c2, got2, _ = self.make()
        yield c2._message(signed_frame(SECOND, "bob", 3))
        wrong = {**signed_frame(SECOND, "bob", 4), "key_id": kid(ALICE)}
        yield c2._message(wrong)
        self.assertEqual(got + got2, [(1, True), (2, True), (3, True), (4, False)])
        self.assertEqual(notices, [])

    @defer.inlineCallbacks
    def test_a_key_without_an_entry_is_flagged_once_looked_up_again(self):
        """A message signed by a key bob's log does not hold: the log is fetched
        once more (a device added since), then the message is not verified and
        the notice names the key; the second such message fetches nothing more."""
        c, got, notices = self.make()
        mallory = SigningKey.generate()
        yield c._message(signed_frame(mallory, "bob", 1))
        yield c._message(signed_frame(mallory, "bob", 2))
        self.assertEqual(got, [(1, False), (2, False)])
        self.assertEqual(self.fake.fetches, ["bob", "bob"])
        self.assertEqual([n.kind for n in notices], [devices.UNKNOWN_KEY] * 2)
        self.assertIn(kid(mallory), notices[0].text)

    @defer.inlineCallbacks
    def test_a_device_added_since_is_found_and_noticed(self):
        """Bob adds a device while carol listens: the first message from it makes
        the client fetch bob's log again, verify it, and say bob's devices changed."""
        c, got, notices = self.make()
        yield c._message(signed_frame(ALICE, "bob", 1))
        self.bob.add(SECOND, ALICE, "laptop")
        self.fake.logs["bob"] = self.bob.json()
        yield c._message(signed_frame(SECOND, "bob", 2))
        self.assertEqual(got, [(1, True), (2, True)])
        self.assertEqual([n.kind for n in notices], [devices.DEVICES_CHANGED])

    @defer.inlineCallbacks
    def test_a_rewritten_log_across_runs_and_a_forged_log(self):
        """What one run saw is remembered in the file; the next run, served a
        log that starts differently, reports it rewritten, verifies nothing
        from bob, and does not remember it: every later run says so again,
        until trust() accepts the log as it is (then bob's messages verify
        with it and the next run is quiet).  A log that does not check is
        reported, nothing from that user verifies, and it is not remembered."""
        path = self.mktemp()
        c, _, notices = self.make(devices.SeenLogs(path))
        yield c._message(signed_frame(ALICE, "bob", 1))
        self.assertEqual(notices, [])
        honest = devices.SeenLogs(path).get(SERVER, "bob")
        mallory = SigningKey.generate()
        self.fake.logs["bob"] = LogBuilder("bob", mallory).json()
        for msg_id in (2, 3):  # two runs
            c2, got2, notices2 = self.make(devices.SeenLogs(path))
            yield c2._message(signed_frame(mallory, "bob", msg_id))
            yield c2._message(signed_frame(mallory, "bob", msg_id + 10))
            self.assertEqual([n.kind for n in notices2], [devices.REWRITTEN])
            self.assertIn("rewritten", notices2[0].text)
            self.assertEqual(got2, [(msg_id, False), (msg_id + 10, False)])
            self.assertTrue(c2.rewritten("bob"))
            self.assertEqual(devices.SeenLogs(path).get(SERVER, "bob"), honest)
        log = yield c2.trust("bob")
        self.assertEqual(list(log.state.active), [kid(mallory)])
        self.assertFalse(c2.rewritten("bob"))
        yield c2._message(signed_frame(mallory, "bob", 4))
        self.assertEqual(got2[-1], (4, True))
        c3, got3, notices3 = self.make(devices.SeenLogs(path))
        yield c3._message(signed_frame(mallory, "bob", 5))
        self.assertEqual((got3, notices3), ([(5, True)], []))
        trusted = devices.SeenLogs(path).get(SERVER, "bob")
        forged = LogBuilder("bob", mallory).add(SECOND, mallory).json()
        forged["entries"][1]["signature"] = b64encode(bytes(64))
        self.fake.logs["bob"] = forged
        c4, got4, notices4 = self.make(devices.SeenLogs(path))
        yield c4._message(signed_frame(mallory, "bob", 6))
        self.assertEqual(got4, [(6, False)])
        self.assertEqual([n.kind for n in notices4], [devices.INVALID])
        with self.assertRaises(KeyLogError):
            yield c4.trust("bob")  # a log that does not check is never accepted
        self.assertEqual(devices.SeenLogs(path).get(SERVER, "bob"), trusted)

    @defer.inlineCallbacks
    def test_a_message_without_key_id_is_checked_with_the_registration_key_only(self):
        """A message stored before keys per device ("key_id": null) was signed,
        if at all, by the registration key: one signed by a later key of the
        log (even an active one) does not verify."""
        self.bob.add(SECOND, ALICE, "laptop")
        self.fake.logs["bob"] = self.bob.json()
        c, got, _ = self.make()
        yield c._message({**signed_frame(ALICE, "bob", 1), "key_id": None})
        yield c._message({**signed_frame(SECOND, "bob", 2), "key_id": None})
        yield c._message({**signed_frame(SECOND, "bob", 3), "key_id": 7})
        self.assertEqual(got, [(1, True), (2, False), (3, False)])


class OwnRewrittenLogTests(unittest.TestCase):
    """approve, revoke, delete_account and link sign nothing on top of this
    user's own key log when it was rewritten since this device saw it; after
    trust() they do."""

    def setUp(self):
        self.fake = FakeServer()
        self.sent: list[tuple[bytes, str]] = []
        self.fake.logs["alice"] = LogBuilder("alice", ALICE).add(SECOND, ALICE).json()

    def make(self, key: SigningKey, seen: devices.SeenLogs) -> wc.Client:
        c = wc.Client(SERVER, "alice", key, seen=seen)

        def request(method, path, body=None, token=None):
            if method != b"GET":
                self.sent.append((method, path))
                return defer.succeed({})
            return self.fake.request(method, path, body, token)

        c._request = request
        c.on_keylog_notice = lambda notice: None
        return c

    @defer.inlineCallbacks
    def test_nothing_is_signed_on_a_rewritten_own_log(self):
        seen = devices.SeenLogs()
        c = self.make(ALICE, seen)
        yield c.devices()  # seen: register, add SECOND
        third, mallory = SigningKey.generate(), SigningKey.generate()
        # The server drops SECOND's entry and slips in a key of its own.
        rewritten = LogBuilder("alice", ALICE).add(mallory, ALICE)
        self.fake.logs["alice"] = rewritten.json()
        pairing = keylog.pairing_text(
            devices.pairing_for(devices.check_log("alice", rewritten.json()), third)
        )
        attempts = (
            lambda: c.approve(pairing, "phone"),
            lambda: c.revoke(kid(mallory)),
            lambda: c.delete_account(),
            lambda: self.make(third, seen).link(),
        )
        for attempt in attempts:
            with self.assertRaises(KeyLogError) as caught:
                yield attempt()
            self.assertEqual(caught.exception.code, "keylog_rewritten")
            self.assertIn("trust alice", caught.exception.message)
        self.assertEqual(self.sent, [])
        keys = yield c.devices()  # listing signs nothing: still shown
        self.assertEqual([k["key_id"] for k in keys], [kid(ALICE), kid(mallory)])
        yield c.trust("alice")
        yield c.revoke(kid(mallory))
        self.assertEqual(self.sent, [(b"POST", "/auth/users/alice/keylog")])


class StoppedTests(unittest.TestCase):
    def test_close_4003_and_4004_give_up_with_the_reason(self):
        """A close 4003 or 4004 stops the client for good (no reconnect scheduled)
        and reports why; 4001 still reconnects."""
        for code, reason, expect in (
            (4003, "key revoked", "key_revoked"),
            (4003, "account deleted", "account_deleted"),
            (4004, "signed out", "signed_out"),
        ):
            c = wc.Client(SERVER, "carol", SigningKey.generate())
            failures: list = []
            c.on_give_up = failures.append
            c._wanted = True
            conn = wc._Conn()
            conn._was_open = True
            c._closed(conn, code, reason)
            self.assertIsNone(c._retrying)
            self.assertFalse(c._wanted)
            (err,) = failures
            self.assertEqual((err.code, err.close_code), (expect, code))
            self.assertIn(f"{code} {reason}", str(err))
            self.assertIn("not reconnecting", str(err))

    def test_the_servers_close_code_counts_when_the_close_was_not_clean(self):
        """The server's 4003 arrived but the TCP connection ended uncleanly
        (Autobahn then says 1006): the client still stops for good."""
        c = wc.Client(SERVER, "carol", SigningKey.generate())
        failures: list = []
        c.on_give_up = failures.append
        c._wanted = True
        conn = wc._Conn()
        conn.factory = type("F", (), {"_wsclient": c})()
        conn._was_open = True
        conn.remoteCloseCode, conn.remoteCloseReason = 4003, "key revoked"
        conn.onClose(False, 1006, "connection was closed uncleanly (peer did not drop)")
        self.assertIsNone(c._retrying)
        (err,) = failures
        self.assertEqual((err.code, err.close_code), ("key_revoked", 4003))


class OwnLinkTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_this_devices_own_addition_is_no_news(self):
        """A new device saw its user's log when it made the pairing text; when it
        next sees the log with only itself added, it says nothing (another
        device added besides it is still said)."""
        fake = FakeServer()
        builder = LogBuilder("bob", ALICE)
        fake.logs["bob"] = builder.json()
        me = wc.Client(SERVER, "bob", SECOND)
        me._request = fake.request
        notices: list = []
        me.on_keylog_notice = notices.append
        yield me.peer_log("bob")
        fake.logs["bob"] = builder.add(SECOND, ALICE).json()
        yield me.peer_log("bob", refresh=True)
        self.assertEqual(notices, [])
        fake.logs["bob"] = builder.add(SigningKey.generate(), ALICE).json()
        yield me.peer_log("bob", refresh=True)
        self.assertEqual([n.kind for n in notices], [devices.DEVICES_CHANGED])


class LoginChallengeTests(unittest.TestCase):
    """Login signs a login challenge for this user and nothing else: a server
    that hands out a key-log entry or a deletion statement as the "challenge"
    gets no signature on it."""

    def make(self, challenge: object) -> tuple[wc.Client, list]:
        c = wc.Client(SERVER, "alice", ALICE)
        posted: list = []

        def request(method, path, body=None, token=None):
            posted.append((path, body))
            if path == "/auth/login":
                return defer.succeed({"challenge": challenge, "expires_at": "x"})
            return defer.succeed({"token": "tok", "expires_at": "x"})

        c._request = request
        return c, posted

    @defer.inlineCallbacks
    def test_a_login_challenge_is_signed(self):
        good = "wsserver-login-v1:alice:" + "aZ09_-" * 7 + "x"
        c, posted = self.make(good)
        token = yield c.login()
        self.assertEqual(token, "tok")
        body = posted[1][1]
        self.assertEqual(body["challenge"], good)
        ALICE.verify_key.verify(good.encode(), b64decode(body["signature"]))

    @defer.inlineCallbacks
    def test_anything_else_is_refused_and_nothing_signed(self):
        head0 = keylog.digest(keylog.entry_string("alice", 0, "register", bytes(32), ""))
        mallory = bytes(SigningKey.generate().verify_key)
        nonce = "A" * 43
        for challenge in (
            keylog.entry_string("alice", 1, keylog.ADD, mallory, head0),
            keylog.delete_string("alice", 1),
            f"wsserver-login-v1:bob:{nonce}",  # another user's
            f"wsserver-login-v1:alice:{nonce[:-1]}",  # 42 characters
            f"wsserver-login-v1:alice:{nonce}A",  # 44
            f"wsserver-login-v1:alice:{nonce[:-1]}=",
            f"wsserver-login-v1:alice:{nonce}\n",
            f"wsserver-login-v1:alice:{nonce[:-1]}\u00e9",
            f"wsserver-login-v1:alice:x:{nonce}",
            f"wsserver-login-v1:alicex:{nonce}",
            None,
            ["wsserver-login-v1:alice:" + nonce],
        ):
            c, posted = self.make(challenge)
            with self.assertRaises(wc.ServerError) as caught:
                yield c.login()
            self.assertEqual(caught.exception.code, "invalid_challenge", challenge)
            self.assertIn("nothing was signed", caught.exception.message)
            self.assertEqual([p for p, _ in posted], ["/auth/login"], challenge)
            self.assertIsNone(c.token)

    @defer.inlineCallbacks
    def test_a_reconnect_that_meets_a_bad_challenge_gives_up(self):
        """Once connected, a login (after a drop or an expiry) that meets a
        challenge that is not one stops the client for good: retrying would
        only ask again."""
        c, posted = self.make(keylog.delete_string("alice", 1))
        failures: list = []
        c.on_give_up = failures.append
        c._wanted = True
        c._connected = defer.succeed(None)  # connected before
        yield c._dial()
        self.assertIsNone(c._retrying)
        (err,) = failures
        self.assertEqual(err.code, "invalid_challenge")
        self.assertEqual([p for p, _ in posted], ["/auth/login"])
