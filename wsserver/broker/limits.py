"""Limits shared by the nodes of a cluster, kept in Redis (protocol section 11).

- ``SharedRateLimiter``: one token bucket per user across the cluster, taken
  by one atomic Lua script on Redis's own clock (one call per reactor turn
  for every frame of that turn).  The bucket's key expires
  when it would be full again, so it lives exactly as long as the debt: a
  client that reconnects to another node finds the same empty bucket.
- ``LEASE_SCRIPT``: the per-user connection cap as leases, a sorted set per
  user of ``node/connection`` members scored by their expiry time.  A node
  refreshes the leases of its connections every ``LEASE_REFRESH`` seconds
  and removes them when they close; a node that dies stops counting once its
  leases expire (``LEASE_TTL``, 30 s).

While Redis is away each falls back to what the node knows alone: the
node-local bucket (the same rate and burst, per node), and the node-local
connection cap.  The switch is logged once each way.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..ratelimit import RateLimiter

_log = Logger()

LEASE_TTL = 30.0  # seconds a connection's lease outlives its node's last refresh
LEASE_REFRESH = 10.0  # seconds between two refreshes of a node's leases

# KEYS: users' buckets; ARGV: rate (tokens/s), burst, then for each key the
# number of frames asking for a token.  For each key it takes as many tokens
# as there are (at most the number asked) and returns two values: the tokens
# granted, and the milliseconds until the next token is there when some were
# not (else 0).  Asking n at once is asking one n times at one moment: the
# first floor(tokens) get one, each of the others is answered with the wait.
BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local asked = tonumber(ARGV[i + 2])
  local b = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(b[1])
  local at = tonumber(b[2])
  if tokens == nil or at == nil then
    tokens = burst
    at = now
  end
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate / 1000)
  end
  local granted = math.min(asked, math.floor(tokens))
  tokens = tokens - granted
  local wait = 0
  if granted < asked then
    wait = math.ceil((1 - tokens) * 1000 / rate)
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.max(1, math.ceil((burst - tokens) * 1000 / rate)))
  out[2 * i - 1] = granted
  out[2 * i] = wait
end
return out
"""

MAX_KEYS_PER_CALL = 512  # buckets per script call (a turn with more makes several)
# A node may take a user's tokens ahead, as an allowance its next frames
# spend without asking Redis: at most what the bucket refills in AHEAD
# seconds (and MAX_HELD), kept at most HOLD seconds; what is left then is
# dropped, never given back.  Tokens are only ever taken from the one bucket,
# so the user never sends more than it allows, wherever and however often
# they reconnect; an allowance left unspent costs the user's connections on
# the other nodes at most AHEAD seconds of refill.  At the default rate (5/s:
# less than one token in AHEAD) no node takes anything ahead.
AHEAD = 0.05
HOLD = 1.0
MAX_HELD = 64

# KEYS[1]: the user's leases; ARGV: member, now (ms), expiry (ms), max.
# Returns 1 when the lease was granted, 0 when the user has max already.
LEASE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
"""

# KEYS: users' lease sets; ARGV: expiry (ms), then one member per key.  A
# connection that opened while Redis was away gets its lease here.
REFRESH_SCRIPT = """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[i + 1])
  if redis.call('PTTL', key) < tonumber(ARGV[1]) then
    redis.call('PEXPIREAT', key, ARGV[1])
  end
