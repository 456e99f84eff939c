"""Since when users were online or offline, as one node saw them (protocol
section 13, ``since``; docs/protocol.md section 15, "Presence").

Online users are as many as this node's connections' users.  Offline users
would be every user who ever connected while the node runs: ``LastSeen``
keeps at most ``limit`` of them, forgetting first the one who went offline
longest ago; a user forgotten is reported as one never seen (offline since
the epoch).
"""

from __future__ import annotations

from collections import OrderedDict

OFFLINE_MAX = 100_000  # offline users remembered by one node


class LastSeen:
    """``record`` a change, ``get`` the state: (online, since ms)."""

    def __init__(self, limit: int = OFFLINE_MAX) -> None:
        self._limit = limit
        self._online: dict[str, int] = {}
        self._offline: OrderedDict[str, int] = OrderedDict()  # oldest first

    def record(self, user_id: str, online: bool, since_ms: int) -> None:
        self._offline.pop(user_id, None)
        if online:
            self._online[user_id] = since_ms
            return
        self._online.pop(user_id, None)
        self._offline[user_id] = since_ms
        while len(self._offline) > self._limit:
            self._offline.popitem(last=False)

    def forget(self, user_id: str) -> None:
        """``user_id`` was deleted: from now on reported as never seen."""
        self._online.pop(user_id, None)
        self._offline.pop(user_id, None)

    def get(self, user_id: str) -> tuple[bool, int]:
        """(online, since ms); (False, 0) for a user not (or no longer) known."""
        if user_id in self._online:
            return True, self._online[user_id]
        return False, self._offline.get(user_id, 0)

    def __len__(self) -> int:
        return len(self._online) + len(self._offline)
