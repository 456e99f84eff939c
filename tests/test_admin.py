"""``wsserver-admin`` (protocol section 14): users, delete-user (section 12,
taking effect at once on running servers: in-process, a real twistd process,
and a two-node cluster), backup (online, checked, restored and served), stats;
--json, one-line errors and exit statuses."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.cluster import two_nodes
from tests.services import fresh_postgres_database
from tests.support import ROOT, LiveServer, RemoteServer, Twistd, public_b64, start_twistd
from tests.test_store import SECRET, new_message
from wsserver import admin
from wsserver import store as st
from wsserver.messages import BROADCAST
from wsserver.store import sqlite as sq

ADMIN = [sys.executable, "-c", "from wsserver.admin import main; main()"]


def run_admin(*argv: str, database: str | None = None) -> tuple[int, str, str]:
    """Run wsserver-admin in this process; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    environ = {"DATABASE": database} if database else {}
    try:
        code = admin.run(list(argv), environ, out, err)
    except SystemExit as exc:  # argparse: --help, bad usage
        code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def in_thread(*argv: str, database: str) -> defer.Deferred:
    """``run_admin`` off the reactor's thread (a server runs in this process)."""
    return threads.deferToThread(run_admin, *argv, database=database)


def prepared_sqlite(testcase: unittest.TestCase) -> str:
    path = testcase.mktemp() + ".db"
    st.prepare_database(path, lambda: SECRET)
    return path


@defer.inlineCallbacks
def fill(store: st.IStore) -> defer.Deferred:
    """alice, bob and carol; bob has a challenge; messages between all of them."""
    for user_id in ("alice", "bob", "carol"):
        yield store.add_user(st.User(user_id, user_id.title(), b"\x01" * 32, 1_700_000_000_000))
    yield store.add_challenge("bob", "c-1", 0, 10**13)
    ids = {}
    for name, sender, to in (
        ("alice-bob", "alice", "bob"),
        ("bob-carol", "bob", "carol"),
        ("bob-all", "bob", BROADCAST),
        ("carol-alice", "carol", "alice"),
        ("alice-all", "alice", BROADCAST),
    ):
        _, msg = yield store.add_message(new_message(sender, to, name))
        ids[name] = msg.id
    return ids


