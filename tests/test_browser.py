"""The web client in a real browser.

Two headless Chromium sessions (separate profiles) and the command-line
client talk through ``twistd -n wsserver``: registration and login in the
page, a conversation with signatures checked in the browser, pending then
delivered, a dropped connection recovered with ``since``, and rate-limit
notices.  Chromium is driven through Debian's chromedriver with Selenium.

Needs ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (Debian's
``chromium`` and ``chromium-driver``; ``.ci/run`` installs them).  Without
them the tests are skipped and say why, unless ``WSSERVER_REQUIRE_BROWSER=1``
(set by ``.ci/run``) makes that a failure.  ``WSSERVER_SCREENSHOT=PATH``
saves the conversation's screenshot there (docs/web-client.png is made so).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

from .support import ROOT, serve_args, spawn_twistd_sync, wait_listening

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=820,760",
]
WAIT = 30.0  # seconds: generous, the machine is shared


def _why_not() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return f"needs Debian's chromium and chromium-driver (missing: {', '.join(missing)})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install '.[test]')"
    return None


WHY_NOT = _why_not()
if WHY_NOT and os.environ.get("WSSERVER_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"WSSERVER_REQUIRE_BROWSER=1 but the browser tests cannot run: {WHY_NOT}")

if not WHY_NOT:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait


def mark_state(item) -> str:
    """The verification the page worked out for a received message."""
    return item.find_element(By.CSS_SELECTOR, ".mark").get_attribute("data-state")


class CuttableProxy:
    """A TCP forwarder on loopback whose connections the test can cut.

    While cut it closes every forwarded connection and refuses new ones (it
    accepts and closes them at once), which a browser sees as the network
    going away; ``restore()`` lets connections through again.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._open -= {a, b}
            for s in (a, b):
                s.close()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            victims = list(self._open)
        for s in victims:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


