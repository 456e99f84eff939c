"""The README's steps, run in the order written against one real ``twistd`` server.

Every ``sh`` block of README.md is run with bash, in order, in one fresh
directory (keys land there, as in a fresh clone), with ``127.0.0.1:8080``
pointing at the test's server; ``export`` lines carry over to the later
blocks.  Commands this test cannot or need not run are recognised and left
out, and nothing else is: installing (``pip install``: the working tree is
what runs, first on PYTHONPATH), starting the server (the test started it
with the README's command line), the test suite and the benchmark.  A line
``$ command`` is followed by its exact output; a comment ``# {...}`` after a
command gives the JSON fields its answer has.  The web page's step (register
an id in the page) is done over HTTP with a fresh key here; the browser test
does it in a real page.  The ``python`` block must be an excerpt of
examples/hello.py, which may import only what ``pip install .`` installs.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path

from nacl.signing import SigningKey

from .support import (
    ROOT,
    TWISTD,
    b64,
    serve_args,
    spawn_twistd_sync,
    twistd_env,
    wait_listening,
)

README = ROOT / "README.md"
WAIT = 60.0  # seconds for one block: generous, the machine is shared
README_PORT = "8080"
# The distributions `pip install .` brings (setup.cfg install_requires), by import name.
INSTALLED = {"twisted", "autobahn", "OpenSSL", "cryptography", "service_identity", "jwt", "nacl"}
# What this test does not run, by the command's first words.
NOT_RUN = (
    ("pip", "install"),  # the working tree is already importable (PYTHONPATH)
    ("twistd", "-n", "wsserver"),  # the server the test started
    ("python", "-m", "pytest"),
    ("wsserver-bench",),
)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """A shell block's commands, continuation lines joined; comment lines left
    out, and in a block of ``$ command`` lines everything else (the output)."""
    out, current = [], ""
    prompted = ("\n" + block).find("\n$ ") >= 0
    for line in block.splitlines():
        if current:
            current += "\n" + line
        elif prompted:
            if not line.startswith("$ "):
                continue
            current = line[2:]
        elif line.strip() and not line.startswith("#"):
            current = line
        else:
            continue
        if not current.endswith("\\"):
            out.append(current)
            current = ""
    return out


def is_run(command: str) -> bool:
    """False for a command this test leaves out (every part of an && chain)."""

    def left_out(part: str) -> bool:
        words = part.split()  # the first words are enough, quotes or not
        return any(words[: len(skip)] == list(skip) for skip in NOT_RUN)

    return not all(left_out(p.strip()) for p in command.split("&&"))


def expected_output(block: str) -> list[str] | None:
    """The output shown after a ``$ command`` line, if the block has one."""
    lines = block.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ "):
            return [x for x in lines[i + 1 :] if x and not x.startswith("$ ")]
    return None


def json_fields(block: str) -> list[list[str]]:
    """For each ``# {...}`` comment, the JSON field names it shows."""
    return [re.findall(r'"(\w+)":', line) for line in block.splitlines() if line.startswith("# {")]


