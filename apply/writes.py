"""Type-based writes on the target: typed values, keys that arrive in chunks, and DUMP payloads the
target refuses (converted by decoding them, see :mod:`conveyor.rdb`).

Overwrite policy: a value is built in a temporary key in the key's hash slot and renamed over the
key at the end, so no reader of the target ever sees a partial key. The parts of a chunked key are
written by one script call each, which also guards against a part being applied twice after a
crash (lists, strings, streams and DUMP parts grow by a known amount per part).
"""
from __future__ import annotations

from redis.crc import key_slot

from conveyor.cluster import slot_tag

# KEYS: temporary key, key. ARGV: index, offset, count, last (0/1), expire (-1 none, 0 passed,
# else unix ms), kind (list|string|stream|payload|other), then commands as: n, token1..tokenN, ...
# Returns 'ok', 'orphan' (a part whose first part never arrived), 'duplicate' (already applied),
# 'expired', or for a DUMP payload the target refused: {'refused', error, payload}.
CHUNK_SCRIPT = r"""
local tmp, key = KEYS[1], KEYS[2]
local index, offset, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local last, expire, kind = ARGV[4] == '1', tonumber(ARGV[5]), ARGV[6]
if index == 0 then
  redis.call('DEL', tmp)
elseif redis.call('EXISTS', tmp) == 0 then
  return 'orphan'
end
local write = true
if kind ~= 'other' then
  local have
  if kind == 'list' then have = redis.call('LLEN', tmp)
  elseif kind == 'stream' then
    if redis.call('EXISTS', tmp) == 1 then have = redis.call('XLEN', tmp) else have = 0 end
  else have = redis.call('STRLEN', tmp) end
  if have == offset + count and last and index > 0 then
    write = false                        -- applied before a crash; only the finish is missing
  elseif have > offset then
    return 'duplicate'
  elseif have < offset then
    return redis.error_reply('ERR conveyor: part ' .. index .. ' expects ' .. offset ..
      ' elements in the temporary key, found ' .. have .. ' (a part is missing)')
  end
end
if write then
  local i = 7
  while i <= #ARGV do
    local n = tonumber(ARGV[i])
    redis.call(unpack(ARGV, i + 1, i + n))
    i = i + n + 1
  end
end
if not last then return 'ok' end
if expire == 0 then
  redis.call('DEL', tmp, key)
  return 'expired'
end
if kind == 'payload' then
  local payload = redis.call('GET', tmp)
  local r = redis.pcall('RESTORE', key, math.max(expire, 0), payload, 'REPLACE', 'ABSTTL')
  if type(r) == 'table' and r.err then return {'refused', r.err, payload} end
  redis.call('DEL', tmp)
  return 'ok'
end
if expire > 0 then
  redis.call('PEXPIREAT', tmp, expire)
  if redis.call('EXISTS', tmp) == 0 then redis.call('DEL', key) return 'expired' end
end
redis.call('RENAME', tmp, key)
return 'ok'
"""

# Replies of RESTORE that mean "this server cannot read that payload": convert it instead.
CONVERTIBLE = ("DUMP payload version or checksum are wrong", "Bad data format",
               "unknown command", "ERR unknown command")


def convertible(error: Exception | str) -> bool:
    text = str(error)
    return any(c in text for c in CONVERTIBLE)


def temp_key(key: bytes, ident: bytes) -> bytes:
    """A temporary key in the same hash slot as ``key`` (RENAME needs that on a cluster)."""
    return slot_tag(key_slot(key)) + b"conveyor-tmp:" + ident + b":" + key


def chunk_kind(ev) -> str:
    if ev.payload is not None:
        return "payload"
    return {"LIST": "list", "STRING": "string", "STREAM": "stream"}.get(ev.value["type"], "other")


def script_args(commands: list[tuple]) -> list:
    out: list = []
    for c in commands:
        out.append(len(c))
        out.extend(c)
    return out
