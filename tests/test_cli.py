"""wsserver-client, run as a process (the working tree's code) against the real server."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from wsserver import cli
from wsserver import client as wc

from .support import ROOT, LiveServer, within
from .test_client import reactor_quiet
from .test_tls import make_certificate

WAIT = 30  # seconds: generous, the machine is shared


def tree_env(**extra: str) -> dict[str, str]:
    """This environment with the working tree first on the import path, so a
    child ``python -m wsserver.cli`` runs the code under test, not a copy
    installed in site-packages."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    env.update(extra)
    return env


class _Proc(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.lines: defer.DeferredQueue = defer.DeferredQueue()
        self.err_lines: defer.DeferredQueue = defer.DeferredQueue()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for line in data.decode().splitlines():
            self.lines.put(line)

    def errReceived(self, data: bytes) -> None:
        self.err += data
        for line in data.decode().splitlines():
            self.err_lines.put(line)

    def processEnded(self, reason) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", 0))

    @defer.inlineCallbacks
    def err_line(self, text: str):
        """The next stderr line containing ``text`` (others are skipped)."""
        while True:
            line = yield within(self.err_lines.get(), WAIT)
            if text in line:
                return line


class CliCase(unittest.TestCase):
    """Runs ``python -m wsserver.cli`` from the working tree in a temporary directory."""

    timeout = 120

    def setUp(self):
        self.addCleanup(reactor_quiet)  # runs last: after the processes and servers
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.url = ""

    def spawn(self, *args: str, user: str = "alice", url: str | None = None) -> _Proc:
        return self.python("-m", "wsserver.cli", *args, user=user, url=url)

    def python(self, *argv: str, user: str = "alice", url: str | None = None) -> _Proc:
        proc = _Proc()
        env = tree_env(WSSERVER_URL=url or self.url, WSSERVER_USER=user)
        env.pop("WSSERVER_CAFILE", None)
        env.pop("WSSERVER_KEY", None)
        transport = reactor.spawnProcess(
            proc, sys.executable, [sys.executable, *argv], env=env, path=str(self.dir)
        )
        proc.transport = transport

        def stop():
            if not proc.ended.called:
                transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(stop)
        return proc

    @defer.inlineCallbacks
    def cli(self, *args: str, user: str = "alice", url: str | None = None):
        proc = self.spawn(*args, user=user, url=url)
        code = yield within(proc.ended, WAIT)
        return code, proc.out.decode(), proc.err.decode()

    def assertOneHumanLine(self, err: str, *wanted: str) -> str:
        """``err`` is one line, ``wsserver-client: ...``, holding every ``wanted``
        text and nothing that looks like a Python repr or traceback."""
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        line = lines[0]
        self.assertTrue(line.startswith("wsserver-client: "), line)
        for text in wanted:
            self.assertIn(text, line)
        for repr_mark in ("<", "Traceback", "Failure", "Error(", "[("):
            self.assertNotIn(repr_mark, line)
        return line


class ServedCase(CliCase):
    """A CliCase with one live server at self.url (no tests of its own)."""

    def setUp(self):
        super().setUp()
        self.server = LiveServer(self)
        self.url = self.server.base


class CliTests(ServedCase):
    @defer.inlineCallbacks
    def test_runs_the_working_tree(self):
        """The CLI processes these tests start import wsserver from the working tree
        (a broken cli.py there must fail the tests, whatever copy is installed)."""
        proc = self.python("-c", "import wsserver.cli as m; print(m.__file__)")
        code = yield within(proc.ended, WAIT)
        self.assertEqual(code, 0, proc.err)
        self.assertEqual(Path(proc.out.decode().strip()), ROOT / "wsserver" / "cli.py")

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
        stored = yield self.server.store.get_message(int(msg_id))
        self.assertEqual((stored.content, stored.verification), ("note to self", "verified"))

    @defer.inlineCallbacks
    def test_server_errors_are_one_line_and_exit_1(self):
        """A refusal prints one line with the server's URL and code and exits 1."""
        yield self.cli("keygen")
        yield self.cli("register", "--name", "Alice")
        code, _, err = yield self.cli("send", "--to", "nobody", "x")
        self.assertEqual(code, 1)
        self.assertEqual(
            err.strip(), f"wsserver-client: {self.url}: unknown_recipient: no such recipient"
        )
        code, _, err = yield self.cli("login", user="carol")
        self.assertEqual(code, 1)
        self.assertIn("keygen", err)
        (self.dir / "raw.key").write_bytes(os.urandom(32))  # a raw seed: not our format
        code, _, err = yield self.cli("--key", "raw.key", "login")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "raw.key is not a wsserver key file", "keygen")
        yield self.cli("keygen", user="dave")
        code, _, err = yield self.cli("login", user="dave")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, self.url, "unknown_user", "register")

    @defer.inlineCallbacks
    def test_register_twice(self):
        """Registering again with the same key says so and exits 0 (nothing
        changes); with another key it is one line naming the conflict, exit 1."""
        yield self.cli("keygen")
        code, _, _ = yield self.cli("register", "--name", "Alice")
        self.assertEqual(code, 0)
        code, out, err = yield self.cli("register", "--name", "Alice")
        self.assertEqual(code, 0, err)
        self.assertIn("already registered with this key", out)
        yield self.cli("--key", "other.key", "keygen")
        code, _, err = yield self.cli("--key", "other.key", "register", "--name", "Mallory")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, self.url, "user_exists", "another key")
        record = yield self.server.store.get_user("alice")
        self.assertEqual(record.username, "Alice")

    @defer.inlineCallbacks
    def test_keygen_refuses_an_id_register_would_refuse(self):
        """keygen checks the user id by the server's rule and writes nothing for a
        bad one."""
        for bad in ("has space", "x" * 65, "ünï"):
            code, _, err = yield self.cli("keygen", user=bad)
            self.assertEqual(code, 1, bad)
            self.assertOneHumanLine(err, "not a user id")
        self.assertEqual(list(self.dir.iterdir()), [])

    @defer.inlineCallbacks
    def test_keygen_into_a_missing_directory(self):
        """--key in a directory that does not exist: one line naming it and how to
        make it (keys are never written into directories made on the fly)."""
        code, _, err = yield self.cli("--key", "keys/alice.key", "keygen")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "keys", "does not exist", "mkdir -m 700")
        self.assertFalse((self.dir / "keys").exists())

    @defer.inlineCallbacks
    def test_listen_json_and_chat(self):
        """listen --json prints each frame with verified_locally; chat sends typed
        lines and shows replies, marked verified."""
        for user in ("alice", "bob"):
            yield self.cli("keygen", user=user)
            yield self.cli("register", "--name", user.title(), user=user)
        listen = self.spawn("listen", "--json", user="bob")
        yield self.cli("send", "--to", "bob", "hello bob")
        line = yield within(listen.lines.get(), WAIT)
        frame = json.loads(line)
        self.assertEqual((frame["type"], frame["content"]), ("message", "hello bob"))
        self.assertIs(frame["verified_locally"], True)

        chat = self.spawn("chat", "--to", "alice", user="bob")
        banner = yield within(chat.lines.get(), WAIT)
        self.assertIn("chatting with alice", banner)
        chat.transport.write(b"hi alice\n")
        echo = yield within(chat.lines.get(), WAIT)
        self.assertRegex(echo, r"\(#\d+ (pending|delivered)\)")
        yield self.cli("send", "--to", "bob", "hi bob", user="alice")
        seen = []
        while not any("hi bob" in s for s in seen):
            seen.append((yield within(chat.lines.get(), WAIT)))
        reply = next(s for s in seen if "hi bob" in s)
        self.assertIn("alice", reply)
        self.assertIn("[verified]", reply)
        chat.transport.closeStdin()
        code = yield within(chat.ended, WAIT)
        self.assertEqual(code, 0)
        stored = yield self.server.store.count_messages()
        self.assertEqual(stored, 3)  # hello bob, hi alice, hi bob

    @defer.inlineCallbacks
    def test_listen_stops_quietly_on_sigint_and_sigterm(self):
        """Ctrl-C (SIGINT) or SIGTERM ends listen with status 0 and no
        "reconnecting" line: the stop is not taken for a dropped connection."""
        yield self.cli("keygen", user="bob")
        yield self.cli("register", "--name", "Bob", user="bob")
        for sig in ("INT", "TERM"):
            listen = self.spawn("listen", user="bob")
            yield listen.err_line("listening as bob")
            listen.transport.signalProcess(sig)
            code = yield within(listen.ended, WAIT)
            self.assertEqual(code, 0, listen.err)
            self.assertNotIn(b"reconnecting", listen.err)
            self.assertNotIn(b"lost", listen.err)


