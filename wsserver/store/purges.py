"""The message phase of account deletions, shared by both engines.

A deletion removes the account (user, keys, key log, challenges, tokens) and
keeps its tombstone in one transaction; the user's messages then go a page
per short transaction, so group commit never waits long.  A deletion whose
message phase did not get to the end (a page failed, the process stopped)
is finished by ``finish_deletions``, which every store runs when it starts
and every ``PURGE_INTERVAL`` seconds.

``Purges`` is mixed into each engine's store.  The engine provides the SQL:
``_purge_page(user_ids, after, finish)`` fires with (messages deleted, the
page's last id or None when none was left; with ``finish`` that page marks
the tombstones purged), ``_unpurged_users(after, limit)`` with the ids of
deleted users not yet purged (ids > ``after``, in order), and
``_account_gone(user_id)`` forgets what the engine caches of a user whose
account removal just committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

PURGE_INTERVAL = 30.0  # seconds between passes finishing deletions left unfinished
PURGE_USERS = 100  # tombstones read per query of such a pass


class Purges:
    """Deleting a user's messages after their account, and finishing what a
    deletion left unfinished (see the module's docstring)."""

    _stopping: bool

    def _init_purges(self, clock: IReactorTime) -> None:
        self._purge_loop = LoopingCall(self._purge_pass)
        self._purge_loop.clock = clock
        self._purging: defer.Deferred | None = None  # the pass in flight
        self._stopping = False

    def _start_purges(self, interval: float) -> None:
        if not self._purge_loop.running:
            self._purge_loop.start(interval, now=True)

    @defer.inlineCallbacks
    def _stop_purges(self) -> Any:
        """Run no more passes; fire once the pass in flight stopped (after its
        page in flight)."""
        self._stopping = True
        if self._purge_loop.running:
            self._purge_loop.stop()
        if self._purging is not None:
            yield self._purging

    def _purge_pass(self) -> defer.Deferred:
        """One pass of the purge loop: a failure is logged (and the next pass
        tries again), never stops the loop."""
        d = self._purging = self.finish_deletions()
        d.addErrback(
            lambda f: _log.warn(
                "finishing deleted users' message removal failed: {e} (tried again in {s:.0f} s)",
                e=f.getErrorMessage(),
                s=self._purge_loop.interval or 0,
            )
        )
        d.addBoth(lambda _: setattr(self, "_purging", None))
        return d

    # What the engine provides.

    def _run(self, interaction: Callable[..., Any], *args: Any) -> defer.Deferred:
        raise NotImplementedError

    def _purge_page(self, user_ids: list[str], after: int, finish: bool) -> defer.Deferred:
        raise NotImplementedError

    def _unpurged_users(self, after: str, limit: int) -> defer.Deferred:
        raise NotImplementedError

    def _account_gone(self, user_id: str) -> None:
        """Forget what the engine caches of a user whose removal committed."""

    # The shared part.

    @defer.inlineCallbacks
    def _delete_account(self, interaction: Callable[[Any], bool], user_id: str) -> Any:
        """Run the engine's account removal (``interaction``: False when no such
        user), then the message phase; fire True, or None when no such user.
        A failed message phase is logged and left to ``finish_deletions``."""
        if not (yield self._run(interaction)):
            return None
        self._account_gone(user_id)
        try:
            yield self._purge_messages([user_id], 0, finish=True)
        except Exception as exc:
            # The account is gone (that committed); the rest of its messages
            # go in a later pass of finish_deletions, on whichever node.
            _log.warn(
                "deleted user {user}, but removing their messages failed: {e}"
                " (finished within {s:.0f} s by a running node)",
                user=user_id,
                e=str(exc),
                s=PURGE_INTERVAL,
            )
        return True

    @defer.inlineCallbacks
    def _purge_messages(self, user_ids: list[str], after: int, finish: bool) -> Any:
        """Delete the messages from or to any of ``user_ids`` with id >
        ``after``, a page per transaction; fire with how many went.  With
        ``finish``, mark their tombstones purged once none is left."""
        removed = 0
        while not self._stopping:
            deleted, last = yield self._purge_page(user_ids, after, finish)
            if last is None:
                break
            removed += deleted
            after = last
        return removed

    @defer.inlineCallbacks
    def finish_deletions(self) -> Any:
        """Remove the messages of every deleted user whose deletion did not get
        to the end of them (a page that failed, a node stopped half-way), and
        mark them purged; fire with how many deletions were finished.  Nodes
        running it together only delete rows twice over (the second finds
        them gone)."""
        finished, after = 0, ""
        while not self._stopping:
            users = yield self._unpurged_users(after, PURGE_USERS)
            if users:
                # All of them at once: their messages are found in one read of
                # the table (a slice at a time), not one read per deletion.
                yield self._purge_messages(users, 0, finish=True)
                if not self._stopping:
                    finished += len(users)
            if len(users) < PURGE_USERS:
                break
            after = users[-1]
        return finished

    def purge_user_messages(self, user_id: str, after_id: int) -> defer.Deferred:
        """Delete the messages from or to ``user_id`` with id > ``after_id`` (those
        stored after the user was deleted, while this node still knew it), a
        page per transaction; fires with how many."""
        return self._purge_messages([user_id], after_id, finish=False)


__all__ = ["PURGE_INTERVAL", "PURGE_USERS", "Purges"]
