"""The PostgreSQL engine: one database shared by every node of a cluster.

psycopg 3 through ``twisted.enterprise.adbapi`` (``ConnectionPool("psycopg",
...)``), each pool thread holding its own connection; ``cp_reconnect`` makes
a pool replace a connection that broke (a restarted server, a terminated
backend), so only the interaction in flight fails and the node recovers by
itself.

Message ids are not a sequence: each batch takes ``stream_head`` under its
row lock inside its transaction and uses the next ids, so ids become
visible in the order they were committed, on every node (with a sequence a
reader tailing the stream would see a small id commit after a larger one and
``since`` would skip it for good).  Group commit keeps the lock's cost per
message small.

Schema files are ``schema/postgres/NNN_*.sql``; each version is applied in
its own transaction under an advisory lock, so nodes starting together
apply it once.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import resources
from typing import Any

import psycopg
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..keylog import ADD, MAX_LOG_ENTRIES, REGISTER, REVOKE, Entry, KeyLogError
from ..messages import BROADCAST, PENDING, Message, is_group_id
from . import (
    CHALLENGE_BAD,
    CHALLENGE_NONE,
    CHALLENGE_OK,
    DUPLICATE,
    EVENT_DELETED,
    EVENT_KEY_REVOKED,
    EVENT_SIGNED_OUT,
    EVENT_SIGNED_OUT_ALL,
    MAX_LIVE_CHALLENGES,
    NO_RECIPIENT,
    NOT_A_MEMBER,
    STORED,
    DatabaseError,
    IStore,
    NewMessage,
    NodeInfo,
    User,
    UserKeys,
    describe,
)
from .batching import BatchedWrites, GroupCommit
from .groups import (
    SQL_MOVE_CURSOR,
    Groups,
    cursor_moves,
    group_page,
    leave_all_groups,
    merge_pages,
    with_members,
)
from .history import History, KnownConversations, conv_of, conversation_rows, wrote_key
from .purges import PURGE_INTERVAL, Purges
from .reads import Reads
from .rows import (
    KEYLOG_COLUMNS,
    MESSAGE_COLUMNS,
    entry_from_row,
    entry_row,
    key_from_row,
    message_from_row,
    refuse_when_full,
    remember_user,
)

_log = Logger()

CONNECT_TIMEOUT = 10  # seconds to wait for the server when connecting
POOL_SIZE = 4  # connections (and threads) per node: one writes batches, the rest read
HEARTBEAT_INTERVAL = 10.0  # seconds between a node's heartbeats
NODE_EXPIRY = 30  # seconds after its last heartbeat a node counts as gone
# Advisory lock keys (any constant bigint; these spell "wsschema"/"wsnodes").
SCHEMA_LOCK = 0x7773736368656D61
NODES_LOCK = 0x77736E6F646573
USER_LOCK = 0x7775  # with hashtext(user_id): the two-key advisory locks of one user id
DELETE_PAGE = 500  # messages per transaction of a deletion's message phase
DELETE_SLICE = 5000  # ids a page of a deletion's message phase reads, at most

_MIGRATION_FILE = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")


# ----------------------------------------------------------------------------
# Schema, the JWT secret and node registration (synchronous, before the reactor)


def migrations() -> list[tuple[int, str]]:
    """Every shipped PostgreSQL schema file as (version, SQL), in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("schema", "postgres").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    found.sort()
    return found


def connect(url: str) -> psycopg.Connection:
    """A plain (blocking) connection to ``url``, for preparing and for tools."""
    return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT)


