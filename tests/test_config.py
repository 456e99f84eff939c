"""Configuration from options and environment, and the twistd plugin."""

from __future__ import annotations

import datetime
import json
import random
import sqlite3
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import jwt
from nacl.signing import SigningKey
from twisted.internet import defer
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest

from wsserver import keylog
from wsserver.config import SETTINGS, Config, ConfigError, load, parse_listen
from wsserver.tap import Options, makeService

from .services import redis_url, require_redis
from .support import LiveServer, b64, connect_ws, sign_message, vector_key
from .test_tls import make_certificate


class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        """With nothing set, the documented defaults apply."""
        c = load({}, {})
        self.assertEqual(c.listen, "tcp:8080")
        self.assertEqual((c.message_rate_limit, c.message_burst_limit), (5.0, 10))
        self.assertEqual(c.database, "wsserver.db")
        self.assertIsNone(c.jwt_secret)
        self.assertEqual((c.token_ttl, c.challenge_ttl), (3600, 60))
        self.assertEqual((c.auth_rate_limit, c.auth_burst_limit), (10.0, 20))
        self.assertEqual((c.max_content_bytes, c.max_frame_bytes), (65536, 524288))
        self.assertEqual((c.max_connections_per_user, c.max_outbox_bytes), (16, 1048576))
        self.assertEqual((c.max_connections_per_ip, c.max_handshakes_per_ip), (4096, 128))
        self.assertFalse(c.require_signatures)
        self.assertEqual(c.shutdown_timeout, 10)
        self.assertEqual(c.allowed_origins, frozenset())
        self.assertFalse(c.tls)

    def test_environment_and_options_options_win(self):
        """Environment variables set values; an option beats its variable."""
        env = {
            "SERVER_ADDR": "127.0.0.1:9000",
            "MESSAGE_RATE_LIMIT": "2.5",
            "MESSAGE_BURST_LIMIT": "3",
            "REQUIRE_SIGNATURES": "yes",
        }
        c = load({"message-burst-limit": "7"}, env)
        self.assertEqual(c.listen, "tcp:9000:interface=127.0.0.1")
        self.assertEqual(c.message_rate_limit, 2.5)
        self.assertEqual(c.message_burst_limit, 7)
        self.assertTrue(c.require_signatures)
        self.assertEqual(load({"port": "8181"}, env).listen, "tcp:8181")

    def test_every_setting_has_an_option(self):
        """Each variable has an option named after it (SERVER_ADDR is --port)."""
        for variable, option, *_ in SETTINGS:
            expected = "port" if variable == "SERVER_ADDR" else variable.lower().replace("_", "-")
            self.assertEqual(option, expected)

    def test_listen_forms(self):
        """PORT, :PORT, HOST:PORT, [v6]:PORT and endpoint strings are accepted."""
        self.assertEqual(parse_listen("8080"), "tcp:8080")
        self.assertEqual(parse_listen(":8080"), "tcp:8080")
        self.assertEqual(parse_listen("localhost:1"), "tcp:1:interface=localhost")
        self.assertEqual(parse_listen("[::1]:8080"), r"tcp6:8080:interface=\:\:1")
        self.assertEqual(
            parse_listen("tcp:8080:interface=127.0.0.1"), "tcp:8080:interface=127.0.0.1"
        )
        for bad in ("", "abc", ":99999", "host:", "http://x:80"):
            with self.assertRaises(ValueError):
                parse_listen(bad)

    def test_bad_values_name_the_variable(self):
        """Every bad value fails with a message that starts with the variable's name."""
        cases = {
            "SERVER_ADDR": "nowhere",
            "MESSAGE_RATE_LIMIT": "fast",
            "MESSAGE_BURST_LIMIT": "0",
            "JWT_SECRET": "short",
            "TOKEN_TTL": "-1",
            "CHALLENGE_TTL": "1.5",
            "AUTH_RATE_LIMIT": "nan",
            "MAX_CONTENT_BYTES": "0",
            "MAX_FRAME_BYTES": "10",
            "MAX_CONNECTIONS_PER_USER": "many",
            "MAX_CONNECTIONS_PER_IP": "0",
            "MAX_HANDSHAKES_PER_IP": "-1",
            "MAX_OUTBOX_BYTES": "1",
            "REQUIRE_SIGNATURES": "maybe",
            "SHUTDOWN_TIMEOUT": "-5",
            "ALLOWED_ORIGINS": "null",
            "DATABASE": " ",
        }
        for variable, value in cases.items():
            with self.assertRaises(ConfigError) as ctx:
                load({}, {variable: value})
            self.assertTrue(str(ctx.exception).startswith(variable), str(ctx.exception))

    def test_bad_option_names_variable_and_option(self):
        """A bad option value names the variable and the option."""
        with self.assertRaises(ConfigError) as ctx:
            load({"message-rate-limit": "x"}, {})
        self.assertIn("MESSAGE_RATE_LIMIT (--message-rate-limit)", str(ctx.exception))

    def test_tls_needs_both_files(self):
        """Only one of TLS_CERT and TLS_KEY is an error."""
        with self.assertRaises(ConfigError):
            load({}, {"TLS_CERT": "cert.pem"})
        with self.assertRaises(ConfigError):
            load({"tls-key": "key.pem"}, {})
        self.assertTrue(load({}, {"TLS_CERT": "c", "TLS_KEY": "k"}).tls)

    def test_frame_must_hold_the_content(self):
        """MAX_FRAME_BYTES below MAX_CONTENT_BYTES is refused."""
        with self.assertRaises(ConfigError):
            load({}, {"MAX_CONTENT_BYTES": "100000", "MAX_FRAME_BYTES": "50000"})

    def test_origins_are_normalised(self):
        """Origins are lower-cased, trailing slashes dropped, blanks ignored."""
        c = load({}, {"ALLOWED_ORIGINS": "https://Example.com/, ,http://a:8080"})
        self.assertEqual(c.allowed_origins, frozenset({"https://example.com", "http://a:8080"}))


