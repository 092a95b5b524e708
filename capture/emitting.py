"""Emitting: events built from what was read and appended to the log, counted, and the
keys the log knows followed; expiries turned into absolute times."""
from __future__ import annotations

from conveyor.events import Event, Kind, now_millis

class Emitting:
    """Events onto the log (part of StateReader)."""

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

    def marker(self, kind: Kind, count: int | None = None, info: dict | None = None) -> None:
        self.seq += 1
        ev = Event(kind, self.info.db, capture_id=self.capture_id, seq=self.seq,
                   read_time_ms=now_millis(), count=count, info=info or {})
        self.writer.append(ev.record_key(), self.codec.encode(ev))

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


def text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