def schema_version(conn: psycopg.Connection) -> int:
    """The schema version recorded in the database; 0 when it has none."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else 0


def upgrade(conn: psycopg.Connection, target: int | None = None) -> int:
    """Bring the schema up to ``target`` (default: newest); return the version.

    Each version is applied in its own transaction holding an advisory lock,
    so nodes starting together apply every version exactly once.
    """
    steps = migrations()
    newest = steps[-1][0] if steps else 0
    target = newest if target is None else target
    for version, script in steps:
        if version > target:
            break
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if schema_version(conn) >= version:
                continue
            conn.execute(script.encode("utf-8"))  # several statements, no parameters
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    current = schema_version(conn)
    if current > newest:
        raise DatabaseError(
            f"DATABASE: schema version {current} is newer than this server supports ({newest})"
        )
    return current


def _one_line(exc: BaseException, url: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    return text.replace(str(password), "***") if password else text


def prepare_database(
    url: str, new_secret: Callable[[], bytes], node: NodeInfo | None = None
) -> bytes:
    """Create or upgrade the database at ``url``; return the kept JWT secret.

    The first node to store a secret wins, so every node agrees.  With
    ``node``, register it (see ``register_node``).
    """
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        raise DatabaseError(f"DATABASE: not a usable PostgreSQL URL: {describe(url)}") from None
    try:
        with connect(url) as conn:
            upgrade(conn)
            with conn.transaction():
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('jwt_secret', %s)"
                    " ON CONFLICT (key) DO NOTHING",
                    (new_secret(),),
                )
                row = conn.execute("SELECT value FROM meta WHERE key = 'jwt_secret'").fetchone()
            if node is not None:
                register_node(conn, node)
            return bytes(row[0])
    except psycopg.Error as exc:
        reason = _one_line(exc, url)
        raise DatabaseError(f"DATABASE: cannot use {describe(url)}: {reason}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register_node(conn: psycopg.Connection, node: NodeInfo) -> None:
    """Record ``node`` as live on this database, or refuse with ``DatabaseError``.

    Nodes without a broker would silently miss each other's live traffic, so
    a node refuses to start while another live node is registered unless both
    have one.  A node is live while its heartbeat is younger than
    ``NODE_EXPIRY`` seconds; a node of this host whose process is gone (killed
    outright) is forgotten at once.  Registration runs under an advisory lock,
    so two nodes starting together cannot both miss each other.
    """
    host, pid = socket.gethostname(), os.getpid()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (NODES_LOCK,))
        conn.execute(
            "DELETE FROM nodes WHERE heartbeat_at < now() - make_interval(secs => %s)",
            (NODE_EXPIRY,),
        )
        rows = conn.execute(
            "SELECT name, host, pid, has_broker,"
            " extract(epoch FROM now() - heartbeat_at)::int FROM nodes WHERE name <> %s"
            " ORDER BY heartbeat_at DESC",
            (node.name,),
        ).fetchall()
        others = []
        for name, other_host, other_pid, has_broker, age in rows:
            if other_host == host and not _pid_alive(other_pid):
                conn.execute("DELETE FROM nodes WHERE name = %s", (name,))
            else:
                others.append((name, has_broker, age))
        for name, has_broker, age in others:
            if not (node.has_broker and has_broker):
                raise DatabaseError(
                    f"DATABASE: node {name} is running on this database (heartbeat {age} s"
                    f" ago) and {'it has' if node.has_broker else 'this node has'} no BROKER:"
                    " nodes without a broker miss each other's live messages; set BROKER on"
                    f" every node, or stop {name} (a node that died is forgotten"
                    f" {NODE_EXPIRY} s after its last heartbeat)"
                )
        conn.execute(
            "INSERT INTO nodes (name, host, pid, has_broker) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,"
            " has_broker = EXCLUDED.has_broker, heartbeat_at = now()",
            (node.name, host, pid, node.has_broker),
        )


# ----------------------------------------------------------------------------
# The running store

# Every query below is a constant: the column list is fixed text, every value a
# "%s" parameter (hence the S608 exemptions).
_COLS = MESSAGE_COLUMNS
_SQL_BY_NONCE = f"SELECT {_COLS} FROM messages WHERE sender = %s AND nonce = %s"  # noqa: S608
_SQL_BY_ID = f"SELECT {_COLS} FROM messages WHERE id = %s"  # noqa: S608
_SQL_BETWEEN = (
    f"SELECT {_COLS} FROM messages WHERE id > %s AND id <= %s"  # noqa: S608
    " ORDER BY id LIMIT %s"
)
_SQL_PENDING = (
    f"SELECT {_COLS} FROM messages WHERE recipient = %s AND status = 'pending'"  # noqa: S608
    " AND id > %s ORDER BY id LIMIT %s"
)
# Each branch ordered and limited on its own, so that PostgreSQL merges the
# three index scans (Merge Append) and stops after a page, instead of reading
# everything after since and sorting it: a client away for a long time costs
# a page, not its whole backlog (tests/test_store_postgres.py ReplayPlanTests).
_SQL_SINCE = (
    "SELECT * FROM ("  # noqa: S608
    f" (SELECT {_COLS} FROM messages WHERE recipient = %s AND status = 'pending'"
    "  AND id > %s AND id <= %s ORDER BY id LIMIT %s)"
    f" UNION ALL (SELECT {_COLS} FROM messages WHERE recipient = %s AND id > %s"
    "  ORDER BY id LIMIT %s)"
    f" UNION ALL (SELECT {_COLS} FROM messages WHERE recipient = %s AND id > %s"
    "  ORDER BY id LIMIT %s)"
    ") AS page ORDER BY id LIMIT %s"
)
# The batch's delivery marks, each row found by its primary key.  Written as
# "status = 'pending' AND id = ANY(...)" the planner may take the partial index
# messages_pending (recipient, id), whose predicate that condition matches:
# ``id`` is not its first column, so the whole index is scanned (per array
# element), with the dead entry of every message marked since the last vacuum
# (a cluster stores each cross-node message pending first: this scan was most
# of PostgreSQL's CPU there).  "(status = 'pending') IS TRUE" means the same
# for a NOT NULL column but does not match the index's predicate, which leaves
# the primary key.  The array is cast to bigint[] (psycopg sends small ints as
# smallint[]).
_SQL_DELIVERED = (
    "UPDATE messages SET status = 'delivered'"
    " WHERE id = ANY(%s::bigint[]) AND (status = 'pending') IS TRUE"
)


def _sql(text: str) -> str:
    """Shared SQL written with "?" marks (wsserver/store/groups.py), in psycopg's."""
    return text.replace("?", "%s")


def since_query(user_id: str, since: int, after: int, limit: int) -> tuple[str, tuple]:
    """The SQL and arguments of a page of a ``since`` replay (also what the
    benchmark's history workload times and whose plan it checks)."""
    floor = max(after, since)
    args = (
        *(user_id, after, since, limit),
        *(user_id, floor, limit),
        *(BROADCAST, floor, limit),
        limit,
    )
    return _SQL_SINCE, args


# One statement for the whole batch: its rows as one JSON parameter (one
# json.dumps in C; eight array parameters cost psycopg's Python array dumper
# about twice the client CPU per message, for the same server work).  A nonce
# its sender already used is skipped by the unique index and reported as such.
_SQL_INSERT = (
    "INSERT INTO messages (id, sender, recipient, content, signature, nonce,"
    " verification, status, created_ms, key_id, conv)"
    " SELECT i, s, r, c, decode(g, 'base64'), n, v, 'pending', t, k, o"
    " FROM json_to_recordset(%s::json)"
    " AS batch (i bigint, s text, r text, c text, g text, n text, v text, t bigint, k text,"
    " o text)"
    " ON CONFLICT (sender, nonce) WHERE nonce IS NOT NULL DO NOTHING RETURNING id"
)


def _batch_json(ids: list[int], news: list[NewMessage]) -> str:
    """The rows of ``_SQL_INSERT``'s parameter."""
    return json.dumps(
        [
            {
                "i": msg_id,
                "s": n.sender,
                "r": n.recipient,
                "c": n.content,
                "g": (
                    None if n.signature is None else base64.b64encode(n.signature).decode("ascii")
                ),
                "n": n.nonce,
                "v": n.verification,
                "t": n.created_ms,
                "k": n.key_id,
                "o": conv_of(n.sender, n.recipient),
            }
            for msg_id, n in zip(ids, news, strict=True)
        ],
        separators=(",", ":"),
    )


