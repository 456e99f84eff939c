"""wsserver-client's key-log warnings, run as a process against a tiny fake
server that serves key logs the test forges (a real server never serves a
rewritten log: that is what the warning is for)."""

from __future__ import annotations

import json

from nacl.signing import SigningKey
from twisted.internet import defer, reactor
from twisted.web import resource, server

from wsserver import client as wc
from wsserver import devices

from .test_cli import CliCase
from .test_devices import ALICE, SECOND, LogBuilder, kid


class _KeyLogs(resource.Resource):
    """GET /auth/users/{id}/keylog from a dict the test changes; anything
    else is a 404 in wsserver's error shape."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[str, dict] = {}

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        parts = request.path.decode().split("/")
        if len(parts) == 5 and parts[4] == "keylog" and parts[3] in self.logs:
            return json.dumps(self.logs[parts[3]]).encode()
        request.setResponseCode(404)
        return json.dumps({"error": {"code": "not_found", "message": "no such thing"}}).encode()


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
        self.fake.logs["bob"] = LogBuilder("bob", SigningKey.generate()).json()
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertIn("wsserver-client: warning: bob's key log was rewritten", err)
        # Seen once, said once: the next look is quiet.
        _, _, err = yield self.cli("send", "--to", "bob", "hi")
        self.assertNotIn("key log", err)

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
        self.fake.logs["alice"] = forged | {"user_id": "alice"}
        code, out, err = yield self.cli("devices")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("does not check", err)
        self.assertIn("invalid_", err)
