"""T8's floor, piece by piece: what the server's store costs per message at
a moderate rate, without WebSocket, JSON or verify.

One process, the real SQLite ``Store`` on a fresh WAL file, the reactor
ticking at ``RATE`` per second; each phase measures the process's CPU
(``getrusage``, every thread) per tick:

- ``timer``: the tick alone (the reactor waking RATE times a second);
- ``thread``: a bare round trip to a thread of our own (``SimpleQueue``
  there, ``callFromThread`` back): the two wake-ups any handoff pays;
- ``handoff``: an empty interaction through the adbapi pool (the thread
  round trip a batch pays: queue to the pool thread, result back by
  ``callFromThread``);
- ``insert``: ``add_message`` (group commit, one message a batch at this
  rate: the thread round trip, the insert and its commit);
- ``insert+mark``: the same and the previous message marked delivered, as
  the server does.

    python -m wsserver.bench.floor [RATE] [SECONDS]
"""

from __future__ import annotations

import os
import queue
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task

from ..store import NewMessage, User, prepare_database
from ..store.sqlite import Store

USERS = 100


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@defer.inlineCallbacks
def measure(store: Store, rate: float, seconds: float) -> Any:
    now_ms = int(time.time() * 1000)
    for i in range(USERS):
        yield store.add_user(User(f"f{i}", f"f{i}", bytes(32), now_ms))
    seq = [0]
    last: list[int] = []

    def message() -> NewMessage:
        seq[0] += 1
        n = seq[0]
        return NewMessage(
            f"f{n % USERS}", f"f{(n + 1) % USERS}", "x" * 100, None, f"n{n}", "none", now_ms
        )

    def insert() -> defer.Deferred:
        return store.add_message(message())

    def insert_and_mark() -> defer.Deferred:
        if last:
            store.mark_delivered(last)
        d = store.add_message(message())

        def stored(outcome: Any) -> None:
            last[:] = [outcome[1].id]

        return d.addCallback(stored)

    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def serve() -> None:
        while (d := inbox.get()) is not None:
            reactor.callFromThread(d.callback, None)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()

    def round_trip() -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        inbox.put(d)
        return d

    phases = {
        "timer": lambda: None,
        "thread": round_trip,
        "handoff": lambda: store._run(lambda txn: None),
        "insert": insert,
        "insert+mark": insert_and_mark,
    }
    out = {}
    for name, tick in phases.items():
        count = [0]

        def one(tick: Any = tick, count: list[int] = count) -> None:
            count[0] += 1
            tick()

        loop = task.LoopingCall(one)
        before = cpu_seconds()
        loop.start(1.0 / rate, now=True)
        yield task.deferLater(reactor, seconds, lambda: None)
        loop.stop()
        yield store.drain()
        out[name] = (cpu_seconds() - before) * 1e6 / count[0]
        print(f"{name:12} {out[name]:7.1f} us CPU per tick ({count[0]} ticks)", flush=True)
    inbox.put(None)
    print(f"{'':12} thread - timer {out['thread'] - out['timer']:7.1f} us", flush=True)
    print(f"{'':12} handoff - timer {out['handoff'] - out['timer']:7.1f} us", flush=True)
    print(f"{'':12} insert+mark - timer {out['insert+mark'] - out['timer']:7.1f} us", flush=True)


def main() -> None:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 else 1000.0
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    path = str(Path(tempfile.mkdtemp(prefix="wsserver-floor-")) / "db.sqlite")
    prepare_database(path, lambda: os.urandom(32))
    store = Store(path, reactor)
    store.start()

    @defer.inlineCallbacks
    def run() -> Any:
        try:
            yield measure(store, rate, seconds)
        finally:
            yield store.close()
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main()