class ReadmeTests(unittest.TestCase):
    """README.md's steps from a fresh directory against one ``twistd -n wsserver``."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsserver-readme-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.text = README.read_text("utf-8")
        log = self.dir / "server.log"
        db = str(self.dir / "server" / "wsserver.db")
        (self.dir / "server").mkdir()
        spawn_twistd_sync(self, serve_args(0, db), None, log)
        self.port = wait_listening(0, log)
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "examples").mkdir()
        shutil.copy(ROOT / "examples" / "hello.py", self.dir / "examples" / "hello.py")
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        self.env = env

    def localise(self, text: str) -> str:
        """The README's address, pointed at this test's server."""
        return text.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{self.port}")

    def script(self, block: str, exports: list[str]) -> str | None:
        run = [c for c in commands(block) if is_run(c)]
        if not run:
            return None
        return "\n".join(["set -e -o pipefail", *exports, *(self.localise(c) for c in run)])

    def page_registers(self, user_id: str) -> None:
        """What the page does when someone registers ``user_id`` in it."""
        key = SigningKey.generate()
        body = {
            "user_id": user_id,
            "username": user_id.title(),
            "public_key": b64(bytes(key.verify_key)),
        }
        request = urllib.request.Request(
            self.url + "/auth/register",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            self.assertEqual(answer.status, 201)

    def run_block(self, script: str, stdin: bytes = b"") -> str:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.dir,
            env=self.env,
            input=stdin,
            capture_output=True,
            timeout=WAIT,
        )
        out, err = done.stdout.decode(), done.stderr.decode()
        self.assertEqual(done.returncode, 0, f"{script}\nstdout: {out}\nstderr: {err}")
        # The README shows no warnings: a step that writes to stderr (a
        # DeprecationWarning, a traceback) is not the clean run it promises.
        self.assertEqual(err, "", f"{script}\nwrote to stderr: {err}")
        return out

    def run_background_block(self, script: str, wanted: str) -> str:
        """Run a block that leaves a process in the background; return the
        first line holding ``wanted`` that it prints, then stop it all."""
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def stop() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()

        self.addCleanup(stop)
        buffer = b""
        deadline = time.monotonic() + WAIT
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                lines = buffer.decode(errors="replace").splitlines()
                for line in lines:
                    if wanted in line:
                        return line
                left = deadline - time.monotonic()
                ready = sel.select(max(left, 0))
                chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
                if not chunk:
                    self.fail(f"{script}\nprinted no line with {wanted!r}:\n{buffer.decode()}")
                buffer += chunk

    def test_the_readme_steps_work_in_order(self):
        """Every shell step of the README runs, in the order written, on one server
        from a fresh directory, prints what the README shows and writes nothing
        to stderr (no warning)."""
        self.assertIn(f"twistd -n wsserver --port {README_PORT}", self.text)
        page_user = re.search(r"register `([\w.-]+)` in the page", self.text).group(1)
        exports: list[str] = []
        ran = []
        for block in blocks(self.text, "sh"):
            script = self.script(block, exports)
            if script is None:
                continue
            if "chat --to" in block:
                self.page_registers(page_user)  # the page's step, just before
                out = self.run_block(script, b"Hello from the command line.\n")
                self.assertIn(f"chatting with {page_user}", out)
                self.assertRegex(out, r"\(#\d+ (pending|delivered)\)")
            elif re.search(r"&\s*$", block, flags=re.M):
                sender = re.search(r"--user (\w+) send --to (\w+) \"([^\"]+)\"", block)
                line = self.run_background_block(script, sender.group(3))
                self.assertIn(f"{sender.group(1)} [verified]", line)
            else:
                out = self.run_block(script)
                shown = expected_output(block)
                if shown is not None:
                    self.assertEqual(out.splitlines(), shown, script)
                for fields in json_fields(block):  # curl's answers, shown as comments
                    for field in fields:
                        self.assertIn(f'"{field}":', out, f"{script}\nanswered: {out}")
            exports += [self.localise(c) for c in commands(block) if c.startswith("export ")]
            ran.append(block)
        self.assertGreaterEqual(len(ran), 4)  # the example, hello.py, chat, listen/send
        # The key of the worked example: the CLI's format, owner-only.
        alice_key = self.dir / "alice.key"
        self.assertEqual(stat.S_IMODE(alice_key.stat().st_mode), 0o600)

    def test_python_excerpt_is_from_hello_py(self):
        """The README's Python block is made of lines of examples/hello.py, which
        imports only the standard library and what ``pip install .`` installs."""
        source = (ROOT / "examples" / "hello.py").read_text("utf-8")
        lines = {line.strip() for line in source.splitlines()}
        (excerpt,) = blocks(self.text, "python")
        for line in excerpt.splitlines():
            if line.strip() and not line.strip().startswith("#"):
                self.assertIn(line.strip(), lines)
        modules = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
        extra = modules - INSTALLED - set(sys.stdlib_module_names)
        self.assertEqual(extra, set(), "examples/hello.py needs more than `pip install .`")


class GitignoreTests(unittest.TestCase):
    def test_what_the_readme_leaves_behind_is_ignored(self):
        """The files the README's steps leave in a working tree (the private
        keys of the users it makes, the pid and log files of the daemon with
        their rotated logs, the database and its side files) are all in
        .gitignore, so ``git add -A`` cannot commit them."""
        if not (ROOT / ".git").exists():
            self.skipTest("not a git checkout")
        text = README.read_text("utf-8")
        keys = {f"{u}.key" for u in re.findall(r"--user ([\w.-]+) keygen", text)}
        pid = re.findall(r"--pidfile=([\w./-]+)", text)
        log = re.findall(r"--logfile=([\w./-]+)", text)
        database = re.search(r"\| `DATABASE` \| `([^`]+)`", text).group(1)
        self.assertTrue(keys and pid and log, "the README names its keys, pid and log files")
        left = sorted(
            {*keys, *pid, *log, *(f + ".1" for f in log)}
            | {database + side for side in ("", "-wal", "-shm", "-journal")}
        )
        done = subprocess.run(
            ["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *left],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        self.assertIn(done.returncode, (0, 1), done.stderr)
        not_ignored = [
            line.split("\t")[-1] for line in done.stdout.splitlines() if line.startswith("::")
        ]
        self.assertEqual(not_ignored, [], "not in .gitignore")


class TwistdHelpTests(unittest.TestCase):
    def test_help_says_where_twistd_options_go(self):
        """``twistd wsserver --help`` says that twistd's own options (--pidfile,
        --logfile) go before ``wsserver``, as the README does."""
        done = subprocess.run(
            [*TWISTD, "wsserver", "--help"],
            cwd=ROOT,
            env=twistd_env(None),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        help_text = " ".join(done.stdout.split())
        self.assertIn("twistd --pidfile=wsserver.pid --logfile=wsserver.log wsserver", help_text)
        self.assertIn("twistd --pidfile=wsserver.pid --logfile=wsserver.log wsserver", self.text())

    def text(self) -> str:
        return " ".join(README.read_text("utf-8").split())
