"""The SQLite engine: the embedded default, one file, one writer.

``prepare_database`` runs once, synchronously, before the reactor starts: it
creates or upgrades the schema from the versioned files in
``schema/sqlite/`` and returns the JWT signing secret kept in the database.
``Store`` is what the running server uses: every call returns a Deferred and
runs in the single thread of an adbapi pool, so SQLite sees one writer.

Messages go through group commit (``batching.GroupCommit``): this module
only supplies ``_write_batch``, which applies one batch in one transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import resources
from typing import Any

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

BUSY_TIMEOUT_MS = 5000
_IN_CHUNK = 500  # ids per UPDATE ... IN (...): below SQLite's parameter limit
DELETE_PAGE = 500  # messages per transaction of a deletion's message phase
DELETE_SLICE = 5000  # ids a page of a deletion's message phase reads, at most

_MIGRATION_FILE = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")


# ----------------------------------------------------------------------------
# Schema


def migrations() -> list[tuple[int, str]]:
    """Every shipped schema file as (version, SQL), in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("schema", "sqlite").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    found.sort()
    return found


def _statements(script: str) -> list[str]:
    """Split a schema file into complete SQL statements."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        raise DatabaseError("incomplete statement in schema file")
    return statements


def _incremental_vacuum_if_new(conn: sqlite3.Connection) -> None:
    """Give a new (empty) database ``auto_vacuum = INCREMENTAL``, so that the
    pages retention frees go back to the file system (``reclaim_space``).

    SQLite takes this setting only before the first table exists; an older
    database keeps its mode (``NONE``) until an operator runs ``VACUUM`` on it
    once with the setting (docs/operations.md, Retention)."""
    if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _incremental_vacuum_if_new(conn)  # before WAL: SQLite takes it only then
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database; 0 when it has none."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not has_table:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else 0


def upgrade(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Bring the schema up to ``target`` (default: newest); return the version.

    Each version is applied in its own IMMEDIATE transaction, so processes
    starting together on one file never apply a version twice.
    """
    steps = migrations()
    newest = steps[-1][0] if steps else 0
    target = newest if target is None else target
    conn.isolation_level = None  # explicit transactions below
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    for version, script in steps:
        if version > target:
            break
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(conn)
            if current >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    current = schema_version(conn)
    if current > newest:
        raise DatabaseError(
            f"schema version {current} is newer than this server supports ({newest})"
        )
    return current


OWNER_ONLY = 0o600
_COMPANIONS = ("", "-wal", "-shm")  # the database file and what SQLite puts beside it


