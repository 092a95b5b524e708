"""The Emitter: events built from what the readers read, appended to the log, counted, and the
keys the log knows followed; expiries turned into absolute times.

It holds what the readers share and nothing else: the sequence, the counters, the open blocks, the
writer, the codec and the ledger. The readers (dumps, typed, paging, splitting) are handed it and
call only its public methods.

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

from dataclasses import dataclass, field

from conveyor.capture.ledger import Ledger
from conveyor.capture.ledger_files import crcs_of, expiries
from conveyor.endpoints import ServerInfo
from conveyor.events import Codec, Columns, Event, Kind, block_record_key, now_millis, record_key
from conveyor.log import LogWriter

BLOCK_EVENTS = 1000               # events of one block at most
BLOCK_BYTES = 256 * 1024          # key and payload bytes of one block at most (capped by the log)


@dataclass
class ReadCounts:
    upserts: int = 0
    deletes: int = 0
    chunked_keys: int = 0           # keys read in parts (big keys, split payloads)
    chunks: int = 0                 # part events written
    over_limit: int = 0             # keys above --mem-limit
    skipped: int = 0                # ... not migrated (--mem-limit-skip)
    over_limit_keys: list[tuple[bytes, int]] = field(default_factory=list)


def expiry_command(info: ServerInfo) -> str:
    """The command reading a key's expiry: PEXPIRETIME (absolute) where the source has it."""
    return "PEXPIRETIME" if info.has_pexpiretime else "PTTL"


class Emitter:
    """Events onto the log, in the order the readers hand them over."""

    def __init__(self, *, writer: LogWriter, codec: Codec, info: ServerInfo) -> None:
        self.writer, self.codec, self.info = writer, codec, info
        self.counts = ReadCounts()
        self.seq = 0
        self.capture_id = ""
        # Live modes: the key ledger (capture/ledger.py) told of every event before it is
        # appended, so that a rescan knows what was logged.
        self.ledger: Ledger | None = None
        self.blocks = writer.takes_blocks and not writer.compacted    # begin_read() decides
        self.block_bytes = max(1024, min(BLOCK_BYTES, writer.max_record_bytes * 8 // 10))
        self._open_blocks: dict[int, Columns] = {}
        self._many = getattr(writer, "partitions", 1) > 1

    def begin_read(self, *, scanned: bool) -> None:
        """A read starts: blocks where the log takes them and keeps them (a scan's keys, or a log
        that does not compact)."""
        w = self.writer
        self.blocks = w.takes_blocks and (scanned or not w.compacted)

    def expire(self, ttl: int | None, read_ms: int) -> int | None:
        """The absolute expiry of a PEXPIRETIME (or PTTL) reply; None: no expiry."""
        # The read time is taken before the reads: an expiry derived from PTTL can then only be
        # early, never late, so a replayed key never lives longer than on the source.
        if ttl is None or ttl < 0:
            return None
        return ttl if self.info.has_pexpiretime else read_ms + ttl

    # -- whole keys ---------------------------------------------------------------------------

    def upsert(self, key: bytes, read_ms: int, expire, *, payload=None, value=None) -> None:
        """An UPSERT of a whole DUMP ``payload`` or of a typed ``value``."""
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

    def upsert_dumps(self, keys: list[bytes], payloads: list[bytes], ttls: list[int],
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
                self.upsert(k, read_ms, x, payload=p)
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

    def delete(self, key: bytes, read_ms: int) -> None:
        self.counts.deletes += 1
        if self.ledger is not None:
            self.ledger.deleted([key])
        if self.blocks:
            self._column(key, None, None, read_ms)
        else:
            self._state(key, None, None, read_ms)

    # -- keys in parts ------------------------------------------------------------------------

    def chunk_id(self) -> str:
        """The id of the parts of one key (it takes a sequence number of its own)."""
        self.seq += 1
        return f"{self.capture_id}-{self.seq}"

    def chunk(self, key, chunk_id, index, offset, part, last, read_ms, expire,
              payload: bytes | None = None) -> None:
        """One part of a key read in parts: a typed ``part`` or a slice of a DUMP ``payload``;
        the ``last`` one counts the key."""
        self.seq += 1
        ev = Event(Kind.UPSERT, self.info.db, key, payload, expire, read_ms, self.capture_id,
                   self.seq, value=part, chunk={"id": chunk_id, "index": index, "offset": offset,
                                                "last": last})
        if self._open_blocks:
            self.flush_blocks()
        if self.ledger is not None and index == 0:
            self.ledger.logged([key])         # in parts: no digest (read again by a rescan)
        self.writer.append(ev.record_key(), self.codec.encode(ev), ev.partition_key())
        c = self.counts
        c.chunks += 1
        if last:
            c.chunked_keys += 1
            c.upserts += 1

    # -- markers and blocks -------------------------------------------------------------------

    def marker(self, kind: Kind, count: int | None = None, info: dict | None = None) -> None:
        if self._open_blocks:
            self.flush_blocks()
        self.seq += 1
        ev = Event(kind, self.info.db, capture_id=self.capture_id, seq=self.seq,
                   read_time_ms=now_millis(), count=count, info=info or {})
        self.writer.append(ev.record_key(), self.codec.encode(ev))

    def flush_blocks(self) -> None:
        """Every pending block onto the log (end of a read; before a record of another kind)."""
        for p in list(self._open_blocks):
            self._append_block(p)

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

    def _state(self, key: bytes, payload: bytes | None, expire: int | None, read_ms: int) -> None:
        """A whole state (a DELETE when ``payload`` is None) as a record of its own."""
        self.seq += 1
        db = self.info.db
        self.writer.append(record_key(db, key), self.codec.encode_state(
            db, key, payload, expire, read_ms, self.capture_id, self.seq))
