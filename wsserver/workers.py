"""``--workers N``: one parent process, one listening socket, N node processes on it.

The parent (``twistd wsserver --workers N``) opens the listening socket in
``makeService``, before twistd daemonizes, so a port that cannot be had ends
the command with one line and exit status 1 as for a single process.  It
never accepts a connection itself (its reactor does not read the socket):
it runs N children, each a ``twistd -n wsserver`` that adopts the socket
(``reactor.adoptStreamPort``) from file descriptor 3 and is otherwise an
ordinary node (TLS wrapped in the child, its own database connection, its
own graceful shutdown).  The kernel hands each new connection to whichever
child accepts first.

The parent supervises: a child that ends is started again after a backoff
(0.5 s, doubling up to 30 s; reset once a child has run 30 s), and every
end is logged with the exit status or signal.  SIGTERM or SIGINT to the
parent (twistd stops its services) is forwarded to every child as SIGTERM;
the parent ends once all of them have drained (each closes its WebSockets
with 1001 within ``SHUTDOWN_TIMEOUT``), killing any still running 15 s
after that.  A child sees its parent go (its stdin, a pipe from the parent,
reaches end of file) and shuts down the same way, so a parent killed
outright leaves no orphan serving the port.  Each child runs in its own
process group, so a Ctrl-C on the terminal reaches only the parent, which
forwards it.

The children's output (twistd's log lines) is read through pipes and
logged again by the parent, each line prefixed with ``worker I/N (pid P)``,
so one log (the terminal or twistd's ``--logfile``) shows every process.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, endpoints, error, main, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import SETTINGS, Config, ConfigError
from .logs import ChoosesLogObserver, child_record

_log = Logger()

CHILD_FD = 3  # where a child finds the listening socket
FD_VARIABLE = "WSSERVER_LISTEN_FD"  # internal: set by the parent for its children only
WORKER_VARIABLE = "WSSERVER_WORKER"  # internal: "I/N", which worker a child is
FIRST_DELAY = 0.5  # seconds before the first restart of a child that ended
MAX_DELAY = 30.0  # the longest wait between restarts
STEADY = 30.0  # seconds a child must run for the next restart to wait FIRST_DELAY again
KILL_GRACE = 15.0  # seconds past SHUTDOWN_TIMEOUT before children still running are killed
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")


def listen_shared(reactor: Any, config: Config) -> Any:
    """Bind the listening socket for the children, or raise ``ConfigError``
    (SERVER_ADDR) saying why not.  The parent's reactor does not read it."""
    kind = config.listen.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6"):
        raise ConfigError(
            f"SERVER_ADDR: workers share a TCP socket, not a {kind}: endpoint; "
            "use HOST:PORT or tcp: (TLS comes from TLS_CERT and TLS_KEY)"
        )
    outcome: list[Any] = []
    # A plain factory: the parent never reads the socket, so it builds nothing.
    d = endpoints.serverFromString(reactor, config.listen).listen(protocol.Factory())
    d.addBoth(outcome.append)
    if not outcome:
        d.cancel()
        raise ConfigError(f"SERVER_ADDR: {config.listen} does not listen at once")
    if isinstance(outcome[0], Failure):
        raise ConfigError(
            f"SERVER_ADDR: cannot listen on {config.listen}: {outcome[0].getErrorMessage()}"
        )
    port = outcome[0]
    port.stopReading()  # the children accept; the parent only holds the socket
    return port


def child_environment(
    options: Mapping[str, str | None], environ: Mapping[str, str], config: Config
) -> dict[str, str]:
    """The environment of a child: the parent's, with every option given on the
    parent's command line turned into its variable (so no secret given as an
    option shows in the children's command lines), paths made absolute (twistd's
    ``--rundir`` changes directory before the children start), and one worker."""
    env = dict(environ)
    for variable, option, *_ in SETTINGS:
        given = options.get(option)
        if given is not None:
            env[variable] = given
    env["DATABASE"] = config.database
    if config.tls_cert is not None and config.tls_key is not None:
        env["TLS_CERT"] = os.path.abspath(config.tls_cert)
        env["TLS_KEY"] = os.path.abspath(config.tls_key)
    env["WORKERS"] = "1"
    env[FD_VARIABLE] = str(CHILD_FD)
    return env


def inherited_listener(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """In a child: (the listening socket's descriptor, ``"I/N"``); None in
    any other process."""
    fd = environ.get(FD_VARIABLE)
    if fd is None:
        return None
    try:
        return int(fd), environ.get(WORKER_VARIABLE, "?")
    except ValueError:
        raise ConfigError(f"{FD_VARIABLE}: internal to --workers, not a setting") from None


def socket_family(fd: int) -> int:
    """The address family of the socket behind ``fd`` (for ``adoptStreamPort``)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


class _ParentWatch:
    """Reads a child's stdin (a pipe from the parent): at its end the parent
    is gone, and the child stops (gracefully, as on SIGTERM)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False  # the reactor drops every reader as it stops
        reactor.addSystemEventTrigger("before", "shutdown", self._reactor_stops)

    def _reactor_stops(self) -> None:
        self._stopping = True

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Any) -> None:
        # The end of the pipe (epoll may report it as a hang-up, without a
        # read), unless the reactor is stopping anyway.
        if self._stopping:
            return
        _log.warn("the workers' parent is gone: shutting down")
        self._reactor.stop()