class PluginTests(unittest.TestCase):
    def test_twistd_finds_the_plugin(self):
        """twistd's plugin discovery finds one 'wsserver' service maker."""
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "wsserver"]
        self.assertTrue(makers)
        self.assertEqual(makers[0].module, "wsserver.tap")

    def test_options_parse(self):
        """The plugin's Options take every setting, each named in the help with
        its variable."""
        from wsserver.tap import Options

        help_text = str(Options())
        for variable, option, *_ in SETTINGS:
            opts = Options()
            opts.parseOptions([f"--{option}", "a value"])
            self.assertEqual(opts[option], "a value")
            self.assertIn(f"--{option}", help_text)
            self.assertIn(variable, help_text)


def _ms(timestamp: str) -> int:
    """Milliseconds since the epoch of an RFC 3339 ``...Z`` timestamp."""
    parsed = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return round(parsed.timestamp() * 1000)


def _carried(obj: Any, name: str) -> Any:
    """``obj``'s attribute ``name``, public or (once made private) ``_name``."""
    return getattr(obj, "_" + name) if hasattr(obj, "_" + name) else getattr(obj, name)


class EverySettingTests(unittest.TestCase):
    """Every setting of the configuration table (protocol section 10, as
    ``config.SETTINGS`` implements it) reaches the running server."""

    timeout = 120

    def chosen(self) -> dict[str, str]:
        """A value other than the default for every setting."""
        directory = Path(self.mktemp()).resolve()
        cert, key = make_certificate(directory)
        return {
            "SERVER_ADDR": "tcp:0:interface=127.0.0.1",
            "MESSAGE_RATE_LIMIT": "0.5",
            "MESSAGE_BURST_LIMIT": "2",
            "DATABASE": str(directory / "chosen.db"),
            "JWT_SECRET": "a secret chosen by the operator, 40 bytes",
            "TOKEN_TTL": "1234",
            "CHALLENGE_TTL": "77",
            "TLS_CERT": str(cert),
            "TLS_KEY": str(key),
            "AUTH_RATE_LIMIT": "0.001",
            "AUTH_BURST_LIMIT": "9",
            "MAX_CONTENT_BYTES": "2000",
            "MAX_FRAME_BYTES": "4096",
            "MAX_CONNECTIONS_PER_USER": "1",
            "MAX_KEYS_PER_USER": "1",
            "MAX_CONNECTIONS_PER_IP": "7",
            "MAX_HANDSHAKES_PER_IP": "5",
            "MAX_OUTBOX_BYTES": "4096",
            "REQUIRE_SIGNATURES": "true",
            "SHUTDOWN_TIMEOUT": "3.5",
            "ALLOWED_ORIGINS": "https://app.example",
            "WORKERS": "2",
            "BROKER": redis_url(random.randint(1, 15)),
            "NODE_NAME": "node-chosen",
            "MESSAGE_RETENTION_DAYS": "30",
            "PENDING_RETENTION_DAYS": "90.5",
            "METRICS_ADDR": "tcp:0:interface=127.0.0.1",
            "LOG_FORMAT": "json",
            "PRESENCE": "everyone",
        }

    def test_each_chosen_value_differs_from_the_default(self):
        """The values below cover SETTINGS exactly; given as variables or as
        options they make the same Config, and every field of it differs from
        the default."""
        values = self.chosen()
        self.assertEqual(set(values), {variable for variable, *_ in SETTINGS})
        from_env = load({}, values)
        from_options = load({option: values[variable] for variable, option, *_ in SETTINGS}, {})
        self.assertEqual(from_env, from_options)
        default = load({}, {})
        for field in fields(Config):
            self.assertNotEqual(
                getattr(from_env, field.name), getattr(default, field.name), field.name
            )

    @defer.inlineCallbacks
    def test_every_setting_reaches_the_running_server(self):
        """Every setting, given as an option of the twistd plugin with a value
        other than its default, changes what the running server does (or, for
        MAX_OUTBOX_BYTES, SHUTDOWN_TIMEOUT and BROKER, is carried by the objects
        that act on it; their behaviour has tests of its own).  WORKERS=2 makes
        the plugin build the parent of tests/test_workers.py instead, checked
        on its own here."""
        require_redis()
        values = self.chosen()
        args = []
        for variable, option, *_ in SETTINGS:
            if variable != "WORKERS":
                args += [f"--{option}", values[variable]]
        options = Options()
        options.parseOptions(args)
        log_path = Path(self.mktemp()).resolve()
        options.parent = {"logfile": str(log_path), "nodaemon": False}  # twistd's own options
        service = makeService(options)
        server = LiveServer(self, service=service)
        checked: set[str] = set()
        ca = Certificate.loadPEM(Path(values["TLS_CERT"]).with_name("ca.pem").read_bytes())
        tls = optionsForClientTLS("localhost", trustRoot=ca)
        server.tls_options = tls
        server.base = f"https://localhost:{server.port}"
        ws_url = f"wss://localhost:{server.port}/ws"
        auth_requests = 0

        # SERVER_ADDR: bound where asked (the default is every address, port 8080).
        host = service.port.getHost()
        self.assertEqual(host.host, "127.0.0.1")
        self.assertNotEqual(host.port, 8080)
        checked.add("SERVER_ADDR")

        # TLS_CERT, TLS_KEY: HTTPS with this certificate, verified for localhost.
        code, _ = yield server.get("/health")
        self.assertEqual(code, 200)
        checked.update({"TLS_CERT", "TLS_KEY"})

        alice_key, bob_key = vector_key("alice"), vector_key("bob")
        yield server.register("alice", alice_key)
        yield server.register("bob", bob_key)
        auth_requests += 2

        # CHALLENGE_TTL: the challenge expires 77 s after it was made.
        before = time.time() * 1000
        code, body = yield server.post("/auth/login", {"user_id": "alice"})
        after = time.time() * 1000
        auth_requests += 1
        expires = _ms(body["expires_at"])
        self.assertTrue(before + 77_000 - 1 <= expires <= after + 77_000 + 1, body)
        checked.add("CHALLENGE_TTL")
        signature = b64(alice_key.sign(body["challenge"].encode()).signature)
        code, body = yield server.post(
            "/auth/login?verify=true", {"user_id": "alice", "signature": signature}
        )
        auth_requests += 1
        alice_token = body["token"]
        bob_token = yield server.login("bob", bob_key)
        auth_requests += 2

        # MAX_KEYS_PER_USER: alice holds 1 key, so a second one is too many.
        pub = bytes(alice_key.verify_key)
        head = keylog.digest(keylog.entry_string("alice", 0, keylog.REGISTER, pub, ""))
        new = SigningKey.generate()
        string = keylog.entry_string("alice", 1, keylog.ADD, bytes(new.verify_key), head)
        code, body = yield server.post(
            "/auth/users/alice/keylog",
            {
                "seq": 1,
                "action": "add",
                "public_key": b64(bytes(new.verify_key)),
                "name": "laptop",
                "by": keylog.key_id(pub),
                "signature": b64(alice_key.sign(string.encode()).signature),
                "key_signature": b64(new.sign(string.encode()).signature),
            },
        )
        auth_requests += 1
        self.assertEqual((code, body["error"]["code"]), (409, "too_many_keys"))
        checked.add("MAX_KEYS_PER_USER")

        # JWT_SECRET, TOKEN_TTL: the token is signed with the secret, lives 1234 s.
        claims = jwt.decode(alice_token, values["JWT_SECRET"].encode(), algorithms=["HS256"])
        self.assertEqual(claims["exp"] - claims["iat"], 1234)
        checked.update({"JWT_SECRET", "TOKEN_TTL"})

        # DATABASE: the users are in the file named.
        with sqlite3.connect(values["DATABASE"]) as db:
            users = {row[0] for row in db.execute("SELECT user_id FROM users")}
        self.assertEqual(users, {"alice", "bob"})
        checked.add("DATABASE")

        # ALLOWED_ORIGINS: a listed browser origin may connect (by default only
        # the server's own may).
        alice = yield connect_ws(
            ws_url, alice_token, headers={"Origin": "https://app.example"}, tls_options=tls
        )
        self.addCleanup(alice.close_and_wait)
        checked.add("ALLOWED_ORIGINS")

        # MAX_CONNECTIONS_PER_USER: a second connection of alice is closed 1008.
        try:
            extra = yield connect_ws(ws_url, alice_token, tls_options=tls)
        except ConnectionError as exc:
            self.assertIn("1008", str(exc))
        else:
            self.assertEqual((yield extra.wait_closed()), 1008)
        checked.add("MAX_CONNECTIONS_PER_USER")

        # REQUIRE_SIGNATURES: an unsigned message is refused (first token).
        alice.send_json({"to": "bob", "content": "plain", "nonce": "c-1"})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("signature_required", "c-1"))
        checked.add("REQUIRE_SIGNATURES")

        # MAX_CONTENT_BYTES: 2001 bytes are too many (second token).
        big = "x" * 2001
        sig = sign_message(alice_key, "alice", "bob", big, "c-2")
        alice.send_json({"to": "bob", "content": big, "nonce": "c-2", "signature": sig})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("message_too_large", "c-2"))

        # MESSAGE_RATE_LIMIT, MESSAGE_BURST_LIMIT: the bucket of 2 is empty now.
        sig = sign_message(alice_key, "alice", "bob", "third", "c-3")
        alice.send_json({"to": "bob", "content": "third", "nonce": "c-3", "signature": sig})
        frame = yield alice.next_of("system")
        self.assertEqual((frame["code"], frame["nonce"]), ("rate_limited", "c-3"))
        self.assertIn("0.5 messages/s, burst 2", frame["content"])
        self.assertTrue(0 < frame["retry_after_ms"] <= 2000, frame)
        checked.update({"MESSAGE_RATE_LIMIT", "MESSAGE_BURST_LIMIT"})

        # MAX_CONTENT_BYTES: exactly 2000 bytes pass (bob's bucket is full).
        bob = yield connect_ws(ws_url, bob_token, tls_options=tls)
        self.addCleanup(bob.close_and_wait)
        fits = "y" * 2000
        sig = sign_message(bob_key, "bob", "alice", fits, "c-4")
        bob.send_json({"to": "alice", "content": fits, "nonce": "c-4", "signature": sig})
        ack = yield bob.next_of("ack")
        self.assertEqual(ack["nonce"], "c-4")
        checked.add("MAX_CONTENT_BYTES")

        # MAX_FRAME_BYTES: a 5000-byte frame closes the connection with 1009.
        bob.sendMessage(b'"' + b"z" * 5000 + b'"')
        self.assertEqual((yield bob.wait_closed()), 1009)
        checked.add("MAX_FRAME_BYTES")

        # MAX_HANDSHAKES_PER_IP, MAX_CONNECTIONS_PER_IP: the caps the listening
        # port applies, counted for an address of their own.
        peers, other = service.peers, "192.0.2.1"
        self.assertEqual([peers.admit(other) for _ in range(6)], [True] * 5 + [False])
        for _ in range(5):
            peers.upgraded(other)
        self.assertEqual([peers.admit(other) for _ in range(3)], [True, True, False])
        self.assertEqual(peers.counts(other), (7, 2))
        checked.update({"MAX_HANDSHAKES_PER_IP", "MAX_CONNECTIONS_PER_IP"})

        # MAX_OUTBOX_BYTES, SHUTDOWN_TIMEOUT: carried by what acts on them.
        self.assertEqual(_carried(service.factory, "max_outbox_bytes"), 4096)
        self.assertEqual(_carried(service, "config").shutdown_timeout, 3.5)
        checked.update({"MAX_OUTBOX_BYTES", "SHUTDOWN_TIMEOUT"})

        # WORKERS: the plugin builds the parent that runs that many children.
        parent_options = Options()
        parent_options.parseOptions([*args, "--workers", values["WORKERS"]])
        parent = makeService(parent_options)
        self.addCleanup(parent.port.stopListening)
        self.assertEqual((type(parent).__name__, parent.count), ("WorkersService", 2))
        checked.add("WORKERS")

        # AUTH_RATE_LIMIT, AUTH_BURST_LIMIT: 9 requests to /auth/* in all, then
        # 429 with a wait of about 1/0.001 s.
        while True:
            client = server.http()
            resp = yield client.get(server.base + "/auth/users/nobody")
            yield resp.content()
            if resp.code == 429:
                break
            auth_requests += 1
            self.assertLessEqual(auth_requests, 9)
        self.assertEqual(auth_requests, 9)
        self.assertGreaterEqual(int(resp.headers.getRawHeaders(b"retry-after")[0]), 900)
        checked.update({"AUTH_RATE_LIMIT", "AUTH_BURST_LIMIT"})

        # BROKER, NODE_NAME: the node is subscribed to that Redis and says its name.
        code, body = yield server.get("/ready")
        self.assertEqual(body["node"], "node-chosen")
        self.assertIn("broker", body["checks"])
        self.assertEqual(
            _carried(service, "broker").prefix, f"wsserver:{values['BROKER'].rsplit('/', 1)[1]}:"
        )
        checked.update({"BROKER", "NODE_NAME"})

        # MESSAGE_RETENTION_DAYS, PENDING_RETENTION_DAYS: carried by the retention
        # loop (tests/test_retention.py runs it).
        retention = _carried(service, "retention")
        self.assertEqual((retention.message_days, retention.pending_days), (30, 90.5))
        checked.update({"MESSAGE_RETENTION_DAYS", "PENDING_RETENTION_DAYS"})

        # METRICS_ADDR: /metrics on a listener of its own, which counted the
        # logins above (the public port has no /metrics: tests/test_metrics.py).
        metrics_port = service.metrics_port.getHost().port
        self.assertNotEqual(metrics_port, server.port)
        resp = yield server.http().get(f"http://127.0.0.1:{metrics_port}/metrics")
        text = (yield resp.content()).decode()
        self.assertIn('wsserver_logins_total{outcome="ok"} 2.0', text)
        checked.add("METRICS_ADDR")

        # LOG_FORMAT: twistd is handed a JSON observer writing to its --logfile.
        service.log_observer({"log_format": "hello {who}", "who": "json", "log_time": 0.0})
        line = log_path.read_text().splitlines()[-1]
        self.assertEqual(json.loads(line)["message"], "hello json")
        checked.add("LOG_FORMAT")

        # PRESENCE: carried by the factory's presence hub (tests/test_presence.py
        # shows what each policy does).
        self.assertEqual(_carried(service.factory, "presence").policy, "everyone")
        checked.add("PRESENCE")

        self.assertEqual(checked, {variable for variable, *_ in SETTINGS})


