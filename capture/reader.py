"""Read the state of a batch of keys and turn it into events, in the order the values were read.

``--type dump`` (default): one pipeline of DUMP + absolute expiry per batch. ``--type struct``:
TYPE, then the typed read (GET, LRANGE, SMEMBERS, ZRANGE WITHSCORES, HGETALL, XRANGE + XINFO).

Big keys: with a size threshold, the batch first asks MEMORY USAGE; a key above it is read in
parts (HSCAN, SSCAN, ZSCAN, LRANGE ranges, XRANGE pages, GETRANGE ranges) and written to the log
as a sequence of chunk events, one page at a time, so no whole big key is ever held in memory.
A DUMP payload or typed value larger than the log's record limit is split into parts as well.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from conveyor import values
from conveyor.acl import in_script
from conveyor.endpoints import ServerInfo
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.log import LogWriter

log = logging.getLogger("conveyor.capture")

BIG_KEY_BYTES = 8 * 1024 * 1024     # MEMORY USAGE above which a key is read in parts
PART_BYTES = 1024 * 1024            # bytes of one part (capped by the log's record limit)
PAGE = 1000                         # elements asked per page of a big key
REREAD_ATTEMPTS = 5                 # a key that changes type while read is read again
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
MAX_NAMED = 20                      # keys named in reports (over --mem-limit)


@dataclass
class ReadCounts:
    upserts: int = 0
    deletes: int = 0
    chunked_keys: int = 0           # keys read in parts (big keys, split payloads)
    chunks: int = 0                 # part events written
    over_limit: int = 0             # keys above --mem-limit
    skipped: int = 0                # ... not migrated (--mem-limit-skip)
    over_limit_keys: list[tuple[bytes, int]] = field(default_factory=list)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _raw(response, **_):
    return response


class StateReader:
    """Turns key names into UPSERT/DELETE events on the log, in the order the values were read.

    A key that is gone when read becomes a DELETE. With ``check_type`` (names that did not come from
    a SCAN with TYPE), a key of another type also becomes a DELETE: the target must not keep a key
    the filter no longer selects, and a delete is never dropped.
    """

    def __init__(self, *, source: redis.Redis, info: ServerInfo, writer: LogWriter, codec: Codec,
                 type_filter: str | None = None, value_type: str = "dump",
                 big_key_bytes: int | None = BIG_KEY_BYTES, mem_limit: int | None = None,
                 mem_limit_skip: bool = False, page: int = PAGE) -> None:
        self.source, self.info, self.writer, self.codec = source, info, writer, codec
        self.type_filter = type_filter
        self.struct = value_type == "struct"
        self.big_key_bytes, self.mem_limit, self.mem_limit_skip = big_key_bytes, mem_limit, mem_limit_skip
        self.page = page
        self.part_bytes = max(1024, min(PART_BYTES, writer.max_record_bytes * 8 // 10))
        # Stream entries may repeat a field name: keep XRANGE replies as flat lists.
        source.set_response_callback("XRANGE", _raw)
        source.set_response_callback("XPENDING", _raw)
        self.counts = ReadCounts()
        self._script: bool | None = None    # None: not tried yet; False: the source refuses it
        self.seq = 0
        self.capture_id = ""
        # Live modes: names of keys the log says exist, and names read during a resync scan. A key
        # deleted while notifications were lost is in ``known`` but not seen by the scan: re-read.
        self.known: set[bytes] | None = None
        self.seen: set[bytes] | None = None

    @property
    def sizing(self) -> bool:
        return bool(self.big_key_bytes or self.mem_limit)

    def read(self, keys: list[bytes], *, check_type: bool = False) -> int:
        """Read and append events for ``keys``; returns how many keys were read."""
        check_type = check_type and self.type_filter is not None
        if self.seen is not None:
            self.seen.update(keys)
        if not self.sizing and not self.struct:
            self._read_dumps(keys, check_type)
            return len(keys)
        todo = keys
        for _ in range(REREAD_ATTEMPTS):
            if not self.struct and self._script is not False:
                res = self._read_scripted(todo, check_type)
                while res is not None and res[0] and res[1]:
                    res = self._read_scripted(res[0], check_type)    # over budget: go on
                if res is not None:
                    todo = res[0]
                    if not todo:
                        return len(keys)
                    continue                      # changed type meanwhile: another attempt
            todo = self._read_sized(todo, check_type)
            if not todo:
                return len(keys)
        raise redis.ResponseError(f"{len(todo)} keys kept changing type while being read "
                                  f"(first: {todo[0]!r})")

    # -- the plain path: DUMP + expiry in one pipeline -----------------------------------------
    def _read_dumps(self, keys: list[bytes], check_type: bool) -> None:
        read_ms = now_millis()
        pipe = self.source.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("DUMP", key)
            self._queue_expiry(pipe, key)
            if check_type:
                pipe.execute_command("TYPE", key)
        replies = pipe.execute()
        step = 3 if check_type else 2
        for i, key in enumerate(keys):
            payload, ttl = replies[step * i], replies[step * i + 1]
            if payload is None or ttl == -2 or (
                    check_type and _text(replies[step * i + 2]) != self.type_filter):
                self._delete(key, read_ms)
            elif len(payload) > self.part_bytes:
                self._split_payload(key, payload, read_ms, self._expire(ttl, read_ms))
            else:
                self._upsert(key, read_ms, self._expire(ttl, read_ms), payload=payload)

    # -- sized, one script per batch ------------------------------------------------------------
    def _read_scripted(self, keys: list[bytes], check_type: bool
                       ) -> tuple[list[bytes], bool] | None:
        """(keys to read again, whether only the budget deferred them); None when the source
        does not run scripts (the pipelined path takes over for good)."""
        read_ms = now_millis()
        big = self.big_key_bytes or 2 ** 62
        expiry = "PEXPIRETIME" if self.info.has_pexpiretime else "PTTL"
        try:
            if self._script is None:
                # Redis 7+: declared read-only, so it also runs on a replica and at maxmemory.
                body = ("#!lua flags=no-writes\n" + READ_SCRIPT if self.info.version >= (7, 0)
                        else READ_SCRIPT)
                self._sha = self.source.script_load(body)
            reply = self.source.evalsha(self._sha, len(keys), *keys, big, SCRIPT_BUDGET, expiry,
                                        1 if check_type else 0)
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
        step = 4 if check_type else 3
        again, deferred, big_keys = [], [], []
        for i, key in enumerate(keys):
            payload, second, size = reply[step * i], reply[step * i + 1], reply[step * i + 2]
            if payload is None and second == -3:
                deferred.append(key)
                continue
            if payload is None and second == -2 or (
                    check_type and _text(reply[step * i + 3]) != self.type_filter):
                self._delete(key, read_ms)
                continue
            if self.mem_limit and size > self.mem_limit:
                self._over_limit(key, size)
                if self.mem_limit_skip:
                    continue
            if payload is None:
                big_keys.append((key, _text(second)))
            elif len(payload) > self.part_bytes:
                self._split_payload(key, payload, read_ms, self._expire(second, read_ms))
            else:
                self._upsert(key, read_ms, self._expire(second, read_ms), payload=payload)
        for key, type_ in big_keys:
            if type_ not in values.TYPES:         # a module type: no typed form, DUMP it
                again.append(key)
            elif not self._read_big(key, type_):
                again.append(key)
        if again:
            # Changed type while read in parts, or a module value above the threshold: the
            # pipelined path reads it (module values whole, with DUMP).
            again = self._read_sized(again, check_type)
        return again + deferred, bool(deferred) and not again

    # -- sized / typed path --------------------------------------------------------------------
    def _read_sized(self, keys: list[bytes], check_type: bool) -> list[bytes]:
        """One round of reads; returns the keys to read again (changed type meanwhile)."""
        pipe = self.source.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("TYPE", key)
            if self.sizing:
                pipe.execute_command("MEMORY", "USAGE", key)
        first = pipe.execute(raise_on_error=False)
        step = 2 if self.sizing else 1
        small: list[tuple[bytes, str]] = []
        big: list[tuple[bytes, str]] = []
        read_ms = now_millis()
        for i, key in enumerate(keys):
            t = first[step * i]
            if isinstance(t, Exception):
                raise t
            type_ = _text(t)
            size = first[step * i + 1] if self.sizing else None
            size = size if isinstance(size, int) else None
            if type_ == "none" or (check_type and type_ != self.type_filter):
                self._delete(key, read_ms)
                continue
            if self.mem_limit and size is not None and size > self.mem_limit:
                self._over_limit(key, size)
                if self.mem_limit_skip:
                    continue
            if (self.big_key_bytes and size is not None and size > self.big_key_bytes
                    and type_ in values.TYPES):
                big.append((key, type_))
            else:
                small.append((key, type_))
        again = self._read_small(small) if small else []
        for key, type_ in big:
            if not self._read_big(key, type_):
                again.append(key)
        return again

    def _read_small(self, items: list[tuple[bytes, str]]) -> list[bytes]:
        read_ms = now_millis()
        pipe = self.source.pipeline(transaction=False)
        spans = []
        for key, type_ in items:
            if self.struct and type_ in values.TYPES:
                n = values.queue_read(pipe, key, type_)
            else:
                pipe.execute_command("DUMP", key)
                n = 1
            self._queue_expiry(pipe, key)
            spans.append(n)
        replies = pipe.execute(raise_on_error=False)
        again, pos = [], 0
        for (key, type_), n in zip(items, spans):
            got, ttl = replies[pos:pos + n], replies[pos + n]
            pos += n + 1
            if isinstance(ttl, Exception):
                raise ttl
            if self.struct and type_ in values.TYPES:
                if any(isinstance(r, Exception) for r in got):
                    if any("WRONGTYPE" not in str(r) for r in got if isinstance(r, Exception)):
                        raise next(r for r in got if isinstance(r, Exception))
                    again.append(key)            # changed type between TYPE and the read
                    continue
                v = values.parse_read(type_, got)
                if v is None or ttl == -2:
                    self._delete(key, read_ms)
                else:
                    self._add_consumers(key, v)
                    self._emit_value(key, v, read_ms, self._expire(ttl, read_ms))
            else:
                payload = got[0]
                if isinstance(payload, Exception):
                    raise payload
                if payload is None or ttl == -2:
                    self._delete(key, read_ms)
                elif len(payload) > self.part_bytes:
                    self._split_payload(key, payload, read_ms, self._expire(ttl, read_ms))
                else:
                    self._upsert(key, read_ms, self._expire(ttl, read_ms), payload=payload)
        return again

    # -- big keys ------------------------------------------------------------------------------
    def _read_big(self, key: bytes, type_: str) -> bool:
        """Read ``key`` page by page into chunk events; False when it changed type meanwhile."""
        read_ms = now_millis()
        self.seq += 1
        chunk_id = f"{self.capture_id}-{self.seq}"
        held: dict | None = None          # one page of lookahead: the last part is marked last
        index = offset = 0
        try:
            for page in self._pages(key, type_):
                for part in self._split(page):
                    if held is not None:
                        self._chunk(key, chunk_id, index, offset, held, False, read_ms, None)
                        index += 1
                        offset += values.elements(held)
                    held = part
            if held is None:
                self._delete(key, read_ms)
                return True
            if type_ == "stream":
                held = self._with_stream_meta(key, held)
            ttl = self._expiry_now(key)
        except redis.ResponseError as e:
            if "WRONGTYPE" in str(e):
                if held is not None or index:
                    # Parts already on the log stay orphans; the key's next read replaces them.
                    log.warning("big key %r changed type while read in parts; reading it again", key)
                return False
            raise
        self._chunk(key, chunk_id, index, offset, held, True, read_ms, self._expire(ttl, read_ms))
        self.counts.chunked_keys += 1
        self.counts.upserts += 1
        if ttl == -2:                     # deleted while read: the delete follows the parts
            self._delete(key, now_millis())
        return True

    def _pages(self, key: bytes, type_: str):
        r, n = self.source, self.page
        if type_ in ("hash", "set", "zset"):
            cmd = {"hash": "HSCAN", "set": "SSCAN", "zset": "ZSCAN"}[type_]
            cursor = b"0"
            while True:
                cursor, items = r.execute_command(cmd, key, cursor, "COUNT", n)
                if type_ == "hash":
                    yield values.value("HASH", values._flat(items))
                elif type_ == "set":
                    yield values.value("SET", items)
                else:
                    members, scores = values._zset_pairs(items)
                    yield values.value("ZSET", members, scores)
                if int(cursor) == 0:
                    return
        elif type_ == "list":
            start = 0
            while True:
                items = r.execute_command("LRANGE", key, start, start + n - 1)
                if items:
                    yield values.value("LIST", items)
                if len(items) < n:
                    return
                start += n
        elif type_ == "string":
            start, size = 0, self.part_bytes
            while True:
                data = r.execute_command("GETRANGE", key, start, start + size - 1)
                if data:
                    yield values.value("STRING", [data])
                if len(data) < size:
                    return
                start += size
        elif type_ == "stream":
            start = b"-"
            while True:
                entries = r.execute_command("XRANGE", key, start, "+", "COUNT", n)
                if entries:
                    yield values.value("STREAM", stream=values.stream_doc(
                        [(e[0], values._flat(e[1])) for e in entries]))
                if len(entries) < n:
                    return
                start = b"(" + entries[-1][0]

    def _with_stream_meta(self, key: bytes, part: dict) -> dict:
        pipe = self.source.pipeline(transaction=False)
        pipe.execute_command("XINFO", "STREAM", key)
        pipe.execute_command("XINFO", "GROUPS", key)
        info, groups = pipe.execute()
        meta = values._stream([], values._pairs(info), groups, {})
        meta["entries"] = part["stream"]["entries"]
        v = values.value("STREAM", stream=meta)
        self._add_consumers(key, v)
        return v

    def _add_consumers(self, key: bytes, v: dict) -> None:
        """The consumer names and pending entries of a stream's groups (XGROUP CREATECONSUMER
        and XCLAIM ... FORCE recreate them)."""
        groups = v["stream"]["groups"] if v["type"] == "STREAM" and v["stream"] else []
        if not groups:
            return
        pipe = self.source.pipeline(transaction=False)
        for g in groups:
            pipe.execute_command("XINFO", "CONSUMERS", key, g["name"])
        for g, reply in zip(groups, pipe.execute(raise_on_error=False)):
            if not isinstance(reply, Exception):     # a group deleted meanwhile: none to add
                g["consumers"] = [values._bytes(values._pairs(c)["name"]) for c in reply]
        for g in groups:
            if g["pending"]:
                g["pel"] = self._pending(key, g["name"])

    def _pending(self, key: bytes, group: bytes) -> list[dict]:
        """XPENDING's extended form, page by page: id, owner, delivery time, delivery count."""
        out, start = [], b"-"
        while True:
            now = now_millis()
            try:
                page = self.source.execute_command("XPENDING", key, group, start, "+", self.page)
            except redis.ResponseError:
                return out                       # the group went away meanwhile
            for p in page:
                p = p.values() if isinstance(p, dict) else p
                eid, consumer, idle, count = list(p)[:4]
                out.append({"id": eid, "consumer": consumer, "delivery_time": now - int(idle),
                            "delivery_count": int(count)})
            if len(page) < self.page:
                return out
            start = b"(" + out[-1]["id"]

    def _split(self, v: dict) -> list[dict]:
        """``v`` in parts of at most ``part_bytes`` (an element bigger than that is one part)."""
        t = v["type"]
        if t == "STRING":
            data = b"".join(v["items"])
            step = self.part_bytes
            return [values.value("STRING", [data[i:i + step]])
                    for i in range(0, max(len(data), 1), step)]
        if t == "STREAM":
            entries = v["stream"]["entries"]
            sizes = [len(e["id"]) + sum(len(f) for f in e["fields"]) for e in entries]
            cuts = _cuts(sizes, self.part_bytes)
            if len(cuts) == 1:
                return [v]
            parts = [values.value("STREAM", stream={**v["stream"], "entries": entries[a:b],
                                                    "last_id": None, "groups": []})
                     for a, b in cuts]
            parts[-1]["stream"] = {**v["stream"], "entries": entries[cuts[-1][0]:]}
            return parts
        items, step = v["items"], 2 if t == "HASH" else 1
        sizes = [sum(len(x) for x in items[i:i + step]) + 8 for i in range(0, len(items), step)]
        cuts = _cuts(sizes, self.part_bytes)
        if len(cuts) == 1:
            return [v]
        return [values.value(t, items[a * step:b * step], v["scores"][a:b] if t == "ZSET" else ())
                for a, b in cuts]

    def _chunk(self, key, chunk_id, index, offset, part, last, read_ms, expire,
               payload: bytes | None = None) -> None:
        self.seq += 1
        ev = Event(Kind.UPSERT, self.info.db, key, payload, expire, read_ms, self.capture_id,
                   self.seq, value=part, chunk={"id": chunk_id, "index": index, "offset": offset,
                                                "last": last})
        self.writer.append(ev.record_key(), self.codec.encode(ev), ev.partition_key())
        self.counts.chunks += 1
        if self.known is not None and last:
            self.known.add(key)

    def _split_payload(self, key: bytes, payload: bytes, read_ms: int, expire) -> None:
        """A DUMP payload above the log's record limit, in parts reassembled by apply."""
        self.seq += 1
        chunk_id = f"{self.capture_id}-{self.seq}"
        step = self.part_bytes
        starts = range(0, len(payload), step)
        for index, start in enumerate(starts):
            self._chunk(key, chunk_id, index, start, None, index == len(starts) - 1, read_ms,
                        expire, payload=payload[start:start + step])
        self.counts.chunked_keys += 1
        self.counts.upserts += 1

    def _emit_value(self, key: bytes, v: dict, read_ms: int, expire) -> None:
        parts = self._split(v)
        if len(parts) == 1:
            self._upsert(key, read_ms, expire, value=v)
            return
        self.seq += 1
        chunk_id = f"{self.capture_id}-{self.seq}"
        offset = 0
        for index, part in enumerate(parts):
            self._chunk(key, chunk_id, index, offset, part, index == len(parts) - 1, read_ms, expire)
            offset += values.elements(part)
        self.counts.chunked_keys += 1
        self.counts.upserts += 1

    # -- events --------------------------------------------------------------------------------
    def _upsert(self, key: bytes, read_ms: int, expire, *, payload=None, value=None) -> None:
        self.seq += 1
        ev = Event(Kind.UPSERT, self.info.db, key, payload, expire, read_ms, self.capture_id,
                   self.seq, value=value)
        self.writer.append(ev.record_key(), self.codec.encode(ev))
        self.counts.upserts += 1
        if self.known is not None:
            self.known.add(key)

    def _delete(self, key: bytes, read_ms: int) -> None:
        self.seq += 1
        ev = Event(Kind.DELETE, self.info.db, key, None, None, read_ms, self.capture_id, self.seq)
        self.writer.append(ev.record_key(), self.codec.encode(ev))
        self.counts.deletes += 1
        if self.known is not None:
            self.known.discard(key)

    def _over_limit(self, key: bytes, size: int) -> None:
        c = self.counts
        c.over_limit += 1
        c.skipped += self.mem_limit_skip
        if len(c.over_limit_keys) < MAX_NAMED:
            c.over_limit_keys.append((key, size))
        log.warning("key %r uses %d bytes, above --mem-limit%s", key, size,
                    " (skipped)" if self.mem_limit_skip else "")

    # -- expiry --------------------------------------------------------------------------------
    def _queue_expiry(self, pipe, key: bytes) -> None:
        pipe.execute_command("PEXPIRETIME" if self.info.has_pexpiretime else "PTTL", key)

    def _expiry_now(self, key: bytes) -> int:
        return self.source.execute_command("PEXPIRETIME" if self.info.has_pexpiretime else "PTTL", key)

    def _expire(self, ttl: int, read_ms: int) -> int | None:
        # The read time is taken before the reads: an expiry derived from PTTL can then only be
        # early, never late, so a replayed key never lives longer than on the source.
        if ttl is None or ttl < 0:
            return None
        return ttl if self.info.has_pexpiretime else read_ms + ttl

    def marker(self, kind: Kind, count: int | None = None, info: dict | None = None) -> None:
        self.seq += 1
        ev = Event(kind, self.info.db, capture_id=self.capture_id, seq=self.seq,
                   read_time_ms=now_millis(), count=count, info=info or {})
        self.writer.append(ev.record_key(), self.codec.encode(ev))


def _cuts(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Ranges [a, b) of ``sizes`` whose sums stay under ``limit`` (at least one element each)."""
    cuts, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        if acc and acc + s > limit:
            cuts.append((start, i))
            start, acc = i, 0
        acc += s
    cuts.append((start, len(sizes)))
    return cuts
