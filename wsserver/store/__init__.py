"""Persistence: ``IStore``, its records, and the choice of engine.

Everything the rest of the server needs from the database goes through
``IStore``; the SQL of each engine lives in its own module (``sqlite.py``,
``postgres.py``) with its own versioned schema files (``schema/<engine>/``),
and the group-commit queue that both share is ``batching.py``.  No other
module of wsserver speaks SQL.

``DATABASE`` chooses the engine: a ``postgresql://`` or ``postgres://`` URL
is PostgreSQL, anything else a SQLite file.  ``prepare_database`` runs once,
synchronously, before the reactor starts (schema, JWT secret); ``open_store``
builds the store the running server uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface

MAX_LIVE_CHALLENGES = 5

# Outcomes of add_message.
STORED = "stored"
DUPLICATE = "duplicate"
NO_RECIPIENT = "unknown_recipient"
NOT_A_MEMBER = "not_a_member"  # to a group the sender is not a member of (or no such group)

# Outcomes of consume_challenge.
CHALLENGE_OK = "ok"
CHALLENGE_NONE = "no_challenge"
CHALLENGE_BAD = "invalid_signature"

_POSTGRES_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)


class DatabaseError(Exception):
    """The database cannot be opened or prepared; the message says why."""


class StoreClosed(Exception):
    """The store is shutting down and accepts no more writes."""


@dataclass(frozen=True, slots=True)
class User:
    """A registered user."""

    user_id: str
    username: str
    public_key: bytes
    created_ms: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An active key of a user (protocol section 12)."""

    key_id: str
    public_key: bytes
    name: str | None
    added_ms: int


@dataclass(frozen=True, slots=True)
class UserKeys:
    """What a token check needs to know of a user: the active keys, oldest
    first, and the token generation (``POST /auth/logout?all=true`` raises it;
    tokens of an older generation are refused)."""

    keys: tuple[KeyRecord, ...]
    token_gen: int


