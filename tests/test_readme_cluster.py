"""README.md's two-node cluster section, run as written.

Its ``bash`` blocks (``tests/test_readme.py`` runs the ``sh`` blocks against
one SQLite server; these need PostgreSQL and Redis) run command by command in
a fresh directory, with three substitutions so that the run is the test's
own: the database name (a fresh one, dropped at the end), the Redis (a
redis-server of the test's own: the nodes use the default key and channel
names) and the two ports (free ones). A user waits for the nodes to start
and for ``listen`` to connect before sending; the test waits for the same
events, with deadlines.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from twisted.trial import unittest

from .cluster import OwnRedis
from .services import admin_execute
from .support import ROOT, free_port
from .test_cluster_faults import require_services
from .test_readme import commands

SECTION = re.compile(r"^## A two-node cluster on one machine\n(.*?)^## ", re.M | re.S)


def wait_until(condition, what: str, seconds: float = 30) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        time.sleep(0.05)


class ReadmeClusterTests(unittest.TestCase):
    """The README's cluster commands work in order, as a user runs them."""

    timeout = 120

    def test_two_node_cluster_section_works(self) -> None:
        """createdb, two nodes with DATABASE and BROKER, /ready, two users on
        different nodes, and a message from node 2 printed by listen on node 1."""
        require_services()
        text = (ROOT / "README.md").read_text("utf-8")
        section = SECTION.search(text)
        self.assertIsNotNone(section, "README.md has no two-node cluster section")
        blocks = re.findall(r"^```bash\n(.*?)^```$", section.group(1), flags=re.M | re.S)
        lines = [c for block in blocks for c in commands(block)]
        self.assertTrue(any(c.startswith("createdb") for c in lines))

        redis = OwnRedis(self)
        redis.start()
        name = f"wsserver_test_{uuid.uuid4().hex[:16]}"
        self.addCleanup(admin_execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        ports = {"8081": str(free_port()), "8082": str(free_port())}

        def local(command: str) -> str:
            command = re.sub(r"127\.0\.0\.1:6379", f"127.0.0.1:{redis.port}", command)
            command = re.sub(r"(5432/|-U postgres )wsserver\b", rf"\g<1>{name}", command)
            for old, new in ports.items():
                command = command.replace(old, new)
            return command

        workdir = Path(tempfile.mkdtemp(prefix="wsreadme"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESSAGE_", "MAX_"))}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["PYTHONPATH"] = str(ROOT)
        background: list[tuple[subprocess.Popen, Path]] = []

        def stop_all() -> None:
            for proc, _ in background:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the shell and twistd
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()

        self.addCleanup(stop_all)
        outputs: list[str] = []
        for command in lines:
            command = local(command)
            if command.startswith("export "):
                key, _, value = command[len("export ") :].partition("=")
                env[key] = value
                continue
            if "/ready" in command:  # a user waits for the nodes to come up
                for port in ports.values():
                    wait_until(
                        lambda p=port: (
                            subprocess.run(
                                ["curl", "-sf", f"http://127.0.0.1:{p}/ready"], capture_output=True
                            ).returncode
                            == 0
                        ),
                        f"node on port {port} ready",
                    )
            if " send " in command:  # ... and for listen to connect
                _, log = background[-1]
                wait_until(lambda log=log: b"listening as" in log.read_bytes(), "listen connects")
            if command.rstrip().endswith("&"):
                log = workdir / f"bg{len(background)}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(
                        command.rstrip()[:-1],
                        shell=True,
                        cwd=workdir,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append((proc, log))
                continue
            done = subprocess.run(
                command, shell=True, cwd=workdir, env=env, capture_output=True, timeout=60
            )
            self.assertEqual(done.returncode, 0, f"{command}: {done.stdout!r} {done.stderr!r}")
            outputs.append(done.stdout.decode())
        ready = next(o for o in outputs if '"ready"' in o)
        self.assertIn('"ready":true', ready)
        self.assertIn('"node":"node2"', ready)
        self.assertRegex(outputs[-1], r"^\d+ (pending|delivered)$")
        _, listen_log = background[-1]
        wait_until(
            lambda: (
                b"alice [verified]" in listen_log.read_bytes()
                and b"hello across nodes" in listen_log.read_bytes()
            ),
            "bob's listen on node 1 prints alice's message sent on node 2",
        )
