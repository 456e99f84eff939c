"""Configuration: command-line options and environment variables -> one ``Config``.

Every setting of protocol section 10 is an environment variable and an
option of ``twistd wsserver`` named after it (``MESSAGE_RATE_LIMIT`` is
``--message-rate-limit``; ``SERVER_ADDR`` is ``--port``).  Options win.  A bad
value raises ``ConfigError`` whose message starts with the variable's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from .auth import MIN_SECRET_BYTES


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the server, validated."""

    listen: str  # a Twisted server endpoint description
    message_rate_limit: float
    message_burst_limit: int
    database: str
    jwt_secret: bytes | None
    token_ttl: int
    challenge_ttl: int
    tls_cert: str | None
    tls_key: str | None
    auth_rate_limit: float
    auth_burst_limit: int
    max_content_bytes: int
    max_frame_bytes: int
    max_connections_per_user: int
    max_keys_per_user: int
    max_connections_per_ip: int
    max_handshakes_per_ip: int
    max_outbox_bytes: int
    require_signatures: bool
    shutdown_timeout: float
    allowed_origins: frozenset[str]
    workers: int
    broker: str | None  # redis://... (protocol section 11), or None: in-process
    node_name: str
    message_retention_days: float  # 0: keep delivered messages for ever
    pending_retention_days: float  # 0: keep pending messages for ever
    metrics_addr: str | None  # a Twisted endpoint for /metrics, or None: not served
    log_format: str  # "text" or "json"
    presence: str  # who may watch whom: "contacts", "everyone" or "off" (protocol section 13)

    @property
    def tls(self) -> bool:
        """True when the server speaks HTTPS/WSS only."""
        return self.tls_cert is not None


def parse_listen(value: str) -> str:
    """Turn ``8080``, ``:8080``, ``host:8080``, ``[::1]:8080`` or an endpoint string
    into a Twisted endpoint description."""
    value = value.strip()
    if re.fullmatch(r"\d+", value):
        return f"tcp:{_port(value)}"
    if m := re.fullmatch(r":(\d+)", value):
        return f"tcp:{_port(m.group(1))}"
    if m := re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", value):
        host = m.group(1).replace(":", r"\:")
        return f"tcp6:{_port(m.group(2))}:interface={host}"
    if m := re.fullmatch(r"([A-Za-z0-9.\-]+):(\d+)", value):
        return f"tcp:{_port(m.group(2))}:interface={m.group(1)}"
    if re.fullmatch(r"(tcp6?|unix|systemd|ssl):.+", value):
        return value
    raise ValueError("use PORT, :PORT, HOST:PORT or a Twisted endpoint such as tcp:8080")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0 to 65535")
    return port


def _number(kind: type, low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise ValueError(f"must be a {'whole ' if kind is int else ''}number") from None
        if value != value or not low <= value <= high:  # NaN fails the first test
            raise ValueError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError("must be true/false, 1/0 or yes/no")


def _secret(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes")
    return raw


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


_POSTGRES_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)


def _database(text: str) -> str:
    """A SQLite file path, or a PostgreSQL URL in libpq's URI form:
    ``postgresql://[user[:password]@][host][:port]/dbname[?param=value...]``.
    Errors never repeat the URL (it may hold a password)."""
    if not _POSTGRES_URL.match(text):
        return _path(text)
    form = "use postgresql://[user[:password]@][host][:port]/dbname"
    if any(ch.isspace() for ch in text):
        raise ValueError(f"a PostgreSQL URL has no spaces ({form})")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535 ({form})")
    name = parts.path[1:]
    if not name or "/" in name:
        raise ValueError(f"a PostgreSQL URL needs one database name ({form})")
    return text


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the cluster's Redis is (``BROKER``)."""

    host: str
    port: int
    db: int
    password: str | None


_BROKER_FORM = "use redis://[:password@]host[:port][/db]"


def parse_broker(text: str) -> BrokerAddress:
    """``redis://[:password@]host[:port][/db]`` as a ``BrokerAddress``.

    Errors never repeat the URL (it may hold a password)."""
    if not re.match(r"redis://", text, re.IGNORECASE):
        raise ValueError(f"only Redis is supported ({_BROKER_FORM})")
    if any(ch.isspace() for ch in text):
        raise ValueError(f"a Redis URL has no spaces ({_BROKER_FORM})")
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ValueError(f"a Redis URL takes no parameters ({_BROKER_FORM})")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535 ({_BROKER_FORM})")
    if not parts.hostname:
        raise ValueError(f"a Redis URL needs a host ({_BROKER_FORM})")
    if parts.username:
        raise ValueError(f"give only a password, before an @ and after a colon ({_BROKER_FORM})")
    db_text = parts.path[1:] if parts.path else ""
    if db_text and not re.fullmatch(r"\d{1,5}", db_text):
        raise ValueError(f"the database must be a number ({_BROKER_FORM})")
    password = parts.password if parts.password else None
    return BrokerAddress(parts.hostname, port or 6379, int(db_text or 0), password)


def describe_broker(text: str) -> str:
    """``BROKER`` as it may be logged: the URL without its password."""
    return re.sub(r"(redis://[^@/]*?):[^@/]*@", r"\1:***@", text, count=1, flags=re.IGNORECASE)


def _broker(text: str) -> str:
    parse_broker(text)
    return text


def _node_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:@\-]{1,128}", text):
        raise ValueError("use 1-128 letters, digits and . _ : @ -")
    return text