# Kinds of account events (table account_events; wsserver/events.py).
EVENT_DELETED = "deleted"  # detail: the stream head when the user was deleted
EVENT_KEY_REVOKED = "key_revoked"  # detail: the revoked key_id
EVENT_SIGNED_OUT = "signed_out"  # detail: the revoked token's jti
EVENT_SIGNED_OUT_ALL = "signed_out_all"  # detail: the new token generation


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What the server has accepted and wants stored."""

    sender: str
    recipient: str
    content: str
    signature: bytes | None
    nonce: str | None
    verification: str
    created_ms: int
    key_id: str | None = None  # the key that signed it (None when unsigned)


class IStore(Interface):
    """Everything the server needs from persistence; every call returns a Deferred
    (or nothing, for the delivery marks, which ride along with the next batch)."""

    batches = Attribute("commits made by group commit so far, for tests and stats")

    def add_user(user: User) -> Any:  # noqa: N805 (zope.interface style)
        """Insert a user and entry 0 of their key log (``register``, the user's
        key, ``at_ms`` = ``created_ms``) in one transaction; fires True, or False
        when the user_id is taken (or was deleted: tombstones stay)."""

    def user_keys(user_id: str) -> Any:  # noqa: N805
        """Fire with the user's ``UserKeys``, or None when no such user."""

    def key_log(user_id: str) -> Any:  # noqa: N805
        """Fire with the user's key log as ``keylog.Entry`` items (``at_ms`` set),
        oldest first, or None when no such user."""

    def append_key_entry(user_id: str, entry: Any, check: Callable[[list[Any]], None]) -> Any:  # noqa: N805
        """Append ``entry`` (a ``keylog.Entry``) to the user's key log, in one
        transaction that holds the user's log against concurrent appends (on
        every node): read the log, call ``check(entries)`` in the database
        thread (it raises ``keylog.KeyLogError`` to refuse; nothing is then
        written), insert the entry (a concurrent append of the same ``seq``
        fails ``KeyLogError('keylog_conflict')``), update the active keys, and
        for a ``revoke`` record an ``EVENT_KEY_REVOKED`` account event (created
        at the store's clock now).  Fires with the stored entry (``at_ms``: the
        entry's own when not 0, else the store's clock now), or None when no
        such user (``check`` is then not called).  Whatever ``check`` lets
        through, the store itself refuses (nothing written): a ``seq`` that is
        not the next one ``keylog_conflict``, an added key already active
        ``key_exists``, a revoked key not active ``invalid_request``, and an
        entry the log has no room for ``too_many_keys`` (at most
        ``keylog.MAX_LOG_ENTRIES`` entries, room kept to revoke every active
        key but one: an ``add`` is refused once the log holds
        ``MAX_LOG_ENTRIES`` minus the active keys, a ``revoke`` never for
        want of room; checked before ``check`` is called).  After a
        ``revoke``, ``get_user``'s ``public_key`` is the first key still
        active."""

    def delete_account(user_id: str, now_ms: int, check: Callable[[list[Any]], None]) -> Any:  # noqa: N805
        """Delete a user as protocol section 12 says: in one transaction read
        the key log and call ``check(entries)`` (it raises to refuse: nothing
        changes), then remove the user, keys, key log, challenges and revoked
        tokens, leave every group (``removed`` events; an owned group passes to
        the member added first among those left), keep the id as a tombstone
        and record an ``EVENT_DELETED`` event; then delete the user's messages,
        a page per short transaction, and mark the tombstone purged.  Fires True
        once the account is gone
        (if the message phase fails part-way, that is logged and
        ``finish_deletions`` removes the rest), or None when no such user (or
        one deleted before; ``check`` is then not called)."""

    def finish_deletions() -> Any:
        """Remove the messages of every deleted user whose deletion's message
        phase did not finish (a page that failed, a process stopped half-way,
        ``wsserver-admin delete-user`` interrupted) and mark them purged; fire
        with how many were finished.  ``start`` runs it at once and every
        ``PURGE_INTERVAL`` (30) seconds, on every node."""

    def revoke_token(user_id: str, jti: str, expires_ms: int, now_ms: int) -> Any:  # noqa: N805
        """Remember a signed-out token until it expires and record an
        ``EVENT_SIGNED_OUT`` event (idempotent: a repeat records nothing);
        fire True, or False when no such user (deleted, or never registered:
        nothing is stored and no event recorded; on PostgreSQL a deletion
        racing it either waits for it and removes the row, or goes first and
        this fires False)."""

    def revoke_tokens(user_id: str, now_ms: int) -> Any:  # noqa: N805
        """Raise the user's token generation (every token issued so far is
        refused) and record an ``EVENT_SIGNED_OUT_ALL`` event; fire with the new
        generation, or None when no such user."""

    def revoked_tokens(now_ms: int) -> Any:  # noqa: N805
        """Fire with the set of jtis signed out and not yet expired (a node
        loads it when it starts; account events keep it current)."""

    def get_user(user_id: str) -> Any:  # noqa: N805
        """Fire with the ``User`` or None (``public_key``: the registration key
        until it is revoked, then the first key still active)."""

    def add_challenge(user_id: str, challenge: str, now_ms: int, expires_ms: int) -> Any:  # noqa: N805
        """Keep a new challenge; forget expired ones and all but the newest
        ``MAX_LIVE_CHALLENGES`` of the user."""

    def consume_challenge(
        user_id: str,  # noqa: N805
        challenge: str | None,
        now_ms: int,
        check: Callable[[str], bool],
    ) -> Any:
        """Try ``check`` on the user's live challenges, newest first, deleting each
        one tried; fire ``CHALLENGE_OK``, ``CHALLENGE_BAD`` or ``CHALLENGE_NONE``.
        A challenge another node consumed first is not counted as tried."""

    def add_message(new: NewMessage) -> Any:  # noqa: N805
        """Store a message by group commit; fires with ``(outcome, Message | None)``
        after the commit: ``STORED``, ``DUPLICATE`` (the message already holding the
        sender's nonce), ``NO_RECIPIENT`` or, for a group id, ``NOT_A_MEMBER``
        (no such group, or the sender is not a member now: the check and the
        insert are one transaction, ordered with membership changes).  A stored
        group message carries ``group_members``: the members at its commit.
        Fails when the database refused the batch, and with ``StoreClosed`` after ``close``."""

    def mark_delivered(ids: list[int]) -> None:  # noqa: N805
        """Record that these pending messages were handed to a connection."""

    def mark_broadcast(msg_id: int, recipients: int) -> None:  # noqa: N805
        """Record that a broadcast went out to ``recipients`` connections."""

    def mark_group_delivered(marks: list[tuple[str, str, int]]) -> None:  # noqa: N805
        """Move group members' delivery cursors, ``(group_id, user_id, msg_id)``
        each: batched with the next commit, never backwards, never for a
        member no longer in the group."""

    def group_status(msg_id: int, group_id: str, sender: str) -> Any:  # noqa: N805
        """Fire with ``(recipients, waiting)`` of a group message: the members
        (the sender not counted) whose window holds it and whose cursor passed
        it, and the members still in the group it is pending for."""

    def create_group(group_id: str, name: str, owner: str, members: Any, now_ms: int) -> Any:  # noqa: N805
        """Create a group (the owner a member; ``members`` checked by the caller:
        distinct, valid ids, the owner not among them, at most 255) and record
        its ``added`` account event; fire ``(Group, detail)``; fail
        ``GroupError`` ``group_exists`` (ids stay taken for good),
        ``unknown_user`` naming the first unregistered id, or
        ``too_many_groups`` naming the first user in 100 groups already."""

    def get_group(group_id: str) -> Any:  # noqa: N805
        """Fire with the ``Group`` (current members, owner first) or None."""

    def user_groups(user_id: str) -> Any:  # noqa: N805
        """Fire with the ``Group`` of each group the user is in now (at most
        100), by id; two queries, whatever the number of groups."""

    def add_group_member(group_id: str, by: str, user_id: str, now_ms: int) -> Any:  # noqa: N805
        """The owner ``by`` adds ``user_id`` (a new window from the stream head;
        a former member's old window is replaced) and records the ``added``
        event; fire ``(Group, detail)``; fail ``GroupError`` ``unknown_group``
        (also when ``by`` is no member), ``not_owner``, ``unknown_user``,
        ``already_member``, ``group_full`` or ``too_many_groups``."""

    def remove_group_member(group_id: str, by: str, user_id: str, now_ms: int) -> Any:  # noqa: N805
        """The owner ``by``, or ``user_id`` themself, removes ``user_id`` (their
        window ends at the stream head; an owner leaving hands the group to the
        member added first among those left) and records the ``removed``
        event, naming the group messages it settled (only ``user_id`` waited
        for them); fire ``(Group, detail)``; fail ``GroupError``
        ``unknown_group``, ``not_owner`` or ``not_a_member``."""

    def record_read(reader: str, msg_id: int, now_ms: int) -> Any:  # noqa: N805
        """Check that ``reader`` received ``msg_id`` and record the read in one
        transaction; fire with (outcome, sender) (``reads.py``)."""

    def contacts_among(user: str, candidates: list[str]) -> Any:  # noqa: N805
        """Fire with the ``candidates`` sharing a direct conversation or a
        current group with ``user`` (``PRESENCE=contacts``)."""

    def drain() -> Any:
        """Fire once every write queued so far has been committed (or failed)."""

    def replay_page(user_id: str, since: int | None, after: int, limit: int) -> Any:  # noqa: N805
        """Up to ``limit`` messages for ``user_id`` with id > ``after``, by id: the
        user's pending direct messages and the messages of their groups above
        their cursor (not their own), and with ``since`` also every direct
        message to the user, every broadcast and every message of their groups
        (their own included, inside their window) above ``since`` (protocol
        section 6).  A member removed from a group is replayed nothing of it."""

    def get_message(msg_id: int) -> Any:  # noqa: N805
        """Fire with the stored ``Message`` or None."""

    def messages_between(after: int, upto: int, limit: int) -> Any:  # noqa: N805
        """Up to ``limit`` stored messages (any recipient) with ``after < id <= upto``,
        by id: what a cluster node reads back when it missed part of the stream.
        Group messages carry ``group_members`` (the members whose window holds
        them)."""

    def stream_head() -> Any:
        """Fire with the largest message id committed so far (0 when none): a
        node polls it to notice messages whose publication it missed."""

    def count_messages() -> Any:
        """Fire with the number of stored messages."""

    def expire_batch(status: str, before_ms: int, from_ms: int, limit: int) -> Any:  # noqa: N805
        """Delete up to ``limit`` messages of ``status`` with ``from_ms <=
        created_ms < before_ms``, oldest first, in one short transaction that
        does not hold group commit up; fire with (rows deleted, created_ms of
        the newest deleted or None).  Idempotent: nodes may run it together."""

    def reclaim_space(pages: int) -> Any:  # noqa: N805
        """Give up to ``pages`` freed pages back to the file system where the
        engine needs telling (SQLite's incremental vacuum); fire with how many
        went back (0 where there is nothing to do)."""

    def prune_account_events(before_ms: int) -> Any:  # noqa: N805
        """Forget account events created before ``before_ms``."""

    def last_account_event() -> Any:
        """Fire with the id of the newest account event (0 when none)."""

    def account_events(after_id: int, limit: int) -> Any:  # noqa: N805
        """Fire with up to ``limit`` account events with id > ``after_id``, by id,
        as (id, user_id, kind, detail); ids are visible in commit order."""

    def forget_user(user_id: str) -> Any:  # noqa: N805
        """Drop a deleted user from the engine's cache of known recipients."""

    def history(user_id: str, peer: str, before: int | None, limit: int) -> Any:  # noqa: N805
        """Fire with (messages, more, reads) of ``user_id``'s conversation with
        ``peer`` (protocol section 13): up to ``limit`` messages with ids below
        ``before`` (None: the newest), newest first; ``more`` is True when
        older ones exist.  ``peer`` is a user id (the direct messages between
        the two, both ways; the caller's own id: notes to self), ``broadcast``,
        or a group id (its messages inside the caller's window: ``joined_id <
        id``, and ``id <= removed_id`` once removed).  Fire with None when the
        peer is no user (never was, or deleted) or a group the caller was
        never a member of.  ``reads`` is a ``history.PageReads``: who read
        each of the caller's own direct and group messages of the page, and
        which of the others' messages the caller read.  Reads only: no status
        changes."""

    def conversations(user_id: str, limit: int) -> Any:  # noqa: N805
        """Fire with up to ``limit`` (peer, last_id, last_created_ms) of
        ``user_id``'s conversations, the most recent first: each direct peer
        (and the user themself for notes to self), each group they are or
        were a member of (its newest message inside their window), and
        ``broadcast`` when a broadcast is stored.  A conversation without a
        stored message (purged, expired) is left out."""

    def purge_user_messages(user_id: str, after_id: int) -> Any:  # noqa: N805
        """Delete messages from or to ``user_id`` with id > ``after_id``; fire
        with how many."""

    def jwt_secret() -> Any:
        """Fire with the JWT signing secret kept in the database (the one
        ``prepare_database`` returned), or None before it was prepared."""

    def start() -> Any:
        """Begin the engine's background work (checkpoints, node heartbeat,
        ``finish_deletions`` at once and every ``PURGE_INTERVAL`` seconds)."""

    def close() -> Any:
        """Refuse new writes, commit what is queued, release the connections."""


