"""Crash safety against the real ``twistd wsserver`` process: SIGKILL at a random
moment under load from several senders, restart, reconnect, and check that every
acknowledged message arrives, in order, and is stored once.

The kill points are drawn from a seeded generator; set WSSERVER_FAULT_SEED to
replay a run (the seed is in the failure message).
"""

from __future__ import annotations

import os
import random
import sqlite3
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.trial import unittest

from .support import (
    ConnectionClosed,
    connect_ws,
    start_twistd,
)

SENDERS = ("s1", "s2", "s3")
RECIPIENTS = ("r1", "r2")
PER_SENDER = 1000
WINDOW = 16
FAST = {"MESSAGE_RATE_LIMIT": "100000", "MESSAGE_BURST_LIMIT": "100000"}


@dataclass
class Run:
    kill_at: int
    plan: dict[str, list[dict]] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)  # nonce -> id
    acks: int = 0
    killed: bool = False


@defer.inlineCallbacks
def pump(client, messages, run: Run, on_ack=None):
    """Send ``messages`` with up to WINDOW unacknowledged; record every ack.

    Stops quietly when the connection closes (the server was killed).
    """
    sent = 0
    try:
        while sent < min(WINDOW, len(messages)):
            client.send_json(messages[sent])
            sent += 1
        for _ in range(len(messages)):
            ack = yield client.next_of("ack", 30)
            previous = run.acked.setdefault(ack["nonce"], ack["id"])
            assert previous == ack["id"], (
                f"nonce {ack['nonce']} acked as {previous} and {ack['id']}"
            )
            run.acks += 1
            if on_ack:
                on_ack()
            if sent < len(messages):
                client.send_json(messages[sent])
                sent += 1
    except ConnectionClosed:
        pass


class CrashTests(unittest.TestCase):
    timeout = 600

    def setUp(self):
        self.seed = int(os.environ.get("WSSERVER_FAULT_SEED", random.randrange(1 << 30)))
        self.rng = random.Random(self.seed)

    @defer.inlineCallbacks
    def one_run(self, kill_at: int):
        run = Run(kill_at)
        db = os.path.abspath(self.mktemp() + ".db")
        proc, server = yield start_twistd(self, db, FAST)
        tokens = {}
        for name in SENDERS + RECIPIENTS:
            _, tokens[name] = yield server.user(name)
        receivers = {}
        for r in RECIPIENTS:
            receivers[r] = yield connect_ws(server.ws_base, tokens[r])
        for s in SENDERS:
            run.plan[s] = [
                {"to": RECIPIENTS[i % 2], "content": f"{s}:{i}", "nonce": f"{s}-{i}"}
                for i in range(PER_SENDER)
            ]
        senders = {}
        for s in SENDERS:
            senders[s] = yield connect_ws(server.ws_base, tokens[s])

        def maybe_kill():
            if not run.killed and run.acks >= run.kill_at:
                run.killed = True
                proc.transport.signalProcess("KILL")

        yield defer.gatherResults([pump(senders[s], run.plan[s], run, maybe_kill) for s in SENDERS])
        self.assertTrue(run.killed, "the load ended before the kill point")
        yield proc.ended()
        for client in list(receivers.values()) + list(senders.values()):
            yield client.wait_closed()
        acked_before = dict(run.acked)

        # Restart on the same file; clients resend what was not acknowledged
        # (same nonces), recipients come back with since.
        proc2, server2 = yield start_twistd(self, db, FAST)
        before = {
            r: [f["id"] for f in c.received if f["type"] == "message"] for r, c in receivers.items()
        }
        again = {}
        for r in RECIPIENTS:
            since = before[r][-1] if before[r] else 0
            again[r] = yield connect_ws(server2.ws_base, tokens[r], since=since)
        resend = {}
        for s in SENDERS:
            resend[s] = yield connect_ws(server2.ws_base, tokens[s])
        yield defer.gatherResults(
            [
                pump(resend[s], [m for m in run.plan[s] if m["nonce"] not in acked_before], run)
                for s in SENDERS
            ]
        )

        # Every message of the plan is acknowledged, once, with one id.
        total = len(SENDERS) * PER_SENDER
        self.assertEqual(len(run.acked), total)
        self.assertEqual(len(set(run.acked.values())), total)
        for nonce, msg_id in acked_before.items():
            self.assertEqual(run.acked[nonce], msg_id)
        conn = sqlite3.connect(db)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0], total)

        # Every recipient gets everything addressed to it, in order on each
        # connection; what a connection already had is not lost.
        by_id = {msg_id: nonce for nonce, msg_id in run.acked.items()}
        redelivered = 0
        for index, r in enumerate(RECIPIENTS):
            mine = {i for i, nonce in by_id.items() if int(nonce.split("-")[1]) % 2 == index}
            first = before[r]
            self.assertEqual(first, sorted(set(first)))
            need = mine - set(first)
            got: list[int] = []
            while not need <= set(got):
                frame = yield again[r].next_of("message", 30)
                got.append(frame["id"])
            self.assertEqual(got, sorted(set(got)))
            redelivered += len(set(first) & set(got))
            yield again[r].close_and_wait()
        for client in resend.values():
            yield client.close_and_wait()
        proc2.transport.signalProcess("TERM")
        yield proc2.ended()
        return len(acked_before), redelivered

    @defer.inlineCallbacks
    def test_sigkill_under_load_loses_nothing_acknowledged(self):
        """Three kill points (early, middle, late): nothing acknowledged is lost,
        resends with the same nonce are not stored twice, order holds per connection."""
        points = sorted(self.rng.randrange(50, 2800) for _ in range(3))
        for point in points:
            try:
                acked, redelivered = yield self.one_run(point)
            except Exception as exc:
                raise AssertionError(f"seed {self.seed}, kill after {point} acks: {exc}") from exc
            print(
                f"kill after {point} acks: {acked} acked before the kill, "
                f"{redelivered} delivered again after the restart"
            )
