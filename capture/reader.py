"""Read the state of a batch of keys and turn it into events, in the order the values were read.

``--type dump`` (default): one pipeline of DUMP + absolute expiry per batch. ``--type struct``:
TYPE, then the typed read (GET, LRANGE, SMEMBERS, ZRANGE WITHSCORES, HGETALL, XRANGE + XINFO).

Big keys: with a size threshold, the batch first asks MEMORY USAGE; a key above it is read in
parts (HSCAN, SSCAN, ZSCAN, LRANGE ranges, XRANGE pages, GETRANGE ranges) and written to the log
as a sequence of chunk events, one page at a time, so no whole big key is ever held in memory.
A DUMP payload or typed value larger than the log's record limit is split into parts as well.

One module per job, joined here: dumps (batch DUMP), sizing, paging (big keys), typed (typed
reads), stream_meta, splitting (payloads above the record limit) and emitting (events).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import redis

from conveyor.capture.dumps import SCRIPT_BUDGET, DumpReads
from conveyor.capture.emitting import Emitting
from conveyor.capture.ledger import Ledger
from conveyor.capture.paging import Paging
from conveyor.capture.sizing import Sizing
from conveyor.capture.splitting import Splitting, cuts_of
from conveyor.capture.stream_meta import StreamMeta
from conveyor.capture.typed import TypedReads
from conveyor.endpoints import ServerInfo
from conveyor.events import Codec
from conveyor.log import LogWriter

__all__ = ["BIG_KEY_BYTES", "SCRIPT_BUDGET", "ReadCounts", "StateReader", "_cuts"]
_cuts = cuts_of                     # the name the unit tests use


BIG_KEY_BYTES = 8 * 1024 * 1024     # MEMORY USAGE above which a key is read in parts
PART_BYTES = 1024 * 1024            # bytes of one part (capped by the log's record limit)
PAGE = 1000                         # elements asked per page of a big key
REREAD_ATTEMPTS = 5                 # a key that changes type while read is read again


@dataclass
class ReadCounts:
    upserts: int = 0
    deletes: int = 0
    chunked_keys: int = 0           # keys read in parts (big keys, split payloads)
    chunks: int = 0                 # part events written
    over_limit: int = 0             # keys above --mem-limit
    skipped: int = 0                # ... not migrated (--mem-limit-skip)
    over_limit_keys: list[tuple[bytes, int]] = field(default_factory=list)


def _raw(response, **_):
    return response


class StateReader(DumpReads, Sizing, TypedReads, Paging, StreamMeta, Splitting, Emitting):
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
        # Live modes: the key ledger (capture/ledger.py) told of every event before it is
        # appended, so that a rescan knows what was logged.
        self.ledger: Ledger | None = None
        self._start_blocks()

    @property
    def sizing(self) -> bool:
        return bool(self.big_key_bytes or self.mem_limit)

    def read(self, keys: list[bytes], *, check_type: bool = False, scanned: bool = False) -> int:
        """Read and append events for ``keys`` (``scanned``: keys a scan found); returns how
        many keys were read."""
        w = self.writer
        self.blocks = w.takes_blocks and (scanned or not w.compacted)
        n = self._read(keys, check_type)
        self.flush_blocks()
        return n

    def _read(self, keys: list[bytes], check_type: bool) -> int:
        check_type = check_type and self.type_filter is not None
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
