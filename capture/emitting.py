"""Emitting: events built from what was read and appended to the log, counted, and the
keys the log knows followed; expiries turned into absolute times.

Whole DUMP payloads and deletes are ``state.v1`` records on a log that keeps one record per key
(compacted Kafka), except what a scan read: a block is never compacted away, so scans (one copy of
the keyspace per pass) use blocks there and live changes stay records compaction replaces. In a
block, whole DUMP payloads and deletes go straight into the columns of the block of their
partition (no Event object per key); a block is appended once it holds BLOCK_EVENTS events or
BLOCK_BYTES, and every pending block is appended at the end of each read
and before any record that is not part of a block, so the log gets every event in the order it
was read. Sequence numbers are given when a block is appended: consecutive within a block.
"""
from __future__ import annotations

from conveyor.capture.ledger import crcs_of, expiries
from conveyor.events import Columns, Event, Kind, block_record_key, now_millis, record_key

BLOCK_EVENTS = 1000               # events of one block at most
BLOCK_BYTES = 256 * 1024          # key and payload bytes of one block at most (capped by the log)


class Emitting:
    """Events onto the log (part of StateReader)."""

    def _start_blocks(self) -> None:
        w = self.writer
        self.blocks = w.takes_blocks and not w.compacted     # read() decides per read
        self.block_bytes = max(1024, min(BLOCK_BYTES, w.max_record_bytes * 8 // 10))
        self._open_blocks: dict[int, Columns] = {}
        self._many = getattr(w, "partitions", 1) > 1

    def _column(self, key: bytes, payload: bytes | None, expire: int | None,
                read_ms: int) -> None:
        """An UPSERT (DELETE when ``payload`` is None) into its partition's block."""
        p = self.writer.partition_of(record_key(self.info.db, key)) if self._many else 0
        cols = self._open_blocks.get(p)
        if cols is None:
            cols = self._open_blocks[p] = Columns()
        elif cols.keys and cols.size + len(key) + len(payload or b"") > self.block_bytes:
            self._append_block(p)
            cols = self._open_blocks[p] = Columns()
        cols.add(key, payload, expire, read_ms)
        if len(cols.keys) >= BLOCK_EVENTS:
            self._append_block(p)

    def _upsert_dumps(self, keys: list[bytes], payloads: list[bytes], ttls: list[int],
                      read_ms: int) -> None:
        """UPSERTs of whole DUMP payloads read together, with their PEXPIRETIME (or PTTL): the
        hot path, into the columns of each partition's block a slice at a time."""
        if not keys:
            return
        self.counts.upserts += len(keys)
        if self.info.has_pexpiretime:
            expires = [t if t >= 0 else None for t in ttls]
        else:
            expires = [read_ms + t if t >= 0 else None for t in ttls]
        if self.ledger is not None:
            self.ledger.logged(keys, crcs_of(payloads), expiries(expires))
        if not self.blocks:
            self.counts.upserts -= len(keys)       # counted again one by one
            for k, p, x in zip(keys, payloads, expires):
                self._upsert(k, read_ms, x, payload=p)
            return
        if not self._many:
            self._extend(0, keys, payloads, expires, read_ms)
            return
        db, part_of = self.info.db, self.writer.partition_of
        by_part: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_part.setdefault(part_of(record_key(db, k)), []).append(i)
        for p, at in by_part.items():
            self._extend(p, [keys[i] for i in at], [payloads[i] for i in at],
                         [expires[i] for i in at], read_ms)

    def _extend(self, p: int, keys: list[bytes], payloads: list[bytes], expires: list,
                read_ms: int) -> None:
        """UPSERTs of one partition into its block, a slice at a time."""
        at = 0
        while at < len(keys):
            cols = self._open_blocks.get(p)
            if cols is None:
                cols = self._open_blocks[p] = Columns()
            end = min(len(keys), at + BLOCK_EVENTS - len(cols.keys))
            size = sum(map(len, keys[at:end])) + sum(map(len, payloads[at:end]))
            if cols.size + size <= self.block_bytes:
                cols.extend(keys[at:end], payloads[at:end], expires[at:end], read_ms, size)
            else:                                   # big payloads: the block fills by bytes
                for i in range(at, end):
                    self._column(keys[i], payloads[i], expires[i], read_ms)
            at = end
            cols = self._open_blocks.get(p)
            if cols is not None and len(cols.keys) >= BLOCK_EVENTS:
                self._append_block(p)

    def _append_block(self, p: int) -> None:
        cols = self._open_blocks.pop(p)
        db = self.info.db
        first = self.seq + 1
        self.seq += len(cols.keys)
        self.writer.append(block_record_key(db, len(cols.keys)),
                           self.codec.encode_block(db, self.capture_id, first, cols),
                           record_key(db, cols.keys[0]))

    def flush_blocks(self) -> None:
        """Every pending block onto the log (end of a read; before a record of another kind)."""
        for p in list(self._open_blocks):
            self._append_block(p)

    def _chunk(self, key, chunk_id, index, offset, part, last, read_ms, expire,
               payload: bytes | None = None) -> None:
        self.seq += 1
        ev = Event(Kind.UPSERT, self.info.db, key, payload, expire, read_ms, self.capture_id,
                   self.seq, value=part, chunk={"id": chunk_id, "index": index, "offset": offset,
                                                "last": last})
        if self._open_blocks:
            self.flush_blocks()
        if self.ledger is not None and index == 0:
            self.ledger.logged([key])         # in parts: no digest (read again by a rescan)
        self.writer.append(ev.record_key(), self.codec.encode(ev), ev.partition_key())
        self.counts.chunks += 1

    def _upsert(self, key: bytes, read_ms: int, expire, *, payload=None, value=None) -> None:
        if self.ledger is not None:
            if value is None and payload is not None:
                self.ledger.logged([key], payload[-8:], expiries([expire]))
            else:
                self.ledger.logged([key])     # a typed value: no digest
        self.counts.upserts += 1
        if value is None and self.blocks:
            self._column(key, payload, expire, read_ms)
            return
        if self._open_blocks:
            self.flush_blocks()
        if value is None:
            self._state(key, payload, expire, read_ms)
            return
        self.seq += 1
        ev = Event(Kind.UPSERT, self.info.db, key, payload, expire, read_ms, self.capture_id,
                   self.seq, value=value)
        self.writer.append(ev.record_key(), self.codec.encode(ev))

    def _state(self, key: bytes, payload: bytes | None, expire: int | None, read_ms: int) -> None:
        """A whole state (a DELETE when ``payload`` is None) as a record of its own."""
        self.seq += 1
        db = self.info.db
        self.writer.append(record_key(db, key), self.codec.encode_state(
            db, key, payload, expire, read_ms, self.capture_id, self.seq))

    def _delete(self, key: bytes, read_ms: int) -> None:
        self.counts.deletes += 1
        if self.ledger is not None:
            self.ledger.deleted([key])
        if self.blocks:
            self._column(key, None, None, read_ms)
        else:
            self._state(key, None, None, read_ms)

    def marker(self, kind: Kind, count: int | None = None, info: dict | None = None) -> None:
        if self._open_blocks:
            self.flush_blocks()
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