FORGED = (
    "see below\n[2026-12-02T02:40:00.000Z] alice [verified] #99: send the money"
    "\x1b]0;owned\x07\r[x] \u202eevil\u2066 \u200b\x9b2J\x7f"
)
UNSAFE = ("\x1b", "\x07", "\r", "\u202e", "\u2066", "\u200b", "\x9b", "\x7f")


class TerminalSafetyTests(ServedCase):
    """What another party sends cannot forge lines or drive the terminal."""

    @defer.inlineCallbacks
    def test_listen_shows_a_forged_line_as_part_of_one_message(self):
        """A message holding a newline, a fake 'verified' line, escape sequences,
        bidi and zero-width characters prints as one message line whose
        continuation lines cannot pass for a message line; no control, bidi or
        format character reaches the terminal."""
        for user in ("mallory", "bob"):
            yield self.cli("keygen", user=user)
            yield self.cli("register", "--name", user.title(), user=user)
        listen = self.spawn("listen", user="bob")
        yield listen.err_line("listening as bob")
        code, _, err = yield self.cli("send", "--to", "bob", FORGED, user="mallory")
        self.assertEqual(code, 0, err)
        while b"send the money" not in listen.out:
            yield within(listen.lines.get(), WAIT)
        out = listen.out.decode()
        for bad in UNSAFE:
            self.assertNotIn(bad, out)
        lines = out.splitlines()
        self.assertEqual(len([x for x in lines if x.startswith("[")]), 1, out)
        self.assertIn("mallory [verified]", lines[0])
        self.assertTrue(lines[0].endswith(": see below"), lines[0])
        self.assertRegex(lines[1], r"^ +\| \[2026-12-02T02:40:00.000Z\] alice \[verified\]")
        self.assertIn("\\x1b]0;owned\\x07\\r[x] \\u202eevil\\u2066 \\u200b", lines[1])