def _create_owner_only(path: str) -> None:
    """Create ``path`` empty and 0600 (whatever the umask) unless it exists.

    SQLite takes an empty file for a new database, and gives the files it
    creates beside it (``-wal``, ``-shm``, a rollback journal) the database
    file's own mode, so they are owner-only too.  An existing file is left as
    it is, with a warning for each of these files others may read.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OWNER_ONLY)
    except FileExistsError:
        _warn_if_exposed(path)
        return
    except OSError as exc:
        raise DatabaseError(f"cannot open {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, OWNER_ONLY)  # the umask may have taken the owner's bits too
    finally:
        os.close(fd)


def _warn_if_exposed(path: str) -> None:
    for suffix in _COMPANIONS:
        name = path + suffix
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except OSError:
            continue
        if mode & 0o077:
            _log.warn(
                "{name} (mode {mode:04o}) is open to other users, and the database"
                " holds the JWT secret (whoever reads it can sign in as any user):"
                " chmod 600 {name}",
                name=os.path.abspath(name),
                mode=mode,
            )


def prepare_database(
    path: str, new_secret: Callable[[], bytes], node: NodeInfo | None = None
) -> bytes:
    """Create or upgrade the database at ``path``; return the kept JWT secret.

    ``new_secret`` makes a secret when the database has none yet; the first
    process to store one wins, so every process sharing the file agrees.  A
    new file is created owner-only; an existing one others can read is
    warned about (it holds the secret).  ``node``, for a process that will
    serve from the file, claims it (``claim_file``) until ``release_file``.
    """
    _create_owner_only(path)
    if node is not None:
        claim_file(path, node)
    try:
        conn = _connect(path)
        try:
            upgrade(conn)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('jwt_secret', ?)",
                (new_secret(),),
            )
            secret = conn.execute("SELECT value FROM meta WHERE key = 'jwt_secret'").fetchone()[0]
            conn.execute("COMMIT")
            return bytes(secret)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        release_file(path)
        raise DatabaseError(f"DATABASE: cannot open {path}: {exc}") from exc


# Claims on database files, by absolute path: the open lock file of each.
_claims: dict[str, int] = {}


def claim_file(path: str, node: NodeInfo) -> None:
    """Refuse a second server on ``path`` unless every one has a broker.

    Processes serving from one file without a broker would each deliver
    only to their own connections: a message to a user connected to the
    other one would wait for a reconnect.  So a node without a broker holds
    an exclusive ``flock`` on ``<path>-node.lock`` and nodes with one hold a
    shared lock: the kernel drops it when the process ends, however it ends,
    so a node killed outright never holds the file back.  (SQLite's own
    locks are POSIX record locks, which ``flock`` does not touch.)
    """
    key = os.path.abspath(path)
    if key in _claims:
        return
    lock_path = key + "-node.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, OWNER_ONLY)
    except OSError as exc:
        raise DatabaseError(f"DATABASE: cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if node.has_broker else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseError(
            f"DATABASE: {key} is served by another wsserver process"
            + (" without a BROKER" if node.has_broker else "; this one has no BROKER")
            + ": processes sharing a database deliver live messages to each other only"
            " through a broker (set BROKER on every one, or give each its own DATABASE)"
        ) from None
    _claims[key] = fd


def release_file(path: str) -> None:
    """Give up this process's claim on ``path`` (at the store's close)."""
    fd = _claims.pop(os.path.abspath(path), None)
    if fd is not None:
        os.close(fd)


# ----------------------------------------------------------------------------
# The running store

# Every query below is a constant: the column list is fixed text, every value a
# "?" parameter (hence the S608 exemptions).
_COLS = MESSAGE_COLUMNS
_SQL_BY_NONCE = f"SELECT {_COLS} FROM messages WHERE sender = ? AND nonce = ?"  # noqa: S608
_SQL_BY_ID = f"SELECT {_COLS} FROM messages WHERE id = ?"  # noqa: S608
_SQL_BETWEEN = (
    f"SELECT {_COLS} FROM messages WHERE id > ? AND id <= ?"  # noqa: S608
    " ORDER BY id LIMIT ?"
)
_SQL_PENDING = (
    f"SELECT {_COLS} FROM messages WHERE recipient = ? AND status = 'pending'"  # noqa: S608
    " AND id > ? ORDER BY id LIMIT ?"
)
_SQL_SINCE = (
    "SELECT * FROM ("  # noqa: S608
    f" SELECT {_COLS} FROM messages WHERE recipient = ? AND status = 'pending'"
    "  AND id > ? AND id <= ?"
    f" UNION ALL SELECT {_COLS} FROM messages WHERE recipient = ? AND id > ?"
    f" UNION ALL SELECT {_COLS} FROM messages WHERE recipient = ? AND id > ?"
    ") ORDER BY id LIMIT ?"
)


def since_query(user_id: str, since: int, after: int, limit: int) -> tuple[str, tuple]:
    """The SQL and arguments of a page of a ``since`` replay (also what the
    benchmark's history workload times and whose plan it checks)."""
    floor = max(after, since)
    return _SQL_SINCE, (user_id, after, since, user_id, floor, BROADCAST, floor, limit)


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")


def _one_thread_pool(path: str) -> adbapi.ConnectionPool:
    return adbapi.ConnectionPool(
        "sqlite3",
        path,
        timeout=BUSY_TIMEOUT_MS / 1000,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=_configure,
        cp_noisy=False,
    )


# A conversations row; an existing one gains ``wrote``, never loses it.
_SQL_CONVERSATION_ROW = (
    "INSERT INTO conversations (user_id, peer, wrote) VALUES (?, ?, ?)"
    " ON CONFLICT (user_id, peer) DO UPDATE SET wrote = 1"
    " WHERE excluded.wrote AND NOT conversations.wrote"
)


def _insert_message(
    txn: Any,
    new: NewMessage,
    known_users: set[str],
    known_convs: KnownConversations,
    fresh_convs: set[str],
) -> tuple[str, Message | None]:
    members: tuple[str, ...] | None = None
    if is_group_id(new.recipient):
        # In the batch's transaction, which holds the file's write lock:
        # membership changes are ordered with it (wsserver/store/groups.py).
        txn.execute(
            "SELECT user_id FROM group_members WHERE group_id = ? AND removed_id IS NULL",
            (new.recipient,),
        )
        members = tuple(row[0] for row in txn.fetchall())
        if new.sender not in members:
            return NOT_A_MEMBER, None
    elif new.recipient != BROADCAST and new.recipient not in known_users:
        txn.execute("SELECT 1 FROM users WHERE user_id = ?", (new.recipient,))
        if txn.fetchone() is None:
            return NO_RECIPIENT, None
        remember_user(known_users, new.recipient)
    conv = conv_of(new.sender, new.recipient)
    try:
        txn.execute(
            "INSERT INTO messages (sender, recipient, content, signature, nonce,"
            " verification, status, created_ms, key_id, conv)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                new.sender,
                new.recipient,
                new.content,
                new.signature,
                new.nonce,
                new.verification,
                PENDING,
                new.created_ms,
                new.key_id,
                conv,
            ),
        )
    except sqlite3.IntegrityError:
        if new.nonce is None:
            raise
        txn.execute(_SQL_BY_NONCE, (new.sender, new.nonce))
        row = txn.fetchone()
        if row is None:
            raise
        return DUPLICATE, message_from_row(row)
    msg_id = txn.lastrowid
    written = wrote_key(new.sender, new.recipient) if conv is not None else None
    if written is not None and written not in known_convs and written not in fresh_convs:
        # A sender and recipient this store has not written yet (or forgot):
        # their rows, the sender's marked ``wrote``.
        txn.executemany(_SQL_CONVERSATION_ROW, conversation_rows(new.sender, new.recipient))
        fresh_convs.add(written)
    msg = Message(
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
        group_members=members,
    )
    return STORED, msg


