"""What both SQL engines share about rows: the message columns in the order
``message_from_row`` reads them, the key-log columns in the order
``entry_from_row`` reads them, active keys as ``KeyRecord``, the bounded
cache of known user ids, and the key log's cap (``refuse_when_full``)."""

from __future__ import annotations

from typing import Any

from ..keylog import ADD, REGISTER, REVOKE, Entry, KeyLogError, key_id
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


def refuse_when_full(entries: list[Entry], entry: Entry, max_entries: int) -> None:
    """Refuse ``entry`` (``KeyLogError('too_many_keys')``) when the log
    ``entries`` has no room for it under ``max_entries`` (keylog.MAX_LOG_ENTRIES).

    An ``add`` needs room for itself and for revoking afterwards every active
    key but one, so the log never grows past ``max_entries`` and a
    ``revoke`` (of a lost or stolen device) is never refused for want of
    room.  The active keys are counted from the log (each revoke the store
    wrote removed exactly one)."""
    added = sum(1 for e in entries if e.action in (REGISTER, ADD))
    active = added - sum(1 for e in entries if e.action == REVOKE)
    needed = len(entries) + 1 + (active if entry.action == ADD else 0)
    if needed > max_entries:
        raise KeyLogError(
            "too_many_keys",
            f"the key log is full: it holds at most {max_entries} entries, with room"
            " kept to revoke every active key but one; no key can be added to this"
            " account (delete it and register a new one to start a new log)",
        )


__all__ = [
    "KEYLOG_COLUMNS",
    "KNOWN_USERS_MAX",
    "MESSAGE_COLUMNS",
    "entry_from_row",
    "entry_row",
    "key_from_row",
    "message_from_row",
    "refuse_when_full",
    "remember_user",
]