# The conversations rows of pairs new to this store, in one statement.  It
# runs while the stream head is locked, so writers never wait on each other's
# rows in opposite orders.
# An existing row gains ``wrote``, never loses it (each row once per
# statement: the pairs are merged first).
_SQL_CONVERSATIONS = (
    "INSERT INTO conversations (user_id, peer, wrote)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::boolean[])"
    " ON CONFLICT (user_id, peer) DO UPDATE SET wrote = TRUE"
    " WHERE EXCLUDED.wrote AND NOT conversations.wrote"
)


def _insert_messages(
    txn: Any,
    ops: list[tuple[str, Any]],
    results: list[Any],
    known_users: set[str],
    known_convs: KnownConversations,
    fresh_convs: set[str],
) -> None:
    """Store the batch's messages; fill in their results (and ``fresh_convs``
    with the ``wrote_key``s whose conversations rows it wrote)."""
    messages = [(i, arg) for i, (kind, arg) in enumerate(ops) if kind == "message"]
    unknown = (
        {m.recipient for _, m in messages if not is_group_id(m.recipient)}
        - known_users
        - {BROADCAST}
    )
    if unknown:
        txn.execute("SELECT user_id FROM users WHERE user_id = ANY(%s)", (sorted(unknown),))
        for (user_id,) in txn.fetchall():
            remember_user(known_users, user_id)
    candidates: list[tuple[int, NewMessage]] = []
    first_of: dict[tuple[str, str], int] = {}
    repeats: list[tuple[int, int]] = []  # (op, op of the first with its nonce)
    for i, new in messages:
        if (
            new.recipient != BROADCAST
            and new.recipient not in known_users
            and not is_group_id(new.recipient)
        ):
            results[i] = (NO_RECIPIENT, None)
        elif new.nonce is not None and (new.sender, new.nonce) in first_of:
            repeats.append((i, first_of[(new.sender, new.nonce)]))
        else:
            if new.nonce is not None:
                first_of[(new.sender, new.nonce)] = i
            candidates.append((i, new))
    if candidates:
        # The row lock orders the writers: ids are handed out and committed in
        # the same order, whichever node writes.
        txn.execute("SELECT last_id FROM stream_head FOR UPDATE")
        head = txn.fetchone()[0]
        # Under the stream lock, which membership changes take too: the
        # members read here are the members at this batch's commit.
        members = _group_members(txn, {n.recipient for _, n in candidates})
        kept = []
        for i, new in candidates:
            if is_group_id(new.recipient) and new.sender not in members.get(new.recipient, ()):
                results[i] = (NOT_A_MEMBER, None)
            else:
                kept.append((i, new))
        candidates = kept
    if candidates:
        ids = list(range(head + 1, head + 1 + len(candidates)))
        news = [new for _, new in candidates]
        txn.execute(_SQL_INSERT, (_batch_json(ids, news),))
        inserted = {row[0] for row in txn.fetchall()}
        txn.execute("UPDATE stream_head SET last_id = %s", (ids[-1],))
        new_pairs = {
            (new.sender, new.recipient)
            for (_, new), msg_id in zip(candidates, ids, strict=True)
            if msg_id in inserted
            and conv_of(new.sender, new.recipient) is not None
            and wrote_key(new.sender, new.recipient) not in known_convs
        }
        if new_pairs:
            wrote: dict[tuple[str, str], bool] = {}
            for sender, recipient in new_pairs:
                for user_id, peer, flag in conversation_rows(sender, recipient):
                    wrote[(user_id, peer)] = wrote.get((user_id, peer), False) or flag
            rows = sorted(wrote.items())
            txn.execute(
                _SQL_CONVERSATIONS,
                ([u for (u, _), _ in rows], [p for (_, p), _ in rows], [w for _, w in rows]),
            )
            fresh_convs.update(wrote_key(*pair) for pair in new_pairs)
        for (i, new), msg_id in zip(candidates, ids, strict=True):
            if msg_id in inserted:
                results[i] = (
                    STORED,
                    Message(
                        msg_id,
                        new.sender,
                        new.recipient,
                        new.content,
                        new.signature,
                        new.nonce,
                        new.verification,
                        PENDING,
                        new.created_ms,
                        key_id=new.key_id,
                        group_members=members.get(new.recipient),
                    ),
                )
            else:
                txn.execute(_SQL_BY_NONCE, (new.sender, new.nonce))
                results[i] = (DUPLICATE, message_from_row(txn.fetchone()))
    for i, first in repeats:
        if results[first][0] == NOT_A_MEMBER:
            results[i] = results[first]
        else:
            results[i] = (DUPLICATE, results[first][1])


def _group_members(txn: Any, recipients: set[str]) -> dict[str, tuple[str, ...]]:
    """The current members of the groups among ``recipients``."""
    groups = sorted(r for r in recipients if is_group_id(r))
    if not groups:
        return {}
    txn.execute(
        "SELECT group_id, user_id FROM group_members WHERE group_id = ANY(%s)"
        " AND removed_id IS NULL ORDER BY group_id, added_ms, user_id",
        (groups,),
    )
    found: dict[str, list[str]] = {}
    for group_id, user_id in txn.fetchall():
        found.setdefault(group_id, []).append(user_id)
    return {g: tuple(u) for g, u in found.items()}


def _write_batch(
    txn: Any,
    ops: list[tuple[str, Any]],
    known_users: set[str],
    known_convs: KnownConversations,
    fresh_convs: set[str],
) -> list[Any]:
    """Apply a batch of writes in one transaction; one result per op."""
    results: list[Any] = [None] * len(ops)
    # Messages first: the stream head stays locked from here to the commit.
    # Every writer that takes it takes it before the rows it changes (a
    # membership change settles messages' status under it, a deletion
    # removes conversations rows under it): this batch's status marks and
    # conversations upserts come after it too, or the two could each hold
    # what the other waits for (a deadlock PostgreSQL would end by failing
    # one of them).
    _insert_messages(txn, ops, results, known_users, known_convs, fresh_convs)
    delivered = sorted({msg_id for kind, arg in ops if kind == "delivered" for msg_id in arg})
    if delivered:
        txn.execute(_SQL_DELIVERED, (delivered,))
    for kind, arg in ops:
        if kind == "broadcast":  # (id, recipients)
            txn.execute(
                "UPDATE messages SET status = 'delivered', recipients = %s WHERE id = %s",
                (arg[1], arg[0]),
            )
    # Cursor moves after the stream lock, in the order membership changes
    # take their locks (stream head, then the member's row): no deadlock.
    moves = cursor_moves(ops)
    if moves:
        txn.executemany(_sql(SQL_MOVE_CURSOR), moves)
    return results


