"""History and the conversation list (protocol section 13), shared by both
engines.

A direct message or a note to self carries its conversation in
``messages.conv`` (``wsserver.messages.conversation_of``); its page is one
backward range of ``messages_conv (conv, id)``.  Broadcasts and group
messages have no ``conv``: their pages are ranges of ``messages_recipient
(recipient, id)``, a group's bounded by the caller's window in
``group_members`` (``joined_id < id``, and ``id <= removed_id`` once
removed).  ``conversations`` holds a row per user and direct peer, with
``wrote`` set once that user sent the peer a message, written only when a
sender and recipient are new: the engines remember the directed pairs they
wrote (``KnownConversations``), so the usual message writes nothing more.

``History`` is mixed into each engine's store.  The engine provides
``_run(interaction, *args)`` and ``_mark`` (its parameter marker, ``?`` or
``%s``) and ``_conv_of_row`` (the SQL of a ``conversations`` row's conv:
PostgreSQL compares with the "C" collation); the queries are written here
once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from ..messages import BROADCAST, conversation_of
from .rows import KNOWN_USERS_MAX, MESSAGE_COLUMNS, message_from_row

ID_MAX = 2**63 - 1  # larger than any message id (a BIGINT / SQLite INTEGER)


class PageReads(NamedTuple):
    """The read receipts a history page carries (protocol.md section 15)."""

    readers: dict[int, list[str]]  # the caller's own messages: who read each
    read: set[int]  # the others' messages the caller read


def conv_of(sender: str, recipient: str) -> str | None:
    """The ``conv`` a message is stored with: None for broadcasts and
    group messages (a recipient the server already checked, so a leading
    ``#`` is enough to tell a group)."""
    if recipient == BROADCAST or recipient.startswith("#"):
        return None
    return conversation_of(sender, recipient)


def wrote_key(sender: str, recipient: str) -> str:
    """The key a store remembers once ``sender``'s direct message to
    ``recipient`` has its ``conversations`` rows: both directions stored,
    and ``sender``'s marked ``wrote`` (user ids hold no space)."""
    return f"{sender} {recipient}"


def conversation_rows(sender: str, recipient: str) -> list[tuple[str, str, bool]]:
    """The ``conversations`` rows (user_id, peer, wrote) a direct message
    from ``sender`` to ``recipient`` needs: the sender's, which says it
    wrote, and the recipient's, which says nothing of the kind (an
    existing row keeps its ``wrote``); one row for a note to self."""
    if sender == recipient:
        return [(sender, sender, True)]
    return [(sender, recipient, True), (recipient, sender, False)]


class KnownConversations:
    """The ``wrote_key``s whose ``conversations`` rows are known to be
    stored: a bounded cache (cleared when full, as the cache of known
    users).  An engine adds a key only once the transaction that wrote its
    rows has committed, so a rolled-back batch never leaves a pair without
    rows."""

    def __init__(self, limit: int = KNOWN_USERS_MAX) -> None:
        self._known: set[str] = set()
        self._limit = limit

    def __contains__(self, conv: object) -> bool:
        return conv in self._known

    def add_all(self, keys: Iterable[str]) -> None:
        for key in keys:
            if len(self._known) >= self._limit:
                self._known.clear()
            self._known.add(key)

    def remember_after(self, results: Any, keys: Iterable[str]) -> Any:
        """A callback for the batch's Deferred: remember ``keys`` (the batch
        committed) and pass its results on."""
        self.add_all(keys)
        return results


class History:
    """``history`` and ``conversations`` of IStore (see the module's docstring)."""

    _mark = "?"
    _conv_of_row = (
        "CASE WHEN c.user_id <= c.peer"
        " THEN c.user_id || ' ' || c.peer ELSE c.peer || ' ' || c.user_id END"
    )

    # A page is one backward range of (column, id): messages_conv for direct
    # messages and notes to self, messages_recipient for broadcasts and
    # groups.  The key's condition and the order, by column (PostgreSQL
    # spells them otherwise).
    _key_range = "{0} = ?"
    _key_order = "id DESC"

    def _run(self, interaction: Any, *args: Any) -> Any:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text if self._mark == "?" else text.replace("?", self._mark)

    def history(self, user_id: str, peer: str, before: int | None, limit: int) -> Any:
        """See ``IStore.history``."""
        upper = ID_MAX if before is None else before
        return self._run(self._history, user_id, peer, upper, limit)

    def _history(self, txn: Any, user_id: str, peer: str, before: int, limit: int) -> Any:
        lower = 0
        if peer == BROADCAST:
            column, key, upper = "recipient", BROADCAST, before
        elif peer.startswith("#"):
            txn.execute(
                self._sql(
                    "SELECT joined_id, removed_id FROM group_members"
                    " WHERE group_id = ? AND user_id = ?"
                ),
                (peer, user_id),
            )
            row = txn.fetchone()
            if row is None:
                return None
            lower, removed = row
            upper = before if removed is None else min(before, removed + 1)
            column, key = "recipient", peer
        else:
            if peer != user_id:
                txn.execute(self._sql("SELECT 1 FROM users WHERE user_id = ?"), (peer,))
                if txn.fetchone() is None:
                    return None
            column, key, upper = "conv", conversation_of(user_id, peer), before
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM messages"  # noqa: S608
            f" WHERE {self._key_range.format(column)} AND id < ? AND id > ?"
            f" ORDER BY {self._key_order.format(column)} LIMIT ?"
        )
        keys = [key] * self._key_range.count("?")
        txn.execute(self._sql(sql), (*keys, upper, lower, limit + 1))
        rows = txn.fetchall()
        messages = [message_from_row(row) for row in rows[:limit]]
        return messages, len(rows) > limit, self._page_reads(txn, user_id, messages)

    def _page_reads(self, txn: Any, user_id: str, messages: list[Any]) -> PageReads:
        """The reads a page shows: who read the caller's own direct and group
        messages, and which of the others' messages the caller read.  Two
        lookups of ``message_reads``' key, bounded by the page."""
        own = [m.id for m in messages if m.sender == user_id and m.recipient != BROADCAST]
        others = [m.id for m in messages if m.sender != user_id]
        readers: dict[int, list[str]] = {}
        if own:
            marks = ",".join("?" * len(own))
            txn.execute(
                self._sql(
                    "SELECT message_id, user_id FROM message_reads"  # noqa: S608
                    f" WHERE message_id IN ({marks}) ORDER BY message_id, read_ms, user_id"
                ),
                own,
            )
            for msg_id, reader in txn.fetchall():
                readers.setdefault(msg_id, []).append(reader)
        read: set[int] = set()
        if others:
            marks = ",".join("?" * len(others))
            txn.execute(
                self._sql(
                    "SELECT message_id FROM message_reads"  # noqa: S608
                    f" WHERE user_id = ? AND message_id IN ({marks})"
                ),
                (user_id, *others),
            )
            read = {row[0] for row in txn.fetchall()}
        return PageReads(readers, read)

    def conversations(self, user_id: str, limit: int) -> Any:
        """See ``IStore.conversations``."""
        return self._run(self._conversations, user_id, limit)

    def _conversations(self, txn: Any, user_id: str, limit: int) -> list[tuple[str, int, int]]:
        keys = [BROADCAST] * self._key_range.count("?")
        txn.execute(self._sql(self._conversations_sql()), (user_id, user_id, *keys, limit))
        return [(peer, last_id, created_ms) for peer, last_id, created_ms in txn.fetchall()]

    def _conversations_sql(self) -> str:
        # Each entry's newest id is one backward probe of an index (direct:
        # messages_conv; groups and broadcast: messages_recipient; spelt as
        # the pages are, so no planner walks the primary key instead),
        # computed once per entry (MATERIALIZED: inlined, the
        # planner evaluates the probe twice); only the `limit` newest
        # entries then read their message's timestamp.
        return (
            "WITH t AS MATERIALIZED ("  # noqa: S608
            " SELECT c.peer AS peer, (SELECT x.id FROM messages x"
            f"  WHERE x.conv = {self._conv_of_row}"
            "  ORDER BY x.conv DESC, x.id DESC LIMIT 1) AS last_id"
            " FROM conversations c WHERE c.user_id = ?"
            " UNION ALL"
            " SELECT g.group_id, (SELECT x.id FROM messages x"
            "  WHERE x.recipient = g.group_id AND x.id > g.joined_id"
            f"  AND x.id <= COALESCE(g.removed_id, {ID_MAX})"
            "  ORDER BY x.recipient DESC, x.id DESC LIMIT 1)"
            " FROM group_members g WHERE g.user_id = ?"
            " UNION ALL"
            " SELECT 'broadcast', (SELECT x.id FROM messages x"
            f"  WHERE {self._key_range.format('x.recipient')}"
            f"  ORDER BY {self._key_order.format('x.recipient')} LIMIT 1)"
            ")"
            " SELECT s.peer, s.last_id, m.created_ms FROM ("
            "  SELECT peer, last_id FROM t WHERE last_id IS NOT NULL"
            "  ORDER BY last_id DESC LIMIT ?"
            " ) s JOIN messages m ON m.id = s.last_id ORDER BY s.last_id DESC"
        )