class DatabaseSettingTests(unittest.TestCase):
    """DATABASE: a SQLite file or a PostgreSQL URL (protocol section 10)."""

    def test_postgresql_urls_are_accepted_as_given(self):
        """postgresql:// and postgres:// URLs in libpq's URI form are kept verbatim."""
        for url in (
            "postgresql://wsserver:secret@db.example:5433/chat",
            "postgres://wsserver@127.0.0.1/chat?sslmode=require",
            "postgresql:///chat",
            "POSTGRESQL://u@h/d",
        ):
            self.assertEqual(load({}, {"DATABASE": url}).database, url)

    def test_bad_postgresql_urls_name_database_and_hide_the_password(self):
        """A PostgreSQL URL without a database name, with a bad port or with spaces is
        refused at start with one line naming DATABASE, never showing the password."""
        for url in (
            "postgresql://u:hunter2@host:5432",
            "postgresql://u:hunter2@host:5432/",
            "postgresql://u:hunter2@host:port/db",
            "postgresql://u:hunter2@host:99999/db",
            "postgres://u:hunter2@host/a/b",
            "postgresql://u:hunter2@host/d b",
        ):
            with self.assertRaises(ConfigError) as ctx:
                load({}, {"DATABASE": url})
            text = str(ctx.exception)
            self.assertTrue(text.startswith("DATABASE: "), text)
            self.assertNotIn("hunter2", text)