# ----------------------------------------------------------------------------
# Keys, the key log, sign-out and deletion (protocol section 12): the SQL that
# the running store and wsserver-admin share.  Each function takes a cursor
# inside a transaction its caller opened (and commits).

_SQL_LOG = f"SELECT {KEYLOG_COLUMNS} FROM key_log WHERE user_id = %s ORDER BY seq"  # noqa: S608
_SQL_ADD_ENTRY = (
    f"INSERT INTO key_log (user_id, {KEYLOG_COLUMNS})"  # noqa: S608
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_SQL_KEYS = (
    "SELECT u.token_gen, k.public_key, k.name, k.added_ms FROM users u"
    " LEFT JOIN user_keys k ON k.user_id = u.user_id WHERE u.user_id = %s ORDER BY k.seq"
)


def _read_log(cur: Any, user_id: str) -> list[Entry]:
    cur.execute(_SQL_LOG, (user_id,))
    return [entry_from_row(row) for row in cur.fetchall()]


def _lock_user(cur: Any, user_id: str) -> bool:
    """Lock the user's row for the rest of the transaction (appends to and
    deletions of one user wait for each other, on every node, and the one
    that waited then reads what the other committed); False when there is
    no such user."""
    cur.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (user_id,))
    return cur.fetchone() is not None


def _add_event(cur: Any, user_id: str, kind: str, detail: str, now_ms: int) -> None:
    """Record an account event; the table lock makes commit order id order
    for the pollers (see 003_operations.sql)."""
    cur.execute("LOCK TABLE account_events IN EXCLUSIVE MODE")
    cur.execute(
        "INSERT INTO account_events (user_id, kind, detail, created_ms) VALUES (%s, %s, %s, %s)",
        (user_id, kind, detail, now_ms),
    )


def _add_entry(cur: Any, user_id: str, entry: Entry, now_ms: int) -> None:
    """Insert a checked key-log entry and bring the active keys in step (see
    the SQLite engine's ``_add_entry``: the same answers).  A unique
    violation of (user_id, seq) fails ``KeyLogError('keylog_conflict')``,
    of (user_id, public_key) ``key_exists``; a revoke that removes no
    active key ``invalid_request``."""
    try:
        cur.execute(_SQL_ADD_ENTRY, entry_row(user_id, entry))
    except psycopg.errors.UniqueViolation:
        raise KeyLogError(
            "keylog_conflict", "another entry took this seq: fetch the log and sign again"
        ) from None
    if entry.action in (REGISTER, ADD):
        try:
            cur.execute(
                "INSERT INTO user_keys (user_id, public_key, seq, name, added_ms)"
                " VALUES (%s, %s, %s, %s, %s)",
                (user_id, entry.public_key, entry.seq, entry.name, entry.at_ms),
            )
        except psycopg.errors.UniqueViolation:
            raise KeyLogError("key_exists", "this key is already an active key") from None
    elif entry.action == REVOKE:
        cur.execute(
            "DELETE FROM user_keys WHERE user_id = %s AND public_key = %s",
            (user_id, entry.public_key),
        )
        if cur.rowcount != 1:
            raise KeyLogError("invalid_request", "the key to revoke is not an active key")
        cur.execute(
            "UPDATE users SET public_key = k.public_key FROM (SELECT public_key FROM user_keys"
            "  WHERE user_id = %s ORDER BY seq LIMIT 1) AS k WHERE users.user_id = %s",
            (user_id, user_id),
        )
        _add_event(cur, user_id, EVENT_KEY_REVOKED, entry.key_id, now_ms)


def _remove_account(cur: Any, user_id: str, now_ms: int) -> None:
    """Everything of a deletion but the messages, in the caller's transaction,
    which holds the user's advisory lock and row lock (see the SQLite
    engine's ``_remove_account``)."""
    cur.execute(
        "INSERT INTO deleted_users (user_id, deleted_ms) VALUES (%s, %s)"
        " ON CONFLICT (user_id) DO NOTHING",
        (user_id, now_ms),
    )
    for table in (
        "users",
        "user_keys",
        "key_log",
        "challenges",
        "revoked_tokens",
        "message_reads",  # the receipts the user sent (schema 5)
    ):
        cur.execute(f"DELETE FROM {table} WHERE user_id = %s", (user_id,))  # noqa: S608
    # The stream lock before the conversations rows and the groups (a message
    # batch takes it before it upserts conversations rows: taken after them,
    # a batch writing a reply to this user and this deletion could each wait
    # for the other), and before account_events' (the order every writer
    # takes them in).
    cur.execute("SELECT last_id FROM stream_head FOR UPDATE")
    locked_head = cur.fetchone()[0]
    # Its conversations rows, both ways (the peers' found through its own).
    cur.execute(
        "DELETE FROM conversations WHERE peer = %s AND user_id IN"
        " (SELECT peer FROM conversations WHERE user_id = %s)",
        (user_id, user_id),
    )
    cur.execute("DELETE FROM conversations WHERE user_id = %s", (user_id,))
    # Leave every group under the stream lock (as membership changes do).
    leave_all_groups(cur, user_id, locked_head, now_ms, _sql, _add_event)
    # The head after the table lock: a batch committed before the event is
    # below it, so the pollers' purge (above it) and this deletion meet.
    cur.execute("LOCK TABLE account_events IN EXCLUSIVE MODE")
    cur.execute("SELECT last_id FROM stream_head")
    head = cur.fetchone()[0]
    _add_event(cur, user_id, EVENT_DELETED, str(head), now_ms)


def _lock_for_deletion(cur: Any, user_id: str) -> bool:
    """The locks a deletion holds: the user id's advisory lock (a
    registration racing it sees the tombstone) and the row's."""
    cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (USER_LOCK, user_id))
    return _lock_user(cur, user_id)