def _write_batch(
    txn: Any,
    ops: list[tuple[str, Any]],
    known_users: set[str],
    known_convs: KnownConversations,
    fresh_convs: set[str],
) -> list[Any]:
    """Apply a batch of writes in one transaction; one result per op (the
    ``wrote_key``s whose ``conversations`` rows it wrote are added to
    ``fresh_convs``)."""
    results: list[Any] = []
    delivered: list[int] = []
    for kind, arg in ops:
        if kind == "message":
            results.append(_insert_message(txn, arg, known_users, known_convs, fresh_convs))
        elif kind == "delivered":
            delivered.extend(arg)
            results.append(None)
        elif kind == "group_delivered":
            results.append(None)  # below, the largest id per member
        else:  # "broadcast": (id, recipients)
            txn.execute(
                "UPDATE messages SET status = 'delivered', recipients = ? WHERE id = ?",
                (arg[1], arg[0]),
            )
            results.append(None)
    for start in range(0, len(delivered), _IN_CHUNK):
        chunk = delivered[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        txn.execute(
            "UPDATE messages SET status = 'delivered'"  # noqa: S608 (only "?" marks)
            f" WHERE status = 'pending' AND id IN ({marks})",
            chunk,
        )
    moves = cursor_moves(ops)
    if moves:
        txn.executemany(SQL_MOVE_CURSOR, moves)
    return results


# ----------------------------------------------------------------------------
# Keys, the key log, sign-out and deletion (protocol section 12): the SQL that
# the running store and wsserver-admin share.  Each function takes a cursor
# inside a transaction its caller opened (and commits).

_SQL_LOG = f"SELECT {KEYLOG_COLUMNS} FROM key_log WHERE user_id = ? ORDER BY seq"  # noqa: S608
_SQL_ADD_ENTRY = (
    f"INSERT INTO key_log (user_id, {KEYLOG_COLUMNS})"  # noqa: S608
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_KEYS = (
    "SELECT u.token_gen, k.public_key, k.name, k.added_ms FROM users u"
    " LEFT JOIN user_keys k ON k.user_id = u.user_id WHERE u.user_id = ? ORDER BY k.seq"
)


def _read_log(cur: Any, user_id: str) -> list[Entry]:
    cur.execute(_SQL_LOG, (user_id,))
    return [entry_from_row(row) for row in cur.fetchall()]


def _add_event(cur: Any, user_id: str, kind: str, detail: str, now_ms: int) -> None:
    """Record an account event (every node polls them: events.py)."""
    cur.execute(
        "INSERT INTO account_events (user_id, kind, detail, created_ms) VALUES (?, ?, ?, ?)",
        (user_id, kind, detail, now_ms),
    )


def _add_entry(cur: Any, user_id: str, entry: Entry, now_ms: int) -> None:
    """Insert a checked key-log entry and bring the active keys in step: an
    added key joins them; a revoked one leaves them (the user's public_key
    becomes the first key still active) and an EVENT_KEY_REVOKED is recorded
    (created ``now_ms``, the store's clock).  An entry whose seq is taken fails
    ``KeyLogError('keylog_conflict')``, an added key already active
    ``key_exists``, a revoked key not active ``invalid_request`` (whatever
    the check let through: the caller's transaction is then rolled back)."""
    try:
        cur.execute(_SQL_ADD_ENTRY, entry_row(user_id, entry))
    except sqlite3.IntegrityError:
        raise KeyLogError(
            "keylog_conflict", "another entry took this seq: fetch the log and sign again"
        ) from None
    if entry.action in (REGISTER, ADD):
        try:
            cur.execute(
                "INSERT INTO user_keys (user_id, public_key, seq, name, added_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (user_id, entry.public_key, entry.seq, entry.name, entry.at_ms),
            )
        except sqlite3.IntegrityError:
            raise KeyLogError("key_exists", "this key is already an active key") from None
    elif entry.action == REVOKE:
        cur.execute(
            "DELETE FROM user_keys WHERE user_id = ? AND public_key = ?",
            (user_id, entry.public_key),
        )
        if cur.rowcount != 1:
            raise KeyLogError("invalid_request", "the key to revoke is not an active key")
        cur.execute(
            "UPDATE users SET public_key = (SELECT public_key FROM user_keys"
            "  WHERE user_id = ? ORDER BY seq LIMIT 1)"
            " WHERE user_id = ? AND EXISTS (SELECT 1 FROM user_keys WHERE user_id = ?)",
            (user_id, user_id, user_id),
        )
        _add_event(cur, user_id, EVENT_KEY_REVOKED, entry.key_id, now_ms)


def _remove_account(cur: Any, user_id: str, now_ms: int) -> None:
    """Everything of a deletion but the messages, in the caller's transaction:
    the user, keys, key log, challenges and signed-out tokens go, the id stays
    as a tombstone (``purged`` 0 until the messages are gone too), and an
    EVENT_DELETED carries the stream head (each node deletes what it stored
    for the user after it)."""
    cur.execute("SELECT COALESCE(MAX(id), 0) FROM messages")
    head = cur.fetchone()[0]
    cur.execute(
        "INSERT OR IGNORE INTO deleted_users (user_id, deleted_ms) VALUES (?, ?)",
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
        cur.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))  # noqa: S608
    _forget_conversations(cur, user_id)
    leave_all_groups(cur, user_id, _stream_head(cur), now_ms, _same, _add_event)
    _add_event(cur, user_id, EVENT_DELETED, str(head), now_ms)


def _forget_conversations(cur: Any, user_id: str) -> None:
    """Delete the user's ``conversations`` rows, both ways: the peers' rows
    are found through the user's own (written together), by primary key."""
    cur.execute(
        "DELETE FROM conversations WHERE peer = ? AND user_id IN"
        " (SELECT peer FROM conversations WHERE user_id = ?)",
        (user_id, user_id),
    )
    cur.execute("DELETE FROM conversations WHERE user_id = ?", (user_id,))


def _same(sql: str) -> str:
    return sql


def _stream_head(cur: Any) -> int:
    """The largest id ever handed to a message (AUTOINCREMENT's counter: ids
    are never reused, even after the newest was deleted)."""
    cur.execute("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)")
    return int(cur.fetchone()[0])


# A page of a deletion's message phase looks at one slice of ids: the next
# DELETE_SLICE ids from the first stored above the last page's.  The messages
# the user sent are found by reading that slice by primary key (there is no
# index on sender: it would slow every insert), those sent to them through
# messages_recipient; so each page's transaction is short however large the
# table, and a whole deletion reads the table once, a slice at a time.
_SQL_NEXT_ID = "SELECT MIN(id) FROM messages WHERE id > ?"


def _sql_page_of(users: int) -> str:
    """The page query for ``users`` users (arguments: first, last, the
    users, the users again, first, last, the page's size)."""
    marks = ",".join("?" * users)
    return (
        f"SELECT id FROM messages WHERE id >= ? AND id <= ? AND sender IN ({marks})"  # noqa: S608
        f" UNION SELECT id FROM messages WHERE recipient IN ({marks}) AND id >= ? AND id <= ?"
        " ORDER BY id LIMIT ?"
    )


_SQL_PAGE_OF = _sql_page_of(1)  # one user's (what the plan test reads)


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
            marks = ",".join("?" * len(user_ids))
            cur.execute(
                f"UPDATE deleted_users SET purged = 1 WHERE user_id IN ({marks})",  # noqa: S608
                list(user_ids),
            )
        return 0, None
    last = first + DELETE_SLICE - 1
    users = list(user_ids)
    cur.execute(_sql_page_of(len(users)), (first, last, *users, *users, first, last, DELETE_PAGE))
    ids = [row[0] for row in cur.fetchall()]
    if len(ids) == DELETE_PAGE:
        last = ids[-1]  # the page is full: the next one goes on from its last id
    return (_delete_ids(cur, ids) if ids else 0), last


def _unpurged(cur: Any, after: str, limit: int) -> list[str]:
    """Up to ``limit`` deleted users whose messages may not all be gone yet,
    with ids > ``after``, by id."""
    cur.execute(
        "SELECT user_id FROM deleted_users WHERE purged = 0 AND user_id > ?"
        " ORDER BY user_id LIMIT ?",
        (after, limit),
    )
    return [row[0] for row in cur.fetchall()]


@implementer(IStore)
class Store(Groups, Reads, Purges, History, BatchedWrites):
    """Asynchronous access to the SQLite database, with group commit."""

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        max_batch: int = 1024,
    ) -> None:
        self.path = path
        self._clock = clock
        self._pool = _one_thread_pool(path)  # the only writer
        # Checkpoints copy the WAL into the database file and fsync it: a few
        # milliseconds that would stall every commit behind them, so they run
        # on a connection and thread of their own (see start()).
        self._checkpoints = _one_thread_pool(path)
        self._checkpoint_loop = LoopingCall(self._checkpoint)
        self._checkpoint_loop.clock = clock
        self._checkpointing = False
        self._init_purges(clock)
        self.max_log_entries = MAX_LOG_ENTRIES  # a test may lower it
        self._known_users: set[str] = set()  # used only in the pool's thread
        self._known_convs = KnownConversations()  # added to once a batch committed
        self._commits = GroupCommit(clock, self._write, max_batch)

    @property
    def _closed(self) -> bool:
        return self._commits.closed

    def _write(self, ops: list[tuple[str, Any]]) -> defer.Deferred:
        fresh: set[str] = set()
        known = self._known_users, self._known_convs
        d = self._pool.runInteraction(_write_batch, ops, *known, fresh)
        return d.addCallback(self._known_convs.remember_after, fresh)

    def _run(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred:
        return self._pool.runInteraction(interaction, *args)

    def _purge_page(self, user_ids: list[str], after: int, finish: bool) -> defer.Deferred:
        return self._run(_delete_page_of, user_ids, after, finish)

    def _unpurged_users(self, after: str, limit: int) -> defer.Deferred:
        return self._run(_unpurged, after, limit)

    def _lock_stream(self, txn: Any) -> int:
        txn.execute("BEGIN IMMEDIATE")  # the file's write lock, as a batch takes
        return _stream_head(txn)

    def _record_event(self, cur: Any, user_id: str, kind: str, detail: str, now_ms: int) -> None:
        _add_event(cur, user_id, kind, detail, now_ms)

    def start(
        self, checkpoint_interval: float = 1.0, *, purge_interval: float = PURGE_INTERVAL
    ) -> defer.Deferred:
        """Checkpoint the WAL every ``checkpoint_interval`` seconds off the write
        path, and finish deletions left unfinished now and every
        ``purge_interval`` seconds (``finish_deletions``).

        Until this is called SQLite checkpoints inside commits, as usual.
        """
        d = self._pool.runOperation("PRAGMA wal_autocheckpoint = 0")
        if not self._checkpoint_loop.running:
            self._checkpoint_loop.start(checkpoint_interval, now=False)
        self._start_purges(purge_interval)
        return d

    def _checkpoint(self) -> None:
        if self._checkpointing:
            return
        self._checkpointing = True
        d = self._checkpoints.runOperation("PRAGMA wal_checkpoint(PASSIVE)")
        d.addErrback(lambda f: _log.failure("WAL checkpoint failed", f))
        d.addBoth(lambda _: setattr(self, "_checkpointing", False))

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Refuse new writes, commit what is queued, close the pools."""
        if self._checkpoint_loop.running:
            self._checkpoint_loop.stop()
        yield self._stop_purges()
        yield self._commits.close()
        self._pool.close()
        self._checkpoints.close()
        release_file(self.path)

    # -- users ----------------------------------------------------------------

    def add_user(self, user: User) -> defer.Deferred:
        """Insert a user and entry 0 of their key log; fires True, or False
        when the user_id is taken (or was deleted)."""

        def interaction(txn: Any) -> bool:
            # One statement, so the tombstone check and the insert are atomic
            # (a deleted id stays taken for good, also against a deletion
            # committed between a separate check and the insert).
            try:
                txn.execute(
                    "INSERT INTO users (user_id, username, public_key, created_ms)"
                    " SELECT ?, ?, ?, ? WHERE NOT EXISTS"
                    " (SELECT 1 FROM deleted_users WHERE user_id = ?)",
                    (user.user_id, user.username, user.public_key, user.created_ms, user.user_id),
                )
            except sqlite3.IntegrityError:
                return False
            if txn.rowcount != 1:
                return False
            # In the same transaction (adbapi commits after the interaction).
            entry = Entry(0, REGISTER, user.public_key, at_ms=user.created_ms)
            _add_entry(txn, user.user_id, entry, user.created_ms)
            return True

        return self._pool.runInteraction(interaction)

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

        return self._pool.runInteraction(interaction)

    def key_log(self, user_id: str) -> defer.Deferred:
        """Fire with the user's key log, oldest first, or None when no such
        user (every user has entry 0; a deleted one has no log)."""

        def interaction(txn: Any) -> list[Entry] | None:
            return _read_log(txn, user_id) or None

        return self._pool.runInteraction(interaction)

    def append_key_entry(
        self, user_id: str, entry: Entry, check: Callable[[list[Entry]], None]
    ) -> defer.Deferred:
        """Append ``entry`` to the user's key log after ``check(entries)`` passed
        on the log as it stands, in one IMMEDIATE transaction (the write lock
        of the file: no other process appends in between).  ``at_ms`` is the
        entry's own when set, else now.  Fires with the stored entry, or None
        when no such user; fails with ``check``'s ``KeyLogError`` (nothing
        written)."""
        now_ms = self._now_ms()
        stored = entry if entry.at_ms else replace(entry, at_ms=now_ms)
        max_entries = self.max_log_entries

        def interaction(txn: Any) -> Entry | None:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,))
            if txn.fetchone() is None:
                return None
            entries = _read_log(txn, user_id)
            refuse_when_full(entries, stored, max_entries)
            check(entries)
            if stored.seq != len(entries):  # whatever check let through
                raise KeyLogError("keylog_conflict", f"seq must be {len(entries)}, the next one")
            _add_entry(txn, user_id, stored, now_ms)
            return stored

        return self._pool.runInteraction(interaction)

    def delete_account(
        self, user_id: str, now_ms: int, check: Callable[[list[Entry]], None]
    ) -> defer.Deferred:
        """Delete the user as protocol section 12 says, once ``check(entries)``
        passed on their key log (see ``IStore``).  Fires True, or None when
        no such user."""

        def interaction(txn: Any) -> bool:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,))
            if txn.fetchone() is None:
                return False
            check(_read_log(txn, user_id))
            _remove_account(txn, user_id, now_ms)
            self._known_users.discard(user_id)  # the pool's thread owns the set
            return True

        return self._delete_account(interaction, user_id)

    def revoke_token(self, user_id: str, jti: str, expires_ms: int, now_ms: int) -> defer.Deferred:
        """Remember a signed-out token until it expires (forgetting those
        expired) and record an EVENT_SIGNED_OUT; a repeat changes nothing.
        Fires True, or False when no such user (nothing stored)."""

        def interaction(txn: Any) -> bool:
            txn.execute("BEGIN IMMEDIATE")
            txn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,))
            if txn.fetchone() is None:
                return False  # deleted (or never was): nothing to sign out
            txn.execute("DELETE FROM revoked_tokens WHERE expires_ms <= ?", (now_ms,))
            txn.execute(
                "INSERT OR IGNORE INTO revoked_tokens (jti, user_id, expires_ms) VALUES (?, ?, ?)",
                (jti, user_id, expires_ms),
            )
            if txn.rowcount == 1:
                _add_event(txn, user_id, EVENT_SIGNED_OUT, jti, now_ms)
            return True

        return self._pool.runInteraction(interaction)

    def revoke_tokens(self, user_id: str, now_ms: int) -> defer.Deferred:
        """Raise the user's token generation and record an
        EVENT_SIGNED_OUT_ALL; fire with the new generation, or None when no
        such user."""

        def interaction(txn: Any) -> int | None:
            txn.execute("UPDATE users SET token_gen = token_gen + 1 WHERE user_id = ?", (user_id,))
            if txn.rowcount != 1:
                return None
            txn.execute("SELECT token_gen FROM users WHERE user_id = ?", (user_id,))
            gen = int(txn.fetchone()[0])
            _add_event(txn, user_id, EVENT_SIGNED_OUT_ALL, str(gen), now_ms)
            return gen

        return self._pool.runInteraction(interaction)

    def revoked_tokens(self, now_ms: int) -> defer.Deferred:
        """Fire with the set of signed-out jtis not yet expired (the expired
        ones are forgotten)."""

        def interaction(txn: Any) -> set[str]:
            txn.execute("DELETE FROM revoked_tokens WHERE expires_ms <= ?", (now_ms,))
            txn.execute("SELECT jti FROM revoked_tokens")
            return {row[0] for row in txn.fetchall()}

        return self._pool.runInteraction(interaction)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def get_user(self, user_id: str) -> defer.Deferred:
        """Fire with the ``User`` or None."""

        def interaction(txn: Any) -> User | None:
            txn.execute(
                "SELECT user_id, username, public_key, created_ms FROM users WHERE user_id = ?",
                (user_id,),
            )
            row = txn.fetchone()
            return User(row[0], row[1], bytes(row[2]), row[3]) if row else None

        return self._pool.runInteraction(interaction)

    # -- login challenges -------------------------------------------------------

    def add_challenge(
        self, user_id: str, challenge: str, now_ms: int, expires_ms: int
    ) -> defer.Deferred:
        """Keep a new challenge; forget expired ones and all but the newest five."""

        def interaction(txn: Any) -> None:
            txn.execute("DELETE FROM challenges WHERE expires_ms <= ?", (now_ms,))
            txn.execute(
                "INSERT INTO challenges (challenge, user_id, expires_ms) VALUES (?, ?, ?)",
                (challenge, user_id, expires_ms),
            )
            txn.execute(
                "DELETE FROM challenges WHERE user_id = ? AND rowid NOT IN"
                " (SELECT rowid FROM challenges WHERE user_id = ?"
                "  ORDER BY rowid DESC LIMIT ?)",
                (user_id, user_id, MAX_LIVE_CHALLENGES),
            )

        return self._pool.runInteraction(interaction)

    def consume_challenge(
        self,
        user_id: str,
        challenge: str | None,
        now_ms: int,
        check: Callable[[str], bool],
    ) -> defer.Deferred:
        """Try ``check`` on the user's live challenges, newest first.

        Every challenge tried is deleted (consumed), up to and including the
        one that passes.  Fires ``CHALLENGE_OK``, ``CHALLENGE_BAD`` (tried,
        none passed) or ``CHALLENGE_NONE`` (nothing live to try).  A challenge
        another process consumed first is not counted as tried.
        """

        def interaction(txn: Any) -> str:
            sql = "SELECT challenge FROM challenges WHERE user_id = ? AND expires_ms > ?"
            args: tuple[Any, ...] = (user_id, now_ms)
            if challenge is not None:
                sql += " AND challenge = ?"
                args += (challenge,)
            txn.execute(sql + " ORDER BY rowid DESC", args)
            live = [row[0] for row in txn.fetchall()]
            tried = False
            for candidate in live:
                txn.execute("DELETE FROM challenges WHERE challenge = ?", (candidate,))
                if txn.rowcount != 1:
                    continue
                tried = True
                if check(candidate):
                    return CHALLENGE_OK
            return CHALLENGE_BAD if tried else CHALLENGE_NONE

        return self._pool.runInteraction(interaction)

    # -- delivery ---------------------------------------------------------------

    def replay_page(
        self, user_id: str, since: int | None, after: int, limit: int
    ) -> defer.Deferred:
        """Up to ``limit`` messages for ``user_id`` with id > ``after``, by id.

        Without ``since``: the user's pending direct messages.  With it: those
        too, plus every direct message to the user and every broadcast with an
        id above ``since`` (protocol section 6).
        """

        def interaction(txn: Any) -> list[Message]:
            if since is None:
                txn.execute(_SQL_PENDING, (user_id, after, limit))
            else:
                txn.execute(*since_query(user_id, since, after, limit))
            direct = [message_from_row(row) for row in txn.fetchall()]
            rows = group_page(self._query(txn), _COLS, user_id, since, after, limit)
            grouped = [message_from_row(row) for row in rows]
            return merge_pages(direct, grouped, limit)

        return self._pool.runInteraction(interaction)

    def get_message(self, msg_id: int) -> defer.Deferred:
        """Fire with the stored ``Message`` or None (for tests and tools)."""

        def interaction(txn: Any) -> Message | None:
            txn.execute(_SQL_BY_ID, (msg_id,))
            row = txn.fetchone()
            return message_from_row(row) if row else None

        return self._pool.runInteraction(interaction)

    def messages_between(self, after: int, upto: int, limit: int) -> defer.Deferred:
        """Up to ``limit`` messages with ``after < id <= upto``, by id (see ``IStore``)."""

        def interaction(txn: Any) -> list[Message]:
            txn.execute(_SQL_BETWEEN, (after, upto, limit))
            page = [message_from_row(row) for row in txn.fetchall()]
            return with_members(page, self._query(txn))

        return self._pool.runInteraction(interaction)

    def stream_head(self) -> defer.Deferred:
        """Fire with the largest committed message id (0 when none)."""

        def interaction(txn: Any) -> int:
            txn.execute("SELECT COALESCE(MAX(id), 0) FROM messages")
            return int(txn.fetchone()[0])

        return self._pool.runInteraction(interaction)

    def jwt_secret(self) -> defer.Deferred:
        """Fire with the JWT secret kept in the database, or None."""

        def interaction(txn: Any) -> bytes | None:
            txn.execute("SELECT value FROM meta WHERE key = 'jwt_secret'")
            row = txn.fetchone()
            return bytes(row[0]) if row else None

        return self._pool.runInteraction(interaction)

    def count_messages(self) -> defer.Deferred:
        """Fire with the number of stored messages."""

        def interaction(txn: Any) -> int:
            txn.execute("SELECT COUNT(*) FROM messages")
            return txn.fetchone()[0]

        return self._pool.runInteraction(interaction)

    # -- retention and account events (wsserver/retention.py, events.py) --------

    def expire_batch(self, status: str, before_ms: int, from_ms: int, limit: int) -> defer.Deferred:
        """Delete up to ``limit`` messages of ``status`` created before
        ``before_ms`` (and not before ``from_ms``, where the last batch ended),
        oldest first, in one short transaction on the writer's thread: a
        group commit waits for at most one such batch.  Fires with (rows
        deleted, created_ms of the newest deleted or None)."""

        def interaction(txn: Any) -> tuple[int, int | None]:
            txn.execute(
                "SELECT id, created_ms FROM messages WHERE created_ms >= ? AND created_ms < ?"
                " AND status = ? ORDER BY created_ms LIMIT ?",
                (from_ms, before_ms, status, limit),
            )
            rows = txn.fetchall()
            if not rows:
                return 0, None
            # Another process may have deleted some of them since the SELECT:
            # count what this one deleted.
            return _delete_ids(txn, [row[0] for row in rows]), rows[-1][1]

        return self._pool.runInteraction(interaction)

    def reclaim_space(self, pages: int) -> defer.Deferred:
        """Give up to ``pages`` free pages back to the file system
        (``PRAGMA incremental_vacuum``; nothing on a database whose
        ``auto_vacuum`` is not INCREMENTAL).  Fires with how many went back."""

        def interaction(txn: Any) -> int:
            txn.execute("PRAGMA freelist_count")
            before = int(txn.fetchone()[0])
            # executescript steps the pragma to its end (execute would step it
            # once: one page); it is a transaction of its own.
            txn.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
            txn.execute("PRAGMA freelist_count")
            return before - int(txn.fetchone()[0])

        return self._pool.runInteraction(interaction)

    def prune_account_events(self, before_ms: int) -> defer.Deferred:
        """Forget account events created before ``before_ms``."""
        return self._pool.runOperation(
            "DELETE FROM account_events WHERE created_ms < ?", (before_ms,)
        )

    def last_account_event(self) -> defer.Deferred:
        """Fire with the id of the newest account event (0 when none)."""

        def interaction(txn: Any) -> int:
            txn.execute("SELECT COALESCE(MAX(id), 0) FROM account_events")
            return int(txn.fetchone()[0])

        return self._pool.runInteraction(interaction)

    def account_events(self, after_id: int, limit: int) -> defer.Deferred:
        """Fire with up to ``limit`` account events with id > ``after_id``, by
        id, as (id, user_id, kind, detail)."""

        def interaction(txn: Any) -> list[tuple[int, str, str, str | None]]:
            txn.execute(
                "SELECT id, user_id, kind, detail FROM account_events WHERE id > ?"
                " ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            return [tuple(row) for row in txn.fetchall()]

        return self._pool.runInteraction(interaction)

    def forget_user(self, user_id: str) -> defer.Deferred:
        """Drop ``user_id`` from the cache of known recipients (it was deleted):
        messages to it are refused ``unknown_recipient`` from now on."""

        def interaction(txn: Any) -> None:
            self._known_users.discard(user_id)

        return self._pool.runInteraction(interaction)


def _delete_ids(txn: Any, ids: list[int]) -> int:
    """Delete these messages; return how many were still there."""
    deleted = 0
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        txn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)  # noqa: S608
        deleted += txn.rowcount
    return deleted


# ----------------------------------------------------------------------------
# For wsserver-admin: synchronous, on a connection of its own, beside a
# running server (WAL: its reads never block the server's writer; each write
# is a short IMMEDIATE transaction).


def admin_connect(path: str) -> sqlite3.Connection:
    """A connection for ``wsserver-admin`` to an existing, up-to-date database."""
    if not os.path.exists(path):
        raise DatabaseError(f"DATABASE: {path} does not exist")
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.isolation_level = None
        current, newest = schema_version(conn), migrations()[-1][0]
    except sqlite3.Error as exc:
        raise DatabaseError(f"DATABASE: cannot open {path}: {exc}") from None
    if current != newest:
        conn.close()
        raise DatabaseError(
            f"DATABASE: {path} has schema version {current}, this wsserver-admin needs"
            f" {newest}: start the server (of this version) on it once to upgrade it"
        )
    return conn


def admin_users(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """Every user as (user_id, username, created_ms), by user_id."""
    return [
        tuple(row)
        for row in conn.execute(
            "SELECT user_id, username, created_ms FROM users ORDER BY user_id"
        ).fetchall()
    ]


def admin_delete_user(conn: sqlite3.Connection, user_id: str, now_ms: int) -> int | None:
    """Delete ``user_id`` as protocol section 12 says; return how many messages
    went, or None when there is no such user.

    One transaction removes the user, their keys, key log, challenges and
    signed-out tokens, keeps the id as a tombstone and records a "deleted"
    account event (every node polls them: the user's connections close with
    4003, and each node deletes whatever it stored for them after this
    point): ``_remove_account``, as ``Store.delete_account``.  The user's
    messages then go in chunks, each its own short transaction, so a running
    server's commits never wait long.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
            deleted = conn.execute(
                "SELECT 1 FROM deleted_users WHERE user_id = ?", (user_id,)
            ).fetchone()
            conn.execute("ROLLBACK")
            if deleted is None:
                return None
            # Deleted before, perhaps by a run that failed half-way: finish.
            return _delete_messages_of(conn, user_id)
        _remove_account(conn.cursor(), user_id, now_ms)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return _delete_messages_of(conn, user_id)


