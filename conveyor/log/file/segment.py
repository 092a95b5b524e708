"""Framing of the file log's segment files: reading records back, and finding them again after damage.

A record is ``length:u32 crc32:u32 timestamp_ms:i64 key_length:u32`` + key + value, where length
counts key + value and the CRC covers timestamp, key length, key and value.

A record is valid when its header is plausible (key length within the length, a timestamp between
2004 and 2109, the whole record inside the file) and its CRC matches. After an invalid one the scan
resynchronises: it looks forward, byte by byte, for the next offset where a valid record starts.
Candidates are found with a regular expression on the timestamp's high bytes, so a long damaged
stretch is crossed at C speed; each candidate must then pass the CRC check (a false match has a
chance of 2**-32, unless a value itself holds a well-formed record of this log).
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator

HEADER = struct.Struct("<IIqI")          # length, crc32, timestamp ms, key length
CRC_PART = struct.Struct("<qI")
READ_CHUNK = 4 * 1024 * 1024
# Timestamps are wall-clock milliseconds: every record written between late 2004 and 2109 has one in
# [2**40, 2**42), i.e. its three high bytes (header offset 13..15) are 01-03 00 00.
MIN_TS, MAX_TS = 1 << 40, 1 << 42
TS_HIGH = 13
CANDIDATE = re.compile(rb"[\x01-\x03]\x00\x00")

# (start, end, timestamp, key length, body) of a record; body is None for a damaged stretch
Item = tuple[int, int, int, int, "memoryview | None"]


def frame(key: bytes, value: bytes, ts: int) -> bytes:
    """The header of a record (the caller appends key and value)."""
    klen = len(key)
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(CRC_PART.pack(ts, klen))))
    return HEADER.pack(klen + len(value), crc, ts, klen)


class SegmentScan:
    """One segment file opened for reading, with a read buffer kept between calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "rb")
        self._buf = memoryview(b"")
        self._at = 0                     # file offset of _buf[0]

    def close(self) -> None:
        self._f.close()

    def size(self) -> int:
        return os.fstat(self._f.fileno()).st_size

    def raw(self, start: int, n: int) -> bytes:
        self._f.seek(start)
        return self._f.read(n)

    def _get(self, start: int, n: int) -> memoryview:
        """Bytes [start, start + n) of the file; the caller knows they exist."""
        off = start - self._at
        if off < 0 or off + n > len(self._buf):
            self._buf, self._at, off = memoryview(self.raw(start, max(n, READ_CHUNK))), start, 0
        return self._buf[off:off + n]

    def record_at(self, pos: int, size: int) -> tuple[int, int, int, memoryview] | None:
        """(end, timestamp, key length, body) of a valid record starting at ``pos``, else None."""
        if pos + HEADER.size > size:
            return None
        length, crc, ts, klen = HEADER.unpack(self._get(pos, HEADER.size))
        end = pos + HEADER.size + length
        if klen > length or end > size or not MIN_TS <= ts < MAX_TS:
            return None
        body = self._get(pos + HEADER.size, length)
        if zlib.crc32(body, zlib.crc32(CRC_PART.pack(ts, klen))) != crc:
            return None
        return end, ts, klen, body

    def resync(self, pos: int, size: int) -> int | None:
        """Where the first valid record after ``pos`` starts, None if there is none."""
        a = pos + 1
        while a + HEADER.size <= size:
            chunk = self.raw(a, READ_CHUNK + HEADER.size)
            for m in CANDIDATE.finditer(chunk, TS_HIGH, TS_HIGH + READ_CHUNK + 2):
                if self.record_at(a + m.start() - TS_HIGH, size):
                    return a + m.start() - TS_HIGH
            a += READ_CHUNK
        return None

    def walk(self, pos: int, *, sealed: bool) -> Iterator[Item]:
        """Records and damaged stretches from ``pos`` on. A stretch that no valid record follows is
        the tail: in a segment still being written (``sealed`` False) it may be a record in flight,
        so the walk stops before it; in a sealed one it is damage like any other."""
        size = self.size()
        while pos < size:
            rec = self.record_at(pos, size)
            if rec is None:
                # Bytes read ahead past the last valid record may have been a torn tail that a
                # writer cut and wrote again since: judge with a fresh read.
                self._buf = memoryview(b"")
                rec = self.record_at(pos, size)
            if rec is not None:
                end, ts, klen, body = rec
                yield pos, end, ts, klen, body
                pos = end
                continue
            nxt = self.resync(pos, size)
            if nxt is None:
                if sealed:
                    yield pos, size, 0, 0, None
                return
            yield pos, nxt, 0, 0, None
            pos = nxt


def count(path: Path, pos: int = 0, n: int = 0) -> tuple[int, int]:
    """(valid records, byte after the last of them) of a segment still being written, counting on
    from ``pos`` where ``n`` records end. Damaged stretches count as no record."""
    scan = SegmentScan(path)
    try:
        for _, end, _, _, body in scan.walk(pos, sealed=False):
            n += body is not None
            pos = end
    finally:
        scan.close()
    return n, pos
