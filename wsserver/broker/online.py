"""Presence in a cluster, kept in Redis next to the connection leases.

A user is online while their lease set (``conns:<user>``, ``limits.py``)
holds a lease that has not expired.  ``PRESENCE_SCRIPT`` compares that with
the recorded state (hash ``presence:<user>``: ``on`` 0/1, ``since`` ms) and
records a change, atomically, so every node sees the same transitions and
the same ``since``.  A node runs it after each lease it adds or removes
(on the same connection, so after them), and for the users its
connections watch; a change it finds is published to every node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from .limits import _checked

# KEYS: pairs (lease set, presence hash); ARGV[1]: now (ms).  For each pair
# three numbers: online (1/0), since (ms; 0: never seen), changed (1/0).
PRESENCE_SCRIPT = """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 2 do
  local live = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf') > 0
  local st = redis.call('HMGET', KEYS[i + 1], 'on', 'since')
  local was = st[1] == '1'
  local since = tonumber(st[2]) or 0
  local changed = 0
  if live ~= was then
    since = now
    changed = 1
    redis.call('HSET', KEYS[i + 1], 'on', live and '1' or '0', 'since', tostring(now))
  end
  out[#out + 1] = live and 1 or 0
  out[#out + 1] = since
  out[#out + 1] = changed
end
return out
"""

MAX_USERS_PER_CALL = 256


def check_presence(conn: Any, prefix: str, users: list[str], now: float) -> defer.Deferred:
    """Fire with ``{user: (online, since_ms, changed)}`` for ``users``."""
    calls = []
    for start in range(0, len(users), MAX_USERS_PER_CALL):
        chunk = users[start : start + MAX_USERS_PER_CALL]
        keys: list[str] = []
        for user in chunk:
            keys += [f"{prefix}conns:{user}", f"{prefix}presence:{user}"]
        d = conn.eval(PRESENCE_SCRIPT, keys, [int(now * 1000)])
        calls.append(d.addCallback(_checked).addCallback(_decoded, chunk))
    d = defer.gatherResults(calls, consumeErrors=True)

    def merged(parts: list[dict[str, tuple[bool, int, bool]]]) -> dict[str, tuple[bool, int, bool]]:
        out: dict[str, tuple[bool, int, bool]] = {}
        for part in parts:
            out.update(part)
        return out

    return d.addCallback(merged)


def _decoded(reply: Any, users: list[str]) -> dict[str, tuple[bool, int, bool]]:
    return {
        user: (bool(int(reply[3 * i])), int(reply[3 * i + 1]), bool(int(reply[3 * i + 2])))
        for i, user in enumerate(users)
    }