class CommandTests(unittest.TestCase):
    """The command line itself, on a SQLite file."""

    @defer.inlineCallbacks
    def setUp(self):
        self.db = prepared_sqlite(self)
        self.store = st.open_store(self.db, reactor)
        self.addCleanup(lambda: self.store._closed or self.store.close())
        yield fill(self.store)
        yield self.store.drain()

    def test_users_one_line_each_or_json(self):
        """users: one line per user (id, name, registration time), by id; with
        --json one object per line."""
        code, out, err = run_admin("users", database=self.db)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [f"{u}\t{u.title()}\t2023-11-14T22:13:20Z" for u in ("alice", "bob", "carol")],
        )
        code, out, _ = run_admin("--json", "users", database=self.db)
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["user_id"] for r in rows], ["alice", "bob", "carol"])
        self.assertEqual(
            rows[0], {"user_id": "alice", "username": "Alice", "created": rows[0]["created"]}
        )

    def test_a_username_cannot_write_to_the_terminal(self):
        """Control characters in a username are shown escaped."""
        conn = sqlite3.connect(self.db)
        conn.execute("UPDATE users SET username = 'evil\x1b[2Jname' WHERE user_id = 'carol'")
        conn.commit()
        conn.close()
        _, out, _ = run_admin("users", database=self.db)
        self.assertNotIn("\x1b", out)
        self.assertIn("evil\\u001b[2Jname", out)

    @defer.inlineCallbacks
    def test_stats(self):
        """stats: users, messages pending and delivered, the database's size."""
        self.store.mark_delivered([1])
        self.store.mark_broadcast(3, 2)
        yield self.store.drain()
        code, out, _ = run_admin("--json", "stats", database=self.db)
        self.assertEqual(code, 0)
        found = json.loads(out)
        self.assertEqual(
            {k: found[k] for k in ("users", "messages_pending", "messages_delivered")},
            {"users": 3, "messages_pending": 3, "messages_delivered": 2},
        )
        self.assertGreater(found["database_bytes"], 0)
        code, out, _ = run_admin("stats", database=self.db)
        self.assertIn("users=3 deleted_users=0 messages_pending=3 messages_delivered=2", out)

    def test_failures_are_one_line_and_exit_1(self):
        """An unknown user, a malformed id, a missing database, an existing backup
        target, an old schema: one line on stderr, nothing on stdout, exit 1."""
        old = self.mktemp()
        conn = sqlite3.connect(old)
        sq.upgrade(conn, target=2)
        conn.close()
        existing = self.mktemp()
        open(existing, "w").close()
        cases = [
            (("delete-user", "nobody"), self.db, "no such user: nobody"),
            (("delete-user", "bad id!"), self.db, "is not a user id"),
            (("stats",), self.mktemp(), "does not exist"),
            (("backup", existing), self.db, "exists; give a new file name"),
            (("users",), old, "has schema version 2"),
        ]
        for argv, database, words in cases:
            code, out, err = run_admin(*argv, database=database)
            self.assertEqual((code, out), (1, ""), argv)
            self.assertEqual(len(err.splitlines()), 1, argv)
            self.assertTrue(err.startswith("wsserver-admin: "), err)
            self.assertIn(words, err)

    def test_usage_help_and_the_installed_script(self):
        """The console script is installed; --help names the commands and says
        there is no revoke-key, by design, and what to do instead; a bad
        command (revoke-key among them) exits 2."""
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "wsserver-admin"), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0)
        for word in ("users", "delete-user", "backup", "stats", "--json"):
            self.assertIn(word, done.stdout)
        said = " ".join(done.stdout.split())
        for words in (
            "There is no revoke-key, by design",
            "would break the user's signed key log",
            "wsserver-client revoke KEY_ID",
            "removed with delete-user",
        ):
            self.assertIn(words, said)
        code, _, _ = run_admin("revoke-key", "alice", "k", database=self.db)
        self.assertEqual(code, 2)


