"""Groups (protocol section 13), shared by both engines.

A group message is stored once (``recipient`` = the group id, ``conv``
NULL).  Each member has a row in ``group_members``: a window on the group's
messages by id (``joined_id`` < id, and id <= ``removed_id`` once removed)
and a delivery cursor ``delivered_id`` (every group message up to it was
handed to one of their connections; the ones above it are pending for them).
There are no per-member rows per message (docs/architecture.md, model K).

Membership changes take the same lock as message batches (SQLite: the
file's write lock; PostgreSQL: ``stream_head`` ``FOR UPDATE``), so the
stream head a change records (``joined_id``, ``removed_id``) splits the
messages exactly: a message the batch stored before is below it, one after
above.  Each change is also an account event of kind ``EVENT_GROUP`` (the
``group`` frames every node sends; wsserver/events.py ``GroupEvents``).

``Groups`` is mixed into each engine's store.  The engine provides
``_run(interaction, *args)``, ``_sql(text)`` (the engine's placeholders for
``?``), ``_lock_stream(txn)`` (take the lock above, return the stream head)
and ``_record_event(txn, user_id, kind, detail, now_ms)``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

MAX_MEMBERS = 256
MAX_GROUPS_PER_USER = 100  # groups a user can be in at once (too_many_groups)
MAX_SETTLED_TOLD = 256  # settled messages a removal's event names (the newest)
EVENT_GROUP = "group"  # account event kind: detail is the JSON of ``event_detail``
ADDED = "added"
REMOVED = "removed"


class GroupError(Exception):
    """A refused group change: ``code`` is a stable error code (web.py maps it
    to a status), ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Group:
    """A group as ``GET /groups/{id}`` shows it: its current members, the
    owner first, then in the order they were (last) added."""

    group_id: str
    name: str
    owner: str
    members: tuple[str, ...]
    created_ms: int


def event_detail(
    group_id: str,
    event: str,
    subject: str | None,
    to: Sequence[str],
    ms: int,
    settled: Sequence[tuple[int, str, int]] = (),
) -> str:
    """The detail of an ``EVENT_GROUP`` account event: the group, the event
    (``added``/``removed``), the member it is about (None: each recipient is
    told about themself, as at creation), who is told, when, and a random
    tag (a node sees its own event twice: applied at once, then polled).
    A removal also names the group messages it settled (``s``: id, sender,
    recipients each), whose senders are told they are delivered."""
    detail: dict[str, Any] = {
        "g": group_id,
        "e": event,
        "u": subject,
        "to": list(to),
        "ms": ms,
        "n": secrets.token_hex(8),
    }
    if settled:
        detail["s"] = [list(item) for item in settled]
    return json.dumps(detail, separators=(",", ":"))