@unittest.skipIf(WHY_NOT, WHY_NOT or "")
class BrowserCase(unittest.TestCase):
    """Starts ``twistd -n wsserver`` (with ``env``) and drives headless Chromium."""

    env: dict[str, str] = {}

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsserver-browser-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        log = self.dir / "server.log"
        args = serve_args(0, str(self.dir / "db.sqlite"))
        self.server = spawn_twistd_sync(self, args, self.env, log)
        self.port = wait_listening(0, log)
        self.server_url = f"http://127.0.0.1:{self.port}"

    # -- browsers ------------------------------------------------------------------

    def browser(self, name: str):
        """A fresh headless Chromium with its own profile."""
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        profile = self.dir / f"profile-{name}"
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.addCleanup(driver.quit)
        driver.wsserver_name = name
        return driver

    def wait_for(self, driver, css: str, count: int = 1, text: str | None = None) -> list:
        """The elements matching ``css`` (at least ``count``, with ``text`` in
        one of them when given), or a failure that shows the page."""

        def found(d):
            elements = d.find_elements(By.CSS_SELECTOR, css)
            if text is not None:
                elements = [e for e in elements if text in e.text]
            return elements if len(elements) >= count else False

        try:
            return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(found)
        except TimeoutException:
            body = driver.find_element(By.TAG_NAME, "body").text
            console = [entry["message"] for entry in driver.get_log("browser")]
            wanted = f"{count} x {css!r} {text or ''}"
            self.fail(f"{driver.wsserver_name}: no {wanted}\npage:\n{body}\nconsole: {console}")

    def open_page(self, driver, base: str | None = None, keep_session: bool = False) -> None:
        """Load the page.  A reload keeps the tab's session (the token in
        sessionStorage) only with ``keep_session``: by default the page starts
        signed out, as in a new tab."""
        if not keep_session and driver.current_url.startswith("http"):
            driver.execute_script("sessionStorage.clear()")
        driver.get((base or self.server_url) + "/")
        self.wait_for(driver, "body[data-ready=true]")

    def register(self, driver, user_id: str, name: str, base: str | None = None) -> None:
        self.open_page(driver, base)
        driver.find_element(By.ID, "user-id").send_keys(user_id)
        driver.find_element(By.ID, "username").send_keys(name)
        driver.find_element(By.ID, "register").click()
        self.wait_for(driver, "#conn[data-state=online]")
        self.assertEqual(driver.find_element(By.ID, "who").text, f"signed in as {user_id}")

    def say(self, driver, to: str, text: str) -> None:
        field = driver.find_element(By.ID, "to")
        field.clear()
        field.send_keys(to)
        driver.find_element(By.ID, "text").send_keys(text + "\n")

    def say_exactly(self, driver, to: str, text: str) -> None:
        """Like ``say`` for text that typing cannot produce (ChromeDriver types
        only the Basic Multilingual Plane): set the field, then press Send."""
        driver.execute_script(
            "document.getElementById('to').value = arguments[0];"
            "document.getElementById('text').value = arguments[1];",
            to,
            text,
        )
        driver.find_element(By.ID, "send").click()

    def incoming(self, driver, text: str):
        """The incoming message item holding ``text``, once its mark is settled."""
        (item,) = self.wait_for(driver, "#log li.msg.in", text=text)
        WebDriverWait(driver, WAIT).until(lambda d: mark_state(item))
        return item

    def outgoing_status(self, driver, text: str, status: str) -> None:
        self.wait_for(driver, f'#log li.msg.out:has(.status[data-state="{status}"])', text=text)

    # -- the Devices view --------------------------------------------------------------

    def devices_view(self, page) -> None:
        page.find_element(By.ID, "show-devices").click()
        self.wait_for(page, "#device-list li.device[data-this=true]")

    def device(self, page, key_id: str):
        (item,) = self.wait_for(page, f'#device-list li.device[data-key-id="{key_id}"]')
        return item

    def approve_in_page(self, page, text: str, name: str) -> str:
        """Paste a pairing text in the Devices view, check it, name it, approve:
        the new key's key_id the page showed."""
        self.devices_view(page)
        field = page.find_element(By.ID, "pair-input")
        field.clear()
        field.send_keys(text)
        page.find_element(By.ID, "pair-check").click()
        self.wait_for(page, "#pair-review:not([hidden])")
        shown = page.find_element(By.ID, "pair-key-id").text
        page.find_element(By.ID, "pair-name").send_keys(name)
        page.find_element(By.ID, "pair-approve").click()
        self.wait_for(page, "#devices-note", text=f"approved {name} ({shown})")
        self.device(page, shown)
        return shown

    def click(self, page, css: str) -> None:
        """Click the element ``css`` finds, finding it again if the page
        re-rendered it meanwhile (the Devices list is rebuilt on each look)."""
        deadline = time.monotonic() + WAIT
        while True:
            (element,) = self.wait_for(page, css)
            try:
                element.click()
                return
            except StaleElementReferenceException:
                self.assertLess(time.monotonic(), deadline, f"{css} kept changing")

    def cli_fails(self, user: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "wsserver.cli", *args],
            cwd=self.dir,
            env=self.cli_env(user),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotEqual(done.returncode, 0, done.stdout)
        return done.stderr

    # -- the command-line client ------------------------------------------------------

    def cli_env(self, user: str) -> dict[str, str]:
        """The CLI's environment: the working tree's code first on the path."""
        path = os.environ.get("PYTHONPATH")
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
            "WSSERVER_URL": self.server_url,
            "WSSERVER_USER": user,
        }

    def cli(self, user: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "wsserver.cli", *args],
            cwd=self.dir,
            env=self.cli_env(user),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def cli_process(self, user: str, *args: str) -> subprocess.Popen:
        """``wsserver-client`` running in the background (killed at cleanup)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "wsserver.cli", *args],
            cwd=self.dir,
            env=self.cli_env(user),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                pipe.close()

        self.addCleanup(stop)
        proc.buffer = b""
        return proc

    def read_line(self, proc: subprocess.Popen, wanted) -> str:
        """The first line ``proc`` prints for which ``wanted(line)`` is true."""
        deadline = time.monotonic() + WAIT
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in proc.buffer:
                    raw, proc.buffer = proc.buffer.split(b"\n", 1)
                    line = raw.decode("utf-8")
                    if wanted(line):
                        return line
                left = deadline - time.monotonic()
                chunk = os.read(proc.stdout.fileno(), 65536) if sel.select(max(left, 0)) else b""
                if not chunk:
                    self.fail(f"the CLI did not print the line wanted; left: {proc.buffer!r}")
                proc.buffer += chunk


class WebClientTests(BrowserCase):
    """The page at / with the default settings."""

    def test_conversation_between_two_browsers_and_the_cli(self):
        """Two pages and the CLI: keys made in the browser, signatures checked on
        both sides, pending then delivered, and a drop recovered with since."""
        proxy = CuttableProxy(self.port)
        self.addCleanup(proxy.close)
        alice_url = f"http://127.0.0.1:{proxy.port}"  # alice's network can be cut
        alice, bob = self.browser("alice"), self.browser("bob")
        self.register(alice, "alice", "Alice", alice_url)
        self.register(bob, "bob", "Bob")

        # A conversation: each side checks the other's signature.
        self.say(alice, "bob", "Hello Bob, this is signed in my browser.")
        item = self.incoming(bob, "Hello Bob")
        self.assertEqual(mark_state(item), "verified")
        self.assertEqual(item.find_element(By.CSS_SELECTOR, ".mark").text, "✓ verified")
        self.outgoing_status(alice, "Hello Bob", "delivered")
        self.say(bob, "alice", "Hi Alice! Verified here too.")
        self.assertEqual(mark_state(self.incoming(alice, "Hi Alice!")), "verified")

        # The command-line client checks what the page signed, and chats with it.
        self.cli("carol", "keygen")
        self.cli("carol", "register", "--name", "Carol")
        self.say(alice, "carol", "Are you there, Carol?")
        self.outgoing_status(alice, "Are you there, Carol?", "pending")  # carol is away
        # --no-receipts: a read receipt would turn the page's "delivered" into
        # "read" before this test looks (receipts: tests/test_conversations_cli.py).
        listen = self.cli_process("carol", "listen", "--json", "--no-receipts")
        frame = json.loads(self.read_line(listen, lambda line: '"message"' in line))
        self.assertEqual((frame["from"], frame["content"]), ("alice", "Are you there, Carol?"))
        self.assertIs(frame["verified_locally"], True)
        self.outgoing_status(alice, "Are you there, Carol?", "delivered")  # the status frame
        chat = self.cli_process("carol", "chat", "--to", "alice", "--no-receipts")
        self.read_line(chat, lambda line: line.startswith("chatting with alice"))
        chat.stdin.write(b"Carol here, from the command line.\n")
        chat.stdin.flush()
        self.assertRegex(self.read_line(chat, lambda line: "(#" in line), r"\(#\d+ delivered\)")
        self.assertEqual(mark_state(self.incoming(alice, "Carol here")), "verified")
        self.say(alice, "carol", "Got it, Carol.")
        reply = self.read_line(chat, lambda line: "Got it, Carol." in line)
        self.assertIn("alice [verified]", reply)
        self.outgoing_status(alice, "Got it, Carol.", "delivered")

        # Alice's network drops: she writes while offline, bob broadcasts.
        proxy.cut()
        self.wait_for(alice, "#conn[data-state=offline]")
        self.say(alice, "bob", "Written while offline.")
        self.outgoing_status(alice, "Written while offline.", "sending")
        self.say(bob, "broadcast", "News for everyone while Alice is away.")
        self.wait_for(bob, "#log li.msg.out:has(.status[data-state=delivered])", text="News for")
        proxy.restore()
        # Back online: the broadcast comes with since, the queued message goes out once.
        self.wait_for(alice, "#conn[data-state=online]")
        self.incoming(alice, "News for everyone")
        self.outgoing_status(alice, "Written while offline.", "delivered")
        self.incoming(bob, "Written while offline.")
        # A doubled message would come before a later one on the same path:
        # once these markers are in, anything doubled is in too.
        self.say(alice, "bob", "Marker from alice.")
        self.incoming(bob, "Marker from alice.")
        self.say(bob, "alice", "Marker from bob.")
        self.incoming(alice, "Marker from bob.")
        texts = [e.text for e in bob.find_elements(By.CSS_SELECTOR, "#log li.msg.in .content")]
        self.assertEqual(texts.count("Written while offline."), 1, texts)
        texts = [e.text for e in alice.find_elements(By.CSS_SELECTOR, "#log li.msg.in .content")]
        self.assertEqual(len(texts), len(set(texts)), texts)
        self.assertEqual(len(texts), 4, texts)

        shot = os.environ.get("WSSERVER_SCREENSHOT") or str(self.dir / "conversation.png")
        self.assertTrue(alice.save_screenshot(shot))
        self.assertEqual(Path(shot).read_bytes()[:8], b"\x89PNG\r\n\x1a\n")

    def test_login_with_the_kept_key_and_refusals(self):
        """A reload logs in with the key kept in IndexedDB (Enter in the form does
        it); refusals are shown."""
        page = self.browser("dave")
        self.register(page, "dave", "Dave")
        self.open_page(page)  # a reload: the page starts signed out
        self.assertEqual(page.find_element(By.ID, "signin-error").text, "")  # WebCrypto is there
        self.assertEqual(page.find_element(By.ID, "user-id").get_attribute("value"), "dave")
        page.find_element(By.ID, "register").click()
        self.wait_for(page, "#signin-error", text="already has a key for dave")
        page.find_element(By.ID, "user-id").send_keys("\n")  # Enter logs in: a key is kept
        self.wait_for(page, "#conn[data-state=online]")
        # A note to self comes back to the sending page, signature checked.
        # UTF-8 beyond ASCII, and a frame long enough for the server's other
        # unmasking path (1 KiB and more).
        for text in ("Grüße, 你好, 👋🏽 and a joiner: 👩‍💻", "long " + "ß" * 1500 + " end"):
            self.say_exactly(page, "dave", text)
            item = self.incoming(page, text[:12])
            self.assertEqual(item.find_element(By.CSS_SELECTOR, ".content").text, text)
            self.assertEqual(mark_state(item), "verified")
        self.say(page, "nobody", "hello?")
        self.wait_for(page, "#log li.notice[data-code=unknown_recipient]")
        self.outgoing_status(page, "hello?", "refused")
        self.wait_for(page, "#log li.msg.out .status", text="unknown_recipient")
        other = self.browser("eve")
        self.open_page(other)
        other.find_element(By.ID, "user-id").send_keys("dave")
        other.find_element(By.ID, "login").click()
        self.wait_for(other, "#signin-error", text="dave is registered elsewhere")
        other.find_element(By.ID, "username").send_keys("Not Dave")
        other.find_element(By.ID, "register").click()
        self.wait_for(other, "#signin-error", text="dave is already registered elsewhere")
        other.find_element(By.ID, "user-id").clear()
        other.find_element(By.ID, "user-id").send_keys("nobody-yet")
        other.find_element(By.ID, "login").click()
        self.wait_for(other, "#signin-error", text="nobody-yet is not registered: register it")


class ReadmeWebClientTests(BrowserCase):
    """The README's page step, after its command-line steps, on the same server."""

    def test_page_step_after_the_readme_cli_steps(self):
        """The README's CLI users (alice from the worked example, bob) do not
        collide with the id the README registers in the page, which works; a page
        asked to register or log in as alice says alice is registered elsewhere.
        Before anyone signs in the page shows no connection state."""
        readme = (ROOT / "README.md").read_text("utf-8")
        page_user = re.search(r"register `([\w.-]+)` in the page", readme).group(1)
        for user in ("alice", "bob"):
            self.cli(user, "keygen")
            self.cli(user, "register", "--name", user.title())
        page = self.browser("readme")
        self.open_page(page)
        conn = page.find_element(By.ID, "conn")
        self.assertFalse(conn.is_displayed())
        self.assertNotIn("offline", page.find_element(By.TAG_NAME, "body").text)
        self.register(page, page_user, page_user.title())
        self.assertTrue(page.find_element(By.ID, "conn").is_displayed())
        other = self.browser("elsewhere")
        self.open_page(other)
        other.find_element(By.ID, "user-id").send_keys("alice")
        other.find_element(By.ID, "username").send_keys("Alice")
        other.find_element(By.ID, "register").click()
        (error,) = self.wait_for(other, "#signin-error", text="registered elsewhere")
        self.assertIn("alice is already registered elsewhere", error.text)
        self.assertNotIn("register first", error.text)
        shot = os.environ.get("WSSERVER_SCREENSHOT_ELSEWHERE")
        if shot:
            other.save_screenshot(shot)