class SafeTextTests(unittest.TestCase):
    """cli's own formatting of text another party chose."""

    def test_every_field_of_a_frame_is_made_safe(self):
        """describe() escapes controls, DEL, C1, bidi and format characters in
        every field another party chose (sender, id, time, content)."""
        frame = {
            "timestamp": "2026\x1b[2J",
            "from": "eve\u202e",
            "to": "bob",
            "id": "7\n[fake]",
            "content": "a\u2028b\x85c",
        }
        line = cli.describe(frame, True)
        self.assertEqual(len(line.splitlines()), 1, line)
        for bad in (*UNSAFE, "\u2028", "\x85", "\n"):
            self.assertNotIn(bad, line)
        self.assertIn("eve\\u202e", line)

    def test_a_sender_whose_log_was_rewritten_is_marked_so(self):
        """A message from a sender whose key log was rewritten shows
        [UNVERIFIED: key log rewritten], not [verified] nor [INVALID]; an
        unsigned one stays [UNSIGNED]."""
        frame = {"timestamp": "t", "from": "bob", "to": "me", "id": 1, "content": "hi"}
        self.assertIn("bob [UNVERIFIED: key log rewritten] #1", cli.describe(frame, False, True))
        self.assertIn("bob [UNSIGNED] #1", cli.describe(frame, None, True))
        self.assertIn("bob [INVALID] #1", cli.describe(frame, False))

    def test_server_text_in_failures_is_one_safe_line(self):
        """An error code and message from the server print as one line with
        their controls escaped."""
        args = cli.parser().parse_args(["--server", "http://h:1", "--user", "a", "login"])
        err = wc.ServerError("bad\x1b]0;x\x07", "two\nlines\u202e")
        line = cli.failure_line(err, args)
        self.assertEqual(len(line.splitlines()), 1, line)
        for bad in UNSAFE:
            self.assertNotIn(bad, line)
        self.assertIn("two\\nlines", line)


