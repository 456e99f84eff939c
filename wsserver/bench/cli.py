"""wsserver-bench: start the server as a user would, drive it with client
processes, measure it from /proc, print a table (and ``--json``, ``--plot``).

    wsserver-bench WORKLOAD [--duration S] [--json FILE] [--plot FILE]
    wsserver-bench all --quick

Figures are per unit (CPU microseconds per message, RSS per connection) or
ratios measured in the same run, because absolute times drift on a shared
machine.  See docs/performance.md for the method and the targets.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from . import connects, services

WORKLOADS = (
    "verify",
    "relay",
    "direct",
    "direct-unsigned",
    "latency",
    "relay-latency",
    "latency-unsigned",
    "broadcast",
    "idle",
    "login",
    "relay-connect",
    "connect",
    "cluster",
    "workers",
    "soak",
    "history",
)
SERVICE_WORKLOADS = ("cluster", "workers")  # in ``all`` only when their services answer
OPTIONAL_WORKLOADS = ("latency-unsigned",)  # never in ``all``: asked for by name
OPEN_LOOP = ("latency", "relay-latency", "latency-unsigned")  # a fixed offered rate
TICKS = os.sysconf("SC_CLK_TCK")
OPEN_LIMITS = [
    "--message-rate-limit",
    "1000000",
    "--message-burst-limit",
    "1000000",
    "--auth-rate-limit",
    "1000000",
    "--auth-burst-limit",
    "1000000",
    "--max-connections-per-ip",
    "20000",
    "--max-handshakes-per-ip",
    "20000",
    "--max-connections-per-user",
    "64",
    "--max-outbox-bytes",
    "16777216",
]


def log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Progress:
    """Progress on stderr: one line rewritten in place (``\\r``) on a terminal;
    into a file or a pipe, a plain line each time the phase changes."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last = ""
        self._shown = False

    def show(self, label: str, what: str, detail: str = "") -> None:
        phase = f"  {label}: {what}"
        if self._tty:
            self._stream.write(f"\r{phase}{detail}")
            self._shown = True
        elif phase != self._last:
            self._stream.write(phase + "\n")
        self._last = phase
        self._stream.flush()

    def clear(self) -> None:
        if self._tty and self._shown:
            self._stream.write("\r" + " " * 70 + "\r")
            self._stream.flush()
            self._shown = False


PROGRESS = Progress()


def summary(count: int, seconds: float) -> str:
    """The closing line: how many workloads ran, in how long."""
    return f"{count} workload{'' if count == 1 else 's'} in {seconds:.0f} s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- processes measured from /proc ----------------------------------------------