class RateLimitedWebClientTests(BrowserCase):
    """The page with a tight per-user limit: one message every 5 s after a burst
    of 3, so however slowly a loaded machine types the six messages (it would
    have to take over 15 s), the fourth is over the limit."""

    env = {"MESSAGE_RATE_LIMIT": "0.2", "MESSAGE_BURST_LIMIT": "3"}

    def test_rate_limit_notice_and_retry(self):
        """Over the limit the page shows the notice and sends again when allowed:
        every message arrives once, in the order written."""
        frank, grace = self.browser("frank"), self.browser("grace")
        self.register(frank, "frank", "Frank")
        self.register(grace, "grace", "Grace")
        for n in range(6):
            self.say(frank, "grace", f"quick message {n}")
        self.wait_for(frank, "#log li.notice[data-code=rate_limited]")
        self.wait_for(grace, "#log li.msg.in", count=6)
        for n in range(6):
            self.outgoing_status(frank, f"quick message {n}", "delivered")
        self.say(frank, "grace", "last one")  # anything doubled would come before it
        self.incoming(grace, "last one")
        texts = [e.text for e in grace.find_elements(By.CSS_SELECTOR, "#log li.msg.in .content")]
        self.assertEqual(texts, [*(f"quick message {n}" for n in range(6)), "last one"])
        notices = frank.find_elements(By.CSS_SELECTOR, "#log li.notice[data-code=rate_limited]")
        self.assertIn("sending again in", notices[-1].text)


