"""A benchmark client process: ``python -m wsserver.bench.worker`` reads its job as
one JSON line on stdin, prints ``ready`` when connected, waits for ``go``, runs,
and prints its figures as one JSON line.

Jobs: ``pairs`` (senders and their receivers: direct, direct-unsigned, latency,
relay), ``broadcast``, ``idle``, ``login``, ``soak``, ``replays`` (history).  The
code that sends is the same for the real server and for the bare relay.
"""

from __future__ import annotations

import base64
import gc
import http.client
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from nacl.signing import SigningKey
from twisted.internet import defer, endpoints, reactor, task, threads
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure

from ..messages import signing_input

QUIET_SECONDS = 2.0  # broadcast receivers are done after this long without a frame
LAG_TICK = 0.5  # seconds between the soak clients' reactor-lag readings
_ID = re.compile(rb'"id":(\d+)')
_STAMP = re.compile(rb'"content":"(\d+) (\d+) ')
_TYPE = re.compile(rb'"type":"(\w+)"')


def now_ns() -> int:
    return time.monotonic_ns()


class Conn(WebSocketClientProtocol):
    """A lean client: routes raw frames to its owner without parsing JSON."""

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.owner.frame(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"{code} {reason}"))
        self.factory.owner.closed(self, code)


def connect(
    job: dict, owner: Any, token: str, headers: dict | None = None, url: str | None = None
) -> defer.Deferred:
    """A WebSocket connection to ``url`` (default: the job's ``url``)."""
    url = url or job["url"]
    all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    factory = WebSocketClientFactory(url, headers=all_headers)
    factory.protocol = Conn
    factory.owner = owner
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(
        autoPingInterval=0,
        utf8validateIncoming=False,
        maxFramePayloadSize=0,
        openHandshakeTimeout=60,
    )
    endpoint: Any = endpoints.TCP4ClientEndpoint(reactor, factory.host, factory.port, timeout=60)
    if factory.isSecure:
        trust = Certificate.loadPEM(Path(job["cafile"]).read_bytes())
        endpoint = endpoints.wrapClientTLS(optionsForClientTLS("localhost", trust), endpoint)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.opened)
    return d