# SQL shared by the engines, written with "?" marks (``_sql`` gives the
# engine's).  Every value is a parameter.
_SQL_GROUP = "SELECT group_id, name, owner, created_ms FROM chat_groups WHERE group_id = ?"
_SQL_MEMBERS = (
    "SELECT g.user_id FROM group_members g JOIN chat_groups c ON c.group_id = g.group_id"
    " WHERE g.group_id = ? AND g.removed_id IS NULL"
    " ORDER BY CASE WHEN g.user_id = c.owner THEN 0 ELSE 1 END, g.added_ms, g.user_id"
)
_SQL_USER_GROUPS = (
    "SELECT group_id FROM group_members WHERE user_id = ? AND removed_id IS NULL ORDER BY group_id"
)
# GET /groups: the caller's groups, then the members of all of them in one query.
_SQL_USER_GROUP_ROWS = (
    "SELECT c.group_id, c.name, c.owner, c.created_ms FROM group_members g"
    " JOIN chat_groups c ON c.group_id = g.group_id"
    " WHERE g.user_id = ? AND g.removed_id IS NULL ORDER BY c.group_id"
)
_SQL_USER_GROUP_MEMBERS = (
    "SELECT g.group_id, g.user_id FROM group_members mine"
    " JOIN group_members g ON g.group_id = mine.group_id"
    " JOIN chat_groups c ON c.group_id = g.group_id"
    " WHERE mine.user_id = ? AND mine.removed_id IS NULL AND g.removed_id IS NULL"
    " ORDER BY g.group_id, CASE WHEN g.user_id = c.owner THEN 0 ELSE 1 END, g.added_ms, g.user_id"
)
# Which of the given users are in MAX_GROUPS_PER_USER groups already ({}: their marks).
_SQL_FULL_USERS = (
    "SELECT user_id FROM group_members WHERE user_id IN ({}) AND removed_id IS NULL"
    " GROUP BY user_id HAVING COUNT(*) >= ?"
)
# The group's last order key: an add takes a larger one (``added_ms``, the time
# of adding, made unique within the group so that it orders the members).
_SQL_LAST_ADDED = "SELECT MAX(added_ms) FROM group_members WHERE group_id = ?"
_SQL_ROW = "SELECT removed_id FROM group_members WHERE group_id = ? AND user_id = ?"
_SQL_ROW_CURSOR = (
    "SELECT joined_id, delivered_id FROM group_members"
    " WHERE group_id = ? AND user_id = ? AND removed_id IS NULL"
)
_SQL_ADD_MEMBER = (
    "INSERT INTO group_members (group_id, user_id, joined_id, removed_id, delivered_id, added_ms)"
    " VALUES (?, ?, ?, NULL, ?, ?)"
)
_SQL_READD = (
    "UPDATE group_members SET joined_id = ?, removed_id = NULL, delivered_id = ?, added_ms = ?"
    " WHERE group_id = ? AND user_id = ?"
)
_SQL_REMOVE = (
    "UPDATE group_members SET removed_id = ? WHERE group_id = ? AND user_id = ?"
    " AND removed_id IS NULL"
)
# A removal settles what only the removed member was still waiting for: the
# group's pending messages inside their window above their cursor that no
# other member still in the group (but the sender) has to receive.
_SETTLE_WHERE = (
    " WHERE recipient = ? AND status = 'pending'"
    " AND id > ? AND id <= ? AND NOT EXISTS (SELECT 1 FROM group_members g"
    " WHERE g.group_id = messages.recipient AND g.removed_id IS NULL"
    " AND g.user_id <> messages.sender AND g.joined_id < messages.id"
    " AND g.delivered_id < messages.id)"
)
_SQL_SETTLE_REMOVED = "UPDATE messages SET status = 'delivered'" + _SETTLE_WHERE  # noqa: S608
# The newest of those (read before the update), with their recipients: the
# members but the sender whose window holds it and whose cursor passed it.
_SQL_SETTLED = (
    "SELECT id, sender, (SELECT COUNT(*) FROM group_members r"  # noqa: S608
    " WHERE r.group_id = messages.recipient AND r.user_id <> messages.sender"
    " AND r.joined_id < messages.id AND (r.removed_id IS NULL OR r.removed_id >= messages.id)"
    " AND r.delivered_id >= messages.id) FROM messages"
    + _SETTLE_WHERE
    + " ORDER BY id DESC LIMIT ?"
)
_SQL_LOCK_GROUP = "UPDATE chat_groups SET owner = owner WHERE group_id = ?"
_SQL_STATUS = (
    "SELECT COALESCE(SUM(CASE WHEN delivered_id >= ? THEN 1 ELSE 0 END), 0),"
    " COALESCE(SUM(CASE WHEN delivered_id < ? AND removed_id IS NULL THEN 1 ELSE 0 END), 0)"
    " FROM group_members WHERE group_id = ? AND user_id <> ? AND joined_id < ?"
    " AND (removed_id IS NULL OR removed_id >= ?)"
)


Sql = Callable[[str], str]  # "?" marks to the engine's
Record = Callable[[Any, str, str, str, int], None]  # (cursor, user_id, kind, detail, now_ms)


def _runner(cur: Any, sql: Sql) -> Callable[[str, tuple], list[tuple]]:
    def run(text: str, args: tuple) -> list[tuple]:
        cur.execute(sql(text), args)
        return [tuple(row) for row in cur.fetchall()]

    return run


