"""Writing the file log: records appended to the last segment, a new segment when it is full, a
torn tail cut when the writer opens (see Damage in the package docstring)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from conveyor.errors import LogError
from conveyor.log.base import History, LogWriter
from conveyor.log.file import segment
from conveyor.log.file.locks import lock, unlock
from conveyor.log.file.options import SEGMENT_BYTES, size_option
from conveyor.log.file.paths import check_log_id, ensure_id, open_dir, seg_path, segments
from conveyor.log.file.retention import Cleanup, gone
from conveyor.log.file.segment import SegmentScan

log = logging.getLogger("conveyor.log")

FLUSH_BUFFER_BYTES = 8 * 1024 * 1024


class FileLogWriter(LogWriter):
    takes_blocks = True             # one partition, never compacted

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.uri = uri
        self.segment_bytes = size_option(opts, "segment_bytes", SEGMENT_BYTES)
        self.cleanup = Cleanup(opts)
        self.warnings: list[str] = []
        self._buf = bytearray()
        self._pending = 0
        self._lock = self._file = None
        self._open()

    def _open(self) -> None:
        self.root = open_dir(self.uri)
        self._lock = lock(self.root / "writer.lock", f"log {self.root} is being written by another "
                                                     "process ({holder}; a file log takes one capture at a time: "
                                                     "use a Kafka or Redis Streams log for several)")
        self.log_id = ensure_id(self.root)
        self._base = (segments(self.root) or [0])[-1]
        path = seg_path(self.root, self._base)
        count, good = segment.count(path) if path.exists() else (0, 0)
        if path.exists():
            self._repair_tail(path, good)
        self._file = open(path, "ab")
        self._size = good
        self._next = self._base + count
        self.cleanup(self.root)

    def _repair_tail(self, path: Path, good: int) -> None:
        """Cut what follows the last valid record of the last segment: a record a crash tore (it
        was never reported flushed). Valid records are never cut: damage before one stays."""
        size = path.stat().st_size
        if size == good:
            return
        log.warning("log %s: cut %d bytes after the last valid record (byte %d of %s): a record torn "
                    "by a crash", self.root, size - good, good, path.name)
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())

    def check_identity(self) -> None:
        check_log_id(self.root, self.log_id)

    def adopt_new_log(self) -> None:
        """Write on into the directory as it is now (records not flushed yet stay buffered)."""
        self._close_files()
        self._open()

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        self._buf += segment.frame(key, value, time.time_ns() // 1_000_000)
        self._buf += key
        self._buf += value
        self._pending += 1
        if len(self._buf) >= FLUSH_BUFFER_BYTES:
            self._write()

    def _write(self) -> None:
        """Write the buffer out, rolling to a new segment whenever the next records do not fit
        (a segment holds at least one record, however big)."""
        while self._buf:
            if self._size and self._size + len(self._buf) > self.segment_bytes:
                self._roll()
            cut, n = self._fitting()
            try:
                self._file.write(self._buf if cut == len(self._buf) else self._buf[:cut])
                self._file.flush()
            except OSError as e:
                raise LogError(f"cannot write log {self.root}: {e}") from e
            self._size += cut
            self._next += n
            self._pending -= n
            del self._buf[:cut]

    def _fitting(self) -> tuple[int, int]:
        """(bytes, records) at the start of the buffer that fit in the current segment."""
        if self._size + len(self._buf) <= self.segment_bytes:
            return len(self._buf), self._pending
        cut = n = 0
        while cut < len(self._buf):
            end = cut + segment.HEADER.size + segment.HEADER.unpack_from(self._buf, cut)[0]
            if n and self._size + end > self.segment_bytes:
                break
            cut, n = end, n + 1
        return cut, n

    def _roll(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        self._base = self._next
        self._file = open(seg_path(self.root, self._base), "ab")
        self._size = 0
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.cleanup(self.root)

    def flush(self, timeout: float = 60.0) -> None:
        check_log_id(self.root, self.log_id)   # never write on into a directory that was removed
        self._write()
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            raise LogError(f"cannot fsync log {self.root}: {e}") from e

    def history(self) -> History:
        self.flush()
        segs = segments(self.root)
        why = gone(segs)
        h = History(not why, iter(()), why)
        h.records = self._history(segs, h)
        return h

    def _history(self, segs: list[int], h: History):
        """Every valid record of every segment. A damaged stretch makes ``h`` incomplete (known
        only once the records were read)."""
        for base in segs:
            scan = SegmentScan(seg_path(self.root, base))
            try:
                for start, _, _, klen, body in scan.walk(0, sealed=True):
                    if body is None:
                        if h.complete:
                            h.complete = False
                            h.why = f"a damaged stretch at byte {start} of {scan.path.name} was skipped"
                        continue
                    yield bytes(body[:klen]), bytes(body[klen:])
            finally:
                scan.close()

    def _close_files(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        unlock(self._lock)

    def close(self) -> None:
        if self._file is None or self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._close_files()