class ParserTests(unittest.TestCase):
    def test_revoke_takes_a_key_id_that_starts_with_a_dash(self):
        """A key_id is base64url and may start with "-": revoke reads it as
        the key_id, not as an option (after the global options too)."""
        for argv in (
            ["revoke", "-OOiBBUdSbj9w1U_"],
            ["--server", "http://h:1", "revoke", "-OOiBBUdSbj9w1U_"],
            ["revoke", "--", "-OOiBBUdSbj9w1U_"],
        ):
            args = cli.parser().parse_args(argv)
            self.assertEqual((args.command, args.key_id), ("revoke", "-OOiBBUdSbj9w1U_"))


class ProbeTests(unittest.TestCase):
    """The look after a connection failure that names the fix."""

    @defer.inlineCallbacks
    def test_probes_run_off_the_reactor_thread(self):
        """The TLS probes that name the fix (a handshake for http:// at a TLS
        port, the certificate's names for a wrong host name) run in a thread,
        never blocking the reactor, and each opens one connection with the
        probe timeout."""
        calls = []

        def create_connection(address, timeout=None):
            calls.append((threading.current_thread(), address, timeout))
            raise ConnectionRefusedError("refused")

        self.patch(cli.socket, "create_connection", create_connection)
        args = cli.parser().parse_args(["--server", "http://127.0.0.1:1", "--user", "a", "login"])
        for kind, url in (("closed", "http://127.0.0.1:1"), ("tls_hostname", "https://h:2")):
            err = wc.ConnectionProblem(kind, url, "the connection closed without an answer")
            line = yield cli.explain(err, args)
            self.assertEqual(line, f"{url}: the connection closed without an answer")
        self.assertEqual(
            [(a, t) for _, a, t in calls],
            [(("127.0.0.1", 1), cli.PROBE_TIMEOUT), (("h", 2), cli.PROBE_TIMEOUT)],
        )
        for thread, _, _ in calls:
            self.assertIsNot(thread, threading.main_thread())


class ChatRefusalTests(ServedCase):
    @defer.inlineCallbacks
    def test_chat_to_an_unknown_recipient(self):
        """chat to an id the server does not know prints the refusal once (no
        second 'system:' line) and exits 1 once input ends."""
        yield self.cli("keygen")
        yield self.cli("register", "--name", "Alice")
        chat = self.spawn("chat", "--to", "nobody")
        self.assertIn("chatting with nobody", (yield within(chat.lines.get(), WAIT)))
        chat.transport.write(b"anyone there?\n")
        chat.transport.closeStdin()
        code = yield within(chat.ended, WAIT)
        out = chat.out.decode()
        self.assertEqual(code, 1, out + chat.err.decode())
        self.assertEqual(out.count("unknown_recipient"), 1, out)
        self.assertIn("not sent: ", out)
        self.assertNotIn("system:", out)