def remove_member(
    cur: Any, group: Group, user_id: str, head: int, now_ms: int, sql: Sql, record: Record
) -> str:
    """End ``user_id``'s window at ``head``, pass ownership on if it was
    theirs (to the member added first among those left), record the
    ``removed`` event (to every member and them); return its detail.  The
    group's messages they alone were still waiting for become delivered
    (section 15: a member removed before receiving it no longer counts); the
    event names the newest ``MAX_SETTLED_TOLD`` of them for their senders."""
    # The group's row, locked to the commit (PostgreSQL; a no-op write on
    # SQLite, whose write lock is held already): ``group_status`` takes it
    # shared, so a node counting after its cursor moves either counts after
    # this removal or this removal reads after that count's cursors.
    cur.execute(sql(_SQL_LOCK_GROUP), (group.group_id,))
    cur.execute(sql(_SQL_ROW_CURSOR), (group.group_id, user_id))
    row = cur.fetchone()
    cur.execute(sql(_SQL_REMOVE), (head, group.group_id, user_id))
    settled: list[tuple[int, str, int]] = []
    if row is not None:
        floor = max(int(row[0]), int(row[1]))
        if floor < head:
            window = (group.group_id, floor, head)
            cur.execute(sql(_SQL_SETTLED), (*window, MAX_SETTLED_TOLD))
            settled = [(int(i), str(s), int(n)) for i, s, n in cur.fetchall()]
            cur.execute(sql(_SQL_SETTLE_REMOVED), window)
    if group.owner == user_id:
        left = [m for m in group.members[1:] if m != user_id]
        if left:
            cur.execute(
                sql("UPDATE chat_groups SET owner = ? WHERE group_id = ?"),
                (left[0], group.group_id),
            )
    detail = event_detail(group.group_id, REMOVED, user_id, group.members, now_ms, settled)
    record(cur, user_id, EVENT_GROUP, detail, now_ms)
    return detail


def leave_all_groups(
    cur: Any, user_id: str, head: int, now_ms: int, sql: Sql, record: Record
) -> None:
    """A deleted account leaves every group it is in, as if it left each
    itself (in the deletion's transaction; ``head``: the stream head under
    the stream lock)."""
    run = _runner(cur, sql)
    for (group_id,) in run(_SQL_USER_GROUPS, (user_id,)):
        group = _read_group(run, group_id)
        if group is not None:
            remove_member(cur, group, user_id, head, now_ms, sql, record)


def _read_group(run: Callable[[str, tuple], list[tuple]], group_id: str) -> Group | None:
    rows = run(_SQL_GROUP, (group_id,))
    if not rows:
        return None
    members = tuple(row[0] for row in run(_SQL_MEMBERS, (group_id,)))
    gid, name, owner, created_ms = rows[0]
    return Group(gid, name, owner, members, int(created_ms))