def _delete_messages_of(conn: sqlite3.Connection, user_id: str) -> int:
    """Delete every message from or to ``user_id``, a page per short
    transaction, and mark the tombstone purged with the last (empty) page."""
    removed, after = 0, 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted, last = _delete_page_of(conn.cursor(), [user_id], after, True)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if last is None:
            return removed
        removed += deleted
        after = last


def admin_stats(conn: sqlite3.Connection, path: str) -> dict[str, int]:
    """Users, deleted users, messages pending / delivered, and the bytes the
    database takes (the file and its WAL)."""
    users = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
    deleted = conn.execute("SELECT COUNT(*) FROM deleted_users").fetchone()[0]
    counts = dict(conn.execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall())
    size = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            size += os.path.getsize(path + suffix)
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    return {
        "users": users,
        "deleted_users": deleted,
        "messages_pending": counts.get("pending", 0),
        "messages_delivered": counts.get("delivered", 0),
        "database_bytes": size,
        "free_bytes": free * page,
    }


def add_delivered_messages(path: str, count: int, created_ms: int, content: str) -> None:
    """Store ``count`` delivered messages created at ``created_ms`` (between two
    users that need not exist), in large transactions: what ``wsserver-bench
    latency --expire N`` gives retention to delete.  Not for a live database."""
    conn = sqlite3.connect(path)
    try:
        step = 50_000
        for start in range(0, count, step):
            rows = [
                ("old-a", "old-b", content, created_ms) for _ in range(min(step, count - start))
            ]
            conn.executemany(
                "INSERT INTO messages (sender, recipient, content, verification, status,"
                " created_ms) VALUES (?, ?, ?, 'unsigned', 'delivered', ?)",
                rows,
            )
            conn.commit()
    finally:
        conn.close()


