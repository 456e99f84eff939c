"""wsserver-client's key-log warnings, run as a process against a tiny fake
server that serves key logs the test forges (a real server never serves a
rewritten log: that is what the warning is for)."""

from __future__ import annotations

import json
import sys
from typing import Any

from nacl.signing import SigningKey
from twisted.internet import defer, reactor
from twisted.web import resource, server

from wsserver import client as wc
from wsserver import devices, keylog
from wsserver.messages import b64encode

from .support import within
from .test_cli import WAIT, CliCase, ServedCase, _Proc, tree_env
from .test_devices import ALICE, SECOND, LogBuilder, kid


class _KeyLogs(resource.Resource):
    """GET /auth/users/{id}/keylog from a dict the test changes; anything
    else is a 404 in wsserver's error shape."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[str, dict] = {}
        self.extra_keys: dict[str, list[str]] = {}  # keys the directory adds
        self.challenge: str | None = None  # what POST /auth/login hands out
        self.changes: list[tuple[bytes, bytes]] = []  # every request but a GET
        self.verify_bodies: list[bytes] = []  # what came to POST /auth/login?verify=true

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        parts = request.path.decode().split("/")
        if request.method != b"GET":
            self.changes.append((request.method, request.path))
        if request.path == b"/auth/login" and self.challenge is not None:
            if request.args.get(b"verify"):
                self.verify_bodies.append(request.content.read())
                return json.dumps({"token": "t", "expires_at": "2099-01-01T00:00:00Z"}).encode()
            return json.dumps({"challenge": self.challenge, "expires_at": "x"}).encode()
        if len(parts) == 5 and parts[4] == "keylog" and parts[3] in self.logs:
            return json.dumps(self.logs[parts[3]]).encode()
        if len(parts) == 4 and parts[3] in self.logs:
            return json.dumps(self.directory(parts[3])).encode()
        request.setResponseCode(404)
        return json.dumps({"error": {"code": "not_found", "message": "no such thing"}}).encode()

    def directory(self, user_id: str) -> dict:
        """GET /auth/users/{id} as the log says, plus any extra keys."""
        log = devices.check_log(user_id, self.logs[user_id])
        keys = [b64encode(raw) for raw in log.state.active.values()]
        keys += self.extra_keys.get(user_id, [])
        return {
            "user_id": user_id,
            "username": user_id.title(),
            "public_key": keys[0],
            "keys": [{"key_id": None, "public_key": k, "name": None} for k in keys],
        }


class FakeServerWarningTests(CliCase):
    def setUp(self):
        super().setUp()
        self.fake = _KeyLogs()
        port = reactor.listenTCP(0, server.Site(self.fake), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.me = SigningKey.generate()
        wc.save_key(self.me, str(self.dir / "alice.key"))
        self.fake.logs["alice"] = LogBuilder("alice", self.me).add(SECOND, self.me, "laptop").json()
        self.bob = LogBuilder("bob", ALICE)
        self.fake.logs["bob"] = self.bob.json()

    @defer.inlineCallbacks
    def test_devices_lists_and_marks_this_one(self):
        """devices prints each active key: key_id, when added, whether it is this
        device, and its name; nothing on stderr on first sight."""
        code, out, err = yield self.cli("devices")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                f"{kid(self.me)}  2026-12-07T03:00:00.000Z  this device   -",
                f"{kid(SECOND)}  2026-12-07T03:00:01.000Z  other device  laptop",
            ],
        )
        seen = devices.SeenLogs(str(self.dir / "alice.key.keylogs.json"))
        self.assertEqual(seen.get(self.url, "alice").count, 2)

    @defer.inlineCallbacks
    def test_a_name_with_control_characters_is_shown_safe(self):
        """A device name is not signed: one with terminal controls does not make
        the log fail; devices and trust show it escaped."""
        self.fake.logs["alice"]["entries"][1]["name"] = "lap\x1b]0;owned\x07top"
        for command in (("devices",), ("trust", "alice", "--yes")):
            code, out, err = yield self.cli(*command)
            self.assertEqual((code, err), (0, ""))
            self.assertIn("other device  lap\\x1b]0;owned\\x07top\n", out)
            self.assertNotIn("\x1b", out)

    @defer.inlineCallbacks
    def test_a_peer_that_adds_a_device_and_a_rewritten_log(self):
        """send looks at the recipient's log first: the first time it says
        nothing; after bob adds a device, a 'notice' line naming it; after the
        server rewrites bob's log, a 'warning' line saying so."""
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertNotIn("key log", err)
        self.bob.add(SECOND, ALICE, "phone")
        self.fake.logs["bob"] = self.bob.json()
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertIn(
            f"wsserver-client: notice: bob's devices changed since you last saw them: "
            f"added {kid(SECOND)} (phone)\n",
            err,
        )
        other = SigningKey.generate()
        self.fake.logs["bob"] = LogBuilder("bob", other).add(SECOND, other, "tablet").json()
        # Not remembered: said on every run until the person accepts it.
        for _ in range(2):
            _, _, err = yield self.cli("send", "--to", "bob", "hi")
            self.assertIn("wsserver-client: warning: bob's key log was rewritten", err)
        listed = [
            f"{kid(other)}  2026-12-07T03:00:00.000Z  -",
            f"{kid(SECOND)}  2026-12-07T03:00:01.000Z  tablet",
        ]
        # Without --yes and without a terminal: it shows, accepts nothing.
        code, out, err = yield self.cli("trust", "bob")
        self.assertEqual((code, out.splitlines()), (1, listed))
        self.assertOneHumanLine(err, "nothing accepted", "--yes")
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertIn("wsserver-client: warning: bob's key log was rewritten", err)
        code, out, err = yield self.cli("trust", "bob", "--yes")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                *listed,
                "trusted bob's key log as it is now (2 entries, 2 active keys): "
                "it is what this device compares with from now on",
            ],
        )
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertNotIn("key log", err)

    @defer.inlineCallbacks
    def test_trust_on_a_terminal_asks(self):
        """On a terminal trust shows the devices and asks: anything but yes
        accepts nothing (exit 1, the warning stays); yes accepts."""
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.fake.logs["bob"] = LogBuilder("bob", SigningKey.generate()).json()

        def on_terminal(answer: bytes) -> _Proc:
            proc = _Proc()
            env = tree_env(WSSERVER_URL=self.url, WSSERVER_USER="alice")
            argv = [sys.executable, "-m", "wsserver.cli", "trust", "bob"]
            proc.transport = reactor.spawnProcess(
                proc, sys.executable, argv, env=env, path=str(self.dir), usePTY=True
            )
            proc.transport.write(answer)
            return proc

        proc = on_terminal(b"y\n")
        self.assertEqual((yield within(proc.ended, WAIT)), 1)
        self.assertIn(b"Type yes to trust", proc.out)
        self.assertIn(b"not confirmed: nothing accepted", proc.out)
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertIn("warning: bob's key log was rewritten", err)
        proc = on_terminal(b"yes\n")
        self.assertEqual((yield within(proc.ended, WAIT)), 0, proc.out)
        self.assertIn(b"trusted bob's key log", proc.out)
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertNotIn("key log", err)

    @defer.inlineCallbacks
    def test_a_key_in_the_directory_without_an_entry(self):
        """The key directory lists a key for bob that his checked log does not
        hold: send says so in a warning naming the key (and devices does for
        one's own account)."""
        mallory = SigningKey.generate()
        self.fake.extra_keys["bob"] = [b64encode(bytes(mallory.verify_key))]
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertIn(
            f"wsserver-client: warning: the key directory lists key {kid(mallory)} for bob, "
            "which bob's key log does not hold as active",
            err,
        )
        self.fake.extra_keys["alice"] = [b64encode(bytes(mallory.verify_key))]
        code, _, err = yield self.cli("devices")
        self.assertEqual(code, 0, err)
        self.assertIn(f"warning: the key directory lists key {kid(mallory)} for alice", err)

    @defer.inlineCallbacks
    def test_a_forged_log_is_a_warning_every_time(self):
        """A log that does not check is a warning each time it is served and is
        never remembered; devices refuses to work from one (exit 1)."""
        forged = self.bob.add(SECOND, ALICE).json()
        forged["entries"][1]["key_signature"] = forged["entries"][1]["signature"]
        self.fake.logs["bob"] = forged
        for _ in range(2):
            _, _, err = yield self.cli("send", "--to", "bob", "hi")
            self.assertIn("wsserver-client: warning: bob's key log does not check", err)
        code, out, err = yield self.cli("trust", "bob", "--yes")  # never accepted
        self.assertEqual((code, out), (1, ""))
        self.assertOneHumanLine(err, "invalid_signature")
        self.fake.logs["alice"] = forged | {"user_id": "alice"}
        code, out, err = yield self.cli("devices")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("does not check", err)
        self.assertIn("invalid_", err)

    @defer.inlineCallbacks
    def test_approve_revoke_delete_refuse_a_rewritten_own_log(self):
        """When alice's own log was rewritten since this device saw it, approve,
        revoke and delete-account sign nothing (one line naming trust, exit
        1); devices still lists (with the warning); after trust they proceed
        as far as this fake server lets them."""
        code, _, err = yield self.cli("devices")
        self.assertEqual(code, 0, err)
        mallory = SigningKey.generate()
        rewritten = LogBuilder("alice", self.me).add(mallory, self.me, "laptop")
        self.fake.logs["alice"] = rewritten.json()
        for command in (("revoke", kid(mallory)), ("delete-account", "--yes")):
            code, out, err = yield self.cli(*command)
            self.assertEqual((code, out), (1, ""), command)
            self.assertIn("warning: alice's key log was rewritten", err)
            last = err.strip().splitlines()[-1]
            self.assertOneHumanLine(last, "keylog_rewritten", "trust alice")
        code, out, err = yield self.cli("devices")
        self.assertEqual(code, 0, err)
        self.assertIn("warning: alice's key log was rewritten", err)
        self.assertIn(kid(mallory), out)
        self.assertEqual(self.fake.changes, [])
        code, out, err = yield self.cli("trust", "alice", "--yes")
        self.assertEqual(code, 0, err)
        self.assertIn(f"{kid(mallory)}  2026-12-07T03:00:01.000Z  other device  laptop", out)
        code, out, err = yield self.cli("revoke", kid(mallory))
        self.assertEqual((code, out.strip(), err), (0, f"revoked {kid(mallory)}", ""))
        self.assertEqual(self.fake.changes, [(b"POST", b"/auth/users/alice/keylog")])

    @defer.inlineCallbacks
    def test_login_refuses_to_sign_what_is_not_a_login_challenge(self):
        """A server that hands out a key-log entry string as the login
        challenge (to get this key's signature on an entry adding its own
        key) gets one line, exit 1, and no signature."""
        mallory = SigningKey.generate()
        head = devices.check_log("alice", self.fake.logs["alice"]).state.head
        self.fake.challenge = keylog.entry_string(
            "alice", 2, keylog.ADD, bytes(mallory.verify_key), head
        )
        for command in (("login",), ("send", "--to", "bob", "hi")):
            code, out, err = yield self.cli(*command)
            self.assertEqual((code, out), (1, ""))
            self.assertOneHumanLine(err, "invalid_challenge", "nothing was signed")
        self.assertEqual(self.fake.verify_bodies, [])
        self.fake.challenge = "wsserver-login-v1:alice:" + "A" * 43
        code, out, err = yield self.cli("login")
        self.assertEqual((code, out.strip()), (0, "t"), err)
        self.assertEqual(len(self.fake.verify_bodies), 1)


