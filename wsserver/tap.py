"""``twistd wsserver``: options, and the one place that builds and wires everything.

``makeService`` does every start-up step that can fail (validate the
configuration, prepare the database, load the TLS files, bind the listening
port) before twistd daemonizes, so any failure stops the start with one line
on the terminal (exit status 1) whether or not twistd was asked to daemonize,
and no pidfile is left.  It also sets the process-wide tuning
(``tune_process``): only a server process gets it, never a test that builds
a ``WsServerService`` in-process.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from typing import Any

from autobahn.websocket import USES_NVX
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.application import service
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from .auth import Authenticator, Tokens, new_secret
from .broker import LocalBroker
from .broker.limits import SharedRateLimiter
from .broker.redis import RedisBroker, check_broker
from .config import SETTINGS, Config, ConfigError, load
from .events import (
    AccountEvents,
    DeletedUsers,
    GroupEvents,
    KeyRevoked,
    SignedOut,
    SignedOutAll,
)
from .logs import ChoosesLogObserver, twistd_json_observer
from .metrics import Metrics, metrics_site, worker_address
from .peers import PeerLimits
from .ratelimit import RateLimiter
from .retention import Retention
from .store import (
    EVENT_DELETED,
    EVENT_KEY_REVOKED,
    EVENT_SIGNED_OUT,
    EVENT_SIGNED_OUT_ALL,
    DatabaseError,
    NodeInfo,
    describe,
    is_postgres,
    open_store,
    prepare_database,
)
from .store.groups import EVENT_GROUP
from .web import WebSocketGate, build_root, build_site
from .web_groups import GroupsTree, Needs
from .websocket import (
    CLOSE_KEY_REVOKED,
    CLOSE_SIGNED_OUT,
    ServerFactory,
    skip_unlogged_option_dumps,
    text_frame,
    use_fast_unmasking,
)
from .workers import (
    WorkersService,
    become_child,
    child_environment,
    inherited_listener,
    listen_shared,
    socket_family,
)

_log = Logger()

GIL_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005


class Options(usage.Options):
    """Every setting of protocol section 10 (environment variables are the defaults)."""

    synopsis = "[options]"
    longdesc = (
        "Run the wsserver WebSocket messaging server. Every option can also be set "
        "through the environment variable named in brackets; options win. "
        "twistd's own options go before 'wsserver', these after it: "
        "twistd --pidfile=wsserver.pid --logfile=wsserver.log wsserver --port 8080 "
        "runs it daemonized; 'twistd -n wsserver ...' in the foreground; "
        "'twistd --help' lists twistd's options."
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


def open_url(address: Any, tls: bool) -> str | None:
    """The URL a person opens to reach a server bound to ``address`` (None for
    an address that is not TCP, such as a UNIX socket).

    A wildcard bind (``0.0.0.0``, ``::``) is shown as the loopback address of
    its family: the one address sure to reach the server from the machine it
    runs on (from elsewhere, the host's own name or address).
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104 (read, not bound)
    host = wildcard.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def where_listening(address: Any, tls: bool) -> str | None:
    """``open_url`` of ``address``, saying so when the bind is a wildcard: the
    URL shows the loopback address, but the server listens on every interface
    (a line that said only 127.0.0.1 would mislead whoever reads the log)."""
    url = open_url(address, tls)
    if url is not None and getattr(address, "host", None) in ("0.0.0.0", "", "::"):  # noqa: S104
        url += " (every interface)"
    return url


def _listened_now(d: defer.Deferred, setting: str, where: str, kinds: str) -> Any:
    """The port ``d`` (an endpoint's ``listen``) has already fired with, or
    ``ConfigError`` naming ``setting``: the endpoint failed, or it does not
    listen at once (only ``kinds`` do)."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if not outcome:
        d.cancel()
        raise ConfigError(f"{setting}: {where} does not listen at once; use {kinds}")
    if isinstance(outcome[0], Failure):
        raise ConfigError(f"{setting}: cannot listen on {where}: {outcome[0].getErrorMessage()}")
    return outcome[0]


class WsServerService(ChoosesLogObserver):
    """The whole server: database, broker, web site, listening port."""

    def __init__(
        self,
        config: Config,
        secret: bytes,
        reactor: Any = None,
        node: NodeInfo | None = None,
        broker_prefix: str = "wsserver:",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.port: Any = None
        self.metrics_port: Any = None  # the listener of METRICS_ADDR, once bound
        self._metrics_addr = config.metrics_addr
        self._listen_fd: int | None = None  # a socket adopted from the --workers parent
        self._node = node.name if node is not None else config.node_name
        clock: IReactorTime = reactor
        self.tls = tls_options(config.tls_cert, config.tls_key) if config.tls else None
        self.endpoint = endpoints.serverFromString(reactor, config.listen)
        self.store = open_store(config.database, clock, node)
        self.limiter = RateLimiter(config.message_rate_limit, config.message_burst_limit, clock)
        self.auth_limiter = RateLimiter(config.auth_rate_limit, config.auth_burst_limit, clock)
        tokens = Tokens(config.jwt_secret or secret, config.token_ttl, clock)
        self.auth = Authenticator(
            self.store, tokens, clock, config.challenge_ttl, config.max_keys_per_user
        )
        # Token checks wait until the signed-out tokens are loaded (the
        # account events prime them, below).
        self.auth.expect_priming()
        self.metrics = Metrics(self._node)
        self.broker: LocalBroker
        if config.broker is not None:
            self.broker = RedisBroker(
                self.store,
                clock,
                config.broker,
                config.node_name,
                prepare=text_frame,
                max_per_user=config.max_connections_per_user,
                prefix=broker_prefix,
                reactor=reactor,
            )
        else:
            self.broker = LocalBroker(
                self.store,
                clock,
                prepare=text_frame,
                max_per_user=config.max_connections_per_user,
            )
        self._wire_metrics()
        message_limiter: Any = self.limiter
        if isinstance(self.broker, RedisBroker):
            message_limiter = SharedRateLimiter(self.limiter, self.broker)
        self.factory = ServerFactory(
            store=self.store,
            broker=self.broker,
            limiter=message_limiter,
            clock=clock,
            max_content_bytes=config.max_content_bytes,
            max_frame_bytes=config.max_frame_bytes,
            max_outbox_bytes=config.max_outbox_bytes,
            require_signatures=config.require_signatures,
            metrics=self.metrics,
            auth=self.auth,
            presence=config.presence,
        )
        # Account changes (protocol sections 12 and 14): deletions, revoked
        # keys and sign-outs, recorded as account events that every node acts
        # on; the node that made one applies it at once (announce).
        self.account_events = AccountEvents(self.store, clock, prime=self.auth.prime)
        events = self.account_events
        events.on(
            EVENT_DELETED, DeletedUsers(self.store, self.auth, self.factory, CLOSE_KEY_REVOKED)
        )
        events.on(EVENT_KEY_REVOKED, KeyRevoked(self.auth, self.factory, CLOSE_KEY_REVOKED))
        events.on(EVENT_SIGNED_OUT, SignedOut(self.auth, self.factory, CLOSE_SIGNED_OUT))
        events.on(EVENT_SIGNED_OUT_ALL, SignedOutAll(self.auth, self.factory, CLOSE_SIGNED_OUT))
        presence = self.factory.presence_hub()
        events.on(EVENT_GROUP, GroupEvents(self.broker, presence.contacts_changed))
        # A deleted user is nobody's contact any more: their watchers stop.
        events.on(EVENT_DELETED, lambda user_id, _: presence.contacts_changed([user_id]))
        gate = WebSocketGate(
            self.factory, self.auth, config.allowed_origins, secure=self.tls is not None
        )
        root = build_root(
            self.auth,
            self.auth_limiter,
            gate,
            self._status,
            self.ready_checks,
            announce=events.apply_now,
            store=self.store,
            groups=GroupsTree(
                Needs(self.store, self.auth, clock, events.apply_now), self.auth_limiter
            ),
        )
        self.site = build_site(root)
        # Operations (protocol section 14): retention.
        self.retention = Retention(
            self.store, clock, config.message_retention_days, config.pending_retention_days
        )

    def _wire_metrics(self) -> None:
        """Give the store, the broker and the authenticator this node's metrics."""
        self.store.use_metrics(self.metrics)
        self.broker.metrics = self.metrics
        self.auth.metrics = self.metrics
        broker = self.broker
        up = (lambda: broker.ready[0]) if isinstance(broker, RedisBroker) else None
        self.metrics.watch(broker.count, broker.users, up)

    def for_worker(self, index: int) -> None:
        """Worker ``index`` of ``--workers`` serves its metrics on an address of
        its own (``metrics.worker_address``)."""
        if self._metrics_addr is not None:
            try:
                self._metrics_addr = worker_address(self._metrics_addr, index)
            except ValueError as exc:
                raise ConfigError(f"METRICS_ADDR: {exc}") from None

    def _status(self) -> dict:
        return {"connections": self.broker.count(), "node": self._node}

    def adopt(self, fd: int) -> None:
        """Serve on the listening socket ``fd`` (from the ``--workers`` parent)
        instead of binding ``SERVER_ADDR``; ``bind`` adopts it."""
        self._listen_fd = fd

    @defer.inlineCallbacks
    def ready_checks(self) -> Any:
        """(NODE_NAME, checks) for ``GET /ready``: the database answers, and in a
        cluster the broker's subscription is live and caught up."""
        checks = {}
        try:
            yield self.store.stream_head().addTimeout(5.0, self.reactor)
            checks["database"] = "ok"
        except Exception:
            checks["database"] = "the database does not answer"
        if isinstance(self.broker, RedisBroker):
            ok, why = self.broker.ready
            checks["broker"] = "ok" if ok else why
        return self.config.node_name, checks

    def listen(self) -> defer.Deferred:
        """Start listening; fires with the listening port."""
        factory: Any = self.site
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        self.peers = PeerLimits(
            factory, self.config.max_connections_per_ip, self.config.max_handshakes_per_ip
        )
        if self._listen_fd is not None:
            fd, self._listen_fd = self._listen_fd, None
            try:
                port = self.reactor.adoptStreamPort(fd, socket_family(fd), self.peers)
            except OSError as exc:
                return defer.fail(exc)
            finally:
                os.close(fd)  # adoptStreamPort works on a duplicate
            self.port = port
            return defer.succeed(port)
        d = self.endpoint.listen(self.peers)

        def listening(port: Any) -> Any:
            self.port = port
            return port

        return d.addCallback(listening)

    def bind_metrics(self) -> None:
        """Listen on ``METRICS_ADDR`` now (if set), or raise ``ConfigError``
        naming it; as ``bind``, before twistd daemonizes."""
        if self._metrics_addr is None or self.metrics_port is not None:
            return
        d = endpoints.serverFromString(self.reactor, self._metrics_addr).listen(
            metrics_site(self.metrics)
        )
        self.metrics_port = _listened_now(
            d, "METRICS_ADDR", self._metrics_addr, "a tcp: or unix: endpoint"
        )

    def bind(self) -> None:
        """Listen now, or raise ``ConfigError`` (SERVER_ADDR) saying why not.

        ``makeService`` calls this, so that the port is had (or the failure
        reported on the terminal) before twistd daemonizes: when it
        daemonizes, twistd calls ``privilegedStartService`` only after it has
        forked, in a process whose stderr is ``/dev/null``, and whose parent
        waits for a status that a process ending with ``SystemExit`` never
        writes (it would wait for ever: docs/architecture.md, Start-up).
        """
        if self.port is not None:
            return
        _listened_now(
            self.listen(), "SERVER_ADDR", self.config.listen, "a tcp:, ssl: or unix: endpoint"
        )
        try:
            self.bind_metrics()
        except ConfigError:
            self.port.stopListening()
            self.port = None
            raise

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Under twistd, makeService has bound already; in-process (tests) this
        # listens, raising ConfigError for a port that cannot be had.
        self.bind()

    def startService(self) -> None:
        super().startService()
        self.bind()
        self.store.start()
        if isinstance(self.broker, RedisBroker):
            self.broker.start()
        self.limiter.start()
        self.auth_limiter.start()
        self.retention.start()
        self.account_events.start()
        self.metrics.start(self.reactor)
        if not USES_NVX:
            _log.warn("Autobahn's NVX acceleration is not active: frames are processed in Python")
        where = self.config.listen
        if self.port is not None:
            where = where_listening(self.port.getHost(), self.tls is not None) or where
        _log.info(
            "wsserver listening on {where} (database {db})",
            where=where,
            db=describe(self.config.database),
        )
        if self.metrics_port is not None:
            url = open_url(self.metrics_port.getHost(), False)
            _log.info(
                "metrics at {url}",
                url=f"{url}metrics" if url else self._metrics_addr,
            )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self._shut_down()

    @defer.inlineCallbacks
    def _shut_down(self) -> Any:
        """Stop listening, commit, close every WebSocket with 1001, within the timeout."""
        _log.info("shutting down: {n} connections", n=self.broker.count())
        if self.port is not None:
            yield defer.maybeDeferred(self.port.stopListening)
        # Wait for the closing handshakes, but at most SHUTDOWN_TIMEOUT. Not
        # with addTimeout: cancelling shut_down cancels the Deferreds it waits
        # on, which lets it finish "successfully" with connections still open.
        in_time = yield _finished_within(
            self.factory.shut_down(), self.config.shutdown_timeout, self.reactor
        )
        dropped = 0
        if not in_time:
            left = list(self.broker.connections())
            dropped = len(left)
            _log.warn("shutdown timed out; dropping {n} connections", n=dropped)
            for conn in left:
                conn.dropConnection(abort=True)
        self.limiter.stop()
        self.auth_limiter.stop()
        self.account_events.stop()
        yield self.retention.stop()
        self.metrics.stop()
        if self.metrics_port is not None:
            yield defer.maybeDeferred(self.metrics_port.stopListening)
        if isinstance(self.broker, RedisBroker):
            yield self.broker.stop()
        yield self.store.close()
        if dropped:
            _log.info(
                "shut down: everything received was committed; {n} connections dropped"
                " without their close handshake",
                n=dropped,
            )
        else:
            _log.info("shut down cleanly")


def _finished_within(d: defer.Deferred, seconds: float, clock: IReactorTime) -> defer.Deferred:
    """Fire True once ``d`` has finished, or False after ``seconds`` on
    ``clock`` if it has not; ``d`` itself is never cancelled (a failure of it
    is logged)."""
    outcome: defer.Deferred = defer.Deferred()
    timer = clock.callLater(seconds, lambda: outcome.called or outcome.callback(False))

    def finished(result: Any) -> None:
        if isinstance(result, Failure):
            _log.failure("shutdown of the connections failed", result)
        if timer.active():
            timer.cancel()
        if not outcome.called:
            outcome.callback(True)

    d.addBoth(finished)
    return outcome


def _load(options: dict[str, Any], environ: dict[str, str]) -> Config:
    config = load(options, environ)
    # twistd changes directory (--rundir) after makeService and before the
    # database pool connects: a relative SQLite path means where the command
    # was run.
    if not is_postgres(config.database):
        config = dataclasses.replace(config, database=os.path.abspath(config.database))
    return config


def build_workers(
    options: dict[str, Any], environ: dict[str, str], reactor: Any = None
) -> WorkersService:
    """The parent of ``--workers N`` (N > 1): validate, prepare the database
    once (the children find it ready), check the TLS files, bind the shared
    listening socket.  Raises ``ConfigError`` or ``DatabaseError``."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = _load(options, environ)
    check_broker(config.broker)  # WORKERS > 1 needs one: it must answer before the fork
    if config.metrics_addr is not None:
        try:
            worker_address(config.metrics_addr, config.workers)
        except ValueError as exc:
            raise ConfigError(f"METRICS_ADDR: {exc}") from None
    prepare_database(config.database, new_secret)  # the parent is not a node
    if config.tls:
        tls_options(config.tls_cert, config.tls_key)
    port = listen_shared(reactor, config)
    url = where_listening(port.getHost(), config.tls) or config.listen
    env = child_environment(options, environ, config)
    return WorkersService(config, port, env, url, describe(config.database), reactor)


def build_service(
    options: dict[str, Any],
    environ: dict[str, str],
    reactor: Any = None,
    broker_prefix: str = "wsserver:",
) -> WsServerService:
    """Validate, prepare the database, reach the broker, build the service.

    Raises ``ConfigError`` or ``DatabaseError`` naming what is wrong.
    ``broker_prefix`` starts every Redis key and channel name (tests give
    each cluster one of its own).
    """
    config = _load(options, environ)
    # Nodes sharing a database register there (PostgreSQL) or claim the file
    # (SQLite); a node without a broker is refused beside another one, which
    # would otherwise miss its live traffic.
    if config.broker is not None:
        check_broker(config.broker)
    node = NodeInfo(config.node_name, has_broker=config.broker is not None)
    secret = prepare_database(config.database, new_secret, node)
    try:
        return WsServerService(config, secret, reactor, node, broker_prefix)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"SERVER_ADDR: {exc}") from None


def tune_process() -> None:
    """Process-wide settings for a server process, measured in docs/performance.md.

    They change the whole interpreter, so only ``makeService`` (twistd's
    path) calls this; a test that builds a ``WsServerService`` in-process
    keeps the interpreter as it was unless it calls this itself.
    """
    # The reactor thread and the database thread hand work to each other for
    # every batch; with CPython's default 5 ms switch interval a busy reactor
    # makes the finished commit wait that long for the GIL.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    use_fast_unmasking()  # measured: ~5 µs less per small received frame
    skip_unlogged_option_dumps()  # measured: ~190 µs less per connect
    # Everything built so far (modules, the service) lives as long as the
    # process: keep it out of the cyclic collector's full passes, which
    # otherwise scan it all (tens of milliseconds) every so often in the
    # middle of traffic.  Frozen before twistd forks, as the gc module advises.
    gc.collect()
    gc.freeze()


def _worker_index(worker: str) -> int:
    """I of a child's ``"I/N"`` (1 if it cannot be read)."""
    head = worker.split("/", 1)[0]
    return int(head) if head.isdigit() else 1


def makeService(options: Options) -> service.IService:
    """Called by twistd, before it daemonizes: the server, bound to its port and
    with the process tuned, or exit 1 with one line naming the bad setting."""
    environ = dict(os.environ)
    try:
        inherited = inherited_listener(environ)
        config = _load(dict(options), environ)
        server: WsServerService | WorkersService
        if inherited is None and config.workers > 1:
            server = build_workers(dict(options), environ)
        else:
            server = build_service(dict(options), environ)
            if inherited is not None:
                server.adopt(inherited[0])
                server.for_worker(_worker_index(inherited[1]))
            server.bind()
    except (ConfigError, DatabaseError) as exc:
        sys.stderr.write(f"wsserver: {exc}\n")
        raise SystemExit(1) from None
    if config.log_format == "json":
        # twistd asks its application for a log observer before making its own.
        try:
            server.log_observer = twistd_json_observer(options.parent)
        except OSError as exc:
            sys.stderr.write(f"wsserver: LOG_FORMAT: cannot open the log file: {exc.strerror}\n")
            raise SystemExit(1) from None
    if isinstance(server, WorkersService):
        return server
    if inherited is not None:
        from twisted.internet import reactor

        become_child(reactor, inherited[1])
    tune_process()
    return server


__all__ = [
    "Options",
    "WsServerService",
    "build_service",
    "build_workers",
    "makeService",
    "tune_process",
]