# A page of a deletion's message phase looks at one slice of ids: the next
# DELETE_SLICE ids from the first stored above the last page's.  The messages
# the user sent are found by reading that slice by primary key (there is no
# index on sender: it would slow every insert), those sent to them through
# messages_recipient; so each page's transaction is short however large the
# table, and a whole deletion reads the table once, a slice at a time.
_SQL_NEXT_ID = "SELECT MIN(id) FROM messages WHERE id > %s"
# Arguments: first, last, the users (a list), the users again, first, last,
# the page's size.
_SQL_PAGE_OF = (
    "SELECT id FROM messages WHERE id >= %s AND id <= %s AND sender = ANY(%s::text[])"
    " UNION SELECT id FROM messages WHERE recipient = ANY(%s::text[]) AND id >= %s AND id <= %s"
    " ORDER BY id LIMIT %s"
)


def _delete_ids(cur: Any, ids: list[int]) -> int:
    """Delete these messages; return how many were still there."""
    cur.execute("DELETE FROM messages WHERE id = ANY(%s::bigint[])", (ids,))
    return cur.rowcount


def _delete_page_of(
    cur: Any, user_ids: Sequence[str], after: int, finish: bool
) -> tuple[int, int | None]:
    """Delete up to ``DELETE_PAGE`` messages from or to any of ``user_ids`` in
    the next slice of ids above ``after``; return (how many went, the id the
    next page starts above, or None when no message is stored above
    ``after``).  With ``finish``, the call that finds none left marks their
    tombstones purged (in the same transaction)."""
    cur.execute(_SQL_NEXT_ID, (after,))
    first = cur.fetchone()[0]
    if first is None:
        if finish:
            cur.execute(
                "UPDATE deleted_users SET purged = TRUE WHERE user_id = ANY(%s::text[])",
                (list(user_ids),),
            )
        return 0, None
    last = first + DELETE_SLICE - 1
    users = list(user_ids)
    cur.execute(_SQL_PAGE_OF, (first, last, users, users, first, last, DELETE_PAGE))
    ids = [row[0] for row in cur.fetchall()]
    if len(ids) == DELETE_PAGE:
        last = ids[-1]  # the page is full: the next one goes on from its last id
    return (_delete_ids(cur, ids) if ids else 0), last


def _unpurged(cur: Any, after: str, limit: int) -> list[str]:
    """Up to ``limit`` deleted users whose messages may not all be gone yet,
    with ids > ``after``, by id."""
    cur.execute(
        "SELECT user_id FROM deleted_users WHERE NOT purged AND user_id > %s"
        " ORDER BY user_id LIMIT %s",
        (after, limit),
    )
    return [row[0] for row in cur.fetchall()]


def _stale(conn: Any) -> bool:
    """True when this idle connection cannot be used: closed, broken, or with
    something to read (an idle connection is sent nothing unless the server
    ended it: a restart, ``pg_terminate_backend``, an idle timeout)."""
    if conn.closed or conn.broken:
        return True
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return bool(readable)


def _on_live_connection(txn: Any, interaction: Callable[..., Any], *args: Any) -> Any:
    """Run ``interaction`` after replacing the thread's connection if it died while
    idle, so that a lost connection fails only what was in flight on it."""
    if _stale(txn.connection):  # the DB-API cursor's connection
        txn.reconnect()
        txn.reopen()
    return interaction(txn, *args)


