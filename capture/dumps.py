"""Batch DUMP: the plain path (DUMP + expiry in one pipeline) and, with sizing, one read
script per batch that sizes, DUMPs and reports big keys in a single server-side pass."""
from __future__ import annotations

import logging

import redis

from conveyor.words import text
from conveyor import packed, values
from conveyor.acl import in_script
from conveyor.capture.emitting import Emitter, expiry_command
from conveyor.capture.paging import BigKeyPager
from conveyor.capture.sizing import Sizer
from conveyor.capture.splitting import Splitter
from conveyor.endpoints import ServerInfo
from conveyor.events import now_millis

log = logging.getLogger("conveyor.capture")

SCRIPT_BUDGET = 16 * 1024 * 1024    # MEMORY USAGE of the keys one read script DUMPs at most

# One server-side pass over a batch (dump mode with sizing): per key MEMORY USAGE, then DUMP +
# expiry for keys up to the big-key threshold while the batch stays within its byte budget.
# Per key it returns: payload, expiry, size[, type]; a key not dumped has payload nil and
# expiry -2 (gone), -3 (over this call's budget: read it again) or its type (a big key).
READ_SCRIPT = r"""
local big, budget, exp, typed = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local used, out = 0, {}
for _, k in ipairs(KEYS) do
  local m = redis.call('MEMORY', 'USAGE', k)
  if not m then
    out[#out + 1] = false; out[#out + 1] = -2; out[#out + 1] = 0
  elseif m > big then
    out[#out + 1] = false; out[#out + 1] = redis.call('TYPE', k).ok; out[#out + 1] = m
  elseif used > 0 and used + m > budget then
    out[#out + 1] = false; out[#out + 1] = -3; out[#out + 1] = m
  else
    used = used + m
    out[#out + 1] = redis.call('DUMP', k); out[#out + 1] = redis.call(exp, k); out[#out + 1] = m
  end
  if typed then out[#out + 1] = m and redis.call('TYPE', k).ok or 'none' end
end
return out
"""


