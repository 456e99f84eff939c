"""Configuration from options and environment, and the twistd plugin."""

from __future__ import annotations

from twisted.trial import unittest

from wsserver.config import SETTINGS, ConfigError, load, parse_listen


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
        """The plugin's Options take every setting."""
        from wsserver.tap import Options

        opts = Options()
        opts.parseOptions(["--port", "8080", "--database", "x.db", "--require-signatures", "1"])
        self.assertEqual(load(dict(opts), {}).listen, "tcp:8080")


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