class Measured:
    """A child process whose CPU and RSS are read from /proc."""

    proc: subprocess.Popen

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the process, all its threads together."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICKS, int(fields[12]) / TICKS

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        code = self._stop()
        log_file = getattr(self, "log", None)
        if log_file is not None:
            log_file.close()
        return code

    def _stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Server(Measured):
    """``twistd -n wsserver`` on a free loopback port with a fresh database."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        tls: tuple[Path, Path] | None = None,
        database: str | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir()
        # WSSERVER_BENCH_TWISTD runs another build's twistd (to compare two
        # commits with the same client code); by default, the one beside us.
        twistd = os.environ.get("WSSERVER_BENCH_TWISTD") or (
            shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"
        )
        cmd = [
            twistd,
            "-n",
            "--pidfile=",
            "wsserver",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--database",
            database or str(self.dir / "db.sqlite"),
            *OPEN_LIMITS,
            *(extra or []),
        ]
        if tls:
            cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.scheme = "https" if tls else "http"
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            preexec_fn=raise_fd_limit,
            env={**os.environ, **(env or {})},
        )
        self.http = self._wait_up(tls)

    def _wait_up(self, tls: Any) -> Any:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.dir / 'server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                break
            except OSError:
                time.sleep(0.1)
        if tls:
            import ssl

            ctx = ssl.create_default_context(cafile=str(tls[0]))
            return lambda: http.client.HTTPSConnection("localhost", self.port, context=ctx)
        return lambda: http.client.HTTPConnection("127.0.0.1", self.port)

    @property
    def ws_url(self) -> str:
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{'wss' if self.scheme == 'https' else 'ws'}://{host}:{self.port}/ws"


class Relay(Measured):
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsserver.bench.relay", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_fd_limit,
        )
        self.proc.stdout.readline()
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"


@dataclass
class User:
    user_id: str
    seed: str
    token: str


def make_users(server: Server, prefix: str, count: int) -> list[User]:
    """Register and log in ``count`` users over one keep-alive connection."""
    conn = server.http()

    def post(path: str, body: dict) -> dict:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status >= 300:
            raise RuntimeError(f"{path}: {resp.status} {data}")
        return data

    users = []
    for i in range(count):
        key = SigningKey.generate()
        user_id = f"{prefix}{i}"
        pub = base64.b64encode(bytes(key.verify_key)).decode()
        post("/auth/register", {"user_id": user_id, "username": user_id, "public_key": pub})
        challenge = post("/auth/login", {"user_id": user_id})["challenge"]
        sig = base64.b64encode(key.sign(challenge.encode()).signature).decode()
        token = post("/auth/login?verify=true", {"user_id": user_id, "signature": sig})["token"]
        users.append(User(user_id, bytes(key).hex(), token))
    conn.close()
    return users


# -- client workers ------------------------------------------------------------


class Workers:
    """Client processes: each gets a job, says ready, waits for go, reports."""

    def __init__(self, jobs: list[dict]) -> None:
        self.procs = []
        for job in jobs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wsserver.bench.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            self.procs.append(proc)

    def wait_ready(self, label: str, timeout: float = 300) -> float:
        started = time.monotonic()
        for i, proc in enumerate(self.procs):
            line = self._line(proc, started + timeout, label, f"connecting ({i}/{len(self.procs)})")
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed to start: {line}")
        return time.monotonic() - started

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def results(self, label: str, duration: float, timeout: float = 300) -> list[dict]:
        started = time.monotonic()
        out = []
        for proc in self.procs:
            line = self._line(proc, started + timeout, label, "running", started, duration)
            result = json.loads(line)
            if "error" in result:
                raise RuntimeError(f"worker error: {result['error']}")
            out.append(result)
        return out

    def finish(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write("bye\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    @staticmethod
    def _line(
        proc: Any, deadline: float, label: str, what: str, since: float = 0, duration: float = 0
    ) -> str:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("a worker exited early")
                PROGRESS.clear()
                return line
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"{label}: a worker timed out while {what}")
            shown = f" {now - since:5.1f}/{duration:.0f} s" if since else ""
            PROGRESS.show(label, what, shown)


@dataclass
class Run:
    results: list[dict]
    cpu: float  # server CPU seconds between go and the last report
    system: float  # of which in the kernel
    wall: float
    parts: dict[str, float] | None = None  # CPU seconds per group of processes (a Meter's)
    gone: int = 0  # processes measured at the start that had ended by the end


# A meter reads the CPU of every process a run counts: {"group:key": (user, system)}.
Meter = Any


def run_measured(
    target: Measured, jobs: list[dict], label: str, duration: float, meter: Meter = None
) -> Run:
    """Start the workers, wait until all are connected, then measure the run.

    By default the CPU counted is the target's; a ``meter`` counts several
    processes (a cluster's nodes, PostgreSQL backends, Redis) and the run
    reports them per group (the part of each key before ``:``)."""
    meter = meter or (lambda: {"server": target.cpu_split()})
    workers = Workers(jobs)
    try:
        workers.wait_ready(label)
        before, wall0 = meter(), time.monotonic()
        workers.go()
        results = workers.results(label, duration)
        after, wall1 = meter(), time.monotonic()
    finally:
        workers.finish()
    cpu, system, parts, gone = cpu_delta(before, after)
    return Run(results, cpu, system, wall1 - wall0, parts, gone)


def cpu_delta(before: dict, after: dict) -> tuple[float, float, dict[str, float], int]:
    """(CPU seconds, of which system, CPU per group, processes gone) between two
    meter readings.  A process only in ``after`` started during the run and is
    counted whole; one only in ``before`` ended and cannot be read (counted in
    ``gone``)."""
    parts: dict[str, float] = {}
    cpu = system = 0.0
    for key, (user1, sys1) in after.items():
        user0, sys0 = before.get(key, (0.0, 0.0))
        group = key.split(":", 1)[0]
        parts[group] = parts.get(group, 0.0) + user1 + sys1 - user0 - sys0
        cpu += user1 + sys1 - user0 - sys0
        system += sys1 - sys0
    return cpu, system, parts, len(set(before) - set(after))


def split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def latency_figures(latencies_us: list[int]) -> dict:
    ms = [v / 1000 for v in latencies_us]
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
    }


def cpu_parts(run: Run, delivered: int) -> dict:
    """CPU µs per delivered message of each group of processes a meter counted."""
    out = {
        f"cpu_us_{group}": seconds * 1e6 / delivered if delivered else float("nan")
        for group, seconds in sorted((run.parts or {}).items())
    }
    out["processes_ended"] = run.gone
    return out


# -- workloads -----------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.workdir = Path(tempfile.mkdtemp(prefix="wsserver-bench-"))
        self.results: dict[str, dict] = {}
        self.samples: dict[str, list] = {}

    def duration(self, default: float) -> float:
        if self.args.duration:
            return self.args.duration
        return 3.0 if self.quick else default

    def verify(self) -> dict:
        key = SigningKey.generate()
        data = b"wsserver-msg-v1\nalice\nbob\nn-1\n" + b"x" * 100
        sig = key.sign(data).signature
        vk = key.verify_key
        runs = []
        count = 500 if self.quick else 2000
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(count):
                vk.verify(data, sig)
            runs.append((time.perf_counter() - started) / count * 1e6)
        return {"us_per_verify": statistics.median(runs)}

    def _pairs(
        self,
        target: Any,
        label: str,
        signed: bool,
        rate: float | None,
        relay: bool = False,
        server: Server | None = None,
        receiver_target: Any = None,
        meter: Meter = None,
    ) -> dict:
        """Pairs of a sender and a receiver (on ``receiver_target`` when given,
        e.g. a cluster's other node); CPU from ``meter`` when given."""
        pairs = 20 if self.quick else self.args.pairs
        if relay:
            users = [
                User(f"u{i}", bytes(SigningKey.generate()).hex(), "x") for i in range(2 * pairs)
            ]
        else:
            users = make_users(server, f"{label[:3]}", 2 * pairs)
        specs = [
            {
                "sender": users[2 * i].user_id,
                "seed": users[2 * i].seed,
                "sender_token": users[2 * i].token,
                "receiver": users[2 * i + 1].user_id,
                "receiver_token": users[2 * i + 1].token,
                **({"receiver_url": receiver_target.ws_url} if receiver_target else {}),
            }
            for i in range(pairs)
        ]
        duration = self.duration(10.0)
        chunks = split(specs, self.args.clients)
        jobs = [
            {
                "kind": "pairs",
                "url": target.ws_url,
                "pairs": chunk,
                "signed": signed,
                "window": self.args.window,
                "rate": rate,
                "phase": i / len(chunks),  # workers interleave their ticks
                "duration": duration,
                "relay": relay,
            }
            for i, chunk in enumerate(chunks)
        ]
        run = run_measured(target, jobs, label, duration, meter)
        results = run.results
        received = sum(r["received"] for r in results)
        latencies = [v for r in results for v in r["latencies_us"]]
        self.samples[label] = latencies
        figures = {
            "pairs": pairs,
            "client_processes": len(jobs),
            "sent": sum(r["sent"] for r in results),
            "delivered": received,
            "msg_per_s": received / run.wall,
            "cpu_us_per_msg": run.cpu * 1e6 / received if received else float("nan"),
            "cpu_system_share": run.system / run.cpu if run.cpu else 0.0,
            "refused": sum(r["refused"] for r in results),
            "closed_early": sum(r["closed_early"] for r in results),
            "lost": sum(r["lost"] for r in results),
            **latency_figures(latencies),
        }
        if rate:
            figures["offered_per_s"] = rate * pairs
        if meter is not None:
            figures.update(cpu_parts(run, received))
        return figures

    def relay(self) -> dict:
        return self._with_relay(
            lambda r: self._pairs(r, "relay", signed=False, rate=None, relay=True)
        )

    def _with_relay(self, run: Any) -> dict:
        """``run(relay)`` against a bare relay started for it, stopped after."""
        relay = Relay()
        try:
            return run(relay)
        finally:
            relay.stop()

    def _with_server(self, name: str, run: Any, tls: Any = None) -> dict:
        server = Server(self.workdir, name, tls)
        try:
            figures = run(server)
        finally:
            code = server.stop()
        figures["server_exit"] = code
        return figures

    def direct(self) -> dict:
        return self._with_server("direct", lambda s: self._pairs(s, "direct", True, None, server=s))

    def direct_unsigned(self) -> dict:
        return self._with_server(
            "direct-unsigned", lambda s: self._pairs(s, "direct-unsigned", False, None, server=s)
        )

    def latency(self) -> dict:
        rate = self._latency_rate()
        if self.args.expire:
            return self._latency_while_expiring(rate)
        return self._with_server(
            "latency", lambda s: self._pairs(s, "latency", True, rate, server=s)
        )

    def _latency_rate(self) -> float:
        """The ``latency`` load's rate per sender (--rate spread over the pairs)."""
        return self.args.rate / (20 if self.quick else self.args.pairs)

    def relay_latency(self) -> dict:
        """T8's ceiling: the bare relay under the ``latency`` load (signed
        frames, which it forwards unread) at the same offered rate."""
        rate = self._latency_rate()
        return self._with_relay(
            lambda r: self._pairs(r, "relay-latency", signed=True, rate=rate, relay=True)
        )

    def latency_unsigned(self) -> dict:
        """``latency`` with unsigned frames: the server's cost at the same rate
        without the verify."""
        rate = self._latency_rate()
        return self._with_server(
            "latency-unsigned",
            lambda s: self._pairs(s, "latency-unsigned", False, rate, server=s),
        )

    def _latency_while_expiring(self, rate: float) -> dict:
        """latency --expire N: the database starts with N delivered messages 30
        days old and MESSAGE_RETENTION_DAYS=1, so retention's first pass (10 s
        after the start) deletes them while the latency pairs run."""
        import re

        from ..store import prepare_database
        from ..store.sqlite import add_delivered_messages

        database = self.workdir / "latency-expire.sqlite"
        prepare_database(str(database), lambda: os.urandom(32))
        old_ms = int((time.time() - 30 * 86400) * 1000)
        add_delivered_messages(str(database), self.args.expire, old_ms, "x" * 100)
        server = Server(
            self.workdir,
            "latency-expire",
            database=str(database),
            extra=["--message-retention-days", "1"],
        )
        try:
            figures = self._pairs(server, "latency", True, rate, server=server)
        finally:
            code = server.stop()
        figures["server_exit"] = code
        figures["expired_at_start"] = self.args.expire
        log_text = (server.dir / "server.log").read_text("utf-8", "replace")
        done = re.search(r"retention: deleted (\d+) delivered .* in ([0-9.]+) s", log_text)
        figures["expired"] = int(done.group(1)) if done else 0
        figures["expiry_seconds"] = float(done.group(2)) if done else None
        return figures

    def broadcast(self) -> dict:
        receivers = 300 if self.quick else self.args.receivers
        return self._with_server("broadcast", lambda s: self._broadcast(s, receivers))

    def _broadcast(
        self,
        server: Server,
        receivers: int,
        receiver_urls: list[str] | None = None,
        meter: Meter = None,
        label: str = "broadcast",
    ) -> dict:
        """One sender on ``server``; receivers on ``receiver_urls`` in turn
        (default: the same server)."""
        users = make_users(server, label[:1], receivers + 1)
        duration = self.duration(10.0)
        tokens = [u.token for u in users[1:]]
        jobs = []
        for i, chunk in enumerate(split(tokens, self.args.clients)):
            job = {
                "kind": "broadcast",
                "url": server.ws_url,
                "receiver_tokens": chunk,
                "duration": duration,
                "rate": self.args.broadcast_rate,
                "window": self.args.broadcast_window,
                "drain": 30.0,
            }
            if receiver_urls:
                job["receiver_urls"] = receiver_urls
            if i == 0:
                job["sender_token"] = users[0].token
            jobs.append(job)
        measured = run_measured(server, jobs, label, duration, meter)
        results = measured.results
        deliveries = sum(r["deliveries"] for r in results)
        acked = set(results[0]["acked_ids"])
        lost = sum(len(acked - set(r["common_ids"])) for r in results)
        figures = {
            "receivers": receivers,
            "client_processes": len(jobs),
            "broadcasts": results[0]["sent"],
            "deliveries": deliveries,
            "deliveries_per_s": deliveries / measured.wall,
            "deliveries_per_cpu_s": deliveries / measured.cpu if measured.cpu else 0,
            "refused": sum(r["refused"] for r in results),
            "closed_early": sum(r["closed_early"] for r in results),
            "lost": lost,
        }
        if meter is not None:
            figures.update(cpu_parts(measured, deliveries))
        return figures

    # -- cluster and workers (need PostgreSQL and/or Redis) ----------------------

    def _single_unsigned(self) -> float:
        """Single-node direct-unsigned CPU µs per message of this run (measured
        now unless the run already has it): the yardstick of T7 and workers."""
        if "direct-unsigned" not in self.results:
            log("  (single-node direct-unsigned, the yardstick)")
            self.results["direct-unsigned"] = self.direct_unsigned()
        return self.results["direct-unsigned"]["cpu_us_per_msg"]

    def cluster(self) -> dict:
        """Two nodes on one PostgreSQL database and one Redis: every sender on
        node A, its receiver on node B; then broadcast with receivers on both."""
        database = self.args.database or services.DEFAULT_DATABASE
        broker = self.args.broker or services.DEFAULT_BROKER
        why = services.unavailable(database, broker)
        if why:
            raise RuntimeError(f"cluster: {why} (--database, --broker)")
        single = self._single_unsigned()
        postgres, redis = services.Postgres(database), services.Redis(broker)
        redis_pid = redis.pid()
        redis.clear()
        postgres.create()
        nodes: list[Server] = []
        try:
            for name in ("a", "b"):
                nodes.append(
                    Server(
                        self.workdir,
                        f"cluster-{name}",
                        database=postgres.url,
                        env={"BROKER": broker, "NODE_NAME": f"bench-{name}"},
                    )
                )
            node_a, node_b = nodes

            activity: list[dict[str, int]] = []  # PostgreSQL's counters at each reading

            def meter() -> dict:
                activity.append(postgres.activity())
                parts = {f"node_{n.dir.name[-1]}:": n.cpu_split() for n in nodes}
                for pid in postgres.backends():
                    cpu = services.pid_cpu(pid)
                    if cpu:
                        parts[f"postgres:{pid}"] = cpu
                cpu = services.pid_cpu(redis_pid) if redis_pid else None
                if cpu:
                    parts["redis:"] = cpu
                return parts

            direct = self._pairs(
                node_a,
                "cluster",
                False,
                None,
                server=node_a,
                receiver_target=node_b,
                meter=meter,
            )
            # What PostgreSQL did per delivered message in the direct phase.
            delivered = direct["delivered"] or 1
            for key, value in activity[1].items():
                direct[f"pg_{key}_per_msg"] = (value - activity[0].get(key, 0)) / delivered
            receivers = 300 if self.quick else self.args.receivers
            broadcast = self._broadcast(
                node_a,
                receivers,
                [node_a.ws_url, node_b.ws_url],
                meter,
                label="cluster-broadcast",
            )
        finally:
            codes = [node.stop() for node in nodes]
            postgres.drop()
            redis.clear()
        figures = dict(direct)
        figures["single_node_cpu_us_per_msg"] = single
        figures["redis_measured"] = redis_pid is not None
        figures["database"] = postgres.name
        for key in ("deliveries_per_s", "deliveries_per_cpu_s", "lost"):
            figures[f"broadcast_{key}"] = broadcast[key]
        for group in ("node_a", "node_b", "postgres", "redis"):
            figures[f"broadcast_cpu_us_{group}"] = broadcast.get(f"cpu_us_{group}", 0.0)
        for key in ("lost", "refused", "closed_early"):
            figures[key] = direct[key] + broadcast[key]
        figures["node_exits"] = codes
        return figures

    def workers(self) -> dict:
        """``--workers 2`` on one socket with BROKER against ``--workers 1`` (the
        same BROKER and SQLite), the direct-unsigned load, in the same run."""
        broker = self.args.broker or services.DEFAULT_BROKER
        why = services.broker_unavailable(broker)
        if why:
            raise RuntimeError(f"workers: {why} (--broker)")
        redis = services.Redis(broker)
        redis_pid = redis.pid()
        out: dict[str, Any] = {}
        for count in (1, 2):
            redis.clear()
            server = Server(
                self.workdir,
                f"workers-{count}",
                extra=["--workers", str(count)],
                env={"BROKER": broker},
            )

            def meter(server: Server = server) -> dict:
                # The parent and every worker process it runs, and Redis.
                parts = {"parent:": server.cpu_split()}
                for pid in services.children(server.proc.pid):
                    cpu = services.pid_cpu(pid)
                    if cpu:
                        parts[f"workers:{pid}"] = cpu
                cpu = services.pid_cpu(redis_pid) if redis_pid else None
                if cpu:
                    parts["redis:"] = cpu
                return parts

            try:
                figures = self._pairs(
                    server, f"workers-{count}", False, None, server=server, meter=meter
                )
            finally:
                out[f"exit_{count}"] = server.stop()
            for key in (
                "msg_per_s",
                "cpu_us_per_msg",
                "cpu_us_parent",
                "cpu_us_workers",
                "cpu_us_redis",
            ):
                out[f"{key}_{count}"] = figures.get(key, 0.0)
            out[f"p99_ms_{count}"] = figures["p99_ms"]
            for key in ("lost", "refused", "closed_early"):
                out[key] = out.get(key, 0) + figures[key]
        redis.clear()
        out["msg_per_s_ratio"] = out["msg_per_s_2"] / out["msg_per_s_1"]
        out["cpu_per_msg_ratio"] = out["cpu_us_per_msg_2"] / out["cpu_us_per_msg_1"]
        out["redis_measured"] = redis_pid is not None
        return out

    def idle(self) -> dict:
        count = 2000 if self.quick else (self.args.connections or 10000)
        out = {"plain": self._with_server("idle", lambda s: self._idle(s, count))}
        cert, key = make_certificate(self.workdir)
        out["tls"] = self._with_server(
            "idle-tls", lambda s: self._idle(s, count, cert), tls=(cert, key)
        )
        return out

    def _idle(self, server: Server, count: int, cafile: Path | None = None) -> dict:
        per_user = 10
        users = make_users(server, "i", (count + per_user - 1) // per_user)
        tokens = [u.token for u in users for _ in range(per_user)][:count]
        time.sleep(0.5)
        rss0 = server.rss_bytes()
        jobs = [
            {
                "kind": "idle",
                "url": server.ws_url,
                "tokens": chunk,
                "duration": 0,
                "cafile": str(cafile) if cafile else None,
            }
            for chunk in split(tokens, max(2, self.args.clients))
        ]
        workers = Workers(jobs)
        try:
            seconds = workers.wait_ready("idle" + (" tls" if cafile else ""))
            time.sleep(1.0)
            rss1 = server.rss_bytes()
            workers.go()
            results = workers.results("idle", 0)
        finally:
            workers.finish()
        connected = sum(r["connections"] for r in results)
        return {
            "connections": connected,
            "client_processes": len(jobs),
            "rss_before_mib": rss0 / 2**20,
            "rss_after_mib": rss1 / 2**20,
            "kib_per_connection": (rss1 - rss0) / 1024 / connected if connected else 0,
            "connects_per_s": connected / seconds if seconds else 0,
            "closed_early": sum(r["closed_early"] for r in results),
        }

    def login(self) -> dict:
        def run(server: Server) -> dict:
            duration = self.duration(10.0)
            jobs = [
                {
                    "kind": "login",
                    "host": "127.0.0.1",
                    "port": server.port,
                    "prefix": f"l{i}",
                    "duration": duration,
                }
                for i in range(self.args.clients)
            ]
            measured = run_measured(server, jobs, "login", duration)
            results = measured.results
            logins = sum(r["logins"] for r in results)
            return {
                "logins": logins,
                "client_processes": len(jobs),
                "logins_per_s": logins / measured.wall,
                "cpu_us_per_login": measured.cpu * 1e6 / logins if logins else float("nan"),
                "errors": sum(r["errors"] for r in results),
            }

        return self._with_server("login", run)

    def relay_connect(self) -> dict:
        return connects.relay_connect_workload(self)

    def connect(self) -> dict:
        return connects.connect_workload(self)

    # -- history (T10) ---------------------------------------------------------------

    def history(self) -> dict:
        """``GET /messages`` pages and ``since`` replays at a small and a large
        database, on SQLite and (when it answers, or with --database) on
        PostgreSQL."""
        from . import history

        quick = self.quick
        sizes = self.args.history_sizes or ((5_000, 25_000) if quick else (10_000, 1_000_000))
        count = 20 if quick else 200
        engines = ["sqlite"]
        database = self.args.database or services.DEFAULT_DATABASE
        if not quick or self.args.database:
            try:
                services.Postgres(database).check()
                engines.append("postgres")
            except Exception as exc:
                log(f"history: PostgreSQL left out: it does not answer ({type(exc).__name__})")
        out: dict[str, Any] = {
            "sizes": list(sizes),
            "replays_per_size": count,
        }
        for engine in engines:
            out.update(self._history_engine(history, engine, sizes, count, database))
        return out

    def _history_engine(
        self, history: Any, engine: str, sizes: tuple[int, ...], count: int, admin: str
    ) -> dict:
        data = history.History()
        out: dict[str, Any] = {}
        postgres = services.Postgres(admin) if engine == "postgres" else None
        if postgres is not None:
            postgres.create()
            database = postgres.url
            out["postgres_database"] = postgres.name
        else:
            database = str(self.workdir / "history.sqlite")
        users: list[User] = []
        try:
            for size in sizes:
                label = f"history {engine} {size:,}"
                PROGRESS.show(label, "loading")
                load = history.load_postgres if postgres else history.load_sqlite
                loaded = load(database, data, size)
                PROGRESS.clear()
                log(f"  {label}: loaded in {loaded:.0f} s (not timed)")
                replays = data.replays(count, seed=size)
                query, plan = history.query_times(engine, database, replays)
                # The first page of a replay from the probe's first message
                # (the whole history after it): the query alone.
                far, far_plan = history.query_times(engine, database, data.far_replays(count))
                page_query, page_plan = history.page_query_times(
                    engine, database, data.pages(count, seed=size)
                )
                server = Server(self.workdir, f"history-{engine}-{size}", database=database)
                try:
                    if not users:
                        users = make_users(server, "h", history.PROBES)
                    tokens = {u.user_id: u.token for u in users}
                    job = {
                        "kind": "replays",
                        "url": server.ws_url,
                        "count": history.REPLAY,
                        "replays": [
                            {"token": tokens[probe], "since": since} for probe, since, _ in replays
                        ],
                    }
                    workers = Workers([job])
                    try:
                        workers.wait_ready(label)
                        workers.go()
                        (result,) = workers.results(label, 0)
                    finally:
                        workers.finish()
                    pages = history.page_times(server.http, tokens, data.pages(count, seed=size))
                finally:
                    server.stop()
                times = [v / 1000 for v in result["times_us"]]
                key = f"{engine}_{size}"
                out[f"{key}_page_p50_ms"] = pages["page_p50_ms"]
                out[f"{key}_page_p99_ms"] = pages["page_p99_ms"]
                out[f"{key}_page_query_p50_ms"] = page_query["page_query_p50_ms"]
                out[f"{key}_page_query_p99_ms"] = page_query["page_query_p99_ms"]
                out[f"{key}_page_plan"] = page_plan
                out[f"{key}_page_plan_uses_index"] = "messages_conv" in "\n".join(page_plan)
                out[f"{key}_replay_p50_ms"] = percentile(times, 50)
                out[f"{key}_replay_p99_ms"] = percentile(times, 99)
                out[f"{key}_query_p50_ms"] = query["query_p50_ms"]
                out[f"{key}_query_p99_ms"] = query["query_p99_ms"]
                out[f"{key}_plan_uses_indexes"] = history.plan_uses_indexes(engine, plan)
                out[f"{key}_plan"] = plan
                out[f"{key}_far_query_p50_ms"] = far["query_p50_ms"]
                out[f"{key}_far_query_p99_ms"] = far["query_p99_ms"]
                out[f"{key}_far_plan"] = far_plan
                out[f"{key}_far_plan_stops_early"] = history.plan_stops_early(engine, far_plan)
                # A replay that did not bring its 256 messages within 30 s.
                out["errors"] = out.get("errors", 0) + result["short"]
                out["closed_early"] = out.get("closed_early", 0) + result["closed_early"]
        finally:
            if postgres is not None:
                postgres.drop()
        small, large = sizes[0], sizes[-1]
        for what in ("page", "page_query", "replay", "query", "far_query"):
            ratio = out[f"{engine}_{large}_{what}_p99_ms"] / out[f"{engine}_{small}_{what}_p99_ms"]
            out[f"{engine}_{what}_p99_ratio"] = ratio
        return out

    # -- soak (T9) ----------------------------------------------------------------

    def soak(self) -> dict:
        """Connections held for the duration (a third on a TLS server) with a
        trickle of traffic; the servers' RSS sampled all along (T9)."""
        duration = self.args.duration or (6.0 if self.quick else 600.0)
        total = self.args.connections or (150 if self.quick else 15000)
        # A short run gets a denser trickle, so that every kind of traffic happens.
        rates = dict(SOAK_RATES if duration >= SOAK_JUDGED_FROM_S else SOAK_RATES_QUICK)
        interval = min(10.0, max(0.5, duration / 20))
        certs = self.workdir / "soak-certs"
        certs.mkdir()
        cert, key = make_certificate(certs)
        counts = {"plain": total - total // 3, "tls": total // 3}
        servers: dict[str, Server] = {}
        try:
            servers["plain"] = Server(self.workdir, "soak", env=tracing(self.args, "plain"))
            servers["tls"] = Server(
                self.workdir, "soak-tls", tls=(cert, key), env=tracing(self.args, "tls")
            )
            jobs: list[dict] = []
            owners: list[str] = []  # the server of each job
            for mode, server in servers.items():
                share = counts[mode] / total
                server_jobs = soak_jobs(
                    server,
                    counts[mode],
                    self.args.clients,
                    {k: v * share for k, v in rates.items()},
                    duration,
                    str(cert) if mode == "tls" else None,
                    prefix=mode[0],
                    first_index=len(jobs),
                )
                jobs += server_jobs
                owners += [mode] * len(server_jobs)
            go = time.monotonic()  # replaced by the time of go (below)
            results, samples, wall = run_sampled(
                list(servers.values()), jobs, "soak", duration, interval
            )
            go = time.monotonic() - wall
        finally:
            codes = {mode: server.stop() for mode, server in servers.items()}
        figures = soak_figures(results, owners, samples, duration, interval)
        if self.args.tracemalloc:
            for mode in servers:
                where = Path(self.args.tracemalloc) / mode
                report = tracemalloc_diff(where, go + figures["baseline_s"])
                (where / "diff.txt").write_text(report)
                log(f"  tracemalloc, {mode} server (minute 1 -> end; {where / 'diff.txt'}):")
                log("\n".join(report.splitlines()[:12]))
        figures["server_exits"] = list(codes.values())
        figures["wall_s"] = wall
        self.samples["soak-rss"] = samples
        return figures

    def run(self, names: list[str]) -> dict:
        for name in names:
            log(f"[{name}]")
            started = time.monotonic()
            self.results[name] = getattr(self, name.replace("-", "_"))()
            self.results[name]["seconds"] = time.monotonic() - started
        return self.results


# -- soak ----------------------------------------------------------------------

# The soak's trickle, in total over both servers (each gets its share of the
# connections' share): direct messages, broadcasts, reconnects with since and
# logins (register + challenge + verify), per second.
SOAK_RATES = {"direct": 30.0, "broadcast": 0.2, "reconnect": 15.0, "login": 1.0}
SOAK_RATES_QUICK = {"direct": 40.0, "broadcast": 2.0, "reconnect": 20.0, "login": 4.0}
SOAK_PER_USER = 5  # connections (devices) per user
MAX_FDS_PER_CLIENT = 19_000  # under the 20,000 descriptors one process may hold
SOAK_BASELINE_S = 60.0  # "minute 1": growth is measured from here to the end
SOAK_JUDGED_FROM_S = 120.0  # shorter runs print T9 as not judged


def soak_jobs(
    server: Server,
    count: int,
    clients: int,
    rates: dict[str, float],
    duration: float,
    cafile: str | None,
    prefix: str,
    first_index: int = 0,
) -> list[dict]:
    """The soak's client jobs for one server: ``count`` connections of users
    with ``SOAK_PER_USER`` each (a user's connections all in one process),
    spread so that no process holds more than ``MAX_FDS_PER_CLIENT``; one
    broadcaster (a user of its own) in the first process; the rates split
    evenly."""
    users = make_users(server, prefix, -(-count // SOAK_PER_USER) + 1)
    broadcaster, users = users[0], users[1:]
    parts = max(1, clients, -(-count // MAX_FDS_PER_CLIENT))
    slots = [{"user_id": u.user_id, "token": u.token} for u in users for _ in range(SOAK_PER_USER)]
    slots = slots[:count]
    groups: list[list[dict]] = [[] for _ in range(parts)]
    for i in range(0, len(slots), SOAK_PER_USER):  # whole users, in turn
        groups[(i // SOAK_PER_USER) % parts].extend(slots[i : i + SOAK_PER_USER])
    jobs = []
    for i, group in enumerate(groups):
        job = {
            "kind": "soak",
            "url": server.ws_url,
            "port": server.port,
            "cafile": cafile,
            "users": group,
            "duration": duration,
            "drain": 60.0,
            "rates": {k: v / parts for k, v in rates.items() if k != "broadcast"},
            "index": first_index + i,
            "seed": first_index + i,
            "login_prefix": f"{prefix}login{i}-",
        }
        if i == 0:
            job["broadcaster_token"] = broadcaster.token
            job["rates"]["broadcast"] = rates.get("broadcast", 0.0)
        jobs.append(job)
    return jobs


def tracing(args: argparse.Namespace, mode: str) -> dict[str, str] | None:
    """The environment that makes a server trace its allocations
    (``--tracemalloc DIR``: snapshots into DIR/<mode>, see
    ``tracemalloc_hook/sitecustomize.py``), or None."""
    if not args.tracemalloc:
        return None
    where = Path(args.tracemalloc) / mode
    where.mkdir(parents=True, exist_ok=True)
    hook = Path(__file__).parent / "tracemalloc_hook"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "WSSERVER_BENCH_TRACEMALLOC": str(where),
        "WSSERVER_BENCH_TRACEMALLOC_EVERY": str(args.tracemalloc_every),
    }


def tracemalloc_diff(where: Path, since: float, top: int = 25) -> str:
    """What grew between the first snapshot taken at or after ``since`` (the
    system-wide monotonic clock) and the last one: the ``top`` lines by
    growth, each with its call stack."""
    import tracemalloc

    taken = []
    for name in where.glob("times-*.txt"):
        for line in name.read_text().splitlines():
            path, at = line.rsplit(" ", 1)
            taken.append((float(at), path))
    taken.sort()
    later = [path for at, path in taken if at >= since]
    if len(later) < 2:
        return f"fewer than two snapshots after the baseline in {where}\n"
    first = tracemalloc.Snapshot.load(later[0])
    last = tracemalloc.Snapshot.load(later[-1])
    lines = [f"{later[0]} -> {later[-1]}"]
    stats = last.compare_to(first, "traceback")
    total = sum(s.size_diff for s in stats)
    lines.append(f"total growth of traced memory: {total / 2**20:+.2f} MiB")
    for stat in stats[:top]:
        lines.append(
            f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks"
            f"  (now {stat.size / 1024:.1f} KiB)"
        )
        lines.extend(f"        {frame}" for frame in stat.traceback.format()[-12:])
    return "\n".join(lines) + "\n"


def run_sampled(
    servers: list[Server], jobs: list[dict], label: str, duration: float, interval: float
) -> tuple[list[dict], list[list[float]], float]:
    """Run the workers (as ``run_measured``) while a thread reads the servers'
    RSS every ``interval`` seconds from go to the end of the duration:
    ``[seconds, MiB of each server...]`` rows."""
    import threading

    samples: list[list[float]] = []
    done = threading.Event()

    def sample(started: float) -> None:
        tick = 0
        while True:
            at = started + tick * interval
            if done.wait(max(0.0, at - time.monotonic())):
                return
            row = [round(time.monotonic() - started, 2)]
            row += [server.rss_bytes() / 2**20 for server in servers]
            samples.append(row)
            tick += 1
            if tick * interval > duration + 1e-9:
                return

    workers = Workers(jobs)
    try:
        workers.wait_ready(label, timeout=900)
        started = time.monotonic()
        workers.go()
        sampler = threading.Thread(target=sample, args=(started,), daemon=True)
        sampler.start()
        results = workers.results(label, duration, timeout=duration + 300)
        wall = time.monotonic() - started
        done.set()
        sampler.join()
    finally:
        done.set()
        workers.finish()
    return results, samples, wall


def rss_growth(samples: list[list[float]], column: int, baseline_s: float) -> tuple[float, float]:
    """(MiB at the baseline, growth in % from there to the last sample) of one
    column: the baseline is the first sample at or after ``baseline_s``."""
    if not samples:
        return float("nan"), float("nan")
    base = next((row for row in samples if row[0] >= baseline_s), samples[-1])
    first, last = base[column], samples[-1][column]
    return first, (last - first) / first * 100 if first else float("nan")


def soak_figures(
    results: list[dict],
    owners: list[str],
    samples: list[list[float]],
    duration: float,
    interval: float,
) -> dict:
    """The soak's figures from its workers' reports and the RSS samples
    (columns: seconds, then one per server in the order of ``owners``' modes)."""
    modes = list(dict.fromkeys(owners))
    baseline = min(SOAK_BASELINE_S, duration / 3)
    figures: dict[str, Any] = {"duration_s": duration, "sample_interval_s": interval}
    for mode in modes:
        mine = [r for r, o in zip(results, owners, strict=True) if o == mode]
        figures[f"connections_{mode}"] = sum(r["connections"] for r in mine)
    figures["client_processes"] = len(results)
    lost = missed = 0
    broadcasts = 0
    for mode in modes:
        mine = [r for r, o in zip(results, owners, strict=True) if o == mode]
        slots = sum(r["connections"] for r in mine)
        acked = {i for r in mine for i in r["broadcast_acked"]}
        broadcasts += len(acked)
        got: dict[int, int] = {}
        for r in mine:
            for msg_id, n in r["broadcast_counts"].items():
                got[int(msg_id)] = got.get(int(msg_id), 0) + n
        lost += sum(1 for i in acked if not got.get(i))
        missed += sum(slots - min(slots, got.get(i, 0)) for i in acked)
        lost += sum(r["direct_lost"] for r in mine)
        missed += sum(r["direct_missed"] for r in mine)
    keys = ("direct_sent", "direct_acked", "direct_resent", "direct_unacked", "broadcast_sent")
    for key in (*keys, "reconnects", "logins"):
        figures[key] = sum(r[key] for r in results)
    figures["broadcast_acked"] = broadcasts
    figures["lost"] = lost
    figures["missed_deliveries"] = missed
    figures["refused"] = sum(r["refused"] for r in results)
    figures["closed_early"] = sum(r["closed_early"] for r in results)
    # A message never acknowledged, even after it was sent again, is an error.
    figures["errors"] = sum(
        r["connect_errors"] + r["login_errors"] + r["direct_unacked"] for r in results
    )
    figures["client_max_loop_lag_s"] = max(r.get("max_loop_lag_s", 0.0) for r in results)
    figures["client_loop_lags_over_5s"] = sum(r.get("loop_lags_over_5s", 0) for r in results)
    figures["baseline_s"] = baseline
    for column, mode in enumerate(modes, start=1):
        base, growth = rss_growth(samples, column, baseline)
        figures[f"rss_{mode}_start_mib"] = samples[0][column] if samples else float("nan")
        figures[f"rss_{mode}_baseline_mib"] = base
        figures[f"rss_{mode}_end_mib"] = samples[-1][column] if samples else float("nan")
        figures[f"rss_{mode}_growth_pct"] = growth
    figures["rss_growth_pct"] = max(figures[f"rss_{mode}_growth_pct"] for mode in modes)
    figures["judged"] = duration >= SOAK_JUDGED_FROM_S
    figures["rss_samples"] = samples
    return figures


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (the idle TLS workload)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- report --------------------------------------------------------------------


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, limit, met) for every target whose figures were measured."""
    rows: list[tuple[str, str, str, bool | None]] = []
    if "direct" in r and "verify" in r:
        ratio = r["direct"]["cpu_us_per_msg"] / r["verify"]["us_per_verify"]
        rows.append(("T1 direct CPU/msg vs verify", f"{ratio:.2f}x", "<= 1.30x", ratio <= 1.3))
    if "direct-unsigned" in r and "relay" in r:
        ratio = r["direct-unsigned"]["cpu_us_per_msg"] / r["relay"]["cpu_us_per_msg"]
        rows.append(("T2 unsigned CPU/msg vs relay", f"{ratio:.2f}x", "<= 2.00x", ratio <= 2.0))
    if "latency" in r:
        lat = r["latency"]
        ok = lat["p99_ms"] <= 5.0 and lat["refused"] == 0 and lat["lost"] == 0
        rows.append(("T3 latency p99 at offered rate", f"{lat['p99_ms']:.2f} ms", "<= 5 ms", ok))
    if "broadcast" in r:
        rate = r["broadcast"]["deliveries_per_cpu_s"]
        rows.append(
            ("T4 broadcast deliveries/CPU-s", f"{rate:,.0f}", ">= 200,000", rate >= 200_000)
        )
    if "idle" in r:
        plain, tls = r["idle"]["plain"], r["idle"]["tls"]
        rows.append(
            (
                "T5 idle RSS/conn plain",
                f"{plain['kib_per_connection']:.1f} KiB",
                "<= 12 KiB",
                plain["kib_per_connection"] <= 12,
            )
        )
        rows.append(
            (
                "T5 idle RSS/conn TLS",
                f"{tls['kib_per_connection']:.1f} KiB",
                "<= 40 KiB",
                tls["kib_per_connection"] <= 40,
            )
        )
    if "cluster" in r:
        c = r["cluster"]
        ratio = c["cpu_us_per_msg"] / c["single_node_cpu_us_per_msg"]
        rows.append(
            ("T7 cluster CPU/msg vs single node", f"{ratio:.2f}x", "<= 2.50x", ratio <= 2.5)
        )
    # Not with --expire: that latency run shares the server with retention.
    if "latency" in r and "relay-latency" in r and "expired" not in r["latency"]:
        ratio = r["latency"]["cpu_us_per_msg"] / r["relay-latency"]["cpu_us_per_msg"]
        rows.append(
            ("T8 latency CPU/msg vs relay-latency", f"{ratio:.2f}x", "<= 2.00x", ratio <= 2.0)
        )
    if "soak" in r:
        soak = r["soak"]
        growth = soak["rss_growth_pct"]
        judged = soak.get("judged", True)
        rows.append(
            (
                "T9 soak RSS growth after minute 1 / lost",
                f"{growth:+.1f}% / {soak['lost']}",
                "<= 5% / 0",
                (growth <= 5.0 and soak["lost"] == 0) if judged else None,
            )
        )
    if "history" in r:
        h = r["history"]
        small, large = h["sizes"][0], h["sizes"][-1]
        judged = small <= 10_000 and large >= 1_000_000
        for engine in ("sqlite", "postgres"):
            if f"{engine}_replay_p99_ratio" not in h:
                continue
            # The replay (client-timed), and the first page of a replay of
            # the whole history (the query alone: "far").
            for what, label in (
                ("page", "page"),
                ("page_query", "page query"),
                ("replay", "replay"),
                ("far_query", "far page"),
            ):
                if f"{engine}_{what}_p99_ratio" not in h:
                    continue
                ratio = h[f"{engine}_{what}_p99_ratio"]
                p99 = h[f"{engine}_{large}_{what}_p99_ms"]
                rows.append(
                    (
                        f"T10 {engine} {label} p99 {large:,} vs {small:,}",
                        f"{ratio:.2f}x {p99:.1f} ms",
                        "<= 1.5x 20 ms",
                        (ratio <= 1.5 and p99 <= 20.0) if judged else None,
                    )
                )
    t11 = connects.target_row(r)
    if t11 is not None:
        rows.append(t11)
    lost = sum(v.get("lost", 0) for v in r.values() if isinstance(v, dict))
    unexpected = sum(
        v.get("refused", 0) + v.get("closed_early", 0) + v.get("errors", 0)
        for v in r.values()
        if isinstance(v, dict)
    )
    unexpected += sum(
        v.get("closed_early", 0) for v in r.get("idle", {}).values() if isinstance(v, dict)
    )
    rows.append(
        (
            "T6 acked lost / unexpected refusals",
            f"{lost} / {unexpected}",
            "0 / 0",
            lost == 0 and unexpected == 0,
        )
    )
    return rows


def verdict(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "NO"


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_report(results: dict) -> None:
    print()
    for name, figures in results.items():
        if name == "idle":
            for mode, sub in figures.items():
                if isinstance(sub, dict):
                    print(f"{name} ({mode})")
                    for key, value in sub.items():
                        print(f"    {key:24} {fmt(value)}")
            continue
        print(name)
        for key, value in figures.items():
            if not isinstance(value, list | dict):  # the soak's RSS samples: --json
                print(f"    {key:24} {fmt(value)}")
    print()
    print(f"{'target':40} {'measured':>14} {'limit':>12}  met")
    rows = targets(results)
    for name, measured, limit, met in rows:
        print(f"{name:40} {measured:>14} {limit:>12}  {verdict(met)}")
    if any(met is None for _, _, _, met in rows):
        why = []
        if any(name.startswith("T9") and met is None for name, _, _, met in rows):
            why.append(
                f"a soak shorter than {SOAK_JUDGED_FROM_S:.0f} s says nothing about growth "
                "after its first minute"
            )
        if any(name.startswith("T10") and met is None for name, _, _, met in rows):
            why.append("T10 compares 10,000 with 1,000,000 stored messages")
        print(f"\n-: not judged ({'; '.join(why)}).")
    if not all(met or met is None for _, _, _, met in rows):
        print(
            "\nNO: a target not met.  docs/performance.md (section Targets, in the source "
            "tree) explains each target and why the ones missed are missed."
        )


def soak_plot_path(path: str, alone: bool) -> str:
    """Where the soak's RSS curve goes: the --plot file when the soak ran
    alone, else beside it (``run.png`` -> ``run-soak.png``)."""
    if alone:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-soak{p.suffix or '.png'}"))


def write_soak_plot(path: str, soak: dict, machine_commit: str = "") -> None:
    """The soak's RSS curve of each server, the minute-1 baseline and the
    +5% line of T9."""
    import matplotlib.pyplot as plt

    samples = soak["rss_samples"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    minutes = [row[0] / 60 for row in samples]
    for column, (mode, colour) in enumerate((("plain", "#4477aa"), ("tls", "#ee6677")), 1):
        connections = soak.get(f"connections_{mode}", 0)
        label = f"{'TLS' if mode == 'tls' else 'plain'} server ({connections:,} connections)"
        ax.plot(minutes, [row[column] for row in samples], color=colour, label=label)
        base = soak[f"rss_{mode}_baseline_mib"]
        ax.axhline(base * 1.05, color=colour, linestyle=":", linewidth=1)
    ax.axvline(soak["baseline_s"] / 60, color="#999999", linestyle="--", linewidth=1)
    ax.text(
        soak["baseline_s"] / 60,
        ax.get_ylim()[0],
        f" baseline ({soak['baseline_s']:g} s)",
        color="#666666",
        fontsize=8,
    )
    ax.set_xlabel("minutes since the traffic started")
    ax.set_ylabel("server RSS (MiB); dotted: minute 1 + 5% (T9)")
    growth = ", ".join(
        f"{mode} {soak[f'rss_{mode}_growth_pct']:+.1f}%" for mode in ("plain", "tls")
    )
    every = soak["sample_interval_s"]
    title = f"Soak: server RSS every {every:g} s; growth after minute 1: {growth}"
    title += f"; lost {soak['lost']}"
    if machine_commit:
        title += f" (commit {machine_commit})"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plot(path: str, results: dict, samples: dict, commit: str = "") -> None:
    """A PNG: cost per message, latency distribution, and every target at a
    glance; the soak's RSS curve in a PNG of its own (``soak_plot_path``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot needs matplotlib: pip install 'wsserver[bench]'")
        return
    if "soak" in results:
        alone = len(results) == 1
        write_soak_plot(soak_plot_path(path, alone), results["soak"], commit)
        if alone:
            return
    fig, (cost, lat, goals) = plt.subplots(1, 3, figsize=(16, 4.8))

    bars = []  # (label, measured, target)
    if "direct" in results and "verify" in results:
        bars.append(
            (
                "direct (signed)\nT1: 1.3 x verify",
                results["direct"]["cpu_us_per_msg"],
                1.3 * results["verify"]["us_per_verify"],
            )
        )
    if "direct-unsigned" in results and "relay" in results:
        bars.append(
            (
                "direct (unsigned)\nT2: 2 x relay",
                results["direct-unsigned"]["cpu_us_per_msg"],
                2.0 * results["relay"]["cpu_us_per_msg"],
            )
        )
    if "latency" in results and "relay-latency" in results:
        bars.append(
            (
                "latency (open loop)\nT8: 2 x relay-latency",
                results["latency"]["cpu_us_per_msg"],
                2.0 * results["relay-latency"]["cpu_us_per_msg"],
            )
        )
    for name in ("verify", "relay", "relay-latency"):
        if name in results:
            key = "us_per_verify" if name == "verify" else "cpu_us_per_msg"
            bars.append((f"{name}\n(ceiling)", results[name][key], None))
    for i, (_label, value, target) in enumerate(bars):
        cost.bar(i, value, color="#4477aa" if target else "#bbbbbb")
        cost.text(i, value, f"{value:.0f}", ha="center", va="bottom", fontsize=9)
        if target:
            cost.hlines(target, i - 0.4, i + 0.4, color="#cc3311", linewidth=3)
    cost.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    cost.set_ylabel("server CPU µs per message (red: target)")
    cost.set_title("Cost per message")

    for label, values in samples.items():
        if values and label != "relay":
            ordered = sorted(v / 1000 for v in values)
            ys = [i / len(ordered) for i in range(len(ordered))]
            shown = label if label in OPEN_LOOP else f"{label} (saturated)"
            lat.plot(ordered, ys, label=shown)
    lat.axvline(5.0, color="#cc3311", linestyle="--", label="T3: p99 <= 5 ms")
    lat.axhline(0.99, color="#999999", linewidth=0.5)
    lat.set_xscale("log")
    lat.set_xlabel("latency send -> receive (ms, log scale)")
    lat.set_ylabel("fraction of messages")
    lat.set_title("Latency distribution")
    lat.legend(fontsize=8, loc="lower right")

    rows = [(name, measured, met) for name, measured, _, met in targets(results)]
    goals.barh(
        range(len(rows)),
        [1] * len(rows),
        color=["#999999" if met is None else "#228833" if met else "#cc3311" for *_, met in rows],
    )
    for i, (name, measured, met) in enumerate(rows):
        said = "not judged" if met is None else "met" if met else "NOT met"
        goals.text(
            0.02,
            i,
            f"{name}: {measured}  ({said})",
            va="center",
            color="white",
            fontsize=8,
            fontweight="bold",
        )
    goals.set_yticks([])
    goals.set_xticks([])
    goals.invert_yaxis()
    goals.set_title("Targets (docs/performance.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
    }


def make_parser() -> argparse.ArgumentParser:
    """The command line of wsserver-bench."""
    parser = argparse.ArgumentParser(
        prog="wsserver-bench",
        description=(
            "Start wsserver as a user would (twistd -n wsserver, fresh database), "
            "drive it from client processes, measure its CPU and memory from /proc, "
            "and print the figures against the targets T1-T11."
        ),
        epilog=(
            "Workloads, method, targets and past figures: docs/performance.md in the source tree."
        ),
    )
    parser.add_argument(
        "workload",
        nargs="+",
        choices=("all", *WORKLOADS),
        help="one or more, run in this order in one run (e.g. relay-connect connect)",
    )
    parser.add_argument("--quick", action="store_true", help="every workload briefly")
    parser.add_argument("--duration", type=float, help="seconds per workload")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--plot", help="write a PNG (needs matplotlib)")
    parser.add_argument("--pairs", type=int, default=50, help="direct/latency pairs")
    parser.add_argument("--window", type=int, default=16, help="messages in flight per sender")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: offered msg/s")
    parser.add_argument("--receivers", type=int, default=1000, help="broadcast receivers")
    parser.add_argument(
        "--broadcast-rate",
        type=float,
        default=0.0,
        help="broadcasts per second (0: closed loop, --broadcast-window unacknowledged)",
    )
    parser.add_argument(
        "--broadcast-window", type=int, default=16, help="broadcasts in flight (as direct)"
    )
    parser.add_argument(
        "--expire",
        type=int,
        default=0,
        help="latency: start with this many expired messages for retention to delete meanwhile",
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="idle: connections (default 10000); soak: connections, a third TLS (default 15000)",
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument(
        "--tracemalloc",
        metavar="DIR",
        help="soak: the servers trace their allocations (slower) and write snapshots "
        "into DIR; the growth from minute 1 to the end is printed and kept in DIR/*/diff.txt",
    )
    parser.add_argument(
        "--tracemalloc-every",
        type=float,
        default=30.0,
        help="soak --tracemalloc: seconds between snapshots",
    )
    parser.add_argument(
        "--history-sizes",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        help="history: stored messages of the small and the large database (default 10000,1000000)",
    )
    parser.add_argument(
        "--database",
        help=(
            "cluster: PostgreSQL URL of a role that may create databases; the benchmark "
            f"creates and drops a database of its own there (default {services.DEFAULT_DATABASE})"
        ),
    )
    parser.add_argument(
        "--broker",
        help=(
            "cluster, workers: the Redis (its keys wsserver:<db>:* are cleared before and "
            f"after; default {services.DEFAULT_BROKER})"
        ),
    )
    return parser


def all_workloads(args: argparse.Namespace) -> list[str]:
    """The workloads of ``all``: cluster and workers only when their services
    answer (given with --database/--broker, or the local defaults)."""
    names = [n for n in WORKLOADS if n not in SERVICE_WORKLOADS + OPTIONAL_WORKLOADS]
    database = args.database or services.DEFAULT_DATABASE
    broker = args.broker or services.DEFAULT_BROKER
    why = services.unavailable(database, broker)
    if why is None:
        names.append("cluster")
    else:
        log(f"cluster left out: {why}")
    why = services.broker_unavailable(broker)
    if why is None:
        names.append("workers")
    else:
        log(f"workers left out: {why}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if "all" in args.workload and len(args.workload) > 1:
        parser.error("all runs every workload: name it alone")
    if len(set(args.workload)) < len(args.workload):
        parser.error("a workload is named twice (its second run would replace the first)")
    raise_fd_limit()
    names = all_workloads(args) if "all" in args.workload else args.workload
    where = machine()  # the commit the run starts with (the code it has loaded)
    bench = Bench(args)
    started = time.monotonic()
    try:
        results = bench.run(names)
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    print_report(results)
    log("\n" + summary(len(names), time.monotonic() - started))
    if args.json:
        rows = [
            {"target": t, "measured": m, "limit": lim, "met": ok}
            for t, m, lim, ok in targets(results)
        ]
        Path(args.json).write_text(
            json.dumps({"machine": where, "results": results, "targets": rows}, indent=2)
        )
    if args.plot:
        write_plot(args.plot, results, bench.samples, where["commit"])
    lost = sum(v.get("lost", 0) for v in results.values() if isinstance(v, dict))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