class ReconnectTests(CliCase):
    """listen and chat when the server goes away and comes back."""

    @defer.inlineCallbacks
    def restart(self, server: LiveServer, database: str) -> LiveServer:
        """Stop ``server`` and start another on the same port with ``database``."""
        port = server.port
        yield server.stop()
        return LiveServer(
            self, {"SERVER_ADDR": f"tcp:{port}:interface=127.0.0.1", "DATABASE": database}
        )

    @defer.inlineCallbacks
    def users(self, *names: str):
        for user in names:
            code, _, err = yield self.cli("keygen", user=user)
            self.assertEqual(code, 0, err)
            code, _, err = yield self.cli("register", "--name", user.title(), user=user)
            self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_gives_up_when_the_server_forgets_the_user(self):
        """A server restarted on an empty database answers the reconnect's login
        with unknown_user: listen and chat each say so in one line on stderr
        (after saying they were reconnecting) and exit 1."""
        first = LiveServer(self)
        self.url = first.base
        yield self.users("alice")
        listen = self.spawn("listen")
        yield listen.err_line("listening as alice")
        chat = self.spawn("chat", "--to", "alice")
        self.assertIn("chatting with alice", (yield within(chat.lines.get(), WAIT)))
        yield self.restart(first, self.mktemp() + ".db")
        for proc in (listen, chat):
            line = yield proc.err_line("reconnecting in")
            self.assertIn(self.url, line)
            code = yield within(proc.ended, WAIT)
            self.assertEqual(code, 1, proc.err)
            last = proc.err.decode().strip().splitlines()[-1]
            self.assertOneHumanLine(last, self.url, "unknown_user", "register")

    @defer.inlineCallbacks
    def test_retries_until_the_server_is_back(self):
        """While the server is down listen says it is reconnecting and what it
        waits for; once the server is back (same database) it says so and shows
        the message sent meanwhile."""
        first = LiveServer(self)
        self.url = first.base
        yield self.users("alice", "bob")
        listen = self.spawn("listen")
        yield listen.err_line("listening as alice")
        database = first.db
        port = first.port
        yield first.stop()
        line = yield listen.err_line("reconnecting in")
        self.assertIn(self.url, line)
        line = yield listen.err_line("connection refused")  # a later attempt, while down
        self.assertIn("reconnecting in", line)
        LiveServer(self, {"SERVER_ADDR": f"tcp:{port}:interface=127.0.0.1", "DATABASE": database})
        yield listen.err_line("connected again")
        code, _, err = yield self.cli("send", "--to", "alice", "welcome back", user="bob")
        self.assertEqual(code, 0, err)
        seen = []
        while not any("welcome back" in s for s in seen):
            seen.append((yield within(listen.lines.get(), WAIT)))
        self.assertIn("bob [verified]", seen[-1])
        self.assertFalse(listen.ended.called)