def become_child(reactor: Any, worker: str) -> None:
    """Set up a child process: its own process group (a terminal's Ctrl-C goes to
    the parent, which forwards it) and a watch on its parent."""
    os.setpgid(0, 0)
    reactor.addReader(_ParentWatch(reactor))
    _log.info(
        "worker {worker} (pid {pid}) adopts the listening socket", worker=worker, pid=os.getpid()
    )


class _Worker(protocol.ProcessProtocol):
    """One child slot of the parent: the process running in it now, if any."""

    def __init__(self, parent: WorkersService, index: int) -> None:
        self.parent = parent
        self.index = index
        self.pid: int | None = None
        self.started = 0.0
        self.delay = FIRST_DELAY
        self.restart: Any = None  # the pending restart call
        self.ended: defer.Deferred | None = None  # fires when the running child ends
        self._partial = {1: b"", 2: b""}

    @property
    def name(self) -> str:
        return f"{self.index}/{self.parent.count}"

    def start(self) -> None:
        self.restart = None
        self.ended = defer.Deferred()
        self._partial = {1: b"", 2: b""}
        env = dict(self.parent.env)
        env[WORKER_VARIABLE] = self.name
        if env.get("NODE_NAME"):
            # Nodes must not share a name (the PostgreSQL node registry, /ready):
            # a name given to the parent becomes one per worker.
            env["NODE_NAME"] = f"{env['NODE_NAME']}-{self.name.split('/')[0]}"
        self.started = self.parent.reactor.seconds()
        transport = self.parent.reactor.spawnProcess(
            self,
            TWISTD[0],
            [*TWISTD, "-n", "--pidfile=", "wsserver"],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", CHILD_FD: self.parent.fd},
        )
        self.pid = transport.pid
        _log.info("worker {worker} started (pid {pid})", worker=self.name, pid=self.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        text = _TIMESTAMP.sub(b"", line.rstrip(b"\r")).decode("utf-8", "replace")
        if not text:
            return
        emit = _log.info if childFD == 1 else _log.warn
        emit(
            "worker {worker} (pid {pid}): {line}",
            worker=self.name,
            pid=self.pid,
            line=text,
            child_record=child_record(text),  # LOG_FORMAT=json: the child's own line
        )

    def signal(self, name: str) -> None:
        """Send signal ``name`` to the running child, if any."""
        if self.ended is not None and not self.ended.called and self.transport is not None:
            with contextlib.suppress(error.ProcessExitedAlready):
                self.transport.signalProcess(name)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._relay(fd, rest)
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            how = f"killed by signal {value.signal}"
        else:
            how = f"exited with status {getattr(value, 'exitCode', 0) or 0}"
        ended, self.ended = self.ended, None
        if self.parent.stopping:
            _log.info("worker {worker} (pid {pid}) {how}", worker=self.name, pid=self.pid, how=how)
        else:
            reactor = self.parent.reactor
            if reactor.seconds() - self.started >= STEADY:
                self.delay = FIRST_DELAY
            _log.warn(
                "worker {worker} (pid {pid}) {how}; starting it again in {delay:g} s",
                worker=self.name,
                pid=self.pid,
                how=how,
                delay=self.delay,
            )
            self.restart = reactor.callLater(self.delay, self.start)
            self.delay = min(self.delay * 2, MAX_DELAY)
        if ended is not None:
            ended.callback(None)


class WorkersService(ChoosesLogObserver):
    """The parent of ``--workers N``: holds the listening socket, runs and
    supervises N children on it."""

    def __init__(
        self,
        config: Config,
        port: Any,
        env: dict[str, str],
        url: str,
        database: str,
        reactor: Any = None,
    ) -> None:
        """``url``: where the start-up line says the server is; ``database``:
        the database as it may be logged (no password)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.port = port
        self.fd: int = port.fileno()
        self.env = env
        self.url = url
        self.database = database
        self.count = config.workers
        self.stopping = False
        self.workers = [_Worker(self, i + 1) for i in range(self.count)]

    def startService(self) -> None:
        super().startService()
        _log.info(
            "wsserver listening on {where} (database {db}; {n} workers)",
            where=self.url,
            db=self.database,
            n=self.count,
        )
        for worker in self.workers:
            worker.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self._shut_down()

    @defer.inlineCallbacks
    def _shut_down(self) -> Any:
        """Forward SIGTERM to every child; end once all have ended (killing
        those still running ``KILL_GRACE`` s past ``SHUTDOWN_TIMEOUT``)."""
        self.stopping = True
        running = []
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
                worker.restart = None
            if worker.ended is not None:
                running.append(worker)
        _log.info("shutting down: stopping {n} workers", n=len(running))
        ends = [w.ended for w in running if w.ended is not None]
        for worker in running:
            worker.signal("TERM")
        killer = self.reactor.callLater(
            self.config.shutdown_timeout + KILL_GRACE, self._kill, running
        )
        yield defer.gatherResults(ends)
        if killer.active():
            killer.cancel()
        yield defer.maybeDeferred(self.port.stopListening)
        _log.info("shut down cleanly: every worker has ended")

    def _kill(self, running: list[_Worker]) -> None:
        for worker in running:
            if worker.ended is not None:
                _log.warn(
                    "worker {worker} (pid {pid}) did not end: killing it",
                    worker=worker.name,
                    pid=worker.pid,
                )
                worker.signal("KILL")


__all__ = [
    "CHILD_FD",
    "WorkersService",
    "become_child",
    "child_environment",
    "inherited_listener",
    "listen_shared",
    "socket_family",
]