class Groups:
    """The group half of ``IStore`` (see the module's docstring)."""

    # What the engine provides.

    # Taken (group id) before ``group_status`` counts: PostgreSQL's shares the
    # group's row with other counts and waits for a removal's lock; None (SQLite)
    # for nothing, its one writer orders removals and cursor moves already.
    _SQL_SHARE_GROUP: str | None = None

    def _run(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text

    def _lock_stream(self, txn: Any) -> int:
        raise NotImplementedError

    def _record_event(self, cur: Any, user_id: str, kind: str, detail: str, now_ms: int) -> None:
        raise NotImplementedError

    # The shared part.

    def _query(self, txn: Any) -> Callable[[str, tuple], list[tuple]]:
        return _runner(txn, self._sql)

    def _missing_users(self, txn: Any, user_ids: Sequence[str]) -> list[str]:
        """The ids of ``user_ids`` that are no registered user, in order."""
        missing = []
        for user_id in user_ids:
            txn.execute(self._sql("SELECT 1 FROM users WHERE user_id = ?"), (user_id,))
            if txn.fetchone() is None:
                missing.append(user_id)
        return missing

    def _check_room(self, txn: Any, user_ids: Sequence[str]) -> None:
        """``GroupError('too_many_groups')`` naming the first of ``user_ids``
        already in ``MAX_GROUPS_PER_USER`` groups."""
        marks = ", ".join("?" * len(user_ids))
        full = {
            row[0]
            for row in self._query(txn)(
                _SQL_FULL_USERS.format(marks), (*user_ids, MAX_GROUPS_PER_USER)
            )
        }
        for user_id in user_ids:
            if user_id in full:
                raise GroupError(
                    "too_many_groups",
                    f"{user_id} is in {MAX_GROUPS_PER_USER} groups, the most a user can be in",
                )

    def create_group(
        self, group_id: str, name: str, owner: str, members: Sequence[str], now_ms: int
    ) -> defer.Deferred:
        """Create a group owned by ``owner`` with ``members`` (checked by the
        caller: valid, distinct, without the owner, at most ``MAX_MEMBERS`` - 1)
        and record an ``added`` event for each member; fire with ``(Group, detail)``.
        Fails ``GroupError``: ``group_exists`` (a group id once used stays
        taken), ``unknown_user`` naming the first id not registered (the owner
        included), ``too_many_groups`` naming the first already in
        ``MAX_GROUPS_PER_USER`` groups."""

        def interaction(txn: Any) -> tuple[Group, str]:
            head = self._lock_stream(txn)
            run = self._query(txn)
            if run(_SQL_GROUP, (group_id,)):
                raise GroupError("group_exists", f"group {group_id} already exists")
            everyone = [owner, *members]
            missing = self._missing_users(txn, everyone)
            if missing:
                raise GroupError("unknown_user", f"no such user: {missing[0]}")
            self._check_room(txn, everyone)
            txn.execute(
                self._sql(
                    "INSERT INTO chat_groups (group_id, name, owner, created_ms)"
                    " VALUES (?, ?, ?, ?)"
                ),
                (group_id, name, owner, now_ms),
            )
            for order, user_id in enumerate(everyone, now_ms):
                txn.execute(self._sql(_SQL_ADD_MEMBER), (group_id, user_id, head, head, order))
            detail = event_detail(group_id, ADDED, None, everyone, now_ms)
            self._record_event(txn, owner, EVENT_GROUP, detail, now_ms)
            group = _read_group(run, group_id)
            assert group is not None
            return group, detail

        return self._run(interaction)

    def get_group(self, group_id: str) -> defer.Deferred:
        """Fire with the ``Group`` (current members), or None when no such group."""

        def interaction(txn: Any) -> Group | None:
            return _read_group(self._query(txn), group_id)

        return self._run(interaction)

    def user_groups(self, user_id: str) -> defer.Deferred:
        """Fire with the ``Group`` of every group ``user_id`` is a member of now,
        by group id."""

        def interaction(txn: Any) -> list[Group]:
            run = self._query(txn)
            rows = run(_SQL_USER_GROUP_ROWS, (user_id,))
            if not rows:
                return []
            members: dict[str, list[str]] = {}
            for group_id, member in run(_SQL_USER_GROUP_MEMBERS, (user_id,)):
                members.setdefault(group_id, []).append(member)
            return [
                Group(gid, name, owner, tuple(members.get(gid, ())), int(created_ms))
                for gid, name, owner, created_ms in rows
            ]

        return self._run(interaction)

    def _member_group(self, txn: Any, group_id: str, by: str) -> Group:
        """The group as it stands, or ``GroupError('unknown_group')`` when there
        is none or ``by`` is not a member (its existence is not revealed)."""
        group = _read_group(self._query(txn), group_id)
        if group is None or by not in group.members:
            raise GroupError("unknown_group", f"no such group: {group_id}")
        return group

    def add_group_member(self, group_id: str, by: str, user_id: str, now_ms: int) -> Any:
        """``by`` (the owner) adds ``user_id``: a new window from the stream
        head now (a member removed before starts a new window; the old one is
        forgotten), an ``added`` event to every member, the new one included.
        Fires ``(Group, detail)``; fails ``GroupError``: ``unknown_group``,
        ``not_owner``, ``unknown_user``, ``already_member``, ``group_full``,
        ``too_many_groups``."""

        def interaction(txn: Any) -> tuple[Group, str]:
            head = self._lock_stream(txn)
            group = self._member_group(txn, group_id, by)
            if group.owner != by:
                raise GroupError("not_owner", "only the group's owner can add members")
            if user_id in group.members:
                raise GroupError("already_member", f"{user_id} is already a member")
            if self._missing_users(txn, [user_id]):
                raise GroupError("unknown_user", f"no such user: {user_id}")
            if len(group.members) >= MAX_MEMBERS:
                raise GroupError("group_full", f"a group has at most {MAX_MEMBERS} members")
            self._check_room(txn, [user_id])
            run = self._query(txn)
            last = run(_SQL_LAST_ADDED, (group_id,))[0][0]
            order = now_ms if last is None else max(now_ms, int(last) + 1)
            if run(_SQL_ROW, (group_id, user_id)):
                txn.execute(self._sql(_SQL_READD), (head, head, order, group_id, user_id))
            else:
                txn.execute(self._sql(_SQL_ADD_MEMBER), (group_id, user_id, head, head, order))
            after = _read_group(run, group_id)
            assert after is not None
            detail = event_detail(group_id, ADDED, user_id, after.members, now_ms)
            self._record_event(txn, user_id, EVENT_GROUP, detail, now_ms)
            return after, detail

        return self._run(interaction)

    def remove_group_member(self, group_id: str, by: str, user_id: str, now_ms: int) -> Any:
        """``by`` (the owner, or ``user_id`` themself: leaving) removes
        ``user_id``: their window ends at the stream head now, a ``removed``
        event goes to every member and to them.  An owner who leaves hands the
        group to the member added first among those left (none left: the
        group stays, empty, its id taken).  Fires ``(Group, detail)``; fails
        ``GroupError``: ``unknown_group``, ``not_owner``, ``not_a_member``."""

        def interaction(txn: Any) -> tuple[Group, str]:
            head = self._lock_stream(txn)
            group = self._member_group(txn, group_id, by)
            if by != user_id and group.owner != by:
                raise GroupError("not_owner", "only the owner can remove another member")
            if user_id not in group.members:
                raise GroupError("not_a_member", f"{user_id} is not a member")
            detail = remove_member(txn, group, user_id, head, now_ms, self._sql, self._record_event)
            after = _read_group(self._query(txn), group_id)
            assert after is not None
            return after, detail

        return self._run(interaction)

    def group_status(self, msg_id: int, group_id: str, sender: str) -> defer.Deferred:
        """Fire with (recipients, waiting) of a group message: the members but
        the sender whose window holds it and whose cursor passed it, and the
        members still in the group whose cursor has not.  The count waits
        for a removal of the group being committed (see ``remove_member``):
        without that, a removal reading before this node's cursor move was
        committed, and this count before the removal was, would both see
        someone waiting and leave the message pending for good."""

        def interaction(txn: Any) -> tuple[int, int]:
            if self._SQL_SHARE_GROUP is not None:
                txn.execute(self._sql(self._SQL_SHARE_GROUP), (group_id,))
            txn.execute(self._sql(_SQL_STATUS), (msg_id, msg_id, group_id, sender, msg_id, msg_id))
            row = txn.fetchone()
            return int(row[0]), int(row[1])

        return self._run(interaction)

    def mark_group_delivered(self, marks: list[tuple[str, str, int]]) -> None:
        """Move members' cursors: ``(group_id, user_id, msg_id)`` each, batched
        with the next commit like ``mark_delivered``, never backwards, and
        for a member removed meanwhile only inside their window (what was
        handed to them before the removal: they may read it)."""
        self._commits.mark_group_delivered(marks)  # type: ignore[attr-defined]


def cursor_moves(ops: list[tuple[str, Any]]) -> list[tuple[int, str, str, int, int]]:
    """The batch's cursor moves, the largest id per member, as the rows of
    ``SQL_MOVE_CURSOR``'s parameters (sorted: PostgreSQL writers lock the
    rows in one order)."""
    best: dict[tuple[str, str], int] = {}
    for kind, arg in ops:
        if kind == "group_delivered":
            for group_id, user_id, msg_id in arg:
                key = (group_id, user_id)
                if msg_id > best.get(key, 0):
                    best[key] = msg_id
    return [(i, g, u, i, i) for (g, u), i in sorted(best.items())]


# A removal committed between the hand-over and this commit leaves the move
# inside the window: the read check (store/reads.py) needs the cursor there.
SQL_MOVE_CURSOR = (
    "UPDATE group_members SET delivered_id = ? WHERE group_id = ? AND user_id = ?"
    " AND delivered_id < ? AND (removed_id IS NULL OR removed_id >= ?)"
)


def members_at(rows: list[tuple[str, str, int, int | None]], group_id: str, msg_id: int) -> tuple:
    """The members of ``group_id`` whose window holds ``msg_id``, from rows of
    (group_id, user_id, joined_id, removed_id)."""
    return tuple(
        u
        for g, u, joined, removed in rows
        if g == group_id and joined < msg_id and (removed is None or removed >= msg_id)
    )


MEMBER_COLUMNS = "group_id, user_id, joined_id, removed_id"
BIG_ID = 2**62  # "no since": above every message id


def with_members(msgs: list[Any], run: Callable[[str, tuple], list[tuple]]) -> list[Any]:
    """Give the group messages among ``msgs`` their ``group_members`` (the
    members whose window holds each), read in one query per group."""
    groups = sorted({m.recipient for m in msgs if m.recipient.startswith("#")})
    if not groups:
        return msgs
    rows: list[tuple] = []
    for group_id in groups:
        rows += run(f"SELECT {MEMBER_COLUMNS} FROM group_members WHERE group_id = ?", (group_id,))  # noqa: S608
    for m in msgs:
        if m.recipient.startswith("#"):
            m.group_members = members_at(rows, m.recipient, m.id)
    return msgs


GROUP_CHUNK = 32  # groups per query of a replay page


def group_page(
    run: Callable[[str, tuple], list[tuple]],
    columns: str,
    user_id: str,
    since: int | None,
    after: int,
    limit: int,
) -> list[tuple]:
    """Rows (of ``columns``) of a page of ``user_id``'s group messages above
    ``after``, by id: of each group they are in, the messages above their
    window's start and above their cursor (not their own) or above ``since``
    (their own too).  One branch per group, each a range of
    ``messages_recipient`` from its own floor that stops after ``limit`` rows,
    so a page costs a page per group, not the backlog since ``since``."""
    mine = run(
        "SELECT group_id, joined_id, delivered_id FROM group_members"
        " WHERE user_id = ? AND removed_id IS NULL ORDER BY group_id",
        (user_id,),
    )
    top = BIG_ID if since is None else since
    rows: list[tuple] = []
    for start in range(0, len(mine), GROUP_CHUNK):
        branches, args = [], []
        for group_id, joined, delivered in mine[start : start + GROUP_CHUNK]:
            floor = max(joined, after, min(delivered, top))
            branches.append(
                f"SELECT * FROM (SELECT {columns} FROM messages"  # noqa: S608
                " WHERE recipient = ? AND id > ? AND (sender <> ? OR id > ?)"
                f" ORDER BY id LIMIT ?) AS b{len(branches)}"
            )
            args += [group_id, floor, user_id, top, limit]
        sql = f"SELECT * FROM ({' UNION ALL '.join(branches)}) AS page ORDER BY id LIMIT ?"  # noqa: S608
        rows += run(sql, (*args, limit))
    if len(mine) > GROUP_CHUNK:
        rows.sort(key=lambda row: row[0])
        del rows[limit:]
    return rows


def merge_pages(a: list[Any], b: list[Any], limit: int) -> list[Any]:
    """Two pages, each by id, as one page of at most ``limit`` by id."""
    if not b:
        return a
    if not a:
        return b[:limit]
    return sorted(a + b, key=lambda m: m.id)[:limit]


__all__ = [
    "ADDED",
    "BIG_ID",
    "EVENT_GROUP",
    "MAX_GROUPS_PER_USER",
    "MAX_MEMBERS",
    "MAX_SETTLED_TOLD",
    "MEMBER_COLUMNS",
    "REMOVED",
    "SQL_MOVE_CURSOR",
    "Group",
    "GroupError",
    "Groups",
    "cursor_moves",
    "event_detail",
    "group_page",
    "leave_all_groups",
    "members_at",
    "merge_pages",
    "remove_member",
    "with_members",
]