end
return #KEYS
"""


def _checked(reply: Any) -> Any:
    # txredisapi hands some error replies over as values.
    if isinstance(reply, Exception):
        raise reply
    return reply


class SharedRateLimiter:
    """The cluster-wide per-user token bucket, with the node-local one as fallback.

    ``take`` returns the seconds to wait (0.0: the token was taken): a float
    when this node holds an allowance of the user's tokens (see ``AHEAD``),
    else a Deferred while Redis is there, else the local bucket's answer.
    The frames of one reactor turn ask together: one script call on the next
    turn takes every user's tokens (``BUCKET_SCRIPT``), instead of a round
    trip to Redis per frame; each Deferred fires with its own frame's answer,
    in the order the frames asked.
    """

    def __init__(self, local: RateLimiter, broker: Any, clock: Any = None) -> None:
        self._local = local
        self._broker = broker
        self._clock = clock if clock is not None else broker.clock
        self.rate = local.rate
        self.burst = local.burst
        self.ahead = min(MAX_HELD, int(self.rate * AHEAD))  # tokens taken ahead per ask
        self._falling_back = False
        self._asked: dict[str, list[defer.Deferred]] = {}
        self._held: dict[str, list[float]] = {}  # key -> [tokens, until]
        self._call: Any = None
        self._next_prune = 0.0

    def _fall_back(self, why: str) -> None:
        if not self._falling_back:
            self._falling_back = True
            _log.warn(
                "shared rate limit unavailable ({why}): each node limits on its own until"
                " Redis is back",
                why=why,
            )

    def take(self, key: str) -> Any:
        """Spend one token of ``key``'s bucket (see the class)."""
        held = self._held.get(key)
        if held is not None:
            if held[0] >= 1 and self._clock.seconds() < held[1]:
                held[0] -= 1
                return 0.0
            del self._held[key]
        if self._broker.command_connection() is None:
            self._fall_back("Redis is unreachable")
            return self._local.take(key)
        d: defer.Deferred = defer.Deferred()
        self._asked.setdefault(key, []).append(d)
        if self._call is None:
            self._call = self._clock.callLater(0, self._ask)
        return d

    def _ask(self) -> None:
        """Ask Redis for the tokens this turn's frames want."""
        self._call = None
        asked, self._asked = self._asked, {}
        if self._held and self._clock.seconds() >= self._next_prune:
            self._next_prune = self._clock.seconds() + 1.0
            self.sweep()
        conn = self._broker.command_connection()
        items = list(asked.items())
        for start in range(0, len(items), MAX_KEYS_PER_CALL):
            chunk = items[start : start + MAX_KEYS_PER_CALL]
            if conn is None:
                self._fall_back("Redis is unreachable")
                self._answer_locally(chunk)
                continue
            prefix = f"{self._broker.prefix}bucket:"
            keys = [prefix + key for key, _ in chunk]
            args = [repr(self.rate), self.burst, *[len(ds) + self.ahead for _, ds in chunk]]
            d = conn.eval(BUCKET_SCRIPT, keys, args)
            d.addCallbacks(self._answered, self._failed, (chunk,), None, (chunk,))

    def _answered(self, reply: Any, chunk: list[tuple[str, list[defer.Deferred]]]) -> None:
        try:
            reply = _checked(reply)
            answers = [(int(reply[2 * i]), int(reply[2 * i + 1])) for i in range(len(chunk))]
        except Exception:
            self._failed(Failure(), chunk)
            return
        if self._falling_back:
            self._falling_back = False
            _log.info("shared rate limit back")
        until = self._clock.seconds() + HOLD
        for (granted, wait_ms), (key, waiting) in zip(answers, chunk, strict=True):
            if granted > len(waiting):
                self._held[key] = [float(granted - len(waiting)), until]
            for j, d in enumerate(waiting):
                d.callback(0.0 if j < granted else wait_ms / 1000.0)

    def _failed(self, failure: Failure, chunk: list[tuple[str, list[defer.Deferred]]]) -> None:
        self._fall_back(failure.getErrorMessage())
        self._answer_locally(chunk)

    def _answer_locally(self, chunk: list[tuple[str, list[defer.Deferred]]]) -> None:
        for key, waiting in chunk:
            for d in waiting:
                d.callback(self._local.take(key))

    def sweep(self) -> None:
        self._local.sweep()
        now = self._clock.seconds()
        for key in [k for k, (_, until) in self._held.items() if until <= now]:
            del self._held[key]

    def __len__(self) -> int:
        return len(self._local)

    def start(self) -> None:
        self._local.start()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
            self._ask()
        self._local.stop()


def lease_expiry_ms(now: float) -> int:
    """The expiry (ms) of a lease granted or refreshed at ``now`` (seconds)."""
    return math.ceil((now + LEASE_TTL) * 1000)


def ask_lease(conn: Any, key: str, member: str, now: float, limit: int) -> defer.Deferred:
    """Fire True when the lease is granted (the user has fewer than ``limit``)."""
    d = conn.eval(LEASE_SCRIPT, [key], [member, int(now * 1000), lease_expiry_ms(now), limit])
    return d.addCallback(lambda reply: bool(int(_checked(reply))))


def refresh_leases(conn: Any, leases: list[tuple[str, str]], now: float) -> defer.Deferred:
    """Extend the leases (key, member) to ``now`` + ``LEASE_TTL``."""
    if not leases:
        return defer.succeed(0)
    keys = [key for key, _ in leases]
    args = [lease_expiry_ms(now), *[member for _, member in leases]]
    return conn.eval(REFRESH_SCRIPT, keys, args).addCallback(_checked)


__all__ = [
    "LEASE_REFRESH",
    "LEASE_TTL",
    "SharedRateLimiter",
    "ask_lease",
    "refresh_leases",
]
