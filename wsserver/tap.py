"""``twistd wsserver``: options, and the one place that builds and wires everything.

``makeService`` validates the configuration and prepares the database
before twistd daemonizes, so a bad setting or an unusable database stops the
start with one line on the terminal (exit status 1) instead of a traceback in
a log file.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from typing import Any

from autobahn.websocket import USES_NVX
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.application import service
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from .auth import Authenticator, Tokens, new_secret
from .broker import LocalBroker
from .config import SETTINGS, Config, ConfigError, load
from .peers import PeerLimits
from .ratelimit import RateLimiter
from .store import DatabaseError, NodeInfo, describe, open_store, prepare_database
from .web import WebSocketGate, build_root, build_site
from .websocket import ServerFactory, text_frame, use_fast_unmasking

_log = Logger()

GIL_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005


class Options(usage.Options):
    """Every setting of protocol section 10 (environment variables are the defaults)."""

    synopsis = "[options]"
    longdesc = (
        "Run the wsserver WebSocket messaging server. Every option can also be set "
        "through the environment variable named in brackets; options win."
    )
    optParameters = [
        [option, None, None, f"{text} [{variable}, default: {default or 'unset'}]"]
        for variable, option, default, _, text in SETTINGS
    ]


def tls_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """Server TLS settings from PEM files: TLS 1.2 or newer, chain included."""
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
    except OSError as exc:
        raise ConfigError(f"TLS_CERT: cannot read {cert_path}: {exc.strerror}") from None
    try:
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as exc:
        raise ConfigError(f"TLS_KEY: cannot read {key_path}: {exc.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"TLS_CERT: no readable PEM certificate in {cert_path}") from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"TLS_KEY: no usable unencrypted PEM key in {key_path}") from None
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # checks that the key matches the certificate
    except Exception:
        raise ConfigError("TLS_KEY: does not match the certificate in TLS_CERT") from None
    return options


class WsServerService(service.Service):
    """The whole server: database, broker, web site, listening port."""

    def __init__(
        self, config: Config, secret: bytes, reactor: Any = None, node: NodeInfo | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.port: Any = None
        clock: IReactorTime = reactor
        self.tls = tls_options(config.tls_cert, config.tls_key) if config.tls else None
        self.endpoint = endpoints.serverFromString(reactor, config.listen)
        self.store = open_store(config.database, clock, node)
        self.limiter = RateLimiter(config.message_rate_limit, config.message_burst_limit, clock)
        self.auth_limiter = RateLimiter(config.auth_rate_limit, config.auth_burst_limit, clock)
        tokens = Tokens(config.jwt_secret or secret, config.token_ttl, clock)
        self.auth = Authenticator(self.store, tokens, clock, config.challenge_ttl)
        self.factory = ServerFactory(
            store=self.store,
            limiter=self.limiter,
            clock=clock,
            max_content_bytes=config.max_content_bytes,
            max_frame_bytes=config.max_frame_bytes,
            max_outbox_bytes=config.max_outbox_bytes,
            require_signatures=config.require_signatures,
        )
        self.broker = LocalBroker(
            self.store,
            clock,
            prepare=text_frame,
            max_per_user=config.max_connections_per_user,
        )
        self.factory.broker = self.broker
        gate = WebSocketGate(
            self.factory, self.auth, config.allowed_origins, secure=self.tls is not None
        )
        root = build_root(self.auth, self.auth_limiter, gate, self._status)
        self.site = build_site(root)

    def _status(self) -> dict:
        return {"connections": self.broker.count()}

    def listen(self) -> defer.Deferred:
        """Start listening; fires with the listening port."""
        factory: Any = self.site
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        self.peers = PeerLimits(
            factory, self.config.max_connections_per_ip, self.config.max_handshakes_per_ip
        )
        d = self.endpoint.listen(self.peers)

        def listening(port: Any) -> Any:
            self.port = port
            return port

        return d.addCallback(listening)

    def privilegedStartService(self) -> None:
        # Listen before twistd drops privileges or daemonizes, so that a port
        # that cannot be had is reported on the terminal.
        super().privilegedStartService()
        outcome: list[Any] = []
        self.listen().addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            # twistd has redirected sys.stderr into its log by now: write to
            # the real terminal.
            (sys.__stderr__ or sys.stderr).write(
                f"wsserver: SERVER_ADDR: cannot listen on {self.config.listen}: "
                f"{outcome[0].getErrorMessage()}\n"
            )
            raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        # The reactor thread and the database thread hand work to each other
        # for every batch; with CPython's default 5 ms switch interval a busy
        # reactor makes the finished commit wait that long for the GIL.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        # Everything built so far lives as long as the process: keep it out of
        # the cyclic collector's full passes, which otherwise scan it all
        # (tens of milliseconds) every so often in the middle of traffic.
        gc.collect()
        gc.freeze()
        use_fast_unmasking()  # measured: ~5 µs less per small received frame
        if self.port is None:
            self.listen().addErrback(self._listen_failed)
        self.store.start()
        self.limiter.start()
        self.auth_limiter.start()
        if not USES_NVX:
            _log.warn("Autobahn's NVX acceleration is not active: frames are processed in Python")
        host = self.port.getHost() if self.port is not None else self.config.listen
        _log.info(
            "wsserver listening on {host} ({scheme}), database {db}",
            host=host,
            scheme="https/wss" if self.tls else "http/ws",
            db=describe(self.config.database),
        )

    def _listen_failed(self, failure: Failure) -> None:
        _log.failure("cannot listen on {addr}", failure, addr=self.config.listen)
        if IReactorCore.providedBy(self.reactor):
            self.reactor.stop()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self._shut_down()

    @defer.inlineCallbacks
    def _shut_down(self) -> Any:
        """Stop listening, commit, close every WebSocket with 1001, within the timeout."""
        _log.info("shutting down: {n} connections", n=self.broker.count())
        if self.port is not None:
            yield defer.maybeDeferred(self.port.stopListening)
        closing = self.factory.shut_down()
        closing.addTimeout(self.config.shutdown_timeout, self.reactor)
        try:
            yield closing
        except defer.TimeoutError:
            left = list(self.broker.connections())
            _log.warn("shutdown timed out; dropping {n} connections", n=len(left))
            for conn in left:
                conn.dropConnection(abort=True)
        self.limiter.stop()
        self.auth_limiter.stop()
        yield self.store.close()
        _log.info("shut down cleanly")


def build_service(
    options: dict[str, Any], environ: dict[str, str], reactor: Any = None
) -> WsServerService:
    """Validate, prepare the database, build the service.

    Raises ``ConfigError`` or ``DatabaseError`` naming what is wrong.
    """
    config = load(options, environ)
    # Nodes sharing a database register there; without a broker (there is
    # none yet) a second live node is refused instead of missing live traffic.
    node = NodeInfo(f"{socket.gethostname()}:{os.getpid()}", has_broker=False)
    secret = prepare_database(config.database, new_secret, node)
    try:
        return WsServerService(config, secret, reactor, node)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"SERVER_ADDR: {exc}") from None


def makeService(options: Options) -> service.IService:
    """Called by twistd: the server, or exit 1 with one line naming the bad setting."""
    try:
        return build_service(dict(options), dict(os.environ))
    except (ConfigError, DatabaseError) as exc:
        sys.stderr.write(f"wsserver: {exc}\n")
        raise SystemExit(1) from None


__all__ = ["Options", "WsServerService", "build_service", "makeService"]
