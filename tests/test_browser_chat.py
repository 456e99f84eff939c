"""The web page as a chat (issue 13): two Chromium pages and the command-line
client in a group, through ``twistd -n wsserver``.

The sidebar (conversations newest first, display names from the directory,
unread counts), a group made and joined in the page, presence dots going on
and off, ``delivered`` and ``read`` marks, the verification mark on every
message (own ones too) with a warning on one whose signature does not check,
history after a reload that stays signed in, older pages on demand, the
one-column layout at 420 px, and sign-out.

Runs with tests/test_browser.py's machinery (servers, browsers, the CLI), so
it needs the same things: ``/usr/bin/chromium``, ``/usr/bin/chromedriver``
and selenium; without them it is skipped and says why, unless
``WSSERVER_REQUIRE_BROWSER=1`` makes that a failure.
``WSSERVER_SCREENSHOT=PATH`` saves the group conversation's screenshot
there (docs/web-client.png is made so).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from .test_browser import WAIT, WHY_NOT, BrowserCase, mark_state

if WHY_NOT and os.environ.get("WSSERVER_REQUIRE_BROWSER") == "1":  # also raised on import above
    raise RuntimeError(f"WSSERVER_REQUIRE_BROWSER=1 but the browser tests cannot run: {WHY_NOT}")

if not WHY_NOT:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

HISTORY_PAGE = 30  # the page's history page size (chat.js PAGE)

SIDEBAR_JS = "return [...document.querySelectorAll('#convs li')].map((li) => li.dataset.conv);"

# What overlaps in the chat view: the pairs of visible panels whose boxes
# intersect, and whether the page is wider than the window.
OVERLAP_JS = """
const ids = ["sidebar", "conv-head", "log", "send-form"];
const boxes = ids.map((id) => [id, document.getElementById(id).getBoundingClientRect()])
  .filter(([, r]) => r.width > 0 && r.height > 0);
const hits = [];
for (let i = 0; i < boxes.length; i++)
  for (let j = i + 1; j < boxes.length; j++) {
    const [a, r] = boxes[i], [b, s] = boxes[j];
    const across = r.left < s.right - 0.5 && s.left < r.right - 0.5;
    if (across && r.top < s.bottom - 0.5 && s.top < r.bottom - 0.5)
      hits.push(a + "/" + b);
  }
return {hits, wide: document.documentElement.scrollWidth > window.innerWidth,
        shown: boxes.map(([id]) => id)};
