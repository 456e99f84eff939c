"""What both SQL engines share about rows: the message columns in the order
``message_from_row`` reads them, and the bounded cache of known user ids."""

from __future__ import annotations

from typing import Any

from ..messages import Message

# The columns every message query selects, in ``message_from_row``'s order.
MESSAGE_COLUMNS = (
    "id, sender, recipient, content, signature, nonce, verification, status, created_ms, recipients"
)

KNOWN_USERS_MAX = 100_000


def message_from_row(row: tuple[Any, ...]) -> Message:
    """A ``Message`` from a row of ``MESSAGE_COLUMNS`` (a BLOB/bytea signature
    may come back as a memoryview)."""
    sig = row[4]
    return Message(
        row[0],
        row[1],
        row[2],
        row[3],
        bytes(sig) if sig is not None else None,
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
    )


def remember_user(known_users: set[str], user_id: str) -> None:
    """Note that ``user_id`` exists.  Users are never removed, so a user seen
    once exists for good; the set is only a cache of that, bounded."""
    if len(known_users) >= KNOWN_USERS_MAX:
        known_users.clear()
    known_users.add(user_id)


__all__ = ["KNOWN_USERS_MAX", "MESSAGE_COLUMNS", "message_from_row", "remember_user"]