class DevicesEndToEndTests(ServedCase):
    """Two devices of alice (alice.key, and second.key linked from it) and a
    peer, bob, all as real processes against a real server."""

    @defer.inlineCallbacks
    def ok(self, *args: str, user: str = "alice") -> Any:
        code, out, err = yield self.cli(*args, user=user)
        self.assertEqual(code, 0, err)
        return out

    @defer.inlineCallbacks
    def register(self, user: str) -> Any:
        yield self.ok("keygen", user=user)
        yield self.ok("register", "--name", user.title(), user=user)

    @defer.inlineCallbacks
    def link_second(self) -> Any:
        """Link second.key to alice from alice.key; the key_id both printed."""
        out = yield self.ok("--key", "second.key", "link")
        text, key_line = out.splitlines()
        self.assertTrue(text.startswith("wsserver-pair-v1:alice:"), out)
        second_id = key_line.removeprefix("key_id ")
        self.assertEqual(second_id, devices.own_key_id(wc.load_key(str(self.dir / "second.key"))))
        code, out, err = yield self.cli("approve", text, "--name", "laptop")
        self.assertEqual((code, out.strip()), (0, f"added {second_id}"), err)
        # The approving device made the change: it is no news to it.
        self.assertNotIn("notice", err)
        return second_id

    @defer.inlineCallbacks
    def test_link_approve_then_the_second_device_signs_and_is_verified(self):
        """A second device is linked and approved; it logs in with its own key
        and sends a signed message that alice's first device sees verified
        with the second key's key_id; devices lists both and marks this one."""
        yield self.register("alice")
        first_id = devices.own_key_id(wc.load_key(str(self.dir / "alice.key")))
        listen = self.spawn("listen", "--json")
        yield listen.err_line("listening as alice")
        second_id = yield self.link_second()
        out = yield self.ok("--key", "second.key", "send", "--to", "alice", "from the laptop")
        msg_id = int(out.split()[0])
        frame = json.loads((yield within(listen.lines.get(), WAIT)))
        self.assertEqual(
            (frame["id"], frame["key_id"], frame["verified_locally"]), (msg_id, second_id, True)
        )
        out = yield self.ok("--key", "second.key", "devices")
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        self.assertRegex(lines[0], rf"^{first_id}  \S+Z  other device  -$")
        self.assertRegex(lines[1], rf"^{second_id}  \S+Z  this device   laptop$")
        out = yield self.ok("devices")
        self.assertIn(f"{first_id}  ", out.splitlines()[0])
        self.assertIn("this device", out.splitlines()[0])
        # Linking a key that is already a device: says so, changes nothing.
        code, _, err = yield self.cli("--key", "second.key", "link")
        self.assertEqual(code, 0, err)
        self.assertIn("already one of alice's devices", err)

    @defer.inlineCallbacks
    def test_an_old_pairing_text_is_refused_with_what_to_do(self):
        """A pairing text made before another device was added: approve says the
        log changed and to make a new one; nothing is appended."""
        yield self.register("alice")
        out = yield self.ok("--key", "late.key", "link")
        stale = out.splitlines()[0]
        yield self.link_second()
        code, _, err = yield self.cli("approve", stale, "--name", "old")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "the key log changed since this pairing text was made")
        log = yield self.server.store.key_log("alice")
        self.assertEqual(len(log), 2)

    @defer.inlineCallbacks
    def test_revoking_the_second_device_stops_its_listen_with_4003(self):
        """Revoked from the first device, the second's listen stops with one line
        naming 4003 and the revocation (exit 1, no reconnect) and it can no
        longer log in; its earlier message still verifies for alice."""
        yield self.register("alice")
        second_id = yield self.link_second()
        yield self.ok("--key", "second.key", "send", "--to", "alice", "before revoking")
        listen = self.spawn("--key", "second.key", "listen")
        yield listen.err_line("listening as alice")
        code, out, err = yield self.cli("revoke", second_id)
        self.assertEqual((code, out.strip()), (0, f"revoked {second_id}"), err)
        self.assertNotIn("notice", err)  # its own change is no news to it
        code = yield within(listen.ended, WAIT)
        self.assertEqual(code, 1)
        last = listen.err.decode().strip().splitlines()[-1]
        self.assertIn("4003", last, listen.err.decode())
        self.assertOneHumanLine(last, "4003", "revoked", "not reconnecting")
        self.assertNotIn("reconnecting in", listen.err.decode())
        code, _, err = yield self.cli("--key", "second.key", "login")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "invalid_signature")
        replay = self.spawn("listen", "--json", "--since", "0")
        frame = json.loads((yield within(replay.lines.get(), WAIT)))
        self.assertEqual((frame["content"], frame["key_id"]), ("before revoking", second_id))
        self.assertIs(frame["verified_locally"], True)

    @defer.inlineCallbacks
    def test_logout(self):
        """logout --token signs out that token (a connection with it closes with
        4004); plain logout without a token is a usage error; logout --all
        stops every listen of the user with 4004 (exit 1, no reconnect)."""
        yield self.register("alice")
        code, _, err = yield self.cli("logout")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "--token", "--all")
        token = (yield self.ok("login")).strip()
        out = yield self.ok("logout", "--token", token)
        self.assertEqual(out.strip(), "signed out")
        code, _, err = yield self.cli("logout", "--token", token)
        self.assertEqual(code, 1)  # already signed out: refused like an expired one
        listen = self.spawn("listen")
        yield listen.err_line("listening as alice")
        out = yield self.ok("logout", "--all")
        self.assertEqual(out.strip(), "signed out everywhere")
        code = yield within(listen.ended, WAIT)
        self.assertEqual(code, 1)
        last = listen.err.decode().strip().splitlines()[-1]
        self.assertOneHumanLine(last, "4004", "signed out", "not reconnecting")
        yield self.ok("send", "--to", "alice", "a new session works")

    @defer.inlineCallbacks
    def test_delete_account(self):
        """delete-account without --yes and without a terminal deletes nothing;
        with --yes it deletes the account (a listen stops with 4003), and the id
        cannot be registered again (user_exists)."""
        yield self.register("alice")
        code, _, err = yield self.cli("delete-account")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "--yes")
        self.assertIsNotNone((yield self.server.store.get_user("alice")))
        listen = self.spawn("listen")
        yield listen.err_line("listening as alice")
        out = yield self.ok("delete-account", "--yes")
        self.assertEqual(out.strip(), "deleted alice")
        code = yield within(listen.ended, WAIT)
        self.assertEqual(code, 1)
        last = listen.err.decode().strip().splitlines()[-1]
        self.assertOneHumanLine(last, "4003 account deleted", "not reconnecting")
        self.assertNotIn("reconnecting in", listen.err.decode())
        self.assertIsNone((yield self.server.store.get_user("alice")))
        code, _, err = yield self.cli("--key", "again.key", "register", "--name", "Alice")
        self.assertIn("no key file", err)
        yield self.ok("--key", "again.key", "keygen")
        code, _, err = yield self.cli("--key", "again.key", "register", "--name", "Alice")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "user_exists")

    @defer.inlineCallbacks
    def test_listen_notices_a_peer_adding_a_device(self):
        """bob listens; alice writes from her first device, then links a second
        and writes from it: bob's listen verifies both and says once on stderr
        that alice's devices changed, naming the new key."""
        yield self.register("alice")
        yield self.register("bob")
        listen = self.spawn("listen", user="bob")
        yield listen.err_line("listening as bob")
        yield self.ok("send", "--to", "bob", "from the desktop")
        line = yield within(listen.lines.get(), WAIT)
        self.assertIn("alice [verified]", line)
        second_id = yield self.link_second()
        yield self.ok("--key", "second.key", "send", "--to", "bob", "from the laptop")
        line = yield listen.err_line("notice:")
        self.assertEqual(
            line,
            f"wsserver-client: notice: alice's devices changed since you last saw them: "
            f"added {second_id} (laptop)",
        )
        line = yield within(listen.lines.get(), WAIT)
        self.assertIn("alice [verified]", line)
        self.assertIn("from the laptop", line)
        self.assertNotIn("warning:", listen.err.decode())  # a real server's logs check

    @defer.inlineCallbacks
    def test_delete_account_on_a_terminal_asks_for_the_user_id(self):
        """On a terminal delete-account asks to type the user id: anything else
        deletes nothing (exit 1); the id itself deletes the account."""
        yield self.register("alice")

        def on_terminal(answer: bytes) -> _Proc:
            proc = _Proc()
            env = tree_env(WSSERVER_URL=self.url, WSSERVER_USER="alice")
            argv = [sys.executable, "-m", "wsserver.cli", "delete-account"]
            proc.transport = reactor.spawnProcess(
                proc, sys.executable, argv, env=env, path=str(self.dir), usePTY=True
            )
            proc.transport.write(answer)
            return proc

        proc = on_terminal(b"alicE\n")
        self.assertEqual((yield within(proc.ended, WAIT)), 1)
        self.assertIn(b"Type the user id to confirm", proc.out)
        self.assertIn(b"not confirmed: nothing was deleted", proc.out)
        self.assertIsNotNone((yield self.server.store.get_user("alice")))
        proc = on_terminal(b"alice\n")
        self.assertEqual((yield within(proc.ended, WAIT)), 0, proc.out)
        self.assertIn(b"deleted alice", proc.out)
        self.assertIsNone((yield self.server.store.get_user("alice")))
