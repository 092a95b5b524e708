"""Read the state of a batch of keys (DUMP + absolute expiry, one pipeline) and turn it into events."""
from __future__ import annotations

from dataclasses import dataclass

import redis

from conveyor.endpoints import ServerInfo
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.log import LogWriter


@dataclass
class ReadCounts:
    upserts: int = 0
    deletes: int = 0


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class StateReader:
    """Turns key names into UPSERT/DELETE events on the log, in the order the values were read.

    A key that is gone when read becomes a DELETE. With ``check_type`` (names that did not come from
    a SCAN with TYPE), a key of another type also becomes a DELETE: the target must not keep a key
    the filter no longer selects, and a delete is never dropped.
    """

    def __init__(self, *, source: redis.Redis, info: ServerInfo, writer: LogWriter, codec: Codec,
                 type_filter: str | None = None) -> None:
        self.source, self.info, self.writer, self.codec = source, info, writer, codec
        self.type_filter = type_filter
        self.counts = ReadCounts()
        self.seq = 0
        self.capture_id = ""
        # Live modes: names of keys the log says exist, and names read during a resync scan. A key
        # deleted while notifications were lost is in ``known`` but not seen by the scan: re-read.
        self.known: set[bytes] | None = None
        self.seen: set[bytes] | None = None

    def read(self, keys: list[bytes], *, check_type: bool = False) -> int:
        """Read and append events for ``keys``; returns how many events were appended."""
        check_type = check_type and self.type_filter is not None
        read_ms, replies = self._fetch(keys, check_type)
        step = 3 if check_type else 2
        absolute = self.info.has_pexpiretime
        db, cid, counts = self.info.db, self.capture_id, self.counts
        encode, append = self.codec.encode, self.writer.append
        known, seen = self.known, self.seen
        if seen is not None:
            seen.update(keys)
        for i, key in enumerate(keys):
            payload, ttl = replies[step * i], replies[step * i + 1]
            self.seq += 1
            gone = payload is None or ttl == -2
            if not gone and check_type and _text(replies[step * i + 2]) != self.type_filter:
                gone = True
            if gone:
                ev = Event(Kind.DELETE, db, key, None, None, read_ms, cid, self.seq)
                counts.deletes += 1
                if known is not None:
                    known.discard(key)
            else:
                expire = None if ttl == -1 else (ttl if absolute else read_ms + ttl)
                ev = Event(Kind.UPSERT, db, key, payload, expire, read_ms, cid, self.seq)
                counts.upserts += 1
                if known is not None:
                    known.add(key)
            append(ev.record_key(), encode(ev))
        return len(keys)

    def _fetch(self, keys: list[bytes], check_type: bool) -> tuple[int, list]:
        # The read time is taken before the pipeline: an expiry derived from PTTL can then only be
        # early, never late, so a replayed key never lives longer than on the source.
        read_ms = now_millis()
        pipe = self.source.pipeline(transaction=False)
        expiry = "PEXPIRETIME" if self.info.has_pexpiretime else "PTTL"
        for key in keys:
            pipe.execute_command("DUMP", key)
            pipe.execute_command(expiry, key)
            if check_type:
                pipe.execute_command("TYPE", key)
        return read_ms, pipe.execute()

    def marker(self, kind: Kind, count: int | None = None, info: dict | None = None) -> None:
        self.seq += 1
        ev = Event(kind, self.info.db, capture_id=self.capture_id, seq=self.seq,
                   read_time_ms=now_millis(), count=count, info=info or {})
        self.writer.append(ev.record_key(), self.codec.encode(ev))
