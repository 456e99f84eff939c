"""What both SQL engines share about rows: the message columns in the order
``message_from_row`` reads them, the key-log columns in the order
``entry_from_row`` reads them, active keys as ``KeyRecord``, and the bounded
cache of known user ids."""

from __future__ import annotations

from typing import Any

from ..keylog import Entry, key_id
from ..messages import Message
from . import KeyRecord

# The columns every message query selects, in ``message_from_row``'s order.
MESSAGE_COLUMNS = (
    "id, sender, recipient, content, signature, nonce, verification, status, created_ms,"
    " recipients, key_id"
)

# The columns of a key-log entry (table key_log), in ``entry_from_row``'s order.
KEYLOG_COLUMNS = "seq, action, public_key, name, by_key, signature, key_signature, at_ms"

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
        row[10],
    )


def _raw(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def entry_from_row(row: tuple[Any, ...]) -> Entry:
    """A ``keylog.Entry`` from a row of ``KEYLOG_COLUMNS``."""
    return Entry(row[0], row[1], bytes(row[2]), row[3], row[4], _raw(row[5]), _raw(row[6]), row[7])


def entry_row(user_id: str, entry: Entry) -> tuple[Any, ...]:
    """The values of an INSERT into key_log of (user_id, ``KEYLOG_COLUMNS``)."""
    return (
        user_id,
        entry.seq,
        entry.action,
        entry.public_key,
        entry.name,
        entry.by,
        entry.signature,
        entry.key_signature,
        entry.at_ms,
    )


def key_from_row(row: tuple[Any, ...]) -> KeyRecord:
    """A ``KeyRecord`` from a row of user_keys' (public_key, name, added_ms),
    its key_id computed."""
    public_key = bytes(row[0])
    return KeyRecord(key_id(public_key), public_key, row[1], row[2])


def remember_user(known_users: set[str], user_id: str) -> None:
    """Note that ``user_id`` exists.  The set is only a cache, bounded; a
    deleted user leaves it (``forget_user``) when the deletion is known."""
    if len(known_users) >= KNOWN_USERS_MAX:
        known_users.clear()
    known_users.add(user_id)


__all__ = [
    "KEYLOG_COLUMNS",
    "KNOWN_USERS_MAX",
    "MESSAGE_COLUMNS",
    "entry_from_row",
    "entry_row",
    "key_from_row",
    "message_from_row",
    "remember_user",
]