class ShortSessionWebClientTests(BrowserCase):
    """The page with tokens that live eight seconds."""

    env = {"TOKEN_TTL": "8"}

    def server_log_count(self, text: str) -> int:
        return (self.dir / "server.log").read_text(errors="replace").count(text)

    def test_expired_session_logs_in_again(self):
        """When the server closes with 4001 the page logs in again with its kept
        key and reconnects with since: nothing is missed or shown twice."""
        heidi, ivan = self.browser("heidi"), self.browser("ivan")
        self.register(heidi, "heidi", "Heidi")
        self.register(ivan, "ivan", "Ivan")
        self.say(ivan, "heidi", "before the expiry")
        self.incoming(heidi, "before the expiry")
        deadline = time.monotonic() + WAIT
        while self.server_log_count("closed: heidi code=4001") < 1:
            self.assertLess(time.monotonic(), deadline, "no 4001 close for heidi")
            time.sleep(0.1)
        while self.server_log_count("logged in heidi") < 2:
            self.assertLess(time.monotonic(), deadline, "heidi's page did not log in again")
            time.sleep(0.1)
        self.wait_for(heidi, "#conn[data-state=online]")
        self.say(ivan, "heidi", "after the expiry")
        self.assertEqual(mark_state(self.incoming(heidi, "after the expiry")), "verified")
        texts = [e.text for e in heidi.find_elements(By.CSS_SELECTOR, "#log li.msg.in .content")]
        self.assertEqual(texts, ["before the expiry", "after the expiry"])


# What the page's key-log module (wsserver/static/keylog.js) works out for the
# shared vectors, run in Chromium itself: arguments[0] is the vectors' keylog
# part, arguments[1] the key ids, arguments[2] a pairing text made by Python.
KEYLOG_JS_CHECK = """
const [log, keyIds, pythonPairing, done] = arguments;
(async () => {
  const k = await import("/static/keylog.js");
  const out = {};
  out.key_ids = [];
  for (const v of keyIds) out.key_ids.push(await k.keyId(k.fromBase64(v.public_key)));
  out.strings = log.entries.map(
    (e) => k.entryString(log.user_id, e.seq, e.action, e.public_key, e.prev));
  const state = await k.checkLog(log.user_id, log.entries);
  out.heads = state.heads;
  out.next_seq = state.nextSeq;
  out.active = [...state.active.keys()];
  out.every = [...state.every.keys()];
  out.delete_string = k.deleteString(log.user_id, state.nextSeq);
  out.delete_ok = await k.signatureOk(
    log.second_device.public_key, out.delete_string, log.delete.signature);
  const pair = k.parsePairingText(pythonPairing);
  out.pairing = [pair.userId, pair.seq, pair.publicKey, pair.keySignature];
  out.pairing_text = k.pairingText(pair.userId, pair.seq, pair.publicKey, pair.keySignature);
  // Each broken log must be refused.
  const broken = {
    "wrong signature": (es) => { es[2].signature = es[1].signature; },
    "wrong key_signature": (es) => { es[1].key_signature = es[1].signature; },
    "signed by a revoked key": (es) => { es[2].by = "If4x36FUomFia_hU"; es[1].action = "revoke"; },
    "entry dropped": (es) => { es.splice(1, 1); },
    "entry 0 replaced": (es) => { es[0].public_key = es[1].public_key; },
    "by not a key": (es) => { es[1].by = "nobody"; },
    "wrong key_id": (es) => { es[1].key_id = "AAAAAAAAAAAAAAAA"; },
    "seq skipped": (es) => { es[2].seq = 3; },
    "entry 0 signed": (es) => { es[0].signature = es[1].signature; },
  };
  out.refused = {};
  for (const [what, spoil] of Object.entries(broken)) {
    const entries = structuredClone(log.entries);
    spoil(entries);
    try {
      await k.checkLog(log.user_id, entries);
      out.refused[what] = null;
    } catch (err) {
      out.refused[what] = err.message;
    }
  }
  // A name with control or format characters is unsigned: shown escaped,
  // the log still checks.
  const named = structuredClone(log.entries);
  named[1].name = "pho\\u202ene\\u0007";
  const namedState = await k.checkLog(log.user_id, named);
  out.control_name = namedState.names.get(namedState.entries[1].key_id);
  out.shown_names = [k.shownName("a\\u200db\\n"), k.shownName("x".repeat(70)), k.shownName(7)];
  // A key that is not a valid Ed25519 point (here the neutral point, of
  // small order) is refused, even as entry 0, which nothing else checks.
  try {
    const neutral = k.toBase64(Uint8Array.of(1, ...new Array(31).fill(0)));
    await k.checkLog(log.user_id, [{ seq: 0, action: "register", public_key: neutral }]);
    out.small_order = null;
  } catch (err) {
    out.small_order = err.message;
  }
  out.rewritten = k.compareHeads([state.heads[0], "x"], state.heads);
  out.extended = k.compareHeads(state.heads.slice(0, 2), state.heads);
  out.same = k.compareHeads(state.heads, state.heads);
  return out;
})().then(done, (err) => done({ error: String(err) }));
"""


class KeyLogModuleTests(BrowserCase):
    """The page's key-log code (keylog.js) against the shared vectors, in
    Chromium's WebCrypto."""

    def test_vectors_in_the_browser(self):
        from wsserver import keylog

        from .support import VECTORS

        page = self.browser("vectors")
        self.open_page(page)
        log = VECTORS["keylog"]
        entry = log["entries"][1]
        pairing = keylog.Pairing(
            log["user_id"],
            entry["seq"],
            base64.b64decode(entry["public_key"]),
            base64.b64decode(entry["key_signature"]),
        )
        text = keylog.pairing_text(pairing)
        page.set_script_timeout(WAIT)
        out = page.execute_async_script(KEYLOG_JS_CHECK, log, VECTORS["key_ids"], text)
        self.assertNotIn("error", out)
        self.assertEqual(out["key_ids"], [v["key_id"] for v in VECTORS["key_ids"]])
        self.assertEqual(out["strings"], [e["string"] for e in log["entries"]])
        # Each entry's digest is the next one's prev.
        self.assertEqual(out["heads"][:-1], [e["prev"] for e in log["entries"][1:]])
        self.assertEqual(out["next_seq"], 3)
        self.assertEqual(out["active"], [log["delete"]["key_id"]])
        self.assertEqual(len(out["every"]), 2)
        self.assertEqual(out["delete_string"], log["delete"]["string"])
        self.assertIs(out["delete_ok"], True)
        self.assertEqual(
            out["pairing"],
            [log["user_id"], 1, entry["public_key"], entry["key_signature"]],
        )
        self.assertEqual(out["pairing_text"], text)
        for what, why in out["refused"].items():
            self.assertIsNotNone(why, f"a log with {what} was accepted")
        self.assertEqual(out["small_order"], "entry 0: public_key is not a valid Ed25519 point")
        self.assertEqual(out["control_name"], r"pho\u202ene\x07")
        self.assertEqual(out["shown_names"], ["a\u200db\\n", "x" * 64 + "…", None])
        relations = (out["rewritten"], out["extended"], out["same"])
        self.assertEqual(relations, ("rewritten", "extended", "same"))