class DeleteUserContract:
    """delete-user as section 12 says, on each engine."""

    def database(self) -> str:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_removes_the_user_their_challenges_and_messages_and_keeps_the_id(self):
        """The user, their keys and key log, challenges, signed-out tokens and
        every message they sent (broadcasts too) or received go; others'
        messages, keys and tokens stay; the id is a tombstone: it cannot be
        registered again."""
        db = self.database()
        store = st.open_store(db, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        ids = yield fill(store)
        yield store.revoke_token("bob", "jti-bob", 10**13, 1)
        yield store.revoke_token("alice", "jti-alice", 10**13, 1)
        yield store.drain()
        code, out, err = yield in_thread("--json", "delete-user", "bob", database=db)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out), {"deleted": "bob", "messages_removed": 3})
        user = yield store.get_user("bob")
        self.assertIsNone(user)
        head = yield store.stream_head()
        left = yield store.messages_between(0, head, 100)
        self.assertEqual([m.id for m in left], [ids["carol-alice"], ids["alice-all"]])
        outcome = yield store.consume_challenge("bob", None, 1, lambda c: True)
        self.assertEqual(outcome, st.CHALLENGE_NONE)
        again = yield store.add_user(st.User("bob", "Bob", b"\x02" * 32, 5))
        self.assertFalse(again)
        self.assertIsNone((yield store.key_log("bob")))
        self.assertIsNone((yield store.user_keys("bob")))
        self.assertEqual((yield store.revoked_tokens(2)), {"jti-alice"})
        self.assertEqual(len((yield store.key_log("alice"))), 1)
        self.assertEqual(len((yield store.user_keys("alice")).keys), 1)
        code, _, err = yield in_thread("delete-user", "nobody", database=db)
        self.assertEqual(code, 1)
        self.assertIn("no such user", err)
        others = yield store.get_user("alice")
        self.assertIsNotNone(others)

    @defer.inlineCallbacks
    def test_a_deletion_that_failed_half_way_is_finished_by_running_it_again(self):
        """The messages go after the user, in chunks of their own: if a chunk
        fails (a lock held too long, a lost connection), running delete-user
        again for the deleted id removes what is left (before, it answered
        "no such user" and the messages stayed for good)."""
        db = self.database()
        store = st.open_store(db, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        yield fill(store)
        yield store.drain()
        code, _, err = yield in_thread("delete-user", "bob", database=db)
        self.assertEqual((code, err), (0, ""))
        # What a run interrupted after the user went would have left behind.
        left = new_message("bob", "alice", "left behind")
        yield store.add_message(left)
        yield store.drain()
        code, out, err = yield in_thread("--json", "delete-user", "bob", database=db)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out), {"deleted": "bob", "messages_removed": 1})
        head = yield store.stream_head()
        rest = yield store.messages_between(0, head, 100)
        self.assertNotIn("bob", {m.sender for m in rest} | {m.recipient for m in rest})

    @defer.inlineCallbacks
    def test_a_deletion_that_failed_half_way_is_finished_by_a_running_node(self):
        """delete-user whose message phase fails after its first page (one
        line, exit 1) leaves the rest to the running nodes: a store that is
        running finishes it by itself, with no second run."""
        db = self.database()
        store = st.open_store(db, reactor)
        self.addCleanup(lambda: store._closed or store.close())
        yield fill(store)
        yield store.drain()
        yield store.start(purge_interval=0.05)
        engine, error = self.engine()
        real, pages = engine._delete_ids, []
        command_done = threading.Event()
        self.addCleanup(command_done.set)

        def failing(cur, ids):
            # The command's second page fails (it runs on the reactor's thread
            # pool); the store's pages (on its own pool's threads) wait until
            # the command is over, so the command does fail half-way.
            if "twisted.internet.reactor" in threading.current_thread().name:
                pages.append(ids)
                if len(pages) == 2:
                    raise error("the database stayed locked")
            else:
                command_done.wait(30)
            return real(cur, ids)

        self.patch(engine, "DELETE_PAGE", 1)
        self.patch(engine, "_delete_ids", failing)
        code, _, err = yield in_thread("delete-user", "bob", database=db)
        command_done.set()
        self.assertEqual(code, 1)
        self.assertIn("the database stayed locked", err)
        self.assertEqual(len(err.splitlines()), 1)

        @defer.inlineCallbacks
        def bobs() -> defer.Deferred:
            head = yield store.stream_head()
            rest = yield store.messages_between(0, head, 100)
            return [m for m in rest if "bob" in (m.sender, m.recipient)]

        deadline = reactor.seconds() + 30
        while (yield bobs()):
            self.assertLess(reactor.seconds(), deadline, "bob's messages are still there")
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertIsNone((yield store.get_user("bob")))


class SQLiteDeleteUserTests(DeleteUserContract, unittest.TestCase):
    def database(self) -> str:
        return prepared_sqlite(self)

    def engine(self):
        return sq, sqlite3.OperationalError


class PostgresDeleteUserTests(DeleteUserContract, unittest.TestCase):
    def database(self) -> str:
        url = fresh_postgres_database(self)
        st.prepare_database(url, lambda: SECRET)
        return url

    def engine(self):
        import psycopg

        from wsserver.store import postgres

        return postgres, psycopg.OperationalError

    def test_backup_points_to_pg_dump(self):
        """backup on PostgreSQL: one line naming pg_dump (no password shown), exit 1."""
        url = self.database().replace("postgresql://", "postgresql://u:hunter2@", 1)
        code, out, err = run_admin("backup", self.mktemp(), database=url)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("pg_dump", err)
        self.assertNotIn("hunter2", err)
        self.assertEqual(len(err.splitlines()), 1)


