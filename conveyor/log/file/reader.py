"""Reading the file log as a consumer group: polling across segments, the group's position
(committed, then written at most every COMMIT_INTERVAL_S), dead letters (records apply could not
process, damaged stretches) and the group's status."""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from datetime import datetime

from conveyor.errors import LogError
from conveyor.events import block_size
from conveyor.log.base import LogReader, LogStatus, PartitionStatus, Record, StartAt
from conveyor.log.file import segment
from conveyor.log.file.locks import lock, unlock
from conveyor.log.file.paths import (atomic_json, check_log_id, ensure_id, open_dir, read_id, read_json,
                                     root_of, safe_name, seg_path, segments)
from conveyor.log.file.retention import Cleanup, gone
from conveyor.log.file.segment import SegmentScan

log = logging.getLogger("conveyor.log")

POLL_INTERVAL_S = 0.02
IDENTITY_CHECK_S = 1.0           # a reader waiting for records checks the log's identity this often
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024   # of a damaged stretch kept in dead-letter.jsonl
# A group's position is written (and fsynced) at most this often while records keep coming; a
# position committed meanwhile is written once reading pauses, by status() and by close(). An fsync
# also flushes what the writer wrote meanwhile: one per batch made apply wait on the disk.
COMMIT_INTERVAL_S = 0.25


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class FileLogReader(LogReader):
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed",
                 *, observe: bool = False, peek: bool = False) -> None:
        self.uri = uri
        self.peek = peek                 # a dry run: the group's position file is never written
        self.group = group
        self.consumer = opts.get("consumer") or f"{socket.gethostname()}-{os.getpid()}"
        self.cleanup = Cleanup(opts)
        self.damaged: list[str] = []
        self.warnings: list[str] = []
        self._lock = self._scan = None
        self.root = root_of(uri)
        self._group_file = self.root / "groups" / f"{safe_name(group)}.json"
        self._seg, self._pos, self._offset = -1, 0, 0
        # offset after a polled record -> (offset, segment, byte) a commit of it saves
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._last: int | None = None    # key of the last polled record in _positions
        self._counted = (-1, 0, 0)       # status(): (segment, byte, records) counted so far
        self._checked = time.monotonic()
        self._saved_seg = -1
        self._unsaved: tuple[int, int, int] | None = None   # committed, not written yet
        self._saved_at = 0.0
        if observe:                      # status() only: it creates, locks and moves nothing
            self.log_id = read_id(self.root)
            return
        self._open(start)

    def _open(self, start: StartAt) -> None:
        self.root = open_dir(self.uri)
        self._lock = lock(self.root / "groups" / f"{safe_name(self.group)}.lock",
                          f"group {self.group!r} of log {self.root} is already being read by {{holder}}: "
                          "a file log has one reader per group (stop it, or use another --group)")
        self.log_id = ensure_id(self.root)
        self.seek(start)
        self.cleanup(self.root)

    def check_identity(self) -> None:
        check_log_id(self.root, self.log_id)

    def adopt_new_log(self) -> None:
        """Read the directory as it is now, from its group position (its earliest record for a new
        log). Records polled before are void: they cannot be committed any more."""
        self._unsaved = None                 # a position in the log that is gone
        self.close()
        self._positions.clear()
        self._counted = (-1, 0, 0)
        self._open("committed")

    def replayable(self) -> tuple[bool, str]:
        why = gone(segments(self.root))
        return not why, why

    # -- positioning ---------------------------------------------------------------------------
    def _goto(self, seg: int, pos: int, offset: int) -> None:
        self._close_scan()
        self._seg, self._pos, self._offset = seg, pos, offset

    def seek(self, where: StartAt) -> None:
        segs = segments(self.root)
        self._last = None
        self._unsaved = None
        if where == "committed":
            c = read_json(self._group_file)
            if c:
                self._goto(c["segment"], c["pos"], c["offset"])
                return
            where = "earliest"
        if where == "earliest" or not segs:
            self._goto(segs[0] if segs else 0, 0, segs[0] if segs else 0)
        elif where == "latest":
            count, good = segment.count(seg_path(self.root, segs[-1]))
            self._goto(segs[-1], good, segs[-1] + count)
        elif isinstance(where, datetime):
            self._seek_time(segs, int(where.timestamp() * 1000))
        else:
            raise LogError(f"cannot seek to {where!r}")
        self._save()

    def _seek_time(self, segs: list[int], ts_ms: int) -> None:
        for i, base in enumerate(segs):
            scan, off = SegmentScan(seg_path(self.root, base)), base
            try:
                for start, _, ts, _, body in scan.walk(0, sealed=i < len(segs) - 1):
                    if body is not None and ts >= ts_ms:
                        self._goto(base, start, off)
                        return
                    off += body is not None
            finally:
                scan.close()
        self.seek("latest")

    # -- reading -------------------------------------------------------------------------------
    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            out = self._read(max_records)
            if out or time.monotonic() >= deadline:
                return out
            self.save_commits()              # reading pauses: the last commit is written now
            if time.monotonic() - self._checked >= IDENTITY_CHECK_S:
                self._checked = time.monotonic()
                self.check_identity()
            time.sleep(POLL_INTERVAL_S)

    def _read(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        while (scan := self._open_scan()) is not None:
            self._take(scan.walk(self._pos, sealed=False), out, max_records)
            if out:
                return out
            # Nothing new here. Once the writer has rolled to a newer segment this one is complete:
            # read what it still holds (its end, if not a record, is damage), then move on.
            newer = [s for s in segments(self.root) if s > self._seg]
            if not newer:
                return out
            self._take(scan.walk(self._pos, sealed=True), out, max_records)
            if out:
                return out
            self._move(newer[0])
        return out

    def _take(self, items, out: list[Record], max_records: int) -> None:
        for start, end, ts, klen, body in items:
            if body is None:
                self._damage(start, end)
                self._pos = end
                self._passed()
                continue
            out.append(Record("0", self._offset, bytes(body[:klen]), bytes(body[klen:]), ts))
            self._offset += 1
            self._pos = end
            self._positions[self._offset] = (self._offset, self._seg, end)
            self._last = self._offset
            if len(out) >= max_records:
                return

    def _open_scan(self) -> SegmentScan | None:
        if self._scan is not None:
            return self._scan
        try:
            self._scan = SegmentScan(seg_path(self.root, self._seg))
            return self._scan
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LogError(f"cannot read log {self.root}: {e}") from e
        self.check_identity()
        later = [s for s in segments(self.root) if s > self._seg]
        if not later:
            return None                  # nothing written yet
        log.warning("log %s: segment %s is gone (deleted by retention?); reading on at segment %s",
                    self.root, seg_path(self.root, self._seg).name, seg_path(self.root, later[0]).name)
        self._move(later[0])
        return self._open_scan()

    def _move(self, seg: int) -> None:
        """On to the next segment, whose name is the number of its first record."""
        self._goto(seg, 0, seg)
        self._passed()

    def _passed(self) -> None:
        """The reader moved past something that is not a record (a damaged stretch, the end of a
        segment): committing the last record polled commits past it too; with nothing polled and
        not committed, the group's position moves now (so that lag can reach 0)."""
        if self._last in self._positions:
            self._positions[self._last] = (self._offset, self._seg, self._pos)
        else:
            self._save()

    def _damage(self, start: int, end: int) -> None:
        """Dead-letter a damaged stretch with its real place, and say so in ``damaged``."""
        name = seg_path(self.root, self._seg).name
        data = self._scan.raw(start, min(end - start, DEAD_LETTER_MAX_BYTES))
        reason = (f"damaged log stretch in {self.root / name} at byte {start} ({end - start} bytes, "
                  f"before record {self._offset}): no valid record there; dead-lettered and skipped"
                  + _held(data))
        self._dead_line({"segment": name, "byte": start, "length": end - start, "offset": self._offset,
                         "reason": reason, "group": self.group,
                         "data": base64.b64encode(data).decode()})
        log.warning("%s", reason)
        self.damaged.append(reason)

    def commit(self, records: list[Record]) -> None:
        if not records:
            return
        after = max(r.offset for r in records) + 1
        where = self._positions.get(after)
        if where is None:
            raise LogError(f"cannot commit offset {after - 1}: it was not polled by this reader")
        self.check_identity()
        self._positions = {o: p for o, p in self._positions.items() if o > after}
        self._unsaved = where
        if time.monotonic() - self._saved_at >= COMMIT_INTERVAL_S:
            self.save_commits()

    def save_commits(self) -> None:
        """Write the last position committed, if it is not written yet."""
        if self._unsaved is not None:
            where, self._unsaved = self._unsaved, None
            self._save(*where)
            self._saved_at = time.monotonic()

    def _save(self, offset: int | None = None, seg: int | None = None, pos: int | None = None) -> None:
        self._unsaved = None                 # this position is at or after any commit pending
        if self.peek:
            return
        if offset is None:
            offset, seg, pos = self._offset, self._seg, self._pos
        atomic_json(self._group_file, {"offset": offset, "segment": seg, "pos": pos,
                                       "updated_ms": time.time_ns() // 1_000_000})
        if seg != self._saved_seg:
            self._saved_seg = seg
            self.cleanup(self.root)      # the group may have left a segment behind

    # -- status --------------------------------------------------------------------------------
    def status(self) -> LogStatus:
        if self._lock is not None:
            self.save_commits()              # the lag counts from the last commit
        segs = segments(self.root)
        end = 0
        if segs:
            # Count on from where the last call stopped: only new records are read.
            seg, pos, count = self._counted
            if seg != segs[-1]:
                seg, pos, count = segs[-1], 0, 0
            if self._seg == seg and self._pos > pos:
                # This reader already walked (and checked) the segment up to its position.
                pos, count = self._pos, self._offset - seg
            count, pos = segment.count(seg_path(self.root, seg), pos, count)
            self._counted = (seg, pos, count)
            end = seg + count
        c = read_json(self._group_file)
        committed = c["offset"] if c else None
        # A group numbered records before a stretch in the last segment was damaged may be ahead.
        lag = max(0, end - (committed if committed is not None else (segs[0] if segs else 0)))
        held = 0
        for base in segs:
            try:
                held += seg_path(self.root, base).stat().st_size
            except FileNotFoundError:
                pass                          # compacted or retired meanwhile
        return LogStatus(f"file:{self.root}", self.group, [PartitionStatus("0", committed, end, lag)],
                         f"{mib(held)} on disk in {len(segs)} segments (cleanup={self.cleanup.mode})")

    def dead_letter(self, record: Record, reason: str) -> None:
        self._dead_line({"partition": record.partition, "offset": record.offset,
                         "timestamp_ms": record.timestamp_ms, "reason": reason, "group": self.group,
                         "key": base64.b64encode(record.key).decode(),
                         "value": base64.b64encode(record.value).decode()})

    def _dead_line(self, doc: dict) -> None:
        try:
            with open(self.root / "dead-letter.jsonl", "a") as f:
                f.write(json.dumps(doc) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise LogError(f"cannot write dead letter to {self.root}: {e}") from e

    def _close_scan(self) -> None:
        if self._scan is not None:
            self._scan.close()
            self._scan = None

    def close(self) -> None:
        if self._lock is not None and not self._lock.closed:
            self.save_commits()
        self._close_scan()
        unlock(self._lock)


def _held(data: bytes) -> str:
    """What a damaged stretch held, when it starts with a block whose key is intact: its key
    names how many events (keys) were lost with it."""
    if len(data) < segment.HEADER.size:
        return ""
    klen = segment.HEADER.unpack_from(data)[3]
    n = block_size(data[segment.HEADER.size:segment.HEADER.size + min(klen, 64)])
    return f" (a block of {n} keys: their states are lost with it)" if n else ""

