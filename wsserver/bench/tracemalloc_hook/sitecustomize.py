"""Loaded by a server the benchmark starts with ``WSSERVER_BENCH_TRACEMALLOC``
set (this directory first on ``PYTHONPATH``): trace allocations and write a
tracemalloc snapshot into that directory every
``WSSERVER_BENCH_TRACEMALLOC_EVERY`` seconds (default 30), from a daemon
thread.  A debugging aid of ``wsserver-bench soak --tracemalloc DIR``; the
server's own code knows nothing of it.
"""

import os
import threading
import time
import tracemalloc

_DIR = os.environ.get("WSSERVER_BENCH_TRACEMALLOC")


def _dump(directory: str, every: float) -> None:
    n = 0
    while True:
        time.sleep(every)
        n += 1
        path = os.path.join(directory, f"snapshot-{os.getpid()}-{n:04d}.pickle")
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(path + ".part")
        os.replace(path + ".part", path)
        with open(os.path.join(directory, f"times-{os.getpid()}.txt"), "a") as f:
            f.write(f"{path} {time.monotonic():.3f}\n")  # the system-wide clock


if _DIR:
    tracemalloc.start(int(os.environ.get("WSSERVER_BENCH_TRACEMALLOC_FRAMES", "8")))
    every = float(os.environ.get("WSSERVER_BENCH_TRACEMALLOC_EVERY", "30"))
    threading.Thread(target=_dump, args=(_DIR, every), daemon=True, name="tracemalloc").start()