class LiveDeleteTests(unittest.TestCase):
    """delete-user takes effect at once on running servers."""

    timeout = 120

    @defer.inlineCallbacks
    def check_deleted_at_once(self, node_of_bob, nodes, database: str, run=in_thread):
        """bob's connections (one on each node given) close with 4003, alice's
        stays open; bob's token and id are refused afterwards."""
        first = nodes[0]
        _, alice_token = yield first.user("alice")
        bob_key, bob_token = yield node_of_bob.user("bob")
        alice = yield first.connect(alice_token, testcase=self)
        bobs = []
        for node in nodes:
            bob = yield node.connect(bob_token, testcase=self)
            bobs.append(bob)
        code, _, err = yield run("delete-user", "bob", database=database)
        self.assertEqual((code, err), (0, ""))
        closed = yield defer.gatherResults([bob.wait_closed(30) for bob in bobs])
        self.assertEqual(closed, [4003] * len(bobs))
        alice.send_json({"to": "bob", "content": "are you there?", "nonce": "n-1"})
        refused = yield alice.next_of("system")
        self.assertEqual(refused["code"], "unknown_recipient")
        for node in nodes:
            with self.assertRaises(ConnectionError):
                yield node.connect(bob_token)
            code, body = yield node.post(
                "/auth/register",
                {"user_id": "bob", "username": "Bob", "public_key": public_b64(bob_key)},
            )
            self.assertEqual((code, body["error"]["code"]), (409, "user_exists"))
        return bob_key

    @defer.inlineCallbacks
    def test_in_process_server(self):
        """A server in this process (SQLite): bob's two connections close 4003."""
        server = LiveServer(self)
        yield self.check_deleted_at_once(server, [server, server], server.db)

    @defer.inlineCallbacks
    def test_real_twistd_process(self):
        """A twistd process; wsserver-admin run as the installed console
        script, as an operator would."""
        # Absolute: twistd runs in the repository root, trial's tests in _trial_temp.
        db = os.path.abspath(self.mktemp() + ".db")
        _, server = yield start_twistd(self, db)

        def script(*argv: str, database: str) -> defer.Deferred:
            def call() -> tuple[int, str, str]:
                done = subprocess.run(
                    [*ADMIN, *argv],
                    env={**os.environ, "DATABASE": database},
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                return done.returncode, done.stdout, done.stderr

            return threads.deferToThread(call)

        yield self.check_deleted_at_once(server, [server], db, run=script)

    @defer.inlineCallbacks
    def test_two_node_cluster(self):
        """Two nodes on PostgreSQL and Redis: bob, connected to both, is closed
        with 4003 on both; neither node lets him back."""
        a, b = yield two_nodes(self)
        yield self.check_deleted_at_once(b, [a, b], a.db)

    @defer.inlineCallbacks
    def test_messages_a_node_stored_after_the_deletion_are_removed(self):
        """A message a node stored for the user after the deletion (its cache
        still knew the user) is removed when the node handles the event."""
        server = LiveServer(self)
        service = server.service
        yield server.user("alice")
        yield server.user("bob")
        service.account_events.stop()  # this test polls by hand
        before = yield service.store.add_message(new_message("alice", "bob", "before"))
        code, _, _ = yield in_thread("delete-user", "bob", database=server.db)
        self.assertEqual(code, 0)
        gone = yield service.store.get_message(before[1].id)
        self.assertIsNone(gone)
        outcome, late = yield service.store.add_message(new_message("alice", "bob", "late"))
        self.assertEqual(outcome, st.STORED)  # the cache still knows bob
        yield service.account_events.poll()
        self.assertEqual(service.account_events.handled, 1)
        gone = yield service.store.get_message(late.id)
        self.assertIsNone(gone)
        outcome, _ = yield service.store.add_message(new_message("alice", "bob", "later"))
        self.assertEqual(outcome, st.NO_RECIPIENT)


class BackupTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_backup_while_serving_then_restore_and_serve_it(self):
        """backup FILE while the server takes messages: a 0600 file that passes
        integrity_check; a server started on the copy serves bob the messages
        stored before the backup (the restore of docs/operations.md)."""
        server = LiveServer(self, {"MESSAGE_RATE_LIMIT": "1000", "MESSAGE_BURST_LIMIT": "100"})
        if st.is_postgres(server.db):
            raise unittest.SkipTest(
                "backs up a SQLite database (this run's server uses PostgreSQL: pg_dump's job)"
            )
        _, alice_token = yield server.user("alice")
        bob_key, _ = yield server.user("bob")
        alice = yield server.connect(alice_token, testcase=self)
        for i in range(20):
            alice.send_json({"to": "bob", "content": f"m-{i}", "nonce": f"n-{i}"})
        acks = yield alice.take(20, "ack")
        target = self.mktemp() + ".backup.db"
        backup = in_thread("backup", target, database=server.db)
        for i in range(20, 40):  # traffic while the copy is taken
            alice.send_json({"to": "bob", "content": f"m-{i}", "nonce": f"n-{i}"})
        code, out, err = yield backup
        self.assertEqual((code, err), (0, ""))
        self.assertIn("backup written and checked", out)
        yield alice.take(20, "ack")
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        conn = sqlite3.connect(target)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        conn.close()
        yield alice.close_and_wait()
        yield server.stop()
        restored = LiveServer(self, {"DATABASE": target})
        token = yield restored.login("bob", bob_key)
        bob = yield restored.connect(token, since=0, testcase=self)
        got = yield bob.take(20, "message")
        self.assertEqual([m["id"] for m in got], [a["id"] for a in acks])
        self.assertEqual([m["content"] for m in got], [f"m-{i}" for i in range(20)])


UNIT = ROOT / "examples" / "wsserver.service"


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values, in order]}} (keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


class SystemdUnitTests(unittest.TestCase):
    """examples/wsserver.service (docs/operations.md, Running under systemd)."""

    timeout = 60

    def setUp(self):
        self.unit = unit_settings(UNIT.read_text("utf-8"))
        self.service = {k: v[-1] for k, v in self.unit["Service"].items()}

    def test_sandboxing_options(self):
        """A dedicated user, no new privileges, a read-only system but the
        database's directory, a private /tmp, no capabilities."""
        expected = {
            "User": "wsserver",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "CapabilityBoundingSet": "",
            "UMask": "0077",
        }
        self.assertEqual({k: self.service.get(k) for k in expected}, expected)
        environment = dict(v.split("=", 1) for v in self.unit["Service"]["Environment"])
        db_dir = os.path.dirname(environment["DATABASE"])
        self.assertIn(db_dir, self.service["ReadWritePaths"].split())
        self.assertEqual(self.service["WorkingDirectory"], db_dir)
        self.assertEqual(f"/var/lib/{self.service['StateDirectory']}", db_dir)

    def test_systemd_analyze_verify_finds_nothing(self):
        """systemd-analyze verify (where installed) reports nothing about the
        unit (twistd's path pointed at this environment's)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        directory = self.mktemp()
        os.makedirs(directory)
        copy = os.path.join(directory, "wsserver.service")
        with open(copy, "w") as f:
            f.write(UNIT.read_text("utf-8").replace("/opt/wsserver/bin/twistd", twistd))
        done = subprocess.run([tool, "verify", copy], capture_output=True, text=True, timeout=60)
        said = [ln for ln in (done.stdout + done.stderr).splitlines() if "wsserver" in ln]
        self.assertEqual((done.returncode, said), (0, []))

    @defer.inlineCallbacks
    def test_its_command_line_serves_and_stops_cleanly_on_sigterm(self):
        """ExecStart's twistd arguments, with the unit's environment (DATABASE
        moved to a temporary directory), start a server that answers, and
        SIGTERM (systemd's stop) drains it and ends it as systemd expects."""
        argv = self.service["ExecStart"].split()
        self.assertTrue(argv[0].endswith("/twistd"))
        env = dict(v.split("=", 1) for v in self.unit["Service"]["Environment"])
        database = os.path.abspath(self.mktemp() + ".db")  # twistd runs elsewhere
        env.update(DATABASE=database, SERVER_ADDR="tcp:0:interface=127.0.0.1")
        proc = Twistd(self, argv[1:], env)
        port = yield proc.listening()
        server = RemoteServer(self, port)
        yield server.wait_up()
        proc.transport.signalProcess("TERM")
        ended = yield proc.ended()
        # twistd drains, then ends by re-raising SIGTERM: systemd counts an
        # end by SIGTERM as a clean exit (no SuccessExitStatus= needed).
        self.assertEqual(ended, ("signal", 15))
        self.assertIn(b"shut down cleanly", proc.proc.out)
