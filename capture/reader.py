"""Read the state of a batch of keys and turn it into events, in the order the values were read.

``--type dump`` (default): one pipeline of DUMP + absolute expiry per batch. ``--type struct``:
TYPE, then the typed read (GET, LRANGE, SMEMBERS, ZRANGE WITHSCORES, HGETALL, XRANGE + XINFO).

Big keys: with a size threshold, the batch first asks MEMORY USAGE; a key above it is read in
parts (HSCAN, SSCAN, ZSCAN, LRANGE ranges, XRANGE pages, GETRANGE ranges) and written to the log
as a sequence of chunk events, one page at a time, so no whole big key is ever held in memory.
A DUMP payload or typed value larger than the log's record limit is split into parts as well.

One object per job, joined here by composition: an Emitter (emitting: sequence, counters, blocks,
writer) handed to the readers, which hold what they are given and call one another only through
public methods: DumpReader (dumps: batch DUMP, plain or scripted), Sizer (sizing: TYPE + MEMORY
USAGE, --mem-limit), TypedReader (typed), BigKeyPager (paging: big keys), StreamMetaReader
(stream_meta) and Splitter (splitting: payloads above the record limit).
"""
from __future__ import annotations

import redis

from conveyor.capture.dumps import DumpReader
from conveyor.capture.emitting import Emitter, ReadCounts
from conveyor.capture.ledger import Ledger
from conveyor.capture.paging import BigKeyPager
from conveyor.capture.sizing import Sizer
from conveyor.capture.splitting import Splitter
from conveyor.capture.stream_meta import StreamMetaReader
from conveyor.capture.typed import TypedReader
from conveyor.endpoints import ServerInfo
from conveyor.events import Codec, Kind
from conveyor.log import LogWriter

__all__ = ["BIG_KEY_BYTES", "RAW_COMMANDS", "ReadCounts", "StateReader", "raw_reply"]


BIG_KEY_BYTES = 8 * 1024 * 1024     # MEMORY USAGE above which a key is read in parts
PART_BYTES = 1024 * 1024            # bytes of one part (capped by the log's record limit)
PAGE = 1000                         # elements asked per page of a big key
REREAD_ATTEMPTS = 5                 # a key that changes type while read is read again
# Stream entries may repeat a field name: these replies are kept as flat lists.
RAW_COMMANDS = ("XRANGE", "XPENDING")


def raw_reply(response, **_):
    """A response callback that keeps the reply as the server sent it."""
    return response


class StateReader:
    """Turns key names into UPSERT/DELETE events on the log, in the order the values were read.

    A key that is gone when read becomes a DELETE. With ``check_type`` (names that did not come from
    a SCAN with TYPE), a key of another type also becomes a DELETE: the target must not keep a key
    the filter no longer selects, and a delete is never dropped.
    """

    emitter_cls: type[Emitter] = Emitter    # ClusterStateReader holds deletes read from replicas
    scripts = True                          # False: the read script is never tried

    def __init__(self, *, source: redis.Redis, info: ServerInfo, writer: LogWriter, codec: Codec,
                 type_filter: str | None = None, value_type: str = "dump",
                 big_key_bytes: int | None = BIG_KEY_BYTES, mem_limit: int | None = None,
                 mem_limit_skip: bool = False, page: int = PAGE) -> None:
        self.source, self.info, self.writer, self.codec = source, info, writer, codec
        self.type_filter = type_filter
        self.struct = value_type == "struct"
        part_bytes = max(1024, min(PART_BYTES, writer.max_record_bytes * 8 // 10))
        for cmd in RAW_COMMANDS:
            source.set_response_callback(cmd, raw_reply)
        self.emitter = emitter = self.emitter_cls(writer=writer, codec=codec, info=info)
        splitter = Splitter(emitter, part_bytes)
        meta = StreamMetaReader(source, page)
        pager = BigKeyPager(source=source, info=info, emitter=emitter, splitter=splitter,
                            stream_meta=meta, page=page, part_bytes=part_bytes)
        typed = TypedReader(source=source, info=info, emitter=emitter, splitter=splitter,
                            stream_meta=meta, struct=self.struct, part_bytes=part_bytes)
        self.sizer = Sizer(source=source, emitter=emitter, typed=typed, pager=pager,
                           type_filter=type_filter, big_key_bytes=big_key_bytes,
                           mem_limit=mem_limit, mem_limit_skip=mem_limit_skip)
        self.dumps = DumpReader(source=source, info=info, emitter=emitter, splitter=splitter,
                                pager=pager, sizer=self.sizer, type_filter=type_filter,
                                part_bytes=part_bytes, big_key_bytes=big_key_bytes,
                                mem_limit=mem_limit, mem_limit_skip=mem_limit_skip,
                                scripts=self.scripts)

    # What the capture process reads and restores (a checkpoint), held by the emitter.
    @property
    def counts(self) -> ReadCounts:
        return self.emitter.counts

    @property
    def seq(self) -> int:
        return self.emitter.seq

    @seq.setter
    def seq(self, seq: int) -> None:
        self.emitter.seq = seq

    @property
    def capture_id(self) -> str:
        return self.emitter.capture_id

    @capture_id.setter
    def capture_id(self, capture_id: str) -> None:
        self.emitter.capture_id = capture_id

    @property
    def ledger(self) -> Ledger | None:
        return self.emitter.ledger

    @ledger.setter
    def ledger(self, ledger: Ledger | None) -> None:
        self.emitter.ledger = ledger

    def marker(self, kind: Kind, count: int | None = None, info: dict | None = None) -> None:
        self.emitter.marker(kind, count, info)

    def forget_script(self) -> None:
        """The source forgot the read script (a restart): load it again on the next read."""
        self.dumps.forget_script()

    def read(self, keys: list[bytes], *, check_type: bool = False, scanned: bool = False) -> int:
        """Read and append events for ``keys`` (``scanned``: keys a scan found); returns how
        many keys were read."""
        self.emitter.begin_read(scanned=scanned)
        n = self._read(keys, check_type)
        self.emitter.flush_blocks()
        return n

    def _read(self, keys: list[bytes], check_type: bool) -> int:
        check_type = check_type and self.type_filter is not None
        dumps, sizer = self.dumps, self.sizer
        if not sizer.sizing and not self.struct:
            dumps.read(keys, check_type)
            return len(keys)
        todo = keys
        for _ in range(REREAD_ATTEMPTS):
            if not self.struct and dumps.scripts:
                res = dumps.read_scripted(todo, check_type)
                while res is not None and res[0] and res[1]:
                    res = dumps.read_scripted(res[0], check_type)    # over budget: go on
                if res is not None:
                    todo = res[0]
                    if not todo:
                        return len(keys)
                    continue                      # changed type meanwhile: another attempt
            todo = sizer.read(todo, check_type)
            if not todo:
                return len(keys)
        raise redis.ResponseError(f"{len(todo)} keys kept changing type while being read "
                                  f"(first: {todo[0]!r})")