class DumpReader:
    """Keys read whole as DUMP payloads: one pipeline per batch (``read``) or, with a size
    threshold or --mem-limit, one read script per batch (``read_scripted``). ``scripts``: False
    where the script is never tried (a cluster: the keys of a batch span slots)."""

    def __init__(self, *, source: redis.Redis, info: ServerInfo, emitter: Emitter,
                 splitter: Splitter, pager: BigKeyPager, sizer: Sizer, type_filter: str | None,
                 part_bytes: int, big_key_bytes: int | None, mem_limit: int | None,
                 mem_limit_skip: bool, scripts: bool = True) -> None:
        self.source, self.info, self.emitter = source, info, emitter
        self.splitter, self.pager, self.sizer = splitter, pager, sizer
        self.type_filter, self.part_bytes = type_filter, part_bytes
        self.big_key_bytes = big_key_bytes
        self.mem_limit, self.mem_limit_skip = mem_limit, mem_limit_skip
        self.expiry = expiry_command(info)
        self._script: bool | None = None if scripts else False  # False: the source refuses it
        self._sha = ""

    @property
    def scripts(self) -> bool:
        """Whether the read script is used (False once the source refused it)."""
        return self._script is not False

    def forget_script(self) -> None:
        """The source forgot the read script (a restart): load it again on the next read."""
        if self._script:
            self._script = None

    def read(self, keys: list[bytes], check_type: bool) -> None:
        """DUMP + expiry (+ TYPE with ``check_type``) of every key in one pipeline."""
        read_ms = now_millis()
        emitter, expiry = self.emitter, self.expiry
        pipe = self.source.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("DUMP", key)
            pipe.execute_command(expiry, key)
            if check_type:
                pipe.execute_command("TYPE", key)
        replies = pipe.execute()
        step = 3 if check_type else 2
        for i, key in enumerate(keys):
            payload, ttl = replies[step * i], replies[step * i + 1]
            if payload is None or ttl == -2 or (
                    check_type and text(replies[step * i + 2]) != self.type_filter):
                emitter.delete(key, read_ms)
            elif len(payload) > self.part_bytes:
                self.splitter.emit_payload(key, payload, read_ms, emitter.expire(ttl, read_ms))
            else:
                emitter.upsert(key, read_ms, emitter.expire(ttl, read_ms), payload=payload)

    def read_scripted(self, keys: list[bytes], check_type: bool
                      ) -> tuple[list[bytes], bool] | None:
        """(keys to read again, whether only the budget deferred them); None when the source
        does not run scripts (the pipelined path takes over for good)."""
        read_ms = now_millis()
        big = self.big_key_bytes or 2 ** 62
        try:
            if self._script is None:
                # Redis 7+: declared read-only, so it also runs on a replica and at maxmemory.
                body = ("#!lua flags=no-writes\n" + READ_SCRIPT if self.info.version >= (7, 0)
                        else READ_SCRIPT)
                self._sha = self.source.script_load(body)
            # One packed command, its reply parsed by hiredis (no redis-py encoding per key).
            (reply,) = packed.run(self.source, [("EVALSHA", self._sha, len(keys), *keys, big,
                                                 SCRIPT_BUDGET, self.expiry,
                                                 1 if check_type else 0)])
            if isinstance(reply, Exception):
                raise reply
            self._script = True
        except redis.ResponseError as e:
            if self._script and (isinstance(e, redis.exceptions.NoScriptError)
                                 or "NOSCRIPT" in str(e)):
                self._script = None               # the source restarted: load it again
                return keys, True
            if self._script is None:
                # A command refused inside the script (ACL): the pipelined read names it.
                (log.debug if in_script(e) else log.warning)(
                    "the source does not run scripts (%s); reading with pipelines", e)
                self._script = False
                return None
            raise
        emitter = self.emitter
        step = 4 if check_type else 3
        plain = not check_type and not self.mem_limit
        part_bytes = self.part_bytes
        if plain:
            payloads = reply[0::step]
            if None not in payloads and max(map(len, payloads), default=0) <= part_bytes:
                # Every key read whole (the common batch): emitted as columns, no loop here.
                emitter.upsert_dumps(keys, payloads, reply[1::step], read_ms)
                return [], False
        again, deferred, big_keys = [], [], []
        whole: tuple[list, list, list] = ([], [], [])   # keys read whole: emitted together
        for i, key in enumerate(keys):
            payload, second, size = reply[step * i], reply[step * i + 1], reply[step * i + 2]
            if plain and payload is not None and len(payload) <= part_bytes:
                whole[0].append(key)
                whole[1].append(payload)
                whole[2].append(second)
                continue
            if payload is None and second == -3:
                deferred.append(key)
                continue
            if payload is None and second == -2 or (
                    check_type and text(reply[step * i + 3]) != self.type_filter):
                emitter.delete(key, read_ms)
                continue
            if self.mem_limit and size > self.mem_limit:
                self.sizer.over_limit(key, size)
                if self.mem_limit_skip:
                    continue
            if payload is None:
                big_keys.append((key, text(second)))
            elif len(payload) > part_bytes:
                self.splitter.emit_payload(key, payload, read_ms, emitter.expire(second, read_ms))
            else:
                emitter.upsert(key, read_ms, emitter.expire(second, read_ms), payload=payload)
        emitter.upsert_dumps(whole[0], whole[1], whole[2], read_ms)
        for key, type_ in big_keys:
            if type_ not in values.TYPES:         # a module type: no typed form, DUMP it
                again.append(key)
            elif not self.pager.read(key, type_):
                again.append(key)
        if again:
            # Changed type while read in parts, or a module value above the threshold: the
            # pipelined path reads it (module values whole, with DUMP).
            again = self.sizer.read(again, check_type)
        return again + deferred, bool(deferred) and not again