def default_node_name() -> str:
    """``<hostname>:<pid>``, the name of a node that was given none."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _metrics_addr(text: str) -> str:
    try:
        return parse_listen(text)
    except ValueError:
        raise ValueError(
            "use PORT, :PORT, HOST:PORT or a Twisted endpoint such as tcp:9108:interface=127.0.0.1"
        ) from None


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _presence(text: str) -> str:
    value = text.strip().lower()
    if value not in ("contacts", "everyone", "off"):
        raise ValueError("must be contacts, everyone or off")
    return value


def _origins(text: str) -> frozenset[str]:
    found = set()
    for item in text.split(","):
        origin = item.strip().lower().rstrip("/")
        if not origin:
            continue
        if not re.fullmatch(r"https?://[a-z0-9.\-\[\]:]+", origin):
            raise ValueError(f"'{origin}' is not an origin like https://example.com:8443")
        found.add(origin)
    return frozenset(found)


# (variable, option, default as text or None, parser, help)
SETTINGS: list[tuple[str, str, str | None, Callable[[str], Any], str]] = [
    (
        "SERVER_ADDR",
        "port",
        ":8080",
        parse_listen,
        "where to listen: PORT, :PORT, HOST:PORT or a Twisted endpoint string",
    ),
    (
        "MESSAGE_RATE_LIMIT",
        "message-rate-limit",
        "5.0",
        _number(float, 0.001, 1e6),
        "messages per second per user",
    ),
    (
        "MESSAGE_BURST_LIMIT",
        "message-burst-limit",
        "10",
        _number(int, 1, 1_000_000),
        "token bucket capacity per user",
    ),
    (
        "DATABASE",
        "database",
        "wsserver.db",
        _database,
        "SQLite database file, or postgresql://user:password@host:port/dbname",
    ),
    (
        "JWT_SECRET",
        "jwt-secret",
        None,
        _secret,
        "token signing secret, >= 32 bytes (default: generated, kept in the database)",
    ),
    ("TOKEN_TTL", "token-ttl", "3600", _number(int, 1, 10 * 365 * 86400), "seconds a token lives"),
    (
        "CHALLENGE_TTL",
        "challenge-ttl",
        "60",
        _number(int, 1, 3600),
        "seconds a login challenge lives",
    ),
    ("TLS_CERT", "tls-cert", None, _path, "PEM certificate (chain) file; needs --tls-key"),
    ("TLS_KEY", "tls-key", None, _path, "PEM private key file; needs --tls-cert"),
    (
        "AUTH_RATE_LIMIT",
        "auth-rate-limit",
        "10",
        _number(float, 0.001, 1e6),
        "requests per second per IP on /auth/*",
    ),
    (
        "AUTH_BURST_LIMIT",
        "auth-burst-limit",
        "20",
        _number(int, 1, 1_000_000),
        "burst per IP on /auth/*",
    ),
    (
        "MAX_CONTENT_BYTES",
        "max-content-bytes",
        "65536",
        _number(int, 1, 16 * 1024 * 1024),
        "largest message content in UTF-8 bytes",
    ),
    (
        "MAX_FRAME_BYTES",
        "max-frame-bytes",
        "524288",
        _number(int, 1024, 128 * 1024 * 1024),
        "largest WebSocket frame or message",
    ),
    (
        "MAX_CONNECTIONS_PER_USER",
        "max-connections-per-user",
        "16",
        _number(int, 1, 10_000),
        "open connections per user",
    ),
    (
        "MAX_KEYS_PER_USER",
        "max-keys-per-user",
        "16",
        _number(int, 1, 1000),
        "active keys (devices) one user may hold",
    ),
    (
        "MAX_CONNECTIONS_PER_IP",
        "max-connections-per-ip",
        "4096",
        _number(int, 1, 1_000_000),
        "TCP connections per client address; more are closed at once",
    ),
    (
        "MAX_HANDSHAKES_PER_IP",
        "max-handshakes-per-ip",
        "128",
        _number(int, 1, 1_000_000),
        "connections per client address not yet upgraded to a WebSocket",
    ),
    (
        "MAX_OUTBOX_BYTES",
        "max-outbox-bytes",
        "1048576",
        _number(int, 1024, 1024 * 1024 * 1024),
        "unsent bytes per connection before it is closed with 1013",
    ),
    ("REQUIRE_SIGNATURES", "require-signatures", "false", _bool, "refuse unsigned messages"),
    (
        "SHUTDOWN_TIMEOUT",
        "shutdown-timeout",
        "10",
        _number(float, 0, 3600),
        "seconds to drain on shutdown",
    ),
    (
        "ALLOWED_ORIGINS",
        "allowed-origins",
        "",
        _origins,
        "comma-separated browser origins allowed on /ws besides the server's own",
    ),
    (
        "WORKERS",
        "workers",
        "1",
        _number(int, 1, 256),
        "node processes run on one listening socket; more than 1 needs BROKER",
    ),
    (
        "BROKER",
        "broker",
        None,
        _broker,
        "redis://[:password@]host[:port][/db]: the Redis of a cluster (default: in-process)",
    ),
    (
        "NODE_NAME",
        "node-name",
        None,
        _node_name,
        "this node's name in logs and /ready (default: <hostname>:<pid>)",
    ),
    (
        "MESSAGE_RETENTION_DAYS",
        "message-retention-days",
        "0",
        _number(float, 0, 36500),
        "delete delivered messages older than this many days (0: keep for ever)",
    ),
    (
        "PENDING_RETENTION_DAYS",
        "pending-retention-days",
        "0",
        _number(float, 0, 36500),
        "delete messages still pending older than this many days (0: keep for ever)",
    ),
    (
        "METRICS_ADDR",
        "metrics-addr",
        None,
        _metrics_addr,
        "where Prometheus metrics are served at /metrics, on a listener of their own: "
        "PORT, :PORT, HOST:PORT or an endpoint (default: not served)",
    ),
    (
        "PRESENCE",
        "presence",
        "contacts",
        _presence,
        "who may watch a user's presence: contacts (users they wrote to, and"
        " members of a group they are in), everyone, or off (everyone appears offline)",
    ),
    (
        "LOG_FORMAT",
        "log-format",
        "text",
        _log_format,
        "text, or json: one JSON object per line",
    ),
]


def load(options: Mapping[str, str | None], environ: Mapping[str, str]) -> Config:
    """Build the ``Config`` from option values (None: not given) and the environment."""
    values: dict[str, Any] = {}
    for variable, option, default, parse, _ in SETTINGS:
        given = options.get(option)
        text = given if given is not None else environ.get(variable, default)
        name = "listen" if variable == "SERVER_ADDR" else variable.lower()
        if text is None:
            values[name] = None
            continue
        try:
            values[name] = parse(text)
        except ValueError as exc:
            shown = f"{variable} (--{option})" if given is not None else variable
            raise ConfigError(f"{shown}: {exc}") from None
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("TLS_CERT/TLS_KEY: set both or neither")
    if values["node_name"] is None:
        values["node_name"] = default_node_name()
    if values["max_frame_bytes"] < values["max_content_bytes"]:
        raise ConfigError("MAX_FRAME_BYTES: must be at least MAX_CONTENT_BYTES")
    if values["workers"] > 1 and values["broker"] is None:
        raise ConfigError(
            f"WORKERS: {values['workers']} workers need BROKER (redis://host:port), "
            "through which they exchange live traffic; set BROKER or WORKERS=1"
        )
    assert set(values) == {f.name for f in fields(Config)}
    return Config(**values)