class Pairs:
    """Senders that each write to one receiver; window = sent but not yet received."""

    def __init__(self, job: dict) -> None:
        self.job = job
        self.signed = job["signed"]
        self.window = job["window"]
        self.rate = job.get("rate")  # per sender, open loop; None: closed loop
        self.pad = "p" * job.get("pad", 60)
        self.latencies: list[int] = []
        self.sent = 0
        self.received = 0
        self.refused = 0
        self.closed_early = 0
        self.acked: set[int] = set()
        self.got: set[int] = set()
        self.running = False
        self.senders: dict[Any, dict] = {}
        self.by_receiver: dict[Any, dict] = {}

    @defer.inlineCallbacks
    def setup(self) -> Any:
        relay = self.job.get("relay", False)
        for spec in self.job["pairs"]:
            headers = {}
            if relay:
                headers = {"X-Bench-User": spec["receiver"], "X-Bench-Partner": spec["sender"]}
            # A cluster puts each receiver on another node than its sender.
            rx = yield connect(
                self.job, self, spec["receiver_token"], headers, spec.get("receiver_url")
            )
            if relay:
                headers = {"X-Bench-User": spec["sender"], "X-Bench-Partner": spec["receiver"]}
            tx = yield connect(self.job, self, spec["sender_token"], headers)
            state = {
                "spec": spec,
                "key": SigningKey(bytes.fromhex(spec["seed"])),
                "in_flight": 0,
                "seq": 0,
                "tx": tx,
            }
            self.senders[tx] = state
            self.by_receiver[rx] = state

    def send_one(self, state: dict) -> None:
        spec = state["spec"]
        state["seq"] += 1
        nonce = f"n{state['seq']}"
        content = f"{state['seq']} {now_ns()} {self.pad}"
        frame = {"to": spec["receiver"], "content": content, "nonce": nonce}
        if self.signed:
            data = signing_input(spec["sender"], spec["receiver"], nonce, content)
            frame["signature"] = base64.b64encode(state["key"].sign(data).signature).decode()
        state["in_flight"] += 1
        self.sent += 1
        state["tx"].sendMessage(json.dumps(frame, separators=(",", ":")).encode())

    def start(self) -> None:
        self.running = True
        if self.rate:
            # A steady offered load: the senders' ticks are spread evenly over
            # the interval (and over the workers), not fired all at once.
            interval = 1.0 / self.rate
            senders = list(self.senders.values())
            phase = self.job.get("phase", 0.0)
            for i, state in enumerate(senders):
                loop = task.LoopingCall(self._tick, state)
                state["loop"] = loop
                offset = interval * ((i + phase) / len(senders) % 1.0)
                reactor.callLater(offset, self._start_loop, loop, interval)
        else:
            for state in self.senders.values():
                for _ in range(self.window):
                    self.send_one(state)

    def _start_loop(self, loop: task.LoopingCall, interval: float) -> None:
        if self.running:
            loop.start(interval, now=True)

    def _tick(self, state: dict) -> None:
        if self.running:
            self.send_one(state)

    def stop(self) -> None:
        self.running = False
        for state in self.senders.values():
            if "loop" in state and state["loop"].running:
                state["loop"].stop()

    def idle(self) -> bool:
        return all(s["in_flight"] <= 0 for s in self.senders.values())

    def frame(self, conn: Any, payload: bytes) -> None:
        kind = _TYPE.search(payload)
        kind = kind.group(1) if kind else b"message"  # the relay forwards client frames
        if kind == b"ack":
            self.acked.add(int(_ID.search(payload).group(1)))
            return
        if kind == b"system":
            self.refused += 1
            state = self.senders.get(conn)
            if state:
                state["in_flight"] -= 1
            return
        if kind != b"message":
            return
        state = self.by_receiver.get(conn)
        if state is None:
            return
        stamp = _STAMP.search(payload)
        self.latencies.append(now_ns() - int(stamp.group(2)))
        found = _ID.search(payload)
        if found:
            self.got.add(int(found.group(1)))
        self.received += 1
        state["in_flight"] -= 1
        if self.running and not self.rate:
            self.send_one(state)

    def closed(self, conn: Any, code: int | None) -> None:
        if self.running:
            self.closed_early += 1

    def report(self) -> dict:
        lost = len(self.acked - self.got) if not self.job.get("relay") else 0
        return {
            "sent": self.sent,
            "received": self.received,
            "refused": self.refused,
            "closed_early": self.closed_early,
            "acked": len(self.acked),
            "lost": lost,
            "latencies_us": [ns // 1000 for ns in self.latencies],
        }


class Broadcast:
    """One sender (in the first worker) and receivers; counts deliveries."""

    last_frame = 0.0
    stopped_at = 0.0
    loop: Any = None

    def __init__(self, job: dict) -> None:
        self.job = job
        self.sender = None
        self.state: dict = {}
        self.counts: dict[Any, set[int]] = {}
        self.acked: set[int] = set()
        self.refused = 0
        self.closed_early = 0
        self.running = False
        self.sent = 0

    @defer.inlineCallbacks
    def setup(self) -> Any:
        tokens = self.job["receiver_tokens"]
        # A cluster spreads the receivers over its nodes, in turn.
        urls = self.job.get("receiver_urls") or [self.job["url"]]
        batch = 100
        for start in range(0, len(tokens), batch):
            conns = yield defer.gatherResults(
                [
                    connect(self.job, self, t, url=urls[(start + i) % len(urls)])
                    for i, t in enumerate(tokens[start : start + batch])
                ]
            )
            for c in conns:
                self.counts[c] = set()
        if self.job.get("sender_token"):
            self.sender = yield connect(self.job, self, self.job["sender_token"])

    def start(self) -> None:
        self.running = True
        if self.sender is None:
            return
        rate = self.job.get("rate")
        if rate:
            self.loop = task.LoopingCall(self._send)
            self.loop.start(1.0 / rate, now=True)
        else:  # closed loop: keep `window` broadcasts unacknowledged
            self.loop = None
            for _ in range(self.job["window"]):
                self._send()

    def _send(self) -> None:
        self.sent += 1
        content = f"{self.sent} {now_ns()} broadcast"
        frame = {"to": "broadcast", "content": content}
        self.sender.sendMessage(json.dumps(frame, separators=(",", ":")).encode())

    def stop(self) -> None:
        self.running = False
        self.stopped_at = time.monotonic()
        if self.loop is not None and self.loop.running:
            self.loop.stop()

    def idle(self) -> bool:
        # Receivers are done once nothing has arrived for a while.
        return time.monotonic() - max(self.last_frame, self.stopped_at) > QUIET_SECONDS

    def frame(self, conn: Any, payload: bytes) -> None:
        self.last_frame = time.monotonic()
        kind = _TYPE.search(payload).group(1)
        if kind == b"message":
            self.counts[conn].add(int(_ID.search(payload).group(1)))
        elif kind == b"ack":
            self.acked.add(int(_ID.search(payload).group(1)))
            if self.running and self.loop is None:
                self._send()
        elif kind == b"system":
            self.refused += 1

    def closed(self, conn: Any, code: int | None) -> None:
        if self.running:
            self.closed_early += 1

    def report(self) -> dict:
        sets = list(self.counts.values())
        common = set.intersection(*sets) if sets else set()
        return {
            "deliveries": sum(len(s) for s in sets),
            "receivers": len(sets),
            "common_ids": sorted(common),
            "acked_ids": sorted(self.acked),
            "sent": self.sent,
            "refused": self.refused,
            "closed_early": self.closed_early,
        }


class Idle:
    """Many authenticated connections that do nothing."""

    def __init__(self, job: dict) -> None:
        self.job = job
        self.conns: list[Any] = []
        self.closed_early = 0
        self.connect_seconds = 0.0

    @defer.inlineCallbacks
    def setup(self) -> Any:
        started = time.monotonic()
        tokens = self.job["tokens"]
        batch = self.job.get("batch", 50)
        for start in range(0, len(tokens), batch):
            conns = yield defer.gatherResults(
                [connect(self.job, self, t) for t in tokens[start : start + batch]]
            )
            self.conns.extend(conns)
        self.connect_seconds = time.monotonic() - started

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def idle(self) -> bool:
        return True

    def frame(self, conn: Any, payload: bytes) -> None:
        pass

    def closed(self, conn: Any, code: int | None) -> None:
        self.closed_early += 1

    def report(self) -> dict:
        return {
            "connections": len(self.conns),
            "connect_seconds": self.connect_seconds,
            "closed_early": self.closed_early,
        }


class Slot:
    """One logical connection of a soak: a user's device that reconnects with
    ``since`` (the largest id it has seen) and keeps every id it received."""

    def __init__(self, user_id: str, token: str) -> None:
        self.user_id = user_id
        self.token = token
        self.conn: Any = None
        self.last_id = 0
        self.got: set[int] = set()
        self.broadcasts: set[int] = set()
        self.reconnects = 0


class Soak:
    """Authenticated connections held for the duration, with a trickle of
    direct messages, broadcasts, reconnects with ``since`` and logins.

    Every slot is one connection of a user; all of a user's slots are in this
    process, so it can check that each slot received every acknowledged
    direct message to its user (live, or replayed after a reconnect).
    Broadcasts come from a sender of their own (not a slot): each process
    counts how many of its slots received each broadcast id, and the
    orchestrator compares with the broadcasts acknowledged in every process.
    """

    settle = 0.5
    keep_gc = True  # ten minutes with the collector off would grow the client

    def __init__(self, job: dict) -> None:
        import random

        self.job = job
        self.random = random.Random(job.get("seed", 0))
        self.slots = [Slot(u["user_id"], u["token"]) for u in job["users"]]
        self.by_conn: dict[Any, Slot] = {}
        self.by_user: dict[str, list[Slot]] = {}
        for slot in self.slots:
            self.by_user.setdefault(slot.user_id, []).append(slot)
        self.users = sorted(self.by_user)
        self.broadcaster: Any = None
        self.acked_direct: dict[str, set[int]] = {}
        self.acked_broadcast: set[int] = set()
        self.sent = {"direct": 0, "broadcast": 0}
        self.reconnects = 0
        self.reconnecting = 0
        self.logins = 0
        self.login_errors = 0
        self.refused = 0
        self.closed_early = 0
        self.connect_errors = 0
        self.running = False
        self.loops: list[task.LoopingCall] = []
        self.last_frame = 0.0
        self.stopped_at = 0.0
        self.seq = 0
        self.reported = False
        self.unacked: dict[str, tuple[Slot, dict]] = {}  # nonce: (sender, frame)
        self.resent = 0
        self.max_lag = 0.0
        self.lags_over_5s = 0

    @defer.inlineCallbacks
    def setup(self) -> Any:
        batch = self.job.get("batch", 50)
        for start in range(0, len(self.slots), batch):
            chunk = self.slots[start : start + batch]
            conns = yield defer.gatherResults([connect(self.job, self, s.token) for s in chunk])
            for slot, conn in zip(chunk, conns, strict=True):
                slot.conn = conn
                self.by_conn[conn] = slot
        if self.job.get("broadcaster_token"):
            self.broadcaster = yield connect(self.job, self, self.job["broadcaster_token"])

    def start(self) -> None:
        self.running = True
        rates = self.job["rates"]
        for rate, action in (
            (rates.get("direct", 0), self._direct),
            (rates.get("broadcast", 0) if self.broadcaster else 0, self._broadcast),
            (rates.get("reconnect", 0), self._reconnect),
            (rates.get("login", 0), self._login),
        ):
            if rate > 0:
                loop = task.LoopingCall(action)
                self.loops.append(loop)
                loop.start(1.0 / rate, now=False)
        # How late this process's reactor runs (a starved client answers the
        # server's pings late, and the server drops it: the report says so).
        self.lag_at = time.monotonic()
        lag = task.LoopingCall(self._lag)
        self.loops.append(lag)
        lag.start(LAG_TICK, now=False)

    def _lag(self) -> None:
        now = time.monotonic()
        late = now - self.lag_at - LAG_TICK
        self.lag_at = now
        self.max_lag = max(self.max_lag, late)
        if late > 5.0:
            self.lags_over_5s += 1

    def stop(self) -> None:
        self.running = False
        self.stopped_at = time.monotonic()
        for loop in self.loops:
            if loop.running:
                loop.stop()

    def _send(self, conn: Any, frame: dict) -> None:
        conn.sendMessage(json.dumps(frame, separators=(",", ":")).encode())

    def _direct(self) -> None:
        sender = self.random.choice(self.slots)
        if sender.conn is None or len(self.users) < 2:
            return
        to = sender.user_id
        while to == sender.user_id:
            to = self.random.choice(self.users)
        self.seq += 1
        self.sent["direct"] += 1
        nonce = f"s{self.job.get('index', 0)}-{self.seq}"
        frame = {"to": to, "content": f"soak {self.seq}", "nonce": nonce}
        self.unacked[nonce] = (sender, frame)
        self._send(sender.conn, frame)

    def _broadcast(self) -> None:
        if self.broadcaster is None:
            return
        self.sent["broadcast"] += 1
        self._send(self.broadcaster, {"to": "broadcast", "content": "soak broadcast"})

    def _reconnect(self) -> None:
        """The trickle's reconnect: close a connection, open it again with since."""
        slot = self.random.choice(self.slots)
        if slot.conn is None:
            return  # already reconnecting
        conn, slot.conn = slot.conn, None
        del self.by_conn[conn]
        conn.sendClose(1000)
        self._reopen(slot)

    def _reopen(self, slot: Slot) -> None:
        """Connect ``slot`` again with ``since`` = the largest id it has seen
        (retrying every second, as a client does, when that fails)."""
        self.reconnecting += 1
        url = f"{self.job['url']}?since={slot.last_id}"
        d = connect(self.job, self, slot.token, url=url)

        def opened(new: Any) -> None:
            self.reconnecting -= 1
            self.reconnects += 1
            slot.reconnects += 1
            slot.conn = new
            self.by_conn[new] = slot
            # As a client does: send again what was not acknowledged, with the
            # same nonce (the server answers with the first one's ack).
            for sender, frame in list(self.unacked.values()):
                if sender is slot:
                    self.resent += 1
                    self._send(new, frame)

        def failed(failure: Failure) -> None:
            self.reconnecting -= 1
            self.connect_errors += 1
            sys.stderr.write(f"soak: reconnect failed: {failure.getErrorMessage()}\n")
            if not self.reported:
                self.reconnecting += 1  # until the retry: the drain waits for it
                reactor.callLater(1.0, self._retry, slot)

        d.addCallbacks(opened, failed)

    def _retry(self, slot: Slot) -> None:
        self.reconnecting -= 1
        if not self.reported:
            self._reopen(slot)

    def _login(self) -> defer.Deferred:
        self.seq += 1
        name = f"{self.job['login_prefix']}{self.seq}"
        d = threads.deferToThread(login_over_http, self.job, name)

        def done(ok: bool) -> None:
            if ok:
                self.logins += 1
            else:
                self.login_errors += 1

        return d.addCallback(done)

    def idle(self) -> bool:
        """Done when no reconnect is in progress, every slot has every
        acknowledged direct message to its user, and no frame came lately."""
        if self.reconnecting or self.unacked:
            return False
        for user, ids in self.acked_direct.items():
            for slot in self.by_user[user]:
                if not ids <= slot.got:
                    return False
        return time.monotonic() - max(self.last_frame, self.stopped_at) > QUIET_SECONDS

    def frame(self, conn: Any, payload: bytes) -> None:
        self.last_frame = time.monotonic()
        data = json.loads(payload)
        kind = data.get("type")
        if kind == "message":
            slot = self.by_conn.get(conn)
            if slot is not None:
                slot.got.add(data["id"])
                slot.last_id = max(slot.last_id, data["id"])
                if data["to"] == "broadcast":
                    slot.broadcasts.add(data["id"])
        elif kind == "ack":
            self.unacked.pop(data.get("nonce"), None)
            if data["to"] == "broadcast":
                self.acked_broadcast.add(data["id"])
            else:
                self.acked_direct.setdefault(data["to"], set()).add(data["id"])
        elif kind == "system":
            self.refused += 1
            sys.stderr.write(f"soak: refused: {data.get('code')}\n")

    def closed(self, conn: Any, code: int | None) -> None:
        if self.reported:
            return  # the process is ending: its reactor drops the connections
        # Not one this process closed on purpose (reconnects are removed
        # first): counted, and reconnected with since as a client would.
        slot = self.by_conn.pop(conn, None)
        if slot is not None:
            self.closed_early += 1
            sys.stderr.write(f"soak: connection closed by the server: {code}\n")
            slot.conn = None
            self._reopen(slot)
        elif conn is self.broadcaster:
            self.closed_early += 1
            sys.stderr.write(f"soak: the broadcaster's connection closed: {code}\n")
            self.broadcaster = None

    def report(self) -> dict:
        self.reported = True
        lost = missed = 0
        for user, ids in self.acked_direct.items():
            slots = self.by_user[user]
            union = set().union(*(s.got for s in slots))
            lost += len(ids - union)
            missed += sum(len(ids - s.got) for s in slots)
        counts: dict[int, int] = {}
        for slot in self.slots:
            for msg_id in slot.broadcasts:
                counts[msg_id] = counts.get(msg_id, 0) + 1
        return {
            "connections": len(self.slots),
            "direct_sent": self.sent["direct"],
            "direct_acked": sum(len(v) for v in self.acked_direct.values()),
            "direct_unacked": len(self.unacked),
            "direct_resent": self.resent,
            "direct_lost": lost,
            "direct_missed": missed,
            "broadcast_sent": self.sent["broadcast"],
            "broadcast_acked": sorted(self.acked_broadcast),
            # How many of this process's slots received each broadcast id.
            "broadcast_counts": {str(k): v for k, v in counts.items()},
            "reconnects": self.reconnects,
            "connect_errors": self.connect_errors,
            "logins": self.logins,
            "login_errors": self.login_errors,
            "refused": self.refused,
            "closed_early": self.closed_early,
            "max_loop_lag_s": round(self.max_lag, 3),
            "loop_lags_over_5s": self.lags_over_5s,
        }


class Replays:
    """``since`` replays one after another: connect with ``since``, time from
    the open to the ``count``-th message, close, next (the history workload)."""

    def __init__(self, job: dict) -> None:
        self.job = job
        self.times_us: list[int] = []
        self.short = 0
        self.closed_early = 0
        self.current: dict | None = None

    @defer.inlineCallbacks
    def run(self) -> Any:
        for replay in self.job["replays"]:
            done: defer.Deferred = defer.Deferred()
            self.current = {"got": 0, "done": done, "opened": 0}
            url = f"{self.job['url']}?since={replay['since']}"
            conn = yield connect(self.job, self, replay["token"], url=url)
            # Set from onOpen's callback, before any frame after the handshake.
            self.current["opened"] = now_ns()
            timer = reactor.callLater(30, lambda d=done: d.called or d.callback(False))
            complete = yield done
            if timer.active():
                timer.cancel()
            if complete:
                self.times_us.append((self.current["finished"] - self.current["opened"]) // 1000)
            else:
                self.short += 1
            closed: defer.Deferred = defer.Deferred()
            self.current["closed"] = closed
            conn.sendClose(1000)
            yield closed
        self.current = None

    def frame(self, conn: Any, payload: bytes) -> None:
        cur = self.current
        if cur is None or not payload.startswith(b'{"type":"message"'):
            return
        cur["got"] += 1
        if cur["got"] == self.job["count"]:
            cur["finished"] = now_ns()
            if not cur["done"].called:
                cur["done"].callback(True)

    def closed(self, conn: Any, code: int | None) -> None:
        cur = self.current
        if cur is None:
            return
        if "closed" in cur:
            if not cur["closed"].called:
                cur["closed"].callback(None)
        else:
            self.closed_early += 1
            if not cur["done"].called:
                cur["done"].callback(False)

    def report(self) -> dict:
        return {"times_us": self.times_us, "short": self.short, "closed_early": self.closed_early}


def run_replays(job: dict) -> None:
    """Say ready, wait for go, run the replays, report."""
    runner = Replays(job)

    @defer.inlineCallbacks
    def main() -> Any:
        print("ready", flush=True)
        yield _wait_for_go()
        yield runner.run()
        print(json.dumps(runner.report()), flush=True)

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            sys.stderr.write(result.getTraceback())
            print(json.dumps({"error": result.getErrorMessage()}), flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()


def login_over_http(job: dict, user_id: str) -> bool:
    """Register ``user_id`` and log in (challenge, signed verify) over HTTP(S);
    True when all three answers are the expected ones.  Runs in a thread."""
    import ssl

    if job.get("cafile"):
        context = ssl.create_default_context(cafile=job["cafile"])
        conn: Any = http.client.HTTPSConnection("localhost", job["port"], context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", job["port"])
    try:

        def post(path: str, body: dict) -> tuple[int, dict]:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())

        key = SigningKey.generate()
        pub = base64.b64encode(bytes(key.verify_key)).decode()
        s1, _ = post("/auth/register", {"user_id": user_id, "username": user_id, "public_key": pub})
        s2, body = post("/auth/login", {"user_id": user_id})
        if s1 != 201 or s2 != 200:
            return False
        sig = base64.b64encode(key.sign(body["challenge"].encode()).signature).decode()
        s3, _ = post("/auth/login?verify=true", {"user_id": user_id, "signature": sig})
        return s3 == 200
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def run_twisted(job: dict, kind: type) -> None:
    """Set up, say ready, wait for go, run for the duration, drain, report."""
    runner = kind(job)

    @defer.inlineCallbacks
    def main() -> Any:
        yield runner.setup()
        print("ready", flush=True)
        yield task.deferLater(reactor, 0, lambda: None)
        yield _wait_for_go()
        # The measuring client must not pause for garbage collection mid-run.
        gc.collect()
        gc.freeze()
        if not getattr(runner, "keep_gc", False):
            gc.disable()
        runner.start()
        yield task.deferLater(reactor, job["duration"], lambda: None)
        runner.stop()
        yield task.deferLater(reactor, getattr(runner, "settle", 0.0), lambda: None)
        # Wait for what is still in flight (returns as soon as nothing is), so
        # that a slow, shared machine is not mistaken for a lost message.
        deadline = time.monotonic() + job.get("drain", 30.0)
        while not runner.idle() and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        gc.enable()
        print(json.dumps(runner.report()), flush=True)
        if job.get("hold"):
            yield _wait_for_go()

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            sys.stderr.write(result.getTraceback())
            print(json.dumps({"error": result.getErrorMessage()}), flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()


def _wait_for_go() -> defer.Deferred:
    """Fire when the orchestrator writes a line on stdin."""
    return threads.deferToThread(sys.stdin.readline)


def run_login(job: dict) -> None:
    """Register + challenge + verify, sequentially on one keep-alive HTTP connection."""
    host, port = job["host"], job["port"]
    conn = http.client.HTTPConnection(host, port)
    prefix = job["prefix"]
    print("ready", flush=True)
    sys.stdin.readline()

    def post(path: str, body: dict) -> tuple[int, dict]:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    done = errors = 0
    end = time.monotonic() + job["duration"]
    while time.monotonic() < end:
        key = SigningKey.generate()
        user = f"{prefix}-{done + errors}"
        pub = base64.b64encode(bytes(key.verify_key)).decode()
        s1, _ = post("/auth/register", {"user_id": user, "username": user, "public_key": pub})
        s2, body = post("/auth/login", {"user_id": user})
        if s1 != 201 or s2 != 200:
            errors += 1
            continue
        sig = base64.b64encode(key.sign(body["challenge"].encode()).signature).decode()
        s3, _ = post("/auth/login?verify=true", {"user_id": user, "signature": sig})
        if s3 == 200:
            done += 1
        else:
            errors += 1
    print(json.dumps({"logins": done, "errors": errors}), flush=True)


def main() -> None:
    job = json.loads(sys.stdin.readline())
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    kind = job["kind"]
    if kind == "login":
        run_login(job)
    elif kind == "replays":
        run_replays(job)
    else:
        from .connects import Connects

        kinds = {
            "pairs": Pairs,
            "broadcast": Broadcast,
            "idle": Idle,
            "soak": Soak,
            "connect": Connects,
        }
        run_twisted(job, kinds[kind])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
