"""What the server logs: one line per connect, close and refusal, and never a
token, a signature or message content."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from wsserver.logs import json_line

from .services import redis_url, require_redis
from .support import (
    LiveServer,
    RemoteServer,
    ServerLog,
    Twistd,
    connect_ws,
    eventually,
    read_port_async,
    serve_args,
    sign_message,
    vector_key,
)


class LogHygieneTests(unittest.TestCase):
    @defer.inlineCallbacks
    def session(self) -> Any:
        """A whole session (login, token in the query string, signed, refused and
        broadcast messages, a forged token); fire with (every log event in this
        process, the secrets that must not be logged, the server's ``ServerLog``)."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        server = LiveServer(self)
        log = ServerLog(self, server, fields=True)
        key, token = yield server.user("alice", vector_key("alice"))
        _, bob_token = yield server.user("bob")
        alice = yield connect_ws(f"{server.ws_base}?token={token}", None, testcase=self)
        secret_text = "the launch code is 0000"
        sig = sign_message(key, "alice", "bob", secret_text, "n-1")
        alice.send_json({"to": "bob", "content": secret_text, "signature": sig, "nonce": "n-1"})
        yield alice.next_of("ack")
        alice.send_json({"to": "nobody", "content": secret_text})
        yield alice.next_of("system")
        alice.send_json({"to": "broadcast", "content": secret_text})
        yield alice.next_of("ack")
        code, _ = yield server.get("/ws?token=forged.token.value")
        self.assertEqual(code, 401)
        yield alice.close_and_wait()
        self.server = server
        return events, (token, bob_token, sig, secret_text, "forged.token.value"), log

    def assert_logged_lines(self, text: str) -> None:
        self.assertIn("connected: alice", text)
        self.assertIn("closed: alice code=1000", text)
        self.assertIn("refused a message from alice: unknown_recipient", text)
        self.assertIn("refused a WebSocket upgrade: unauthorized", text)
        self.assertIn("/ws?token=<redacted>", text)

    @defer.inlineCallbacks
    def test_no_secrets_or_content_in_any_log_event(self):
        """The session logs connects, closes and refusals with user ids and codes,
        and no token, signature or content, in any key of any event."""
        _, secrets, log = yield self.session()
        # Every event formatted with its fields; with --workers 2 the process's log.
        text = "\n".join((yield log.lines()))
        for secret in secrets:
            self.assertNotIn(secret, text)
        self.assert_logged_lines(text)

    @defer.inlineCallbacks
    def test_json_lines_carry_what_the_text_lines_carry(self):
        """LOG_FORMAT=json: each event of the session is one line holding one
        JSON object whose message is the text line's, with the fields its
        format names (user, code) and no token, signature or content."""
        events, secrets, _ = yield self.session()
        if self.server.log is not None:
            raise unittest.SkipTest(
                "reads the in-process log events; WSSERVER_TEST_WORKERS=2 runs the "
                "server in other processes"
            )
        lines = [line for line in map(json_line, events) if line is not None]
        self.assertGreater(len(lines), 10)
        records = []
        for line in lines:
            self.assertTrue(line.endswith("\n"))
            self.assertNotIn("\n", line[:-1])
            records.append(json.loads(line))
        text = "".join(lines)
        for secret in secrets:
            self.assertNotIn(secret, text)
        self.assert_logged_lines("\n".join(r["message"] for r in records))
        by_message = {r["message"]: r for r in records}
        closed = by_message["closed: alice code=1000"]
        self.assertEqual((closed["user"], closed["code"], closed["level"]), ("alice", 1000, "info"))
        self.assertEqual(closed["namespace"], "wsserver.websocket")
        self.assertRegex(closed["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        refused = by_message["refused a message from alice: unknown_recipient"]
        self.assertEqual(refused["code"], "unknown_recipient")
        formatted = {formatEvent(e) for e in events if formatEvent(e)}
        self.assertEqual({r["message"] for r in records}, formatted)

    def test_a_field_never_replaces_a_fixed_key_and_failures_carry_the_traceback(self):
        """A format field named like a fixed key is written as name_; an event
        with a failure carries its traceback; an empty event writes nothing."""
        from twisted.python.failure import Failure

        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            failure = Failure()
        record = json.loads(
            json_line({"log_format": "at {time}", "time": "noon", "log_failure": failure})
        )
        self.assertEqual((record["message"], record["time_"]), ("at noon", "noon"))
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIsNone(json_line({}))


class TwistdJsonLogTests(unittest.TestCase):
    """LOG_FORMAT=json under twistd: in the foreground, daemonized, with workers."""

    timeout = 180

    def assert_all_json(self, output: str) -> list[dict]:
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertGreater(len(lines), 3, output)
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                self.fail(f"not a JSON line: {line!r}")
        return records

    @defer.inlineCallbacks
    def test_foreground(self):
        """twistd -n: every line on standard output is a JSON object, twistd's
        own included; a session's content and token are in none."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        proc = Twistd(self, serve_args(0, str(tmp / "db.sqlite")), {"LOG_FORMAT": "json"})
        port = yield proc.listening()
        server = RemoteServer(self, port)
        yield server.wait_up()
        _key, token = yield server.user("alice", vector_key("alice"))
        alice = yield connect_ws(f"{server.ws_base}?token={token}", None, testcase=self)
        alice.send_json({"to": "alice", "content": "json secret content", "nonce": "j-1"})
        yield alice.next_of("ack")
        yield alice.close_and_wait()
        proc.transport.signalProcess("TERM")
        yield proc.ended()
        output = proc.proc.out.decode()
        records = self.assert_all_json(output)
        messages = [r["message"] for r in records]
        self.assertTrue(any(m.startswith("twistd ") for m in messages), messages)
        self.assertTrue(any(m.startswith("wsserver listening on") for m in messages))
        connected = [r for r in records if r["message"].startswith("connected: alice")]
        self.assertEqual(connected[0]["user"], "alice")
        self.assertIn("shut down cleanly", messages)
        for secret in (token, "json secret content"):
            self.assertNotIn(secret, output)

    @defer.inlineCallbacks
    def test_daemonized_logfile(self):
        """Daemonized with --logfile: the file holds JSON lines."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        pidfile, logfile = tmp / "wsserver.pid", tmp / "wsserver.log"
        args = [
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "wsserver",
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--database",
            str(tmp / "db.sqlite"),
            "--log-format",
            "json",
        ]
        launcher = Twistd(self, args)
        how = yield launcher.ended()
        self.assertEqual(how, ("exit", 0), launcher.proc.err)
        port = yield read_port_async(logfile)
        yield RemoteServer(self, port).wait_up()
        pid = int(pidfile.read_text())

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        self.addCleanup(kill)
        os.kill(pid, signal.SIGTERM)
        yield eventually(lambda: not pidfile.exists(), "the pidfile is removed")
        records = self.assert_all_json(logfile.read_text())
        self.assertIn("shut down cleanly", [r["message"] for r in records])

    @defer.inlineCallbacks
    def test_bad_value_is_one_line_and_exit_1(self):
        """LOG_FORMAT=xml: one line naming LOG_FORMAT on stderr, exit status 1."""
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        proc = Twistd(self, serve_args(0, str(tmp / "db.sqlite")), {"LOG_FORMAT": "xml"})
        how = yield proc.ended()
        self.assertEqual(how, ("exit", 1))
        self.assertEqual(proc.proc.err.decode(), "wsserver: LOG_FORMAT: must be text or json\n")

    @defer.inlineCallbacks
    def test_workers_relay_their_json_lines(self):
        """--workers 2: the parent's lines and its children's (relayed, with
        the worker that wrote them) are all JSON objects."""
        require_redis()
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir()
        env = {"LOG_FORMAT": "json", "WORKERS": "2", "BROKER": redis_url(0)}
        proc = Twistd(self, serve_args(0, str(tmp / "db.sqlite")), env)
        port = yield proc.listening()
        yield RemoteServer(self, port).wait_up()

        def both_children_logged() -> bool:
            text = proc.proc.out.decode("utf-8", "replace")
            return '"worker":"1/2"' in text and '"worker":"2/2"' in text

        yield eventually(both_children_logged, "lines of both workers")
        proc.transport.signalProcess("TERM")
        yield proc.ended()
        records = self.assert_all_json(proc.proc.out.decode())
        children = [r for r in records if r.get("worker") in ("1/2", "2/2")]
        self.assertTrue(
            any(r["message"].startswith("wsserver listening on") for r in children), children
        )