class _NotWsserver(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        return b"<html>nothing here</html>"


class ConnectionErrorTests(CliCase):
    """Every way of failing to reach a server is one human line with the fix."""

    @defer.inlineCallbacks
    def fails(self, *wanted: str, url: str, args: tuple[str, ...] = ()) -> str:
        code, _, err = yield self.cli(*args, "login", url=url)
        self.assertEqual(code, 1, err)
        return self.assertOneHumanLine(err, url, *wanted)

    def setUp(self):
        super().setUp()
        key = wc.generate_key()
        wc.save_key(key, str(self.dir / "alice.key"))

    @defer.inlineCallbacks
    def test_connection_refused(self):
        """Nothing listening: 'connection refused' and the port to check."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, never listening: connections are refused
            yield self.fails("connection refused", f"port {port}", url=f"http://127.0.0.1:{port}")

    @defer.inlineCallbacks
    def test_not_a_url(self):
        """A server address without http:// or https:// says what is expected."""
        yield self.fails("must be an http:// or https:// URL", url="127.0.0.1:8080")

    @defer.inlineCallbacks
    def test_unknown_host(self):
        """A host name that does not resolve is named."""
        yield self.fails(
            "no-such-host.invalid", "cannot be resolved", url="http://no-such-host.invalid:8080"
        )

    @defer.inlineCallbacks
    def test_not_a_wsserver(self):
        """A web server that is not wsserver: said so, without its HTML."""
        port = reactor.listenTCP(0, server.Site(_NotWsserver()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        line = yield self.fails("is this a wsserver?", url=url)
        self.assertNotIn("html", line)

    @defer.inlineCallbacks
    def test_bad_server_urls(self):
        """A URL with a path, with credentials or with a port out of range is
        refused before connecting, in one line naming the URL (never a
        password) and what is expected."""
        plain = LiveServer(self)
        root = f"http://127.0.0.1:{plain.port}"
        yield self.fails("must be the server's root", f"use {root}", url=root + "/sub/path")
        code, _, err = yield self.cli("login", url=f"http://user:s3cret@127.0.0.1:{plain.port}")
        self.assertEqual(code, 1)
        line = self.assertOneHumanLine(err, "must not hold a user name or password", root)
        self.assertNotIn("s3cret", line)
        yield self.fails("port 99999", "1 to 65535", url="http://127.0.0.1:99999")

    @defer.inlineCallbacks
    def test_cafile_that_is_not_a_certificate(self):
        """--cafile naming a private key: one line naming the file and the
        server, saying a CA certificate in PEM was expected and what it holds."""
        _, key = make_certificate(Path(self.mktemp()).resolve(), names=("example.test",))
        url = "https://127.0.0.1:1"
        line = yield self.fails(
            f"--cafile {key}",
            "not a PEM certificate",
            "-----BEGIN CERTIFICATE-----",
            "private key",
            url=url,
            args=("--cafile", str(key)),
        )
        self.assertNotIn("routines", line)

    @defer.inlineCallbacks
    def test_missing_key_file_names_the_keygen_to_run(self):
        """A missing --key file: the keygen command suggested carries that --key."""
        code, _, err = yield self.cli("--key", "x.key", "login", url="http://127.0.0.1:1")
        self.assertEqual(code, 1)
        self.assertOneHumanLine(err, "no key file x.key", "wsserver-client --key x.key keygen")
        code, _, err = yield self.cli("login", user="zed", url="http://127.0.0.1:1")
        self.assertOneHumanLine(err, "no key file zed.key", "wsserver-client --user zed keygen")

    @defer.inlineCallbacks
    def test_https_url_at_a_plain_server(self):
        """https:// at a plain-HTTP port: use http://."""
        plain = LiveServer(self)
        url = f"https://127.0.0.1:{plain.port}"
        yield self.fails(
            "does not speak TLS", "plain HTTP", f"use http://127.0.0.1:{plain.port}", url=url
        )

    @defer.inlineCallbacks
    def test_tls_mistakes(self):
        """Against a TLS server: http:// says use https://; no --cafile for a
        private CA says to pass one; a host name the certificate is not for names
        the names it is for; with everything right the login works."""
        cert, key = make_certificate(Path(self.mktemp()).resolve(), names=("example.test",))
        tls = LiveServer(self, {"TLS_CERT": str(cert), "TLS_KEY": str(key)})
        ca = str(cert.with_name("ca.pem"))
        port = tls.port
        yield self.fails("use https://127.0.0.1:", url=f"http://127.0.0.1:{port}")
        yield self.fails(
            "not signed by a certificate authority", "--cafile", url=f"https://127.0.0.1:{port}"
        )
        yield self.fails(
            "not for localhost",
            "example.test",
            f"https://example.test:{port}",
            url=f"https://localhost:{port}",
            args=("--cafile", ca),
        )
        yield self.fails("unknown_user", url=f"https://127.0.0.1:{port}", args=("--cafile", ca))
