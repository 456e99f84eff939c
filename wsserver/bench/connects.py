"""The ``connect`` workload (T11) and its ceiling ``relay-connect``.

Each client process opens authenticated WebSocket connections one after
another, one at a time per process, cycling over its users (registered and
logged in beforehand, not measured).  A connection opens with
``?since=<the last id this user saw>``, as a reconnecting client does, so the
server replays nothing.

When is the connect done?  The first frame the client could receive is the
first live frame after the replay (protocol section 6: replayed messages
before live ones; the server holds live frames until its replay has finished).
So the client sends one unsigned message to itself right after the open (a
user may write to themself: it reaches the sending connection too) and closes
the connection as soon as that message comes back: by then the server has
checked the token, looked up the user, replayed nothing and gone live.  The
bare relay (``relay.py``) is driven by the same code: it forwards the frame
back to the same connection (partner = self), with no token, no user and no
replay.  Both figures therefore include one small message in and out, the
closing handshake and the TCP teardown.

Figures: server CPU µs per connect, connects/s, and the client-timed connect
(TCP connect to the message back) p50/p99.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from twisted.internet import reactor
from twisted.python.failure import Failure

_ID = re.compile(rb'"id":(\d+)')
_TYPE = re.compile(rb'"type":"(\w+)"')


class Connects:
    """A client process's side of ``connect``: one connection at a time."""

    def __init__(self, job: dict) -> None:
        self.job = job
        self.relay = job.get("relay", False)
        self.slots = [dict(slot) for slot in job["slots"]]
        self.next_slot = 0
        self.running = False
        self.busy = False
        self.current: dict | None = None
        self.conn: Any = None
        self.started_ns = 0
        self.answered = False
        self.seq = 0
        self.connects = 0
        self.errors = 0
        self.replayed = 0  # messages before the probe (none expected: since is the last id)
        self.nonce = ""
        self.unexpected: list[str] = []
        self.latencies_us: list[int] = []

    def setup(self) -> Any:
        return None

    def start(self) -> None:
        self.running = True
        self._next()

    def stop(self) -> None:
        self.running = False

    def idle(self) -> bool:
        return not self.busy

    def _next(self) -> None:
        if not self.running:
            self.busy = False
            return
        from .worker import connect  # the worker imports this module

        self.busy = True
        slot = self.slots[self.next_slot]
        self.next_slot = (self.next_slot + 1) % len(self.slots)
        self.current = slot
        self.answered = False
        self.conn = None
        headers = {}
        if self.relay:
            headers = {"X-Bench-User": slot["user"], "X-Bench-Partner": slot["user"]}
        url = f"{self.job['url']}?since={slot['since']}"
        self.started_ns = time.monotonic_ns()
        d = connect(self.job, self, slot["token"], headers, url)
        d.addCallbacks(self._opened, self._failed)

    def _opened(self, conn: Any) -> None:
        self.conn = conn
        self.seq += 1
        user = self.current["user"]
        self.nonce = f"k{os.getpid()}-{self.seq}"
        frame = {"to": user, "content": "c", "nonce": self.nonce}
        conn.sendMessage(json.dumps(frame, separators=(",", ":")).encode())

    def _failed(self, failure: Failure) -> None:
        self.errors += 1
        if len(self.unexpected) < 5:
            self.unexpected.append(failure.getErrorMessage())
        reactor.callLater(0, self._next)

    def frame(self, conn: Any, payload: bytes) -> None:
        kind = _TYPE.search(payload)
        kind = kind.group(1) if kind else b"message"  # the relay forwards client frames
        if kind == b"ack" or self.answered:
            return
        if kind != b"message":
            self.errors += 1
            self.answered = True  # counted: closed() must not count it again
            if len(self.unexpected) < 5:
                self.unexpected.append(payload[:200].decode("utf-8", "replace"))
            conn.sendClose(1000)
            return
        if f'"nonce":"{self.nonce}"'.encode() not in payload:
            self.replayed += 1  # not the probe (a message replayed first): wait on
            return
        self.answered = True
        self.latencies_us.append((time.monotonic_ns() - self.started_ns) // 1000)
        found = _ID.search(payload)
        if found and not self.relay:
            self.current["since"] = int(found.group(1))
        self.connects += 1
        conn.sendClose(1000)

    def closed(self, conn: Any, code: int | None) -> None:
        if conn is not self.conn:
            return  # a failed open: _failed moves on
        if not self.answered:
            self.errors += 1
        self.conn = None
        reactor.callLater(0, self._next)

    def report(self) -> dict:
        return {
            "connects": self.connects,
            "errors": self.errors,
            "replayed": self.replayed,
            "unexpected": self.unexpected,
            "latencies_us": self.latencies_us,
        }


# -- the orchestrator's side (wsserver-bench) -------------------------------------


def measure(bench: Any, target: Any, label: str, users: list[Any], relay: bool) -> dict:
    """Run the connect load against ``target`` (a Server or the Relay) for the
    workload's duration; figures per connect."""
    from .cli import latency_figures, run_measured, split

    duration = bench.duration(10.0)
    slots = [{"user": u.user_id, "token": u.token, "since": 0} for u in users]
    jobs = [
        {
            "kind": "connect",
            "url": target.ws_url,
            "slots": chunk,
            "relay": relay,
            "duration": duration,
        }
        for chunk in split(slots, bench.args.clients)
    ]
    run = run_measured(target, jobs, label, duration)
    connects = sum(r["connects"] for r in run.results)
    latencies = [v for r in run.results for v in r["latencies_us"]]
    bench.samples[label] = latencies
    figures = {
        "users": len(users),
        "client_processes": len(jobs),
        "connects": connects,
        "connects_per_s": connects / run.wall,
        "cpu_us_per_connect": run.cpu * 1e6 / connects if connects else float("nan"),
        "cpu_system_share": run.system / run.cpu if run.cpu else 0.0,
        "errors": sum(r["errors"] for r in run.results),
        "replayed": sum(r["replayed"] for r in run.results),
        **latency_figures(latencies),
    }
    unexpected = [u for r in run.results for u in r["unexpected"]]
    if unexpected:
        figures["unexpected"] = "; ".join(unexpected[:5])
    return figures


def user_count(bench: Any) -> int:
    return 20 if bench.quick else 50


def connect_workload(bench: Any) -> dict:
    """``connect``: wsserver, users registered and logged in first."""
    from .cli import make_users

    def run(server: Any) -> dict:
        users = make_users(server, "c", user_count(bench))
        return measure(bench, server, "connect", users, relay=False)

    return bench._with_server("connect", run)


def relay_connect_workload(bench: Any) -> dict:
    """``relay-connect``: the same clients against the bare Autobahn relay."""
    from .cli import User

    users = [User(f"c{i}", "", "x") for i in range(user_count(bench))]
    return bench._with_relay(lambda r: measure(bench, r, "relay-connect", users, relay=True))


def target_row(r: dict) -> tuple[str, str, str, bool | None] | None:
    """The T11 row of the targets table, when both workloads ran."""
    if "connect" not in r or "relay-connect" not in r:
        return None
    ratio = r["connect"]["cpu_us_per_connect"] / r["relay-connect"]["cpu_us_per_connect"]
    return ("T11 connect CPU vs relay-connect", f"{ratio:.2f}x", "<= 2.00x", ratio <= 2.0)