"""


class ChatWebClientTests(BrowserCase):
    """Two pages (alice, bob) and the CLI (carol) in a group.

    The three clients share one address here, where people would each have
    their own: the per-address limit of the HTTP API (directory look-ups,
    history, key logs) is raised so that it is not what is tested; the
    per-user message limit is raised so the CLI can write a page and more
    of history quickly."""

    env = {
        "AUTH_RATE_LIMIT": "100",
        "AUTH_BURST_LIMIT": "200",
        "MESSAGE_RATE_LIMIT": "100",
        "MESSAGE_BURST_LIMIT": "200",
    }

    # -- helpers -----------------------------------------------------------------------

    def until(self, page, check, what: str):
        """Wait until ``check(page)`` is truthy, or fail saying ``what``."""
        try:
            return WebDriverWait(page, WAIT, poll_frequency=0.05).until(lambda d: check(d))
        except TimeoutException:
            body = page.find_element(By.TAG_NAME, "body").text
            self.fail(f"{page.wsserver_name}: {what}\npage:\n{body}")

    def sidebar(self, page) -> list[str]:
        return page.execute_script(SIDEBAR_JS)

    def unread(self, page, conv: str) -> str:
        found = page.find_elements(By.CSS_SELECTOR, f'#convs li[data-conv="{conv}"] .unread')
        return found[0].text if found else ""

    def open_conv(self, page, conv: str) -> None:
        """Click the conversation in the list, finding it again when the list
        was re-rendered between finding and clicking (it is, on each message)."""
        deadline = time.monotonic() + WAIT
        while True:
            button = self.wait_for(page, f'#convs li[data-conv="{conv}"] button')[0]
            try:
                button.click()
                break
            except StaleElementReferenceException:
                self.assertLess(time.monotonic(), deadline, f"{conv} kept changing")
        self.wait_for(page, f'#chat[data-open="{conv}"]')

    def write(self, page, text: str) -> None:
        """Send ``text`` in the open conversation."""
        page.find_element(By.ID, "text").send_keys(text + "\n")

    def shown(self, page, css: str = "#log li.msg") -> list[str]:
        """The contents of the message items on screen, top to bottom."""
        return [
            e.find_element(By.CSS_SELECTOR, ".content").text
            for e in page.find_elements(By.CSS_SELECTOR, css)
            if e.is_displayed()
        ]

    def dot(self, page, where: str, user: str) -> str:
        (node,) = self.wait_for(page, f'{where} .dot[data-user="{user}"]')
        return node.get_attribute("data-online")

    def logins(self, user: str) -> int:
        log = (self.dir / "server.log").read_text(errors="replace")
        return log.count(f"logged in {user}\n") + log.count(f"logged in {user} ")

    # -- the test -------------------------------------------------------------------------

    def test_group_of_two_pages_and_the_cli(self):
        self.cli("carol", "keygen")
        self.cli("carol", "register", "--name", "Carol C.")
        alice, bob = self.browser("alice"), self.browser("bob")
        self.register(alice, "alice", "Alice A.")
        self.register(bob, "bob", "Bob B.")

        # A direct message first: bob's sidebar lists alice by her display name.
        self.say(alice, "bob", "Hi Bob, a team is coming.")
        self.incoming(bob, "Hi Bob, a team is coming.")
        self.wait_for(bob, '#convs li[data-conv="alice"] .name', text="Alice A.")

        # Alice makes a group with bob and carol, in the page.
        alice.find_element(By.ID, "new-group").click()
        alice.find_element(By.ID, "group-id").send_keys("team")
        alice.find_element(By.ID, "group-name").send_keys("The Team")
        alice.find_element(By.ID, "group-members").send_keys("bob, carol\n")
        self.wait_for(alice, '#chat[data-open="#team"]')
        self.wait_for(alice, "#conv-title", text="The Team")
        self.wait_for(alice, "#members", text="Carol C.")
        self.wait_for(alice, "#members", text="Bob B.")
        self.assertFalse(
            alice.find_element(By.ID, "to").is_displayed()
        )  # the group is the recipient
        # Presence: bob is on, carol (the CLI, not connected) is off.
        self.until(
            alice, lambda p: self.dot(p, "#members", "bob") == "true", "bob's dot never went on"
        )
        self.assertEqual(self.dot(alice, "#members", "carol"), "false")

        # Bob learns of the group; he is reading alice's direct messages.
        self.wait_for(bob, '#convs li[data-conv="#team"] .name', text="The Team")
        self.open_conv(bob, "alice")
        self.until(
            bob, lambda p: self.dot(p, "#convs", "alice") == "true", "alice's dot never went on"
        )
        self.assertEqual(self.dot(bob, "#conv-title", "alice"), "true")

        self.write(alice, "Hello team, signed in my browser.")
        self.outgoing_status(alice, "Hello team", "pending")  # carol is away
        (mine,) = self.wait_for(alice, "#log li.msg.out", text="Hello team")
        self.until(alice, lambda p: mark_state(mine) == "verified", "own message not verified")
        # Not on bob's screen: unread, and the group moves to the top.
        self.until(bob, lambda p: self.unread(p, "#team") == "1", "no unread count on the group")
        self.assertEqual(self.sidebar(bob)[:3], ["", "#team", "alice"])
        self.assertEqual(self.unread(bob, "alice"), "")
        self.assertEqual(
            mine.find_element(By.CSS_SELECTOR, ".read").get_attribute("data-state"), None
        )

        # Carol comes online on the command line: her dot goes on, the
        # message reaches her (delivered), and she writes to the group.
        listen = self.cli_process("carol", "listen", "--json")
        self.read_line(listen, lambda line: "Hello team" in line)
        self.until(
            alice, lambda p: self.dot(p, "#members", "carol") == "true", "carol's dot never went on"
        )
        self.outgoing_status(alice, "Hello team", "delivered")
        self.assertEqual(
            mine.find_element(By.CSS_SELECTOR, ".status").text, "delivered (2 of 2 members)"
        )
        # carol's listen shows it and reports it read (the CLI sends receipts)
        self.until(
            alice,
            lambda p: mine.find_element(By.CSS_SELECTOR, ".read").text == "read by Carol C.",
            "not read by carol",
        )
        self.cli("carol", "send", "--to", "#team", "Carol here, from the command line.")
        self.assertEqual(mark_state(self.incoming(alice, "Carol here")), "verified")
        self.until(bob, lambda p: self.unread(p, "#team") == "2", "unread count did not grow")
        listen.kill()
        listen.wait()
        self.until(
            alice,
            lambda p: self.dot(p, "#members", "carol") == "false",
            "carol's dot never went off",
        )

        # Bob opens the group: both messages shown, verified; the unread
        # count goes and alice's message is marked read by Bob.
        self.open_conv(bob, "#team")
        self.assertEqual(self.unread(bob, "#team"), "")
        self.assertEqual(mark_state(self.incoming(bob, "Hello team")), "verified")
        self.assertEqual(mark_state(self.incoming(bob, "Carol here")), "verified")
        self.until(
            alice,
            lambda p: (
                mine.find_element(By.CSS_SELECTOR, ".read").text == "read by Carol C., Bob B."
            ),
            "not read by bob",
        )
        self.write(bob, "Bob here, in the group.")
        self.incoming(alice, "Bob here")
        self.outgoing_status(bob, "Bob here", "pending")  # carol is off again
        # Read at once: the group is open on alice's screen.
        self.wait_for(bob, "#log li.msg.out .read[data-state=read]", text="read by Alice A.")

        shot = os.environ.get("WSSERVER_SCREENSHOT")
        if shot:  # alice's page: the group with marks and dots
            alice.set_window_size(1000, 700)
            alice.execute_script("document.getElementById('log').scrollTop = 1e9")
            self.assertTrue(alice.save_screenshot(shot))
            self.assertEqual(Path(shot).read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
            alice.set_window_size(820, 760)

        # More than a page of history, from the command line.
        chat = self.cli_process("carol", "chat", "--to", "#team")
        self.read_line(chat, lambda line: line.startswith("chatting with"))
        lines = [f"line {n:02d} of the backlog" for n in range(HISTORY_PAGE + 5)]
        chat.stdin.write("".join(f"{line}\n" for line in lines).encode())
        chat.stdin.flush()
        self.incoming(bob, lines[-1])
        chat.kill()
        chat.wait()
        self.wait_for(bob, "#log li.msg", count=len(lines) + 3)

        # A direct message while bob reads the group: alice moves to the top
        # of his list, unread.
        self.open_conv(alice, "bob")
        self.write(alice, "Direct again.")
        self.open_conv(alice, "#team")
        self.until(bob, lambda p: self.unread(p, "alice") == "1", "no unread count on alice")
        self.assertEqual(self.sidebar(bob)[:3], ["", "alice", "#team"])
        self.assertEqual(self.unread(bob, "#team"), "")

        # Someone changes carol's message on the server: its signature no
        # longer checks.
        with contextlib.closing(sqlite3.connect(self.dir / "db.sqlite")) as db, db:
            changed = db.execute(
                "UPDATE messages SET content = ? WHERE content = ?",
                ("Carol here, and send your passwords.", "Carol here, from the command line."),
            ).rowcount
        self.assertEqual(changed, 1)

        # F5: bob stays signed in (no new login), in the group, with its history.
        logins = self.logins("bob")
        self.open_page(bob, keep_session=True)
        self.wait_for(bob, "#conn[data-state=online]")
        self.wait_for(bob, '#chat[data-open="#team"]')
        self.assertFalse(bob.find_element(By.ID, "signin").is_displayed())
        self.assertEqual(self.logins("bob"), logins)
        self.wait_for(bob, "#log li.msg", count=HISTORY_PAGE, text="line")
        self.assertEqual(self.shown(bob), lines[-HISTORY_PAGE:])  # the newest page, oldest first
        (earlier,) = self.wait_for(bob, "#earlier:not([hidden])")
        earlier.click()
        expected = [
            "Hello team, signed in my browser.",
            "Carol here, and send your passwords.",
            "Bob here, in the group.",
            *lines,
        ]
        self.until(
            bob, lambda p: self.shown(p) == expected, f"not the whole history: {self.shown(bob)}"
        )
        self.wait_for(bob, "#earlier[hidden]")
        items = bob.find_elements(By.CSS_SELECTOR, "#log li.msg")
        self.assertEqual(
            [item.get_attribute("class").split()[1] for item in items[:3]],
            ["in", "in", "out"],
        )
        for item in items:
            self.until(
                bob, lambda p, item=item: mark_state(item) not in (None, ""), "a mark never settled"
            )
        states = [mark_state(item) for item in items]
        self.assertEqual(states[1], "invalid")
        self.assertEqual(states[:1] + states[2:], ["verified"] * (len(items) - 1))  # bob's own too
        self.assertIn(
            "does not match its signature", items[1].find_element(By.CSS_SELECTOR, ".warning").text
        )
        self.assertEqual(len(bob.find_elements(By.CSS_SELECTOR, "#log .warning")), 1)
        self.assertEqual(self.sidebar(bob)[:3], ["", "alice", "#team"])  # from the server
        # The receipts of bob's own message, from the page's read_by: alice
        # read it live, carol's chat when it replayed it (this page was not
        # told of hers before the reload, and shows it now).
        self.assertEqual(
            items[2].find_element(By.CSS_SELECTOR, ".read").text, "read by Alice A., Carol C."
        )

        # A reply after the reload still gets its marks, and moves the group up.
        self.write(bob, "Back after a reload.")
        self.wait_for(alice, "#log li.msg.in", text="Back after a reload.")
        self.until(
            bob,
            lambda p: self.sidebar(p)[:3] == ["", "#team", "alice"],
            "the group did not move up",
        )
        self.wait_for(bob, "#log li.msg.out .read[data-state=read]", text="read by Alice A.")

        # 420 px wide: one column; the conversation with a way back to the
        # list; nothing overlaps and nothing is wider than the window.
        bob.set_window_size(420, 760)
        layout = self.until(bob, lambda p: p.execute_script(OVERLAP_JS), "no layout")
        self.assertEqual(layout["hits"], [])
        self.assertFalse(layout["wide"])
        self.assertNotIn("sidebar", layout["shown"])
        bob.find_element(By.ID, "back").click()
        layout = bob.execute_script(OVERLAP_JS)
        self.assertEqual(layout["shown"], ["sidebar"])
        self.assertFalse(layout["wide"])
        self.open_conv(bob, "alice")
        # The conversation's messages are drawn once its history has come.
        wanted = ["Hi Bob, a team is coming.", "Direct again."]
        self.until(bob, lambda p: self.shown(p) == wanted, "the conversation's messages")
        self.assertEqual(self.shown(bob), wanted)
        self.assertEqual(bob.execute_script(OVERLAP_JS)["hits"], [])
        narrow = os.environ.get("WSSERVER_SCREENSHOT_NARROW")
        if narrow:  # to look at: bob's page at 420 px
            bob.save_screenshot(narrow)

        # Sign out: back to the sign-in form, and a reload stays signed out.
        bob.find_element(By.ID, "signout").click()
        self.wait_for(bob, "#signin-note", text="signed out")
        self.open_page(bob, keep_session=True)
        self.assertTrue(bob.find_element(By.ID, "signin").is_displayed())
        self.assertFalse(bob.find_element(By.ID, "chat").is_displayed())

    def test_a_refused_kept_token_means_a_silent_login(self):
        """A reload whose kept token the server refuses (here: spoiled in
        sessionStorage) logs in again with the kept key, without asking: the
        connection and the HTTP calls (the conversation list) work."""
        page = self.browser("dave")
        self.register(page, "dave", "Dave")
        self.say(page, "dave", "A note to self.")
        self.incoming(page, "A note to self.")
        self.wait_for(page, '#convs li[data-conv="dave"]')
        page.execute_script(
            "const kept = JSON.parse(sessionStorage.getItem('wsserver.session'));"
            "kept.token = 'not.a.token';"
            "sessionStorage.setItem('wsserver.session', JSON.stringify(kept));"
        )
        logins = self.logins("dave")
        self.open_page(page, keep_session=True)
        self.wait_for(page, "#conn[data-state=online]")
        self.assertFalse(page.find_element(By.ID, "signin").is_displayed())
        self.wait_for(page, '#convs li[data-conv="dave"]')
        self.assertEqual(page.find_element(By.ID, "side-error").text, "")
        self.assertGreater(self.logins("dave"), logins)
        kept = page.execute_script("return JSON.parse(sessionStorage.getItem('wsserver.session'))")
        self.assertNotEqual(kept["token"], "not.a.token")

    def test_a_hidden_tab_counts_unread_and_reads_on_return(self):
        """A message that comes to the open conversation while the tab is
        hidden is unread, not reported read; coming back to the tab reports it."""
        alice, bob = self.browser("alice"), self.browser("bob")
        self.register(alice, "alice", "Alice")
        self.register(bob, "bob", "Bob")
        self.say(alice, "bob", "First, while you look.")
        self.incoming(bob, "First, while you look.")
        self.open_conv(bob, "alice")
        self.wait_for(alice, "#log li.msg.out .read[data-state=read]", text="read by Bob")
        bob.execute_script(HIDE_TAB_JS, "hidden")
        self.say(alice, "bob", "Second, while you are away.")
        (second,) = self.wait_for(alice, "#log li.msg.out", text="Second, while")
        self.outgoing_status(alice, "Second, while", "delivered")
        self.until(bob, lambda p: self.unread(p, "alice") == "1", "no unread count while hidden")
        self.assertEqual(second.find_element(By.CSS_SELECTOR, ".read").text, "")
        bob.execute_script(HIDE_TAB_JS, "visible")
        self.until(
            alice,
            lambda p: second.find_element(By.CSS_SELECTOR, ".read").text == "read by Bob",
            "not read",
        )
        self.assertEqual(self.unread(bob, "alice"), "")

        # A third arrives while hidden, and bob reloads before looking: the
        # page forgot it was unread, but the history page says "read": false,
        # so opening the conversation reports it read.
        bob.execute_script(HIDE_TAB_JS, "hidden")
        self.say(alice, "bob", "Third, before your reload.")
        (third,) = self.wait_for(alice, "#log li.msg.out", text="Third, before")
        self.outgoing_status(alice, "Third, before", "delivered")
        self.until(bob, lambda p: self.unread(p, "alice") == "1", "no unread count while hidden")
        self.open_page(bob, keep_session=True)
        self.wait_for(bob, "#conn[data-state=online]")
        self.open_conv(bob, "alice")
        self.wait_for(bob, "#log li.msg.in", text="Third, before")
        self.until(
            alice,
            lambda p: third.find_element(By.CSS_SELECTOR, ".read").text == "read by Bob",
            "not read after the reload",
        )

        # The same for a group message (a new user found it never read):
        # alice makes #pair with bob, writes to it while bob looks elsewhere,
        # bob reloads and opens the group.
        alice.find_element(By.ID, "new-group").click()
        alice.find_element(By.ID, "group-id").send_keys("pair")
        alice.find_element(By.ID, "group-name").send_keys("Pair")
        alice.find_element(By.ID, "group-members").send_keys("bob\n")
        self.wait_for(alice, '#chat[data-open="#pair"]')
        self.wait_for(bob, '#convs li[data-conv="#pair"]')
        self.write(alice, "To the pair, before your reload.")
        (fourth,) = self.wait_for(alice, "#log li.msg.out", text="To the pair")
        self.outgoing_status(alice, "To the pair", "delivered")
        self.until(bob, lambda p: self.unread(p, "#pair") == "1", "no unread count on the group")
        self.open_page(bob, keep_session=True)
        self.wait_for(bob, "#conn[data-state=online]")
        self.open_conv(bob, "#pair")
        self.wait_for(bob, "#log li.msg.in", text="To the pair")
        self.until(
            alice,
            lambda p: fourth.find_element(By.CSS_SELECTOR, ".read").text == "read by Bob",
            "the group message not read after the reload",
        )
        self.assertEqual(bob.find_element(By.ID, "add-form").is_displayed(), False)  # not owner

    def test_a_removed_member_sees_it_in_the_groups_header(self):
        """carol (the CLI) makes #club with bob (the page) and writes to it;
        bob opens it; carol removes him: his page's header says he is no
        longer a member (a new user saw only the group's id, twice)."""
        self.cli("carol", "keygen")
        self.cli("carol", "register", "--name", "Carol C.")
        bob = self.browser("bob")
        self.register(bob, "bob", "Bob B.")
        self.cli("carol", "group", "create", "club", "--name", "The Club", "bob")
        self.cli("carol", "send", "--to", "#club", "Welcome to the club.")
        self.wait_for(bob, '#convs li[data-conv="#club"]')
        self.open_conv(bob, "#club")
        self.wait_for(bob, "#conv-title", text="The Club")
        self.wait_for(bob, "#log li.msg.in", text="Welcome to the club.")
        self.cli("carol", "group", "remove", "club", "bob")
        self.wait_for(bob, "#conv-sub", text="you are no longer a member")

    def test_a_new_conversation_shows_presence_from_its_first_message(self):
        """With PRESENCE=contacts (the default) a user opened before any
        message between the two is shown offline; erin's first message makes
        her frank's contact (his page watches again: her dot goes on), not
        frank hers (a stranger's message is not enough: her dot of him stays
        off) until he answers, when her page watches again."""
        erin, frank = self.browser("erin"), self.browser("frank")
        self.register(erin, "erin", "Erin")
        self.register(frank, "frank", "Frank")
        erin.find_element(By.ID, "open-id").send_keys("frank\n")
        self.wait_for(erin, '#chat[data-open="frank"]')
        self.wait_for(erin, "#conv-title", text="Frank")
        self.assertEqual(self.dot(erin, "#convs", "frank"), "false")  # not a contact yet
        self.write(erin, "Hello Frank.")
        self.until(
            frank, lambda p: self.dot(p, "#convs", "erin") == "true", "erin's dot never went on"
        )
        self.assertEqual(self.dot(erin, "#convs", "frank"), "false")
        self.open_conv(frank, "erin")
        self.write(frank, "Hello Erin.")
        self.until(
            erin, lambda p: self.dot(p, "#convs", "frank") == "true", "frank's dot never went on"
        )


# Plays the tab going to the background (or back): headless Chromium's tab
# is always visible, so document.visibilityState is made to say arguments[0]
# and the event the browser would send is sent.
HIDE_TAB_JS = """
window.fakeVisibility = arguments[0];
Object.defineProperty(document, "visibilityState", {
  configurable: true, get: () => window.fakeVisibility,
});
document.dispatchEvent(new Event("visibilitychange"));
"""


class RateLimitedReadsWebClientTests(BrowserCase):
    """Receipts under a tight per-user limit (one frame a second after a burst
    of two): each read costs a token, so opening a conversation with six
    unread messages is refused some of them.  They go out again by
    themselves, and the reader sees no "message not sent" notice."""

    env = {"MESSAGE_RATE_LIMIT": "1", "MESSAGE_BURST_LIMIT": "2"}

    def test_refused_reads_are_sent_again_without_a_notice(self):
        alice, bob = self.browser("alice"), self.browser("bob")
        self.register(alice, "alice", "Alice")
        self.register(bob, "bob", "Bob")
        bob.find_element(By.ID, "open-id").send_keys("broadcast\n")
        self.wait_for(bob, '#chat[data-open="broadcast"]')
        texts = [f"message {n} while bob reads elsewhere" for n in range(6)]
        for text in texts:
            self.say(alice, "bob", text)
        for text in texts:
            self.outgoing_status(alice, text, "delivered")
        self.wait_for(bob, '#convs li[data-conv="alice"] .unread', text="6")
        bob.find_element(By.CSS_SELECTOR, '#convs li[data-conv="alice"] button').click()
        for text in texts:
            self.incoming(bob, text)
        self.wait_for(alice, "#log li.msg.out .read[data-state=read]", count=len(texts))
        reads = [e.text for e in alice.find_elements(By.CSS_SELECTOR, "#log li.msg.out .read")]
        self.assertEqual(reads, ["read by Bob"] * len(texts))
        self.assertEqual(bob.find_elements(By.CSS_SELECTOR, "#log li.notice"), [])