def pairing_line(output: str) -> str:
    """The pairing text in what ``wsserver-client link`` printed."""
    for line in output.splitlines():
        found = re.search(r"wsserver-pair-v1:\S+", line)
        if found:
            return found.group(0)
    raise AssertionError(f"no pairing text in {output!r}")


class DevicesWebClientTests(BrowserCase):
    """Section 12 in the page, with the command-line client as the other device."""

    def test_page_links_the_cli_revokes_it_signs_out_and_deletes(self):
        """A user registered in the page approves the CLI's pairing text; the
        CLI's signed message shows verified with its device name; revoking it
        closes its connection with 4003 and it cannot log in again.  Sign out
        closes the page's connection with 4004 and keeps the key (signing in
        again works); deleting the account forgets it and the id stays taken."""
        page = self.browser("olga")
        self.register(page, "olga", "Olga")
        self.devices_view(page)
        (mine,) = self.wait_for(page, "#device-list li.device")
        page_key_id = mine.get_attribute("data-key-id")
        # Entry 0 has no name: "this browser" shows once, as the tag.
        self.assertEqual(mine.text.count("this browser"), 1, mine.text)
        self.assertEqual(mine.find_elements(By.CSS_SELECTOR, ".name"), [])
        # No note yet: the empty note and error take no room.
        for empty in ("devices-error", "devices-note"):
            self.assertEqual(page.find_element(By.ID, empty).rect["height"], 0, empty)

        # The CLI (a laptop) makes its key and a pairing text; the page approves it.
        self.cli("olga", "keygen")
        text = pairing_line(self.cli("olga", "link"))
        laptop = self.approve_in_page(page, text, "laptop")
        self.assertEqual(laptop, pairing_key_id(text))
        item = self.device(page, laptop)
        self.assertIn("laptop", item.text)
        # Texts that cannot be approved are refused, and say why.
        from wsserver import keylog

        neutral = keylog.Pairing("olga", 2, bytes([1]) + bytes(31), bytes(64))  # small order
        for bad, why in (
            (keylog.pairing_text(neutral), "the pairing text's key is not a valid Ed25519"),
            (text, "the key log changed since this pairing text was made"),  # used already
            (text.replace(":olga:", ":someone:"), "this pairing text is for someone, not olga"),
            (text[:-3], "this is not a wsserver pairing text"),
        ):
            field = page.find_element(By.ID, "pair-input")
            field.clear()
            field.send_keys(bad)
            page.find_element(By.ID, "pair-check").click()
            self.wait_for(page, "#devices-error", text=why)
            self.assertFalse(page.find_element(By.ID, "pair-review").is_displayed())
        self.assertEqual(item.find_elements(By.CSS_SELECTOR, "button")[0].text, "Revoke")

        # The laptop sends a signed message: the page checks it with the laptop's key.
        page.find_element(By.ID, "show-chat").click()
        listen = self.cli_process("olga", "listen", "--json")
        self.read_line(listen, lambda line: "listening as olga" in line)
        self.cli("olga", "send", "--to", "olga", "Signed on the laptop.")
        item = self.incoming(page, "Signed on the laptop.")
        self.assertEqual(mark_state(item), "verified")
        mark = item.find_element(By.CSS_SELECTOR, ".mark")
        self.assertEqual(mark.text, "✓ verified (laptop)")
        self.assertEqual(mark.get_attribute("data-key-id"), laptop)
        # And the page's message reaches the laptop, verified with the page's key.
        self.say(page, "olga", "Signed in the browser.")
        frame = json.loads(self.read_line(listen, lambda line: "Signed in the browser." in line))
        self.assertIs(frame["verified_locally"], True)
        self.assertEqual(frame["key_id"], page_key_id)

        # Revoke the laptop: asked first; its listen closes with 4003.  What
        # an action before said (the last refused pairing text) goes when
        # this one starts.
        self.devices_view(page)
        self.assertIn("not a wsserver pairing text", page.find_element(By.ID, "devices-error").text)
        self.click(page, f'#device-list li.device[data-key-id="{laptop}"] button')
        (yes,) = self.wait_for(page, "button.confirm-revoke")
        self.assertEqual(yes.text, f"Yes, revoke laptop ({laptop})")  # the name is unsigned
        for said in ("devices-error", "devices-note"):
            self.assertEqual(page.find_element(By.ID, said).text, "", said)
        # "Yes" and "No" do not touch (side by side, or "No" below on a narrow page).
        no = yes.find_element(By.XPATH, "following-sibling::button")
        self.assertEqual(no.text, "No")
        a, b = yes.rect, no.rect
        self.assertTrue(b["x"] > a["x"] + a["width"] or b["y"] > a["y"] + a["height"], (a, b))
        yes.click()
        self.wait_for(page, "#devices-note", text="revoked laptop")
        row = f'#device-list li.device[data-key-id="{laptop}"]'
        WebDriverWait(page, WAIT).until(lambda d: not d.find_elements(By.CSS_SELECTOR, row))
        self.read_line(listen, lambda line: "4003" in line or "revoked" in line)
        self.assertEqual(listen.wait(WAIT), 1)
        self.assertIn("invalid_signature", self.cli_fails("olga", "login"))

        # Sign out: the server closes with 4004, the page is back at sign-in.
        page.find_element(By.ID, "signout").click()
        (note,) = self.wait_for(page, "#signin-note[data-code='4004'][data-by=server]")
        self.assertIn("signed out", note.text)
        self.assertEqual(page.find_element(By.ID, "conn").text, "signed out")
        self.assertFalse(page.find_element(By.ID, "chat").is_displayed())
        page.find_element(By.ID, "login").click()  # the key stayed: log in again
        self.wait_for(page, "#conn[data-state=online]")
        # The Devices view of the new session shows no note of the last one.
        self.devices_view(page)
        self.assertEqual(page.find_element(By.ID, "devices-note").text, "")

        # Delete the account: confirmed by typing the id.
        self.devices_view(page)
        button = page.find_element(By.ID, "delete-account")
        self.assertFalse(button.is_enabled())
        page.find_element(By.ID, "delete-confirm").send_keys("olg")
        self.assertFalse(button.is_enabled())
        page.find_element(By.ID, "delete-confirm").send_keys("a")
        button.click()
        (note,) = self.wait_for(page, "#signin-note[data-code='4003'][data-by=server]")
        self.assertIn("account olga deleted", note.text)
        self.assertEqual(page.find_element(By.ID, "conn").text, "account deleted")
        # Both fields of the deleted account are cleared.
        for field in ("user-id", "username"):
            self.assertEqual(page.find_element(By.ID, field).get_attribute("value"), "", field)
        # The key is forgotten here, and the id stays taken.
        page.find_element(By.ID, "user-id").send_keys("olga")
        page.find_element(By.ID, "login").click()
        self.wait_for(page, "#signin-error", text="olga is not registered")
        page.find_element(By.ID, "username").send_keys("Olga again")
        page.find_element(By.ID, "register").click()
        self.wait_for(page, "#signin-error", text="olga is already registered elsewhere")

    def test_page_links_itself_to_an_account_made_by_the_cli(self):
        """The CLI registers; the page makes a key and a pairing text, the CLI
        approves it, the page signs in with its own key and its message reaches
        the CLI verified with the page's key_id."""
        self.cli("pavel", "keygen")
        self.cli("pavel", "register", "--name", "Pavel")
        page = self.browser("pavel")
        self.open_page(page)
        page.find_element(By.ID, "user-id").send_keys("pavel")
        page.find_element(By.ID, "link").click()
        self.wait_for(page, "#linking:not([hidden]) #link-state[data-state=waiting]")
        first = page.find_element(By.ID, "pair-text").get_attribute("value")
        page.find_element(By.ID, "link-cancel").click()  # stops waiting, drops that key
        self.assertFalse(page.find_element(By.ID, "linking").is_displayed())
        page.find_element(By.ID, "link").click()
        self.wait_for(page, "#linking:not([hidden]) #link-state[data-state=waiting]")
        self.assertNotEqual(page.find_element(By.ID, "pair-text").get_attribute("value"), first)
        text = page.find_element(By.ID, "pair-text").get_attribute("value")
        shown = page.find_element(By.ID, "link-key-id").text
        self.assertEqual(shown, pairing_key_id(text))
        approved = self.cli("pavel", "approve", text, "--name", "browser")
        self.assertIn(shown, approved)
        self.wait_for(page, "#conn[data-state=online]")
        self.assertEqual(page.find_element(By.ID, "who").text, "signed in as pavel")
        # The log with this browser's own entry is remembered: no notice for it.
        kept = page.execute_script("return localStorage.getItem('wsserver.keylog.pavel')")
        self.assertEqual(len(json.loads(kept)["heads"]), 2)
        listen = self.cli_process("pavel", "listen", "--json")
        self.read_line(listen, lambda line: "listening as pavel" in line)
        self.say(page, "pavel", "From the linked browser.")
        frame = json.loads(self.read_line(listen, lambda line: "linked browser" in line))
        self.assertIs(frame["verified_locally"], True)
        self.assertEqual(frame["key_id"], shown)
        # The page lists both devices: itself (named by the CLI) and the CLI.
        self.devices_view(page)
        row = self.device(page, shown)
        self.assertEqual(row.find_element(By.CSS_SELECTOR, ".name").text, "browser")
        self.assertEqual(row.text.count("this browser"), 1, row.text)
        self.wait_for(page, "#device-list li.device", count=2)
        # The CLI revokes the browser: the page is closed with 4003 and says so.
        self.cli("pavel", "revoke", "--", shown)
        (note,) = self.wait_for(page, "#signin-note[data-code='4003'][data-by=server]")
        self.assertIn("this browser's key for pavel was revoked", note.text)
        self.assertEqual(page.find_element(By.ID, "conn").text, "key revoked")
        page.find_element(By.ID, "login").click()  # the useless key was forgotten
        self.wait_for(page, "#signin-error", text="pavel is registered elsewhere")

    def test_key_change_notice_and_rewritten_log_warning(self):
        """A sender's new device brings a notice and its messages verify with
        the new key; a log that no longer starts with what this browser saw
        brings the strong warning and marks the sender's messages unverified
        until accepted."""
        self.cli("quinn", "keygen")
        self.cli("quinn", "register", "--name", "Quinn")
        page = self.browser("rita")
        self.register(page, "rita", "Rita")
        self.cli("quinn", "send", "--to", "rita", "From the first key.")
        self.assertEqual(mark_state(self.incoming(page, "From the first key.")), "verified")
        # Quinn adds a phone (a second key file) from the command line.
        phone = ("--key", "quinn-phone.key")
        self.cli("quinn", *phone, "keygen")
        text = pairing_line(self.cli("quinn", *phone, "link"))
        self.cli("quinn", "approve", text, "--name", "phone")
        self.cli("quinn", *phone, "send", "--to", "rita", "From the phone.")
        item = self.incoming(page, "From the phone.")
        self.assertEqual(mark_state(item), "verified")
        self.assertEqual(item.find_element(By.CSS_SELECTOR, ".mark").text, "✓ verified (phone)")
        (notice,) = self.wait_for(page, "#log li.notice[data-code=keylog_changed]")
        self.assertIn(f"quinn added a device (phone, {pairing_key_id(text)})", notice.text)
        self.assertNotIn("strong", notice.get_attribute("class"))

        # What this browser remembers of quinn's log no longer starts the log
        # the server shows: as if the server had rewritten it since.
        page.execute_script(
            "localStorage.setItem('wsserver.keylog.quinn', JSON.stringify({heads: ['forged']}))"
        )
        self.open_page(page)  # a reload: nothing of quinn's log in memory
        page.find_element(By.ID, "login").click()
        self.wait_for(page, "#conn[data-state=online]")
        self.cli("quinn", "send", "--to", "rita", "After the rewrite.")
        item = self.incoming(page, "After the rewrite.")
        self.assertEqual(mark_state(item), "unverified")
        (warning,) = self.wait_for(page, "#log li.notice.strong[data-code=keylog_rewritten]")
        self.assertIn("quinn's key log was REWRITTEN", warning.text)
        self.cli("quinn", "send", "--to", "rita", "Still unverified.")
        self.assertEqual(mark_state(self.incoming(page, "Still unverified.")), "unverified")
        warning.find_element(By.CSS_SELECTOR, "button").click()  # checked in person
        self.cli("quinn", "send", "--to", "rita", "Accepted now.")
        self.assertEqual(mark_state(self.incoming(page, "Accepted now.")), "verified")
        warnings = page.find_elements(By.CSS_SELECTOR, "#log li.notice.strong")
        self.assertEqual(warnings, [])