@implementer(IStore)
class PostgresStore(Groups, Reads, Purges, History, BatchedWrites):
    """Asynchronous access to a PostgreSQL database, with group commit."""

    _mark = "%s"  # History's queries
    _PARAM = "%s"  # for the SQL shared with SQLite (reads.py)
    # With "conv = %s" the key is a constant to the planner and ORDER BY id
    # DESC can come from messages_pkey: for a busy conversation it walks the
    # primary key back with a filter (cheaper by its estimate), reading every
    # newer message of the table until the page is full: not flat for a
    # conversation whose messages are old.  As a range on the key (of one
    # value) the order (key, id) only the key's index gives, and the B-tree
    # still starts at (key, before) and stops after the page.
    _key_range = "{0} >= ? AND {0} <= ?"
    _key_order = "{0} DESC, id DESC"
    _conv_of_row = (
        'CASE WHEN c.user_id COLLATE "C" <= c.peer COLLATE "C"'
        " THEN c.user_id || ' ' || c.peer ELSE c.peer || ' ' || c.user_id END"
    )

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        node: NodeInfo | None = None,
        max_batch: int = 1024,
    ) -> None:
        self.url = url
        self._clock = clock
        self._node = node
        self._pool = adbapi.ConnectionPool(
            "psycopg",
            url,
            connect_timeout=CONNECT_TIMEOUT,
            cp_min=1,
            cp_max=POOL_SIZE,
            cp_reconnect=True,
            cp_noisy=False,
        )
        self._known_users: set[str] = set()  # a cache; a stale miss only costs a query
        self._known_convs = KnownConversations()  # added to once a batch committed
        self._commits = GroupCommit(clock, self._write, max_batch)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._beating = False
        self._init_purges(clock)
        self.max_log_entries = MAX_LOG_ENTRIES  # a test may lower it

    @property
    def _closed(self) -> bool:
        return self._commits.closed

    def _run(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``runInteraction`` on a connection known to be alive when it starts."""
        return self._pool.runInteraction(_on_live_connection, interaction, *args)

    def _execute(self, sql: str, args: tuple[Any, ...]) -> defer.Deferred:
        def interaction(txn: Any) -> None:
            txn.execute(sql, args)

        return self._run(interaction)

    def _write(self, ops: list[tuple[str, Any]]) -> defer.Deferred:
        fresh: set[str] = set()
        d = self._run(_write_batch, ops, self._known_users, self._known_convs, fresh)
        return d.addCallback(self._known_convs.remember_after, fresh)

    def _purge_page(self, user_ids: list[str], after: int, finish: bool) -> defer.Deferred:
        return self._run(_delete_page_of, user_ids, after, finish)

    def _unpurged_users(self, after: str, limit: int) -> defer.Deferred:
        return self._run(_unpurged, after, limit)

    def _account_gone(self, user_id: str) -> None:
        self._known_users.discard(user_id)

    def _sql(self, text: str) -> str:
        return _sql(text)

    _SQL_SHARE_GROUP = "SELECT 1 FROM chat_groups WHERE group_id = ? FOR SHARE"

    def _lock_stream(self, txn: Any) -> int:
        txn.execute("SELECT last_id FROM stream_head FOR UPDATE")  # as a batch takes it
        return int(txn.fetchone()[0])

    def _record_event(self, cur: Any, user_id: str, kind: str, detail: str, now_ms: int) -> None:
        _add_event(cur, user_id, kind, detail, now_ms)

    def start(self, *, purge_interval: float = PURGE_INTERVAL) -> defer.Deferred:
        """Keep this node's registration alive (a heartbeat on the reactor
        clock), and finish deletions left unfinished now and every
        ``purge_interval`` seconds (``finish_deletions``).

        The first beat is at once: twistd registers the node before it
        daemonizes, so the serving process (whose pid the row must hold) may be
        another one than the registering one.
        """
        if self._node is not None and not self._heartbeat.running:
            self._heartbeat.start(HEARTBEAT_INTERVAL, now=True)
        self._start_purges(purge_interval)
        return defer.succeed(None)

    def _beat(self) -> None:
        if self._beating or self._node is None:
            return
        self._beating = True
        node = self._node
        d = self._execute(
            "INSERT INTO nodes (name, host, pid, has_broker) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,"
            " heartbeat_at = now()",
            (node.name, socket.gethostname(), os.getpid(), node.has_broker),
        )
        d.addErrback(lambda f: _log.warn("node heartbeat failed: {e}", e=f.getErrorMessage()))
        d.addBoth(lambda _: setattr(self, "_beating", False))

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Refuse new writes, commit what is queued, unregister, close the pool."""
        if self._heartbeat.running:
            self._heartbeat.stop()
        yield self._stop_purges()
        yield self._commits.close()
        if self._node is not None:
            try:
                yield self._execute("DELETE FROM nodes WHERE name = %s", (self._node.name,))
            except Exception as exc:  # the database may be gone; the row expires
                _log.warn("cannot unregister this node: {e}", e=str(exc))
        self._pool.close()

    # -- users ----------------------------------------------------------------

    def add_user(self, user: User) -> defer.Deferred:
        """Insert a user and entry 0 of their key log; fires True, or False
        when the user_id is taken (or was deleted)."""

        def interaction(txn: Any) -> bool:
            # The same lock as admin_delete_user's: a registration racing a
            # deletion sees its tombstone.
            txn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (USER_LOCK, user.user_id))
            txn.execute("SELECT 1 FROM deleted_users WHERE user_id = %s", (user.user_id,))
            if txn.fetchone() is not None:
                return False  # deleted: the id stays taken for good
            txn.execute(
                "INSERT INTO users (user_id, username, public_key, created_ms)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (user_id) DO NOTHING",
                (user.user_id, user.username, user.public_key, user.created_ms),
            )
            if txn.rowcount != 1:
                return False
            entry = Entry(0, REGISTER, user.public_key, at_ms=user.created_ms)
            _add_entry(txn, user.user_id, entry, user.created_ms)
            return True

        return self._run(interaction)

    # -- keys, the key log, sign-out and deletion (protocol section 12) ---------

    def user_keys(self, user_id: str) -> defer.Deferred:
        """Fire with the user's ``UserKeys`` (active keys oldest first, token
        generation), or None when no such user."""

        def interaction(txn: Any) -> UserKeys | None:
            txn.execute(_SQL_KEYS, (user_id,))
            rows = txn.fetchall()
            if not rows:
                return None
            keys = tuple(key_from_row(row[1:]) for row in rows if row[1] is not None)
            return UserKeys(keys, rows[0][0])

        return self._run(interaction)

    def key_log(self, user_id: str) -> defer.Deferred:
        """Fire with the user's key log, oldest first, or None when no such
        user (every user has entry 0; a deleted one has no log)."""

        def interaction(txn: Any) -> list[Entry] | None:
            return _read_log(txn, user_id) or None

        return self._run(interaction)

    def append_key_entry(
        self, user_id: str, entry: Entry, check: Callable[[list[Entry]], None]
    ) -> defer.Deferred:
        """Append ``entry`` to the user's key log after ``check(entries)`` passed
        on the log as it stands, holding the user's row lock (``SELECT ... FOR
        UPDATE``) so appends of one user on any node run one after the other.
        ``at_ms`` is the entry's own when set, else now.  Fires with the
        stored entry, or None when no such user; fails with ``check``'s
        ``KeyLogError`` (nothing written)."""
        now_ms = self._now_ms()
        stored = entry if entry.at_ms else replace(entry, at_ms=now_ms)
        max_entries = self.max_log_entries

        def interaction(txn: Any) -> Entry | None:
            if not _lock_user(txn, user_id):
                return None
            entries = _read_log(txn, user_id)
            refuse_when_full(entries, stored, max_entries)
            check(entries)
            if stored.seq != len(entries):  # whatever check let through
                raise KeyLogError("keylog_conflict", f"seq must be {len(entries)}, the next one")
            _add_entry(txn, user_id, stored, now_ms)
            return stored

        return self._run(interaction)

    def delete_account(
        self, user_id: str, now_ms: int, check: Callable[[list[Entry]], None]
    ) -> defer.Deferred:
        """Delete the user as protocol section 12 says, once ``check(entries)``
        passed on their key log (see ``IStore``).  Fires True, or None when
        no such user."""

        def interaction(txn: Any) -> bool:
            if not _lock_for_deletion(txn, user_id):
                return False
            check(_read_log(txn, user_id))
            _remove_account(txn, user_id, now_ms)
            return True

        return self._delete_account(interaction, user_id)

    def revoke_token(self, user_id: str, jti: str, expires_ms: int, now_ms: int) -> defer.Deferred:
        """Remember a signed-out token until it expires (forgetting those
        expired) and record an EVENT_SIGNED_OUT; a repeat changes nothing.
        Fires True, or False when no such user (nothing stored).  The user's
        row is held ``FOR KEY SHARE`` (a deletion's ``FOR UPDATE`` waits for
        it, and it for a deletion), so no row outlives a racing deletion."""

        def interaction(txn: Any) -> bool:
            txn.execute("SELECT 1 FROM users WHERE user_id = %s FOR KEY SHARE", (user_id,))
            if txn.fetchone() is None:
                return False  # deleted (or never was): nothing to sign out
            txn.execute("DELETE FROM revoked_tokens WHERE expires_ms <= %s", (now_ms,))
            txn.execute(
                "INSERT INTO revoked_tokens (jti, user_id, expires_ms) VALUES (%s, %s, %s)"
                " ON CONFLICT (jti) DO NOTHING",
                (jti, user_id, expires_ms),
            )
            if txn.rowcount == 1:
                _add_event(txn, user_id, EVENT_SIGNED_OUT, jti, now_ms)
            return True

        return self._run(interaction)

    def revoke_tokens(self, user_id: str, now_ms: int) -> defer.Deferred:
        """Raise the user's token generation and record an
        EVENT_SIGNED_OUT_ALL; fire with the new generation, or None when no
        such user."""

        def interaction(txn: Any) -> int | None:
            txn.execute(
                "UPDATE users SET token_gen = token_gen + 1 WHERE user_id = %s RETURNING token_gen",
                (user_id,),
            )
            row = txn.fetchone()
            if row is None:
                return None
            _add_event(txn, user_id, EVENT_SIGNED_OUT_ALL, str(row[0]), now_ms)
            return int(row[0])

        return self._run(interaction)

    def revoked_tokens(self, now_ms: int) -> defer.Deferred:
        """Fire with the set of signed-out jtis not yet expired (the expired
        ones are forgotten)."""

        def interaction(txn: Any) -> set[str]:
            txn.execute("DELETE FROM revoked_tokens WHERE expires_ms <= %s", (now_ms,))
            txn.execute("SELECT jti FROM revoked_tokens")
            return {row[0] for row in txn.fetchall()}

        return self._run(interaction)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def get_user(self, user_id: str) -> defer.Deferred:
        """Fire with the ``User`` or None."""

        def interaction(txn: Any) -> User | None:
            txn.execute(
                "SELECT user_id, username, public_key, created_ms FROM users WHERE user_id = %s",
                (user_id,),
            )
            row = txn.fetchone()
            return User(row[0], row[1], bytes(row[2]), row[3]) if row else None

        return self._run(interaction)

    # -- login challenges -------------------------------------------------------

    def add_challenge(
        self, user_id: str, challenge: str, now_ms: int, expires_ms: int
    ) -> defer.Deferred:
        """Keep a new challenge; forget expired ones and all but the newest five."""

        def interaction(txn: Any) -> None:
            txn.execute("DELETE FROM challenges WHERE expires_ms <= %s", (now_ms,))
            txn.execute(
                "INSERT INTO challenges (challenge, user_id, expires_ms) VALUES (%s, %s, %s)",
                (challenge, user_id, expires_ms),
            )
            txn.execute(
                "DELETE FROM challenges WHERE user_id = %s AND seq NOT IN"
                " (SELECT seq FROM challenges WHERE user_id = %s ORDER BY seq DESC LIMIT %s)",
                (user_id, user_id, MAX_LIVE_CHALLENGES),
            )

        return self._run(interaction)

    def consume_challenge(
        self,
        user_id: str,
        challenge: str | None,
        now_ms: int,
        check: Callable[[str], bool],
    ) -> defer.Deferred:
        """Try ``check`` on the user's live challenges, newest first (see ``IStore``)."""

        def interaction(txn: Any) -> str:
            sql = "SELECT challenge FROM challenges WHERE user_id = %s AND expires_ms > %s"
            args: tuple[Any, ...] = (user_id, now_ms)
            if challenge is not None:
                sql += " AND challenge = %s"
                args += (challenge,)
            txn.execute(sql + " ORDER BY seq DESC", args)
            live = [row[0] for row in txn.fetchall()]
            tried = False
            for candidate in live:
                txn.execute("DELETE FROM challenges WHERE challenge = %s", (candidate,))
                if txn.rowcount != 1:
                    continue
                tried = True
                if check(candidate):
                    return CHALLENGE_OK
            return CHALLENGE_BAD if tried else CHALLENGE_NONE

        return self._run(interaction)

    # -- delivery ---------------------------------------------------------------

    def replay_page(
        self, user_id: str, since: int | None, after: int, limit: int
    ) -> defer.Deferred:
        """Up to ``limit`` messages for ``user_id`` with id > ``after``, by id (see
        ``IStore``)."""

        def interaction(txn: Any) -> list[Message]:
            if since is None:
                txn.execute(_SQL_PENDING, (user_id, after, limit))
            else:
                txn.execute(*since_query(user_id, since, after, limit))
            direct = [message_from_row(row) for row in txn.fetchall()]
            rows = group_page(self._query(txn), _COLS, user_id, since, after, limit)
            grouped = [message_from_row(row) for row in rows]
            return merge_pages(direct, grouped, limit)

        return self._run(interaction)

    def get_message(self, msg_id: int) -> defer.Deferred:
        """Fire with the stored ``Message`` or None (for tests and tools)."""

        def interaction(txn: Any) -> Message | None:
            txn.execute(_SQL_BY_ID, (msg_id,))
            row = txn.fetchone()
            return message_from_row(row) if row else None

        return self._run(interaction)

    def messages_between(self, after: int, upto: int, limit: int) -> defer.Deferred:
        """Up to ``limit`` messages with ``after < id <= upto``, by id (see ``IStore``)."""

        def interaction(txn: Any) -> list[Message]:
            txn.execute(_SQL_BETWEEN, (after, upto, limit))
            page = [message_from_row(row) for row in txn.fetchall()]
            return with_members(page, self._query(txn))

        return self._run(interaction)

    def stream_head(self) -> defer.Deferred:
        """Fire with the largest committed message id (0 when none)."""

        def interaction(txn: Any) -> int:
            txn.execute("SELECT last_id FROM stream_head")
            return int(txn.fetchone()[0])

        return self._run(interaction)

    def jwt_secret(self) -> defer.Deferred:
        """Fire with the JWT secret kept in the database, or None."""

        def interaction(txn: Any) -> bytes | None:
            txn.execute("SELECT value FROM meta WHERE key = 'jwt_secret'")
            row = txn.fetchone()
            return bytes(row[0]) if row else None

        return self._run(interaction)

    def count_messages(self) -> defer.Deferred:
        """Fire with the number of stored messages."""

        def interaction(txn: Any) -> int:
            txn.execute("SELECT COUNT(*) FROM messages")
            return txn.fetchone()[0]

        return self._run(interaction)

    # -- retention and account events (wsserver/retention.py, events.py) --------

    def expire_batch(self, status: str, before_ms: int, from_ms: int, limit: int) -> defer.Deferred:
        """Delete up to ``limit`` messages of ``status`` created before
        ``before_ms`` (and not before ``from_ms``), oldest first, in one short
        transaction on a pool connection (the batch writer is not held up).
        Fires with (rows deleted, created_ms of the newest deleted or None).
        Nodes running it together delete disjoint or already-gone rows."""

        def interaction(txn: Any) -> tuple[int, int | None]:
            txn.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                " WHERE created_ms >= %s AND created_ms < %s AND status = %s"
                " ORDER BY created_ms LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING created_ms",
                (from_ms, before_ms, status, limit),
            )
            ages = [row[0] for row in txn.fetchall()]
            return len(ages), (max(ages) if ages else None)

        return self._run(interaction)

    def reclaim_space(self, pages: int) -> defer.Deferred:
        """Nothing to do (fires 0): PostgreSQL's autovacuum makes the space of
        deleted rows reusable."""
        return defer.succeed(0)

    def prune_account_events(self, before_ms: int) -> defer.Deferred:
        """Forget account events created before ``before_ms``."""
        return self._execute("DELETE FROM account_events WHERE created_ms < %s", (before_ms,))

    def last_account_event(self) -> defer.Deferred:
        """Fire with the id of the newest account event (0 when none)."""

        def interaction(txn: Any) -> int:
            txn.execute("SELECT COALESCE(MAX(id), 0) FROM account_events")
            return int(txn.fetchone()[0])

        return self._run(interaction)

    def account_events(self, after_id: int, limit: int) -> defer.Deferred:
        """Fire with up to ``limit`` account events with id > ``after_id``, by
        id, as (id, user_id, kind, detail)."""

        def interaction(txn: Any) -> list[tuple[int, str, str, str | None]]:
            txn.execute(
                "SELECT id, user_id, kind, detail FROM account_events WHERE id > %s"
                " ORDER BY id LIMIT %s",
                (after_id, limit),
            )
            return [tuple(row) for row in txn.fetchall()]

        return self._run(interaction)

    def forget_user(self, user_id: str) -> defer.Deferred:
        """Drop ``user_id`` from the cache of known recipients (it was deleted)."""
        self._known_users.discard(user_id)
        return defer.succeed(None)