def backup(path: str, target: str) -> None:
    """Copy the database at ``path`` to a new file ``target`` (0600) with
    SQLite's online backup API, consistent while a server writes to it, and
    check the copy (``PRAGMA integrity_check``).  Raises ``DatabaseError``."""
    if not os.path.exists(path):
        raise DatabaseError(f"DATABASE: {path} does not exist")
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OWNER_ONLY)
    except OSError as exc:
        raise DatabaseError(f"cannot create {target}: {exc.strerror}") from None
    os.fchmod(fd, OWNER_ONLY)
    os.close(fd)
    try:
        source = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            copy = sqlite3.connect(target)
            try:
                # In one step (pages=-1): one read snapshot, which in WAL mode
                # never blocks the server's writer, where a copy in steps would
                # restart each time another process writes.
                source.backup(copy, pages=-1)
                copy.execute("PRAGMA journal_mode = DELETE")
                verdict = copy.execute("PRAGMA integrity_check").fetchall()
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        _remove_quietly(target)
        raise DatabaseError(f"backup failed: {exc}") from None
    if verdict != [("ok",)]:
        _remove_quietly(target)
        raise DatabaseError(
            f"backup failed: the copy does not pass integrity_check: {verdict[0][0]}"
        )


def _remove_quietly(path: str) -> None:
    for suffix in _COMPANIONS:
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


__all__ = ["Store", "migrations", "prepare_database", "schema_version", "upgrade"]
