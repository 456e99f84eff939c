"""Limits shared by the nodes of a cluster, kept in Redis (protocol section 11).

- ``SharedRateLimiter``: one token bucket per user across the cluster, taken
  by one atomic Lua script on Redis's own clock (one call per reactor turn
  for every frame of that turn; at high rates a node takes a few tokens
  ahead, which the script counts against the burst).  The bucket's key expires
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

# KEYS: users' buckets; ARGV: rate (tokens/s), burst, this node's name, HOLD
# in ms, then for each key two numbers: the frames asking for a token, and
# the tokens this node would like to take ahead.  For each key it returns
# three values: the frames granted a token, the tokens granted ahead, and
# the milliseconds until the next token is there when some frame got none
# (else 0).  Asking for n frames at once is asking one n times at one
# moment: the first floor(tokens) get one, each of the others the wait.
#
# A node may take tokens ahead, as an allowance its next frames spend
# without asking Redis (``SharedRateLimiter``).  The bucket's hash records
# each node's allowance (field "h:<node>" = "<tokens>:<until ms>") and the
# bucket refills only up to the burst less the other nodes' live
# allowances, so what the bucket holds plus every allowance never exceeds
# the burst: the user can never send more than one exact bucket would let
# them, however the frames are spread over nodes and time.  A node asks
# only once its allowance is spent or dropped, so its own field is
# replaced.  The key lives until the bucket is full again and every
# allowance has expired.
BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local mine = 'h:' .. ARGV[3]
local hold = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local frames = tonumber(ARGV[3 + 2 * i])
  local ahead = tonumber(ARGV[4 + 2 * i])
  local fields = redis.call('HGETALL', key)
  local tokens = nil
  local at = nil
  local others = 0
  local last = now
  for j = 1, #fields, 2 do
    local f = fields[j]
    local v = fields[j + 1]
    if f == 'tokens' then
      tokens = tonumber(v)
    elseif f == 'at' then
      at = tonumber(v)
    elseif f ~= mine and string.sub(f, 1, 2) == 'h:' then
      local sep = string.find(v, ':', 1, true)
      local count = tonumber(string.sub(v, 1, sep - 1))
      local untl = tonumber(string.sub(v, sep + 1))
      if untl > now then
        others = others + count
        last = math.max(last, untl)
      else
        redis.call('HDEL', key, f)
      end
    end
  end
  local cap = burst - others
  if tokens == nil or at == nil then
    tokens = cap
    at = now
  end
  if now > at then
    tokens = math.min(cap, tokens + (now - at) * rate / 1000)
  end
  local granted = math.max(0, math.min(frames + ahead, math.floor(tokens)))
  local for_frames = math.min(frames, granted)
  local kept = granted - for_frames
  tokens = tokens - granted
  local wait = 0
  if for_frames < frames then
    wait = math.ceil((1 - tokens) * 1000 / rate)
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  if kept > 0 then
    redis.call('HSET', key, mine, kept .. ':' .. (now + hold))
    last = math.max(last, now + hold)
  else
    redis.call('HDEL', key, mine)
  end
  local full = math.ceil((burst - tokens) * 1000 / rate)
  redis.call('PEXPIRE', key, math.max(1, full, last - now))
  out[3 * i - 2] = for_frames
  out[3 * i - 1] = kept
  out[3 * i] = wait
end
return out
"""

