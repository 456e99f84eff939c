"""Read receipts and presence contacts, shared by both engines (protocol section 13).

``Reads`` is mixed into each engine's store.  The engine provides ``_run``
(a function run in one transaction on the pool's thread) and ``_PARAM``,
its placeholder (``?`` or ``%s``); the SQL is the same on both.

``record_read`` decides in one transaction whether the reader received the
message (the rules: docs/protocol.md section 15, "Read receipts") and
inserts the ``message_reads`` row; the primary key (message_id, user_id)
decides which of two racing reads (two nodes, two devices) is the first:
``ON CONFLICT DO NOTHING`` makes the other a no-op, so the sender hears of
it once.

``contacts_among`` answers who a watcher may watch under
``PRESENCE=contacts``: who wrote the watcher a direct message
(``conversations.wrote`` on the candidate's row) or shares a current group
with them (docs/protocol.md section 15, "Presence").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from ..messages import BROADCAST, is_group_id

# Outcomes of record_read (the second item: the sender for READ, else None).
READ = "read"  # recorded now: tell the sender
ALREADY_READ = "already_read"  # recorded before: tell nobody
NOT_RECEIVED = "not_received"  # no such message, the reader's own, or not received

_MESSAGE = "SELECT sender, recipient, status FROM messages WHERE id = ?"
# The reader received a group message: it is in their window and their
# delivery cursor passed it (a connection of theirs was handed it).
_IN_WINDOW = (
    "SELECT 1 FROM group_members WHERE group_id = ? AND user_id = ?"
    " AND joined_id < ? AND (removed_id IS NULL OR ? <= removed_id) AND ? <= delivered_id"
)
_INSERT = (
    "INSERT INTO message_reads (message_id, user_id, read_ms) VALUES (?, ?, ?)"
    " ON CONFLICT (message_id, user_id) DO NOTHING"
)
# The candidates who wrote ``user`` a direct message (primary-key probes).
_WROTE_TO = "SELECT user_id FROM conversations WHERE peer = ? AND wrote AND user_id IN ({})"
_SHARE_GROUP = (
    "SELECT DISTINCT theirs.user_id FROM group_members mine"
    " JOIN group_members theirs ON theirs.group_id = mine.group_id"
    " WHERE mine.user_id = ? AND mine.removed_id IS NULL"
    " AND theirs.removed_id IS NULL AND theirs.user_id IN ({})"
)


def received(reader: str, sender: str, recipient: str, status: str, in_window: bool) -> bool:
    """Whether ``reader`` received a message (``in_window``: for a group
    message, the message is inside the reader's window in ``group_members``
    and at or below their delivered cursor there)."""
    if sender == reader:
        return False  # the reader's own message, a note to self included
    if recipient == reader:
        return status == "delivered"
    if recipient == BROADCAST:
        return True
    if is_group_id(recipient):
        return in_window
    return False


def _record_read(txn: Any, param: str, reader: str, msg_id: int, now_ms: int) -> tuple[str, Any]:
    def sql(text: str) -> str:
        return text.replace("?", param)

    txn.execute(sql(_MESSAGE), (msg_id,))
    row = txn.fetchone()
    if row is None:
        return NOT_RECEIVED, None
    sender, recipient, status = row
    in_window = False
    if is_group_id(recipient) and sender != reader:
        txn.execute(sql(_IN_WINDOW), (recipient, reader, msg_id, msg_id, msg_id))
        in_window = txn.fetchone() is not None
    if not received(reader, sender, recipient, status, in_window):
        return NOT_RECEIVED, None
    txn.execute(sql(_INSERT), (msg_id, reader, now_ms))
    if txn.rowcount == 1:
        return READ, sender
    return ALREADY_READ, None


def _contacts_among(txn: Any, param: str, user: str, candidates: list[str]) -> set[str]:
    found: set[str] = set()
    marks = ", ".join([param] * len(candidates))
    for query in (_WROTE_TO, _SHARE_GROUP):
        txn.execute(query.replace("?", param).format(marks), (user, *candidates))
        found.update(row[0] for row in txn.fetchall())
    return found


class Reads:
    """``record_read`` and ``contacts_among`` (see the module's docstring)."""

    _PARAM = "?"
    _run: Callable[..., defer.Deferred]

    def record_read(self, reader: str, msg_id: int, now_ms: int) -> defer.Deferred:
        """Check that ``reader`` received ``msg_id`` and record the read, in
        one transaction; fire with (READ, sender), (ALREADY_READ, None) or
        (NOT_RECEIVED, None)."""
        return self._run(_record_read, self._PARAM, reader, msg_id, now_ms)

    def contacts_among(self, user: str, candidates: list[str]) -> defer.Deferred:
        """Fire with the set of ``candidates`` (at most 256) that ``user``
        may watch: each sent ``user`` a direct message, or shares a current
        group with ``user`` (docs/protocol.md section 15, "Presence")."""
        if not candidates:
            return defer.succeed(set())
        return self._run(_contacts_among, self._PARAM, user, list(candidates))
