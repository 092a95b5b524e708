"""Leases of a Redis Streams log's partition streams among the consumers of one group.

Several apply processes may read one group. Each partition stream is leased to one consumer at a
time, so a key (whose events all sit in one stream) is never applied by two consumers at once.
Members announce themselves in a registry (a sorted set: member -> heartbeat expiry) and lease
streams in a hash (stream -> ``owner expiry``); both are updated atomically by one small Lua
script, timed by the server's clock so that the processes' clocks do not matter. Each live member
takes about streams/members; a member that stops renewing (killed) loses its streams once its
lease expires, and another member takes them over with their pending entries.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import redis

LEASE_MS = 10_000                 # a dead member's streams are taken over after this long
RENEW_EVERY_S = 1.0               # poll() renews (and rebalances) at most this often
LOCAL_MARGIN = 0.8                # the local view of a lease ends before the server's does

# KEYS: members zset, leases hash. ARGV: me, lease ms, mode (balance|renew|leave), streams...
# Returns {owned streams, newly acquired streams}.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, lease, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if mode == 'leave' then
  redis.call('ZREM', KEYS[1], me)
else
  redis.call('ZADD', KEYS[1], now + lease, me)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(live)
local alive, idx = {}, 0
for i, m in ipairs(live) do
  alive[m] = true
  if m == me then idx = i - 1 end
end
local n = #ARGV - 3
local members = math.max(#live, 1)
local quota = math.floor(n / members)
if idx < n % members then quota = quota + 1 end
local mine, free = {}, {}
for i = 4, #ARGV do
  local s = ARGV[i]
  local v = redis.call('HGET', KEYS[2], s)
  local owner, exp = nil, 0
  if v then
    local sp = string.find(v, ' ', 1, true)
    owner, exp = string.sub(v, 1, sp - 1), tonumber(string.sub(v, sp + 1))
  end
  if owner == me and exp > now then
    table.insert(mine, s)
  elseif (not owner) or exp <= now or not alive[owner] then
    table.insert(free, s)
  end
end
if mode == 'leave' then
  for _, s in ipairs(mine) do redis.call('HDEL', KEYS[2], s) end
  return {{}, {}}
end
local acquired = {}
if mode == 'balance' then
  while #mine > quota do
    redis.call('HDEL', KEYS[2], table.remove(mine))
  end
  for _, s in ipairs(free) do
    if #mine >= quota then break end
    table.insert(mine, s)
    table.insert(acquired, s)
  end
end
for _, s in ipairs(mine) do
  redis.call('HSET', KEYS[2], s, me .. ' ' .. (now + lease))
end
return {mine, acquired}
"""


def default_consumer() -> str:
    """Unique per process: two apply processes never share a name (and so never a PEL)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Leases:
    """This member's leases; ``owned`` maps stream -> local monotonic expiry."""

    r: redis.Redis
    prefix: str
    group: str
    consumer: str
    streams: list[str]
    lease_ms: int = LEASE_MS
    owned: dict[str, float] = field(default_factory=dict)
    last_renew: float = 0.0

    def __post_init__(self) -> None:
        self._script = self.r.register_script(LEASE_SCRIPT)
        self.keys = [f"{self.prefix}:members:{self.group}", f"{self.prefix}:leases:{self.group}"]

    def due(self) -> bool:
        return time.monotonic() - self.last_renew >= RENEW_EVERY_S or not self.owned

    def update(self, mode: str) -> list[str]:
        """Run the lease script (``balance``: renew, release above quota, take free streams;
        ``renew``: only renew; ``leave``: release all). Returns the streams newly acquired."""
        started = time.monotonic()
        mine, acquired = self._script(keys=self.keys,
                                      args=[self.consumer, self.lease_ms, mode, *self.streams])
        self.last_renew = started
        until = started + self.lease_ms / 1000 * LOCAL_MARGIN
        self.owned = {s.decode() if isinstance(s, bytes) else s: until for s in mine}
        return [s.decode() if isinstance(s, bytes) else s for s in acquired]

    def current(self) -> set[str]:
        """Streams whose lease has not expired in the local (conservative) view."""
        now = time.monotonic()
        return {s for s, until in self.owned.items() if until > now}