def is_postgres(database: str) -> bool:
    """True when ``DATABASE`` names a PostgreSQL database rather than a SQLite file."""
    return bool(_POSTGRES_URL.match(database))


def describe(database: str) -> str:
    """``DATABASE`` as it may be logged: a URL without its password (in the
    user part or as a ``password=`` parameter)."""
    if not is_postgres(database):
        return database
    shown = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", database, count=1)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", shown, flags=re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node registers about itself in a shared database."""

    name: str
    has_broker: bool


def prepare_database(
    database: str, new_secret: Callable[[], bytes], node: NodeInfo | None = None
) -> bytes:
    """Create or upgrade the database; return the JWT secret kept in it.

    Synchronous (before the reactor runs).  ``node``, for a process that
    will serve from the database, registers this node (PostgreSQL) or claims
    the file (SQLite), and refuses to start beside another live one when
    either lacks a broker.  Raises ``DatabaseError``
    with a message that starts with ``DATABASE``.
    """
    if is_postgres(database):
        from . import postgres

        return postgres.prepare_database(database, new_secret, node)
    from . import sqlite

    return sqlite.prepare_database(database, new_secret, node)


def open_store(database: str, clock: IReactorTime, node: NodeInfo | None = None) -> Any:
    """The ``IStore`` for ``DATABASE`` (after ``prepare_database``)."""
    if is_postgres(database):
        from . import postgres

        return postgres.PostgresStore(database, clock, node)
    from . import sqlite

    return sqlite.Store(database, clock)


_SQLITE_NAMES = ("Store", "migrations", "schema_version", "upgrade")


def __getattr__(name: str) -> Any:
    # Names this package had when it was one SQLite module, for code and tests
    # written against it: ``Store`` is the SQLite store.
    if name in _SQLITE_NAMES:
        from . import sqlite

        return getattr(sqlite, name)
    if name == "MARK_DELAY":
        from .batching import MARK_DELAY

        return MARK_DELAY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHALLENGE_BAD",
    "CHALLENGE_NONE",
    "CHALLENGE_OK",
    "DUPLICATE",
    "EVENT_DELETED",
    "EVENT_KEY_REVOKED",
    "EVENT_SIGNED_OUT",
    "EVENT_SIGNED_OUT_ALL",
    "MAX_LIVE_CHALLENGES",
    "NOT_A_MEMBER",
    "NO_RECIPIENT",
    "STORED",
    "DatabaseError",
    "IStore",
    "KeyRecord",
    "NewMessage",
    "NodeInfo",
    "StoreClosed",
    "User",
    "UserKeys",
    "describe",
    "is_postgres",
    "open_store",
    "prepare_database",
]