MAX_KEYS_PER_CALL = 512  # buckets per script call (a turn with more makes several)
# The allowance a node takes ahead: at most what the bucket refills in AHEAD
# seconds (and MAX_HELD tokens), spent within HOLD seconds or dropped (never
# given back).  An allowance left unspent is missing from the user's bucket
# for at most HOLD, and is at most AHEAD seconds of refill.  At the default
# rate (5/s: less than one token in AHEAD) no node takes anything ahead.
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
    when this node holds an allowance of the user's tokens, else a Deferred
    while Redis is there, else the local bucket's answer.  The frames of one
    reactor turn ask together: one script call on the next turn takes every
    user's tokens (``BUCKET_SCRIPT``), instead of a round trip to Redis per
    frame; each Deferred fires with its own frame's answer, in the order the
    frames asked.  At rates where the bucket refills at least a token in
    ``AHEAD`` seconds, an ask also takes up to that many tokens ahead, which
    the node's next frames of that user spend at once (within ``HOLD``); the
    script keeps the bucket plus every node's allowance within the burst.
    One ask per user is under way at a time: frames that come meanwhile wait
    for its answer.
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
        self._in_flight: dict[str, list[defer.Deferred]] = {}  # key -> frames waiting
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
        if key in self._in_flight:
            # This node's ask for the key is under way: wait for its answer
            # (and allowance) rather than ask twice.
            d = defer.Deferred()
            self._in_flight[key].append(d)
            return d
        if self._broker.command_connection() is None:
            self._fall_back("Redis is unreachable")
            return self._local.take(key)
        d = defer.Deferred()
        self._asked.setdefault(key, []).append(d)
        if self._call is None:
            self._call = self._clock.callLater(0, self._ask)
        return d

    def _ask(self) -> None:
        """Ask Redis for the tokens this turn's frames want."""
        self._call = None
        asked, self._asked = self._asked, {}
        now = self._clock.seconds()
        if self._held and now >= self._next_prune:
            self._next_prune = now + 1.0
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
            args: list[Any] = [repr(self.rate), self.burst, self._broker.node, int(HOLD * 1000)]
            for key, waiting in chunk:
                args += [len(waiting), self.ahead]
                self._in_flight[key] = []
            d = conn.eval(BUCKET_SCRIPT, keys, args)
            # The allowance is counted from now: Redis runs the script later,
            # so this node drops it before Redis stops counting it.
            d.addCallbacks(self._answered, self._failed, (chunk, now), None, (chunk,))

    def _answered(
        self, reply: Any, chunk: list[tuple[str, list[defer.Deferred]]], sent: float
    ) -> None:
        try:
            reply = _checked(reply)
            answers = [
                (int(reply[3 * i]), int(reply[3 * i + 1]), int(reply[3 * i + 2]))
                for i in range(len(chunk))
            ]
        except Exception:
            self._failed(Failure(), chunk)
            return
        if self._falling_back:
            self._falling_back = False
            _log.info("shared rate limit back")
        # Every record first, then the callbacks (which may ask again).
        later = []
        for (_, kept, _), (key, _) in zip(answers, chunk, strict=True):
            if kept > 0:
                self._held[key] = [float(kept), sent + HOLD]
            later.append((key, self._in_flight.pop(key, [])))
        for (granted, _, wait_ms), (_, waiting) in zip(answers, chunk, strict=True):
            for j, d in enumerate(waiting):
                d.callback(0.0 if j < granted else wait_ms / 1000.0)
        self._retake(later)

    def _retake(self, later: list[tuple[str, list[defer.Deferred]]]) -> None:
        """An ask is answered: the frames that waited for it take their tokens
        now (from the allowance, or in the next ask)."""
        for key, waiting in later:
            for d in waiting:
                taken = self.take(key)
                if isinstance(taken, defer.Deferred):
                    taken.chainDeferred(d)
                else:
                    d.callback(taken)

    def _failed(self, failure: Failure, chunk: list[tuple[str, list[defer.Deferred]]]) -> None:
        self._fall_back(failure.getErrorMessage())
        self._answer_locally(chunk)

    def _answer_locally(self, chunk: list[tuple[str, list[defer.Deferred]]]) -> None:
        later = [(key, self._in_flight.pop(key, [])) for key, _ in chunk]
        for key, waiting in chunk:
            for d in waiting:
                d.callback(self._local.take(key))
        self._retake(later)

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
