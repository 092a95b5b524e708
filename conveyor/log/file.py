"""The embedded file log: segment files in a directory on local disk.

Layout of ``file:PATH``::

    PATH/00000000000000000000.log   segments, named by the offset of their first record
    PATH/groups/<group>.json        committed position of each consumer group
    PATH/meta/<name>.json           small documents (capture checkpoints, apply status)
    PATH/dead-letter.jsonl          records apply could not process, with the reason
    PATH/writer.lock                held (flock) by the one writer

A record is ``length:u32 crc32:u32 timestamp_ms:i64 key_length:u32`` + key + value, where length
counts key + value and the CRC covers timestamp, key length, key and value. Offsets are record
numbers, so lag is an exact record count. ``flush`` writes and fsyncs; a torn record at the tail
(a crash mid-write) is truncated when the next writer opens the log. A record whose CRC does not
match anywhere else is corruption and raises LogError: it is never skipped silently.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import struct
import time
import zlib
from datetime import datetime
from pathlib import Path

from conveyor.errors import LogError
from conveyor.log.base import (History, LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus, Record,
                               StartAt)

HEADER = struct.Struct("<IIqI")          # length, crc32, timestamp ms, key length
CRC_PART = struct.Struct("<qI")
SEGMENT_BYTES = 256 * 1024 * 1024
READ_CHUNK = 4 * 1024 * 1024
POLL_INTERVAL_S = 0.02
FLUSH_BUFFER_BYTES = 8 * 1024 * 1024
SEGMENT_RE = re.compile(r"^(\d{20})\.log$")


def _path(uri: str) -> Path:
    rest = uri[len("file:"):]
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise LogError(f"log URI {uri!r} names no directory (use file:PATH)")
    return Path(rest).expanduser()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", lambda m: "%%%02X" % ord(m.group()), name)


def _atomic_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise LogError(f"cannot write {path}: {e}") from e


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LogError(f"cannot read {path}: {e}") from e


def _open_dir(uri: str) -> Path:
    root = _path(uri)
    try:
        for sub in ("", "groups", "meta"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LogError(f"cannot use log directory {root}: {e}") from e
    return root


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    return _path(uri).is_dir()


def _segments(root: Path) -> list[int]:
    try:
        return sorted(int(m.group(1)) for n in os.listdir(root) if (m := SEGMENT_RE.match(n)))
    except OSError as e:
        raise LogError(f"cannot list log directory {root}: {e}") from e


def _seg_path(root: Path, base: int) -> Path:
    return root / f"{base:020d}.log"


def _parse(buf, pos: int, end: int, where: str, *, strict: bool = True):
    """Yields (start, next_pos, ts, key, value) of whole records in buf[pos:end]."""
    hsize = HEADER.size
    unpack = HEADER.unpack_from
    while end - pos >= hsize:
        length, crc, ts, klen = unpack(buf, pos)
        nxt = pos + hsize + length
        if nxt > end:
            return
        body = buf[pos + hsize:nxt]
        if klen > length or zlib.crc32(body, zlib.crc32(CRC_PART.pack(ts, klen))) != crc:
            if strict:
                raise LogError(f"corrupt record in {where} at byte {pos}: checksum mismatch")
            return
        yield pos, nxt, ts, bytes(body[:klen]), bytes(body[klen:])
        pos = nxt


def _scan_segment(path: Path, pos: int = 0, count: int = 0, *, verify: bool = True
                  ) -> tuple[int, int]:
    """(records, bytes of whole valid records) of a segment, counting on from ``pos`` where
    ``count`` records end; stops at the first torn record (and, with ``verify``, the first whose
    CRC does not match). Reads READ_CHUNK at a time: memory stays flat whatever the segment size."""
    hsize, unpack = HEADER.size, HEADER.unpack_from
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos + hsize <= size:
            f.seek(pos)
            data = f.read(READ_CHUNK)
            length = unpack(data, 0)[0]
            if pos + hsize + length > size:
                break                                    # torn tail
            if hsize + length > len(data):               # one record bigger than a chunk
                if verify:
                    data += f.read(hsize + length - len(data))
                else:
                    pos, count = pos + hsize + length, count + 1
                    continue
            start = pos
            if verify:
                for _, nxt, *_ in _parse(memoryview(data), 0, len(data), str(path), strict=False):
                    pos, count = start + nxt, count + 1
            else:
                at = 0
                while at + hsize <= len(data):
                    nxt = at + hsize + unpack(data, at)[0]
                    if nxt > len(data):
                        break
                    at, count = nxt, count + 1
                pos = start + at
            if pos == start:
                break                                    # a bad record: stop before it
    return count, pos


class FileLogWriter(LogWriter):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.root = _open_dir(uri)
        self.segment_bytes = int(opts.get("segment_bytes", SEGMENT_BYTES))
        self._lock = open(self.root / "writer.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise LogError(f"log {self.root} is being written by another process "
                           "(one capture per log at a time)") from None
        segs = _segments(self.root) or [0]
        self._base = segs[-1]
        path = _seg_path(self.root, self._base)
        count, good = _scan_segment(path) if path.exists() else (0, 0)
        if path.exists() and path.stat().st_size != good:
            # A crash mid-write left a torn record: drop it (it was never reported flushed).
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        self._file = open(path, "ab")
        self._size = good
        self._next = self._base + count
        self._buf = bytearray()
        self._pending = 0

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        ts = time.time_ns() // 1_000_000
        klen = len(key)
        crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(CRC_PART.pack(ts, klen))))
        self._buf += HEADER.pack(klen + len(value), crc, ts, klen)
        self._buf += key
        self._buf += value
        self._pending += 1
        if len(self._buf) >= FLUSH_BUFFER_BYTES:
            self._write()

    def _write(self) -> None:
        if not self._buf:
            return
        try:
            if self._size and self._size + len(self._buf) > self.segment_bytes:
                self._roll()
            self._file.write(self._buf)
            self._file.flush()
        except OSError as e:
            raise LogError(f"cannot write log {self.root}: {e}") from e
        self._size += len(self._buf)
        self._next += self._pending
        self._buf = bytearray()
        self._pending = 0

    def _roll(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        self._base = self._next
        self._file = open(_seg_path(self.root, self._base), "ab")
        self._size = 0
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def flush(self, timeout: float = 60.0) -> None:
        self._write()
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            raise LogError(f"cannot fsync log {self.root}: {e}") from e

    def history(self) -> History:
        self.flush()
        return History(True, self._history())

    def _history(self):
        """Every record of every segment; a file log never removes one."""
        for base in _segments(self.root):
            path = _seg_path(self.root, base)
            with open(path, "rb") as f:
                held = b""
                while data := f.read(READ_CHUNK):
                    held = held + data if held else data
                    mv, pos = memoryview(held), 0
                    for _, pos, _, key, value in _parse(mv, 0, len(held), str(path)):
                        yield key, value
                    mv.release()
                    held = held[pos:]

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


class FileLogReader(LogReader):
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed",
                 *, observe: bool = False) -> None:
        self.root = _open_dir(uri)
        self.uri = uri
        self.group = group
        self._group_file = self.root / "groups" / f"{_safe(group)}.json"
        self._file = None
        self._seg = -1
        self._pos = 0
        self._offset = 0
        self._positions: dict[int, tuple[int, int]] = {}   # offset after a record -> (segment, byte)
        self._counted = (-1, 0, 0)       # status(): (segment, byte, records) counted so far
        committed = _read_json(self._group_file)
        if observe:                      # status() only: positioning would save the group
            return
        if start == "committed" and committed:
            self._goto(committed["segment"], committed["pos"], committed["offset"])
        else:
            self.seek("earliest" if start == "committed" else start)

    # -- positioning ---------------------------------------------------------------------------
    def _goto(self, seg: int, pos: int, offset: int) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._seg, self._pos, self._offset = seg, pos, offset

    def seek(self, where: StartAt) -> None:
        segs = _segments(self.root)
        if where == "committed":
            c = _read_json(self._group_file)
            if c:
                self._goto(c["segment"], c["pos"], c["offset"])
                return
            where = "earliest"
        if where == "earliest" or not segs:
            self._goto(segs[0] if segs else 0, 0, segs[0] if segs else 0)
        elif where == "latest":
            count, good = _scan_segment(_seg_path(self.root, segs[-1]))
            self._goto(segs[-1], good, segs[-1] + count)
        elif isinstance(where, datetime):
            self._seek_time(segs, int(where.timestamp() * 1000))
        else:
            raise LogError(f"cannot seek to {where!r}")
        self._save()

    def _seek_time(self, segs: list[int], ts_ms: int) -> None:
        for base in segs:
            data = _seg_path(self.root, base).read_bytes()
            off = base
            for start, _, ts, _, _ in _parse(memoryview(data), 0, len(data), "seek", strict=False):
                if ts >= ts_ms:
                    self._goto(base, start, off)
                    return
                off += 1
        self.seek("latest")

    # -- reading -------------------------------------------------------------------------------
    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            out = self._read(max_records)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(POLL_INTERVAL_S)

    def _read(self, max_records: int) -> list[Record]:
        path = _seg_path(self.root, self._seg)
        if self._file is None:
            if not path.exists():
                return []
            self._file = open(path, "rb")
        self._file.seek(self._pos)
        data = self._file.read(READ_CHUNK)
        out: list[Record] = []
        if data:
            mv = memoryview(data)
            nxt = 0
            base, seg, ends = self._pos, self._seg, self._positions
            for _, nxt, ts, key, value in _parse(mv, 0, len(data), f"{path}"):
                out.append(Record("0", self._offset, key, value, ts))
                self._offset += 1
                ends[self._offset] = (seg, base + nxt)
                if len(out) >= max_records:
                    break
            if not out and len(data) >= HEADER.size:
                length = HEADER.unpack_from(mv, 0)[0]
                if HEADER.size + length > READ_CHUNK:      # a record bigger than one chunk
                    data = data + self._file.read(HEADER.size + length - len(data))
                    return self._read_big(data, path)
            self._pos += nxt
        if out:
            return out
        # Nothing new here: move on once the writer has rolled to a newer segment.
        newer = [s for s in _segments(self.root) if s > self._seg]
        if newer and self._offset >= newer[0]:
            self._goto(newer[0], 0, self._offset)
            return self._read(max_records)
        return []

    def _read_big(self, data: bytes, path: Path) -> list[Record]:
        out = []
        for _, nxt, ts, key, value in _parse(memoryview(data), 0, len(data), f"{path}"):
            out.append(Record("0", self._offset, key, value, ts))
            self._offset += 1
            self._pos += nxt
            self._positions[self._offset] = (self._seg, self._pos)
            break
        return out

    def commit(self, records: list[Record]) -> None:
        if not records:
            return
        after = max(r.offset for r in records) + 1
        where = self._positions.get(after)
        if where is None:
            raise LogError(f"cannot commit offset {after - 1}: it was not polled by this reader")
        self._positions = {o: p for o, p in self._positions.items() if o > after}
        self._save(after, *where)

    def _save(self, offset: int | None = None, seg: int | None = None, pos: int | None = None) -> None:
        if offset is None:
            offset, seg, pos = self._offset, self._seg, self._pos
        _atomic_json(self._group_file, {"offset": offset, "segment": seg, "pos": pos,
                                        "updated_ms": time.time_ns() // 1_000_000})

    # -- status --------------------------------------------------------------------------------
    def status(self) -> LogStatus:
        segs = _segments(self.root)
        end = 0
        if segs:
            # Count on from where the last call stopped: only new records are read.
            seg, pos, count = self._counted
            if seg != segs[-1]:
                seg, pos, count = segs[-1], 0, 0
            count, pos = _scan_segment(_seg_path(self.root, seg), pos, count, verify=False)
            self._counted = (seg, pos, count)
            end = seg + count
        c = _read_json(self._group_file)
        committed = c["offset"] if c else None
        lag = end - (committed if committed is not None else (segs[0] if segs else 0))
        return LogStatus(f"file:{self.root}", self.group, [PartitionStatus("0", committed, end, lag)])

    def dead_letter(self, record: Record, reason: str) -> None:
        line = json.dumps({"partition": record.partition, "offset": record.offset,
                           "timestamp_ms": record.timestamp_ms, "reason": reason,
                           "group": self.group,
                           "key": base64.b64encode(record.key).decode(),
                           "value": base64.b64encode(record.value).decode()})
        try:
            with open(self.root / "dead-letter.jsonl", "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise LogError(f"cannot write dead letter to {self.root}: {e}") from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class FileMetaStore(MetaStore):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.dir = _open_dir(uri) / "meta"

    def put(self, name: str, doc: dict) -> None:
        _atomic_json(self.dir / f"{_safe(name)}.json", doc)

    def get(self, name: str) -> dict | None:
        return _read_json(self.dir / f"{_safe(name)}.json")