# ----------------------------------------------------------------------------
# For wsserver-admin: synchronous, on a connection of its own.


def admin_connect(url: str) -> psycopg.Connection:
    """A connection for ``wsserver-admin`` to an existing, up-to-date database."""
    try:
        conn = connect(url)
        conn.autocommit = True
        current, newest = schema_version(conn), migrations()[-1][0]
    except psycopg.Error as exc:
        raise DatabaseError(
            f"DATABASE: cannot use {describe(url)}: {_one_line(exc, url)}"
        ) from None
    if current != newest:
        conn.close()
        raise DatabaseError(
            f"DATABASE: {describe(url)} has schema version {current}, this wsserver-admin"
            f" needs {newest}: start the server (of this version) on it once to upgrade it"
        )
    return conn


def admin_users(conn: psycopg.Connection) -> list[tuple[str, str, int]]:
    """Every user as (user_id, username, created_ms), by user_id."""
    rows = conn.execute("SELECT user_id, username, created_ms FROM users ORDER BY user_id")
    return [tuple(row) for row in rows.fetchall()]


def admin_delete_user(conn: psycopg.Connection, user_id: str, now_ms: int) -> int | None:
    """Delete ``user_id`` as protocol section 12 says; return how many messages
    went, or None when there is no such user (see the SQLite engine's
    ``admin_delete_user``: the same steps)."""
    with conn.transaction():
        cur = conn.cursor()
        if _lock_for_deletion(cur, user_id):
            _remove_account(cur, user_id, now_ms)
        else:
            # Deleted before (perhaps by a run that failed half-way: finish
            # removing the messages), or no such user.
            cur.execute("SELECT 1 FROM deleted_users WHERE user_id = %s", (user_id,))
            if cur.fetchone() is None:
                return None
    return _delete_messages_of(conn, user_id)


def _delete_messages_of(conn: psycopg.Connection, user_id: str) -> int:
    """Delete every message from or to ``user_id``, a page per short
    transaction, and mark the tombstone purged with the last (empty) page."""
    removed, after = 0, 0
    while True:
        with conn.transaction():
            deleted, last = _delete_page_of(conn.cursor(), [user_id], after, True)
        if last is None:
            return removed
        removed += deleted
        after = last


def admin_stats(conn: psycopg.Connection) -> dict[str, int]:
    """Users, deleted users, messages pending / delivered, and the database's size."""
    users = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
    deleted = conn.execute("SELECT COUNT(*) FROM deleted_users").fetchone()[0]
    counts = dict(conn.execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall())
    size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return {
        "users": users,
        "deleted_users": deleted,
        "messages_pending": counts.get("pending", 0),
        "messages_delivered": counts.get("delivered", 0),
        "database_bytes": int(size),
    }


__all__ = [
    "PostgresStore",
    "connect",
    "migrations",
    "prepare_database",
    "register_node",
    "schema_version",
    "upgrade",
]