class BrokerSettingTests(unittest.TestCase):
    """BROKER and NODE_NAME (protocol section 10)."""

    def test_redis_urls_are_accepted(self):
        """redis://[:password@]host[:port][/db] URLs are kept verbatim and parsed."""
        from wsserver.config import parse_broker

        for url, parsed in (
            ("redis://127.0.0.1", ("127.0.0.1", 6379, 0, None)),
            ("redis://:s3cret@cache.example:6380/3", ("cache.example", 6380, 3, "s3cret")),
            ("redis://[::1]:6379/1", ("::1", 6379, 1, None)),
        ):
            self.assertEqual(load({}, {"BROKER": url}).broker, url)
            address = parse_broker(url)
            self.assertEqual((address.host, address.port, address.db, address.password), parsed)
        self.assertIsNone(load({}, {}).broker)

    def test_bad_broker_urls_name_broker_and_hide_the_password(self):
        """Another scheme, a bad port or database, a user name or parameters are
        refused with one line naming BROKER that never shows the password."""
        for url in (
            "http://:hunter2@host",
            "redis://:hunter2@host:0",
            "redis://:hunter2@host:port",
            "redis://:hunter2@host/x",
            "redis://user:hunter2@host",
            "redis://:hunter2@host/0?timeout=1",
            "redis://:hunter2@",
            "redis://:hunter2@host/ 1",
        ):
            with self.assertRaises(ConfigError) as ctx:
                load({}, {"BROKER": url})
            text = str(ctx.exception)
            self.assertTrue(text.startswith("BROKER: "), text)
            self.assertNotIn("hunter2", text)

    def test_node_name_defaults_to_host_and_pid(self):
        """NODE_NAME is <hostname>:<pid> unless given; a bad one names NODE_NAME."""
        import os
        import socket

        self.assertEqual(load({}, {}).node_name, f"{socket.gethostname()}:{os.getpid()}")
        self.assertEqual(load({}, {"NODE_NAME": "eu-1"}).node_name, "eu-1")
        with self.assertRaises(ConfigError) as ctx:
            load({}, {"NODE_NAME": "has space"})
        self.assertTrue(str(ctx.exception).startswith("NODE_NAME: "))