def pairing_key_id(text: str) -> str:
    from wsserver import keylog

    return keylog.key_id(keylog.parse_pairing_text(text).public_key)


# A man in the middle, played by the test in the page itself: window.fetch
# answers POST /auth/login with arguments[0] as the "challenge" (every other
# request goes through), and counts the signatures sent back (POST
# /auth/login?verify=true) in window.verifyCalls.
FORGE_CHALLENGE_JS = """
const forged = arguments[0];
const real = window.fetch.bind(window);
window.verifyCalls = 0;
window.fetch = async (path, init) => {
  const url = String(path);
  if (url.startsWith("/auth/login?verify")) window.verifyCalls += 1;
  if (url === "/auth/login") {
    const body = JSON.stringify({ challenge: forged, expires_at: "2099-01-01T00:00:00Z" });
    return new Response(body, { status: 200, headers: { "Content-Type": "application/json" } });
  }
  return real(path, init);
};
"""

# Records every WebSocket the page opens in window.sockets, so the test can
# play a server's close frame on the page's own socket.
RECORD_SOCKETS_JS = """
window.sockets = [];
const Real = window.WebSocket;
window.WebSocket = class extends Real {
  constructor(...args) {
    super(...args);
    window.sockets.push(this);
  }
};
"""

FORGED_CLOSE_JS = """
const socket = window.sockets[window.sockets.length - 1];
socket.onclose(new CloseEvent("close", { code: arguments[0], reason: arguments[1] }));
"""


