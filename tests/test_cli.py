"""wsserver-client, run as a process against the real server."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from wsserver import client as wc

from .support import LiveServer, within


class _Proc(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.lines: defer.DeferredQueue = defer.DeferredQueue()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for line in data.decode().splitlines():
            self.lines.put(line)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", 0))


class CliTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.server = LiveServer(self)
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()

    def spawn(self, *args: str, user: str = "alice") -> _Proc:
        proc = _Proc()
        env = {**os.environ, "WSSERVER_URL": self.server.base, "WSSERVER_USER": user}
        transport = reactor.spawnProcess(
            proc,
            sys.executable,
            [sys.executable, "-m", "wsserver.cli", *args],
            env=env,
            path=str(self.dir),
        )
        proc.transport = transport

        def stop():
            if not proc.ended.called:
                transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(stop)
        return proc

    @defer.inlineCallbacks
    def cli(self, *args: str, user: str = "alice"):
        proc = self.spawn(*args, user=user)
        code = yield within(proc.ended, 30)
        return code, proc.out.decode(), proc.err.decode()

    @defer.inlineCallbacks
    def test_keygen_register_login_send(self):
        """keygen writes a 0600 key and refuses to overwrite it; register, login and
        send work and print what they did."""
        code, out, _ = yield self.cli("keygen")
        self.assertEqual(code, 0)
        key = wc.load_key(str(self.dir / "alice.key"))
        self.assertEqual(out.strip(), wc.public_key_b64(key))
        self.assertEqual(stat.S_IMODE(os.stat(self.dir / "alice.key").st_mode), 0o600)
        code, _, err = yield self.cli("keygen")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        self.assertEqual(bytes(wc.load_key(str(self.dir / "alice.key"))), bytes(key))
        code, out, _ = yield self.cli("register", "--name", "Alice")
        self.assertEqual(code, 0, out)
        code, out, _ = yield self.cli("login")
        self.assertEqual((code, out.count(".")), (0, 2))
        code, out, _ = yield self.cli("send", "--to", "alice", "note to self")
        msg_id, status = out.split()
        self.assertEqual((code, status), (0, "delivered"))
        stored = yield self.server.service.store.get_message(int(msg_id))
        self.assertEqual((stored.content, stored.verification), ("note to self", "verified"))

    @defer.inlineCallbacks
    def test_server_errors_are_one_line_and_exit_1(self):
        """A refusal prints one line with the server's code and exits 1."""
        yield self.cli("keygen")
        yield self.cli("register", "--name", "Alice")
        code, _out, err = yield self.cli("register", "--name", "Again")
        self.assertEqual(code, 1)
        self.assertEqual(
            err.strip(), "wsserver-client: user_exists: user_id 'alice' is already registered"
        )
        code, _, err = yield self.cli("send", "--to", "nobody", "x")
        self.assertEqual(
            (code, err.strip()), (1, "wsserver-client: unknown_recipient: no such recipient")
        )
        code, _, err = yield self.cli("login", user="carol")
        self.assertEqual(code, 1)
        self.assertIn("keygen", err)

    @defer.inlineCallbacks
    def test_listen_json_and_chat(self):
        """listen --json prints each frame with verified_locally; chat sends typed
        lines and shows replies, marked verified."""
        for user in ("alice", "bob"):
            yield self.cli("keygen", user=user)
            yield self.cli("register", "--name", user.title(), user=user)
        listen = self.spawn("listen", "--json", user="bob")
        yield task.deferLater(reactor, 1.0, lambda: None)
        yield self.cli("send", "--to", "bob", "hello bob")
        line = yield within(listen.lines.get(), 15)
        frame = json.loads(line)
        self.assertEqual((frame["type"], frame["content"]), ("message", "hello bob"))
        self.assertIs(frame["verified_locally"], True)

        chat = self.spawn("chat", "--to", "alice", user="bob")
        banner = yield within(chat.lines.get(), 15)
        self.assertIn("chatting with alice", banner)
        chat.transport.write(b"hi alice\n")
        echo = yield within(chat.lines.get(), 15)
        self.assertRegex(echo, r"\(#\d+ (pending|delivered)\)")
        yield self.cli("send", "--to", "bob", "hi bob", user="alice")
        seen = []
        while not any("hi bob" in s for s in seen):
            seen.append((yield within(chat.lines.get(), 15)))
        reply = next(s for s in seen if "hi bob" in s)
        self.assertIn("alice", reply)
        self.assertIn("[verified]", reply)
        chat.transport.closeStdin()
        code = yield within(chat.ended, 15)
        self.assertEqual(code, 0)
        stored = yield self.server.service.store.count_messages()
        self.assertEqual(stored, 3)  # hello bob, hi alice, hi bob