class HostileServerWebClientTests(BrowserCase):
    """What a malicious server (or a man in the middle) answers is not trusted
    by the page: its answers are forged in the page by patching fetch or
    WebSocket, as one would."""

    def login_again(self, page) -> None:
        page.find_element(By.ID, "login").click()
        self.wait_for(page, "#conn[data-state=online]")

    def test_a_challenge_that_is_not_a_login_challenge_is_not_signed(self):
        """The page signs only wsserver-login-v1:<its user>:<43 base64url>: a
        key-log entry or a deletion passed off as a challenge is refused, with
        an error, and nothing is sent back signed."""
        from wsserver import keylog

        page = self.browser("sam")
        self.register(page, "sam", "Sam")
        key = bytes(range(32))
        nonce = "A" * 43
        for forged in (
            keylog.entry_string("sam", 1, "add", key, "x" * 43),  # approve the server's key
            keylog.delete_string("sam", 1),  # delete the account
            f"wsserver-login-v1:someone:{nonce}",  # another user's challenge
            f"wsserver-login-v1:sam:{nonce[:-1]}",  # too short
            f"wsserver-login-v1:sam:{nonce}\n",  # anything after it
            f"wsserver-login-v1:sam:{nonce[:-1]}+",  # not base64url
        ):
            self.open_page(page)  # signed out, sam's key kept
            page.execute_script(FORGE_CHALLENGE_JS, forged)
            page.find_element(By.ID, "login").click()
            self.wait_for(page, "#signin-error", text="that is not one")
            self.assertIn("nothing was signed", page.find_element(By.ID, "signin-error").text)
            self.assertEqual(page.execute_script("return window.verifyCalls"), 0, repr(forged))
            self.assertTrue(page.find_element(By.ID, "signin").is_displayed())
        self.open_page(page)  # the real server's challenge is signed
        self.login_again(page)

    def test_link_refuses_a_rewritten_log_and_approval_does_not_overwrite(self):
        """Linking to a user whose log no longer starts with what this browser
        remembers is refused; once linked, the log seen at approval is
        remembered only when it is the remembered one plus this browser's own
        entry (else the next look warns)."""
        self.cli("pia", "keygen")
        self.cli("pia", "register", "--name", "Pia")
        page = self.browser("pia")
        self.open_page(page)
        forged = json.dumps({"heads": ["forged"]})
        remembered = "return localStorage.getItem('wsserver.keylog.pia')"
        page.execute_script("localStorage.setItem('wsserver.keylog.pia', arguments[0])", forged)
        page.find_element(By.ID, "user-id").send_keys("pia")
        page.find_element(By.ID, "link").click()
        self.wait_for(page, "#signin-error", text="pia's key log was REWRITTEN")
        self.assertFalse(page.find_element(By.ID, "linking").is_displayed())
        self.assertEqual(page.find_element(By.ID, "pair-text").get_attribute("value"), "")
        self.assertEqual(page.execute_script(remembered), forged)

        # A browser that never saw pia's log links; what it remembers changes
        # before the approval (as if it had seen another log meanwhile): the
        # log after the approval does not extend it, and is not remembered.
        page.execute_script("localStorage.removeItem('wsserver.keylog.pia')")
        page.find_element(By.ID, "link").click()
        self.wait_for(page, "#linking:not([hidden]) #link-state[data-state=waiting]")
        heads = json.loads(page.execute_script(remembered))["heads"]
        self.assertEqual(len(heads), 1)
        page.execute_script("localStorage.setItem('wsserver.keylog.pia', arguments[0])", forged)
        text = page.find_element(By.ID, "pair-text").get_attribute("value")
        self.cli("pia", "approve", text, "--name", "browser")
        self.wait_for(page, "#conn[data-state=online]")
        self.assertEqual(page.execute_script(remembered), forged)
        page.find_element(By.ID, "show-devices").click()
        self.wait_for(page, "#devices-error", text="your key log was rewritten")

    def test_a_message_stored_before_key_ids_checks_with_the_registration_key(self):
        """ "key_id": null (a message stored before keys per device) is checked
        with entry 0's key: verified, no warning; one signed by a later key
        and shown with a null key_id is invalid, not verified."""
        import sqlite3

        self.cli("omar", "keygen")
        self.cli("omar", "register", "--name", "Omar")
        phone = ("--key", "omar-phone.key")
        self.cli("omar", *phone, "keygen")
        text = pairing_line(self.cli("omar", *phone, "link"))
        self.cli("omar", "approve", text, "--name", "phone")
        page = self.browser("nia")
        self.register(page, "nia", "Nia")
        self.open_page(page)  # nia offline: what omar sends is stored
        self.cli("omar", "send", "--to", "nia", "Old message from the first key.")
        self.cli("omar", *phone, "send", "--to", "nia", "Old message from the phone.")
        with contextlib.closing(sqlite3.connect(self.dir / "db.sqlite")) as db, db:
            update = "UPDATE messages SET key_id = NULL WHERE recipient = 'nia'"
            changed = db.execute(update).rowcount
        self.assertEqual(changed, 2)
        self.login_again(page)
        item = self.incoming(page, "Old message from the first key.")
        self.assertEqual(mark_state(item), "verified")
        self.assertEqual(mark_state(self.incoming(page, "Old message from the phone.")), "invalid")
        self.assertEqual(page.find_elements(By.CSS_SELECTOR, "#log li.notice.strong"), [])

    def test_a_4003_close_forgets_the_key_only_when_the_log_says_so(self):
        """A close 4003 "key revoked" or "account deleted" that the key log
        does not bear out (it holds a revoke, of another key) keeps the key:
        the page says so, and logs in again with it.  A real revocation of
        this browser's key forgets it."""
        page = self.browser("tess")
        self.register(page, "tess", "Tess")
        # Two more devices on the command line; the phone is revoked.
        self.cli("tess", "keygen")
        text = pairing_line(self.cli("tess", "link"))
        laptop = self.approve_in_page(page, text, "laptop")
        self.assertEqual(laptop, pairing_key_id(text))
        mine = self.wait_for(page, "#device-list li.device[data-this=true]")[0]
        page_key_id = mine.get_attribute("data-key-id")
        phone = ("--key", "tess-phone.key")
        self.cli("tess", *phone, "keygen")
        text = pairing_line(self.cli("tess", *phone, "link"))
        self.cli("tess", "approve", text, "--name", "phone")
        self.cli("tess", "revoke", "--", pairing_key_id(text))  # a key_id may start with -
        for reason in ("key revoked", "account deleted"):
            self.open_page(page)
            page.execute_script(RECORD_SOCKETS_JS)
            self.login_again(page)
            page.execute_script(FORGED_CLOSE_JS, 4003, reason)
            (note,) = self.wait_for(page, "#signin-note[data-code='4003']", text="keeps its key")
            self.assertIn(f"4003 {reason}", note.text)
            self.assertIn("the key log does not show this browser's key revoked", note.text)
            self.login_again(page)  # the key was kept
        # A real revocation, from the laptop: the key is forgotten.
        self.cli("tess", "revoke", "--", page_key_id)
        self.wait_for(page, "#signin-note[data-code='4003']", text="was revoked")
        page.find_element(By.ID, "login").click()
        self.wait_for(page, "#signin-error", text="tess is registered elsewhere")


VALID_POINT_JS = """
const [keys, done] = arguments;
import("/static/keylog.js")
  .then((k) => done(keys.map((key) => k.validPoint(k.fromBase64(key)))))
  .catch((err) => done(String(err)));
"""


def point_cases() -> list[bytes]:
    """32-byte strings for the point check: valid keys, the same plus a
    point of small order, every small-order encoding libsodium lists,
    non-canonical encodings, and random bytes (about half on the curve)."""
    import random

    from nacl.bindings import crypto_core_ed25519_add
    from nacl.signing import SigningKey

    rng = random.Random(12)
    p = 2**255 - 19
    order8 = bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
    small = [
        bytes([1]) + bytes(31),  # the neutral point
        bytes(32),  # order 4; then order 2
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        order8,
        bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
        bytes(31) + b"\x80",
        bytes([1]) + bytes(30) + b"\x80",
    ]
    cases = list(small)
    for _ in range(12):
        key = bytes(SigningKey(rng.randbytes(32)).verify_key)
        cases.append(key)
        cases.append(crypto_core_ed25519_add(key, order8))  # on the curve, not in the subgroup
        flipped = bytearray(key)
        flipped[31] ^= 0x80  # the other x: still a valid point (its negation)
        cases.append(bytes(flipped))
    for y in (p, p + 1, p + 2, 2**255 - 1):  # y >= p: not canonical
        cases.append(y.to_bytes(32, "little"))
    cases += [rng.randbytes(32) for _ in range(60)]
    return cases


class PointCheckTests(BrowserCase):
    """keylog.js's validPoint says what libsodium's
    crypto_core_ed25519_is_valid_point (the server's and the CLI's check)
    says, for every case."""

    def test_valid_point_agrees_with_libsodium(self):
        from nacl.bindings import crypto_core_ed25519_is_valid_point

        page = self.browser("points")
        self.open_page(page)
        page.set_script_timeout(WAIT)
        cases = point_cases()
        keys = [base64.b64encode(case).decode() for case in cases]
        got = page.execute_async_script(VALID_POINT_JS, keys)
        wanted = [crypto_core_ed25519_is_valid_point(case) for case in cases]
        self.assertEqual(got, wanted)
        self.assertGreater(sum(wanted), 20)  # both answers are exercised
        self.assertGreater(len(wanted) - sum(wanted), 40)


class RewrittenOwnLogWebClientTests(BrowserCase):
    """Nothing is signed on top of the user's own key log once it no longer
    starts with what this browser remembers of it."""

    def test_no_deletion_signed_on_a_rewritten_own_log(self):
        page = self.browser("uma")
        self.register(page, "uma", "Uma")
        page.execute_script(
            "localStorage.setItem('wsserver.keylog.uma', JSON.stringify({heads: ['forged']}))"
        )
        page.find_element(By.ID, "show-devices").click()
        self.wait_for(page, "#devices-error", text="your key log was rewritten")
        page.find_element(By.ID, "delete-confirm").send_keys("uma")
        page.find_element(By.ID, "delete-account").click()
        self.wait_for(page, "#devices-error", text="your key log was rewritten")
        self.assertTrue(page.find_element(By.ID, "devices").is_displayed())
        import urllib.request

        with urllib.request.urlopen(f"{self.server_url}/auth/users/uma") as answer:
            self.assertEqual(json.loads(answer.read())["user_id"], "uma")  # not deleted
