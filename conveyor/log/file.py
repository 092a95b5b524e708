"""The embedded file log: segment files in a directory on local disk.

Layout of ``file:PATH``::

    PATH/00000000000000000000.log   segments, named by the number of their first record
    PATH/log-id                     the log's identity, written when the log is created
    PATH/groups/<group>.json        committed position of each consumer group
    PATH/groups/<group>.lock        held (flock) by the one reader of that group
    PATH/meta/<name>.json           small documents (capture checkpoints, apply status)
    PATH/dead-letter.jsonl          records apply could not process, and damaged log stretches
    PATH/writer.lock                held (flock) by the one writer

Records are framed as described in ``segment.py``. ``flush`` writes and fsyncs.

Damage. Only the tail of the last segment can be torn by a crash (a record half-written): the next
writer cuts the bytes after the last valid record there, and nothing else. A damaged stretch
anywhere else (a failed CRC, a flipped length) is left where it is: the writer appends after the
last valid record, the reader dead-letters the stretch (its segment file, real byte offset and
bytes), records a one-line reason in ``damaged`` and resynchronises on the next valid record.

Numbering. Offsets are record numbers: a segment's first record has the number in its name, the
next valid records count on from there, and a damaged stretch counts as no record. So lag is an
exact count of valid records not yet committed, and reaches 0 once the group read and committed
everything valid. (Records swallowed by a damaged stretch in a sealed segment leave a gap before
the next segment's number; the group's position jumps over it as it reads past the stretch, so the
gap counts in lag only until then.)

Retention (option ``retention``, e.g. ``7d``; units s, m, h, d; default 7d). Whole segments are
deleted, oldest first and never the one being written, once every group has committed past them
and they are older than the retention; a log no group has read yet keeps everything. After that
``history()`` is incomplete and ``replayable()`` is False, both saying why.

Commits. ``commit`` writes the group's position at most every COMMIT_INTERVAL_S while records
keep coming (and whenever reading pauses, ``status`` is asked, or the reader closes): a crash may
replay up to that much again, which whole-state events tolerate.

Groups. One reader per group: a second one is refused (a second ``apply`` of the same group would
overwrite the first one's position). Readers of other groups are independent.
"""
from __future__ import annotations

import base64
import fcntl
import gc
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote

from conveyor.errors import ConfigError, LogError, LogLost
from conveyor.events import block_size
from conveyor.log import file_compact, segment
from conveyor.log.base import (History, LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus, Record,
                               StartAt)
from conveyor.log.segment import SegmentScan

log = logging.getLogger("conveyor.log")

SEGMENT_BYTES = 256 * 1024 * 1024
POLL_INTERVAL_S = 0.02
IDENTITY_CHECK_S = 1.0           # a reader waiting for records checks the log's identity this often
FLUSH_BUFFER_BYTES = 8 * 1024 * 1024
DEFAULT_RETENTION = {"delete": "7d", "compact": "1h"}
CLEANUP = ("compact", "delete")
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024   # of a damaged stretch kept in dead-letter.jsonl
# A group's position is written (and fsynced) at most this often while records keep coming; a
# position committed meanwhile is written once reading pauses, by status() and by close(). An fsync
# also flushes what the writer wrote meanwhile: one per batch made apply wait on the disk.
COMMIT_INTERVAL_S = 0.25
SEGMENT_RE = re.compile(r"^(\d{20})\.log$")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
LOG_ID = "log-id"


def _path(uri: str) -> Path:
    rest = uri[len("file:"):]
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise LogError(f"log URI {uri!r} names no directory (use file:PATH)")
    return Path(rest).expanduser()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", lambda m: "%%%02X" % ord(m.group()), name)


def _duration(text: str) -> float:
    m = DURATION_RE.match(text)
    if not m:
        raise ConfigError(f"log option retention={text!r}: expected a number with s, m, h or d (e.g. 7d)")
    return float(m.group(1)) * UNITS[m.group(2)]


def _size_option(opts: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(opts.get(name, default))
    except ValueError:
        raise ConfigError(f"log option {name}={opts[name]!r} is not a whole number of bytes") from None
    if value <= 0:
        raise ConfigError(f"log option {name} must be positive")
    return value


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
    """The log directory, created (with its identity) if it holds no log yet."""
    root = _path(uri)
    try:
        for sub in ("", "groups", "meta"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LogError(f"cannot use log directory {root}: {e}") from e
    return root


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    """A directory holds a log when something created one there (an identity, segments, groups)."""
    root = _path(uri)
    if not root.is_dir():
        return False
    return (root / LOG_ID).exists() or (root / "groups").is_dir() or bool(_segments(root))


def remove_empty_file_log(uri: str) -> None:
    """Remove a log directory that holds no record (only what a reader made to wait in it)."""
    root = _path(uri)
    if any(p.stat().st_size for p in root.glob("*.log")) or (root / "dead-letter.jsonl").exists():
        return
    shutil.rmtree(root)


def _segments(root: Path) -> list[int]:
    try:
        return sorted(int(m.group(1)) for n in os.listdir(root) if (m := SEGMENT_RE.match(n)))
    except OSError as e:
        raise LogError(f"cannot list log directory {root}: {e}") from e


def _seg_path(root: Path, base: int) -> Path:
    return root / f"{base:020d}.log"


def _lock(path: Path, refusal: str):
    """An exclusive flock on ``path`` (released when the process ends), holding our pid."""
    f = open(path, "a+")
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    if not _try_lock(f):
        f.seek(0)
        holder = f.read().strip()
        # A reader or writer of this process dropped without close() (a crash inside a library
        # caller) holds the lock until it is collected: collect it, then try once more.
        if holder == me:
            gc.collect()
        if holder != me or not _try_lock(f):
            f.close()
            raise LogError(refusal.format(holder=holder or "another process"))
    f.truncate(0)
    f.write(me)
    f.flush()
    return f


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(f) -> None:
    if f is not None and not f.closed:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# -- identity ----------------------------------------------------------------------------------------
def _read_id(root: Path) -> str:
    try:
        return (root / LOG_ID).read_text().strip()
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise LogError(f"cannot read {root / LOG_ID}: {e}") from e


def _ensure_id(root: Path) -> str:
    """The log's id, created if the directory has none (a new log, or one older than identities).
    Linking a complete temporary file makes two processes starting at once agree on one id."""
    if found := _read_id(root):
        return found
    tmp = root / f"{LOG_ID}.{os.getpid()}.tmp"
    try:
        tmp.write_text(uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, root / LOG_ID)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError as e:
        raise LogError(f"cannot write {root / LOG_ID}: {e}") from e
    return _read_id(root)


def _check_identity(root: Path, log_id: str) -> None:
    now = _read_id(root)
    if now != log_id:
        raise LogLost(f"the log directory {root} was removed or recreated (its log-id was {log_id}, "
                      f"it is now {now or 'missing'})")


# -- retention ---------------------------------------------------------------------------------------
class Cleanup:
    """``cleanup=compact`` (default): sealed segments every group is past and older than the
    retention (default 1h) lose the records later ones supersede (conveyor/log/file_compact.py);
    ``apply --from earliest`` still rebuilds an empty target. ``cleanup=delete``: such segments
    (older than a retention of 7d by default) are deleted whole, and the log is no longer
    replayable from its start."""

    def __init__(self, opts: dict[str, str]) -> None:
        self.mode = opts.get("cleanup", "compact")
        if self.mode not in CLEANUP:
            raise ConfigError(f"log option cleanup={self.mode!r}: expected compact or delete")
        self.retention_s = _duration(opts.get("retention", DEFAULT_RETENTION[self.mode]))
        self.segment_bytes = _size_option(opts, "segment_bytes", SEGMENT_BYTES)
        self._running = None

    def __call__(self, root: Path) -> None:
        if self.mode == "delete":
            _retire(root, self.retention_s)
            return
        if self._running is not None and self._running.poll() is None:
            return                          # the last pass is still at work
        try:
            self._running = file_compact.start(root, self.retention_s, self.segment_bytes)
        except OSError as e:
            log.warning("log %s: cannot start a compaction: %s", root, e)


def _retire(root: Path, retention_s: float) -> None:
    """Delete the oldest segments every group has committed past and older than the retention."""
    groups = [_read_json(p) for p in (root / "groups").glob("*.json")]
    groups = [g for g in groups if g]
    if not groups:
        return                           # nobody read the log yet: it keeps everything
    past = min(g["segment"] for g in groups)
    now = time.time()
    for base in _segments(root)[:-1]:
        path = _seg_path(root, base)
        try:
            if base >= past or now - path.stat().st_mtime < retention_s:
                return
            path.unlink()
        except FileNotFoundError:
            continue                     # another process retired it first
        except OSError as e:
            raise LogError(f"cannot delete {path} (retention): {e}") from e
        log.info("log %s: deleted segment %s (every group is past it, older than the retention)",
                 root, path.name)


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _gone(segs: list[int]) -> str:
    """Why the log no longer holds every record ever appended, "" if it does."""
    if segs and segs[0] > 0:
        return f"segments before record {segs[0]} were deleted by retention"
    return ""


# -- writer ------------------------------------------------------------------------------------------
class FileLogWriter(LogWriter):
    takes_blocks = True             # one partition, never compacted

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.uri = uri
        self.segment_bytes = _size_option(opts, "segment_bytes", SEGMENT_BYTES)
        self.cleanup = Cleanup(opts)
        self.warnings: list[str] = []
        self._buf = bytearray()
        self._pending = 0
        self._lock = self._file = None
        self._open()

    def _open(self) -> None:
        self.root = _open_dir(self.uri)
        self._lock = _lock(self.root / "writer.lock", f"log {self.root} is being written by another "
                                                      "process ({holder}; a file log takes one capture at a time: "
                                                      "use a Kafka or Redis Streams log for several)")
        self.log_id = _ensure_id(self.root)
        self._base = (_segments(self.root) or [0])[-1]
        path = _seg_path(self.root, self._base)
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
        _check_identity(self.root, self.log_id)

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
        self._file = open(_seg_path(self.root, self._base), "ab")
        self._size = 0
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.cleanup(self.root)

    def flush(self, timeout: float = 60.0) -> None:
        _check_identity(self.root, self.log_id)   # never write on into a directory that was removed
        self._write()
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            raise LogError(f"cannot fsync log {self.root}: {e}") from e

    def history(self) -> History:
        self.flush()
        segs = _segments(self.root)
        why = _gone(segs)
        h = History(not why, iter(()), why)
        h.records = self._history(segs, h)
        return h

    def _history(self, segs: list[int], h: History):
        """Every valid record of every segment. A damaged stretch makes ``h`` incomplete (known
        only once the records were read)."""
        for base in segs:
            scan = SegmentScan(_seg_path(self.root, base))
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
        _unlock(self._lock)

    def close(self) -> None:
        if self._file is None or self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._close_files()


# -- reader ------------------------------------------------------------------------------------------
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
        self.root = _path(uri)
        self._group_file = self.root / "groups" / f"{_safe(group)}.json"
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
            self.log_id = _read_id(self.root)
            return
        self._open(start)

    def _open(self, start: StartAt) -> None:
        self.root = _open_dir(self.uri)
        self._lock = _lock(self.root / "groups" / f"{_safe(self.group)}.lock",
                           f"group {self.group!r} of log {self.root} is already being read by {{holder}}: "
                           "a file log has one reader per group (stop it, or use another --group)")
        self.log_id = _ensure_id(self.root)
        self.seek(start)
        self.cleanup(self.root)

    def check_identity(self) -> None:
        _check_identity(self.root, self.log_id)

    def adopt_new_log(self) -> None:
        """Read the directory as it is now, from its group position (its earliest record for a new
        log). Records polled before are void: they cannot be committed any more."""
        self._unsaved = None                 # a position in the log that is gone
        self.close()
        self._positions.clear()
        self._counted = (-1, 0, 0)
        self._open("committed")

    def replayable(self) -> tuple[bool, str]:
        why = _gone(_segments(self.root))
        return not why, why

    # -- positioning ---------------------------------------------------------------------------
    def _goto(self, seg: int, pos: int, offset: int) -> None:
        self._close_scan()
        self._seg, self._pos, self._offset = seg, pos, offset

    def seek(self, where: StartAt) -> None:
        segs = _segments(self.root)
        self._last = None
        self._unsaved = None
        if where == "committed":
            c = _read_json(self._group_file)
            if c:
                self._goto(c["segment"], c["pos"], c["offset"])
                return
            where = "earliest"
        if where == "earliest" or not segs:
            self._goto(segs[0] if segs else 0, 0, segs[0] if segs else 0)
        elif where == "latest":
            count, good = segment.count(_seg_path(self.root, segs[-1]))
            self._goto(segs[-1], good, segs[-1] + count)
        elif isinstance(where, datetime):
            self._seek_time(segs, int(where.timestamp() * 1000))
        else:
            raise LogError(f"cannot seek to {where!r}")
        self._save()

    def _seek_time(self, segs: list[int], ts_ms: int) -> None:
        for i, base in enumerate(segs):
            scan, off = SegmentScan(_seg_path(self.root, base)), base
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
            newer = [s for s in _segments(self.root) if s > self._seg]
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
            self._scan = SegmentScan(_seg_path(self.root, self._seg))
            return self._scan
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LogError(f"cannot read log {self.root}: {e}") from e
        self.check_identity()
        later = [s for s in _segments(self.root) if s > self._seg]
        if not later:
            return None                  # nothing written yet
        log.warning("log %s: segment %s is gone (deleted by retention?); reading on at segment %s",
                    self.root, _seg_path(self.root, self._seg).name, _seg_path(self.root, later[0]).name)
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
        name = _seg_path(self.root, self._seg).name
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
        _atomic_json(self._group_file, {"offset": offset, "segment": seg, "pos": pos,
                                        "updated_ms": time.time_ns() // 1_000_000})
        if seg != self._saved_seg:
            self._saved_seg = seg
            self.cleanup(self.root)      # the group may have left a segment behind

    # -- status --------------------------------------------------------------------------------
    def status(self) -> LogStatus:
        if self._lock is not None:
            self.save_commits()              # the lag counts from the last commit
        segs = _segments(self.root)
        end = 0
        if segs:
            # Count on from where the last call stopped: only new records are read.
            seg, pos, count = self._counted
            if seg != segs[-1]:
                seg, pos, count = segs[-1], 0, 0
            if self._seg == seg and self._pos > pos:
                # This reader already walked (and checked) the segment up to its position.
                pos, count = self._pos, self._offset - seg
            count, pos = segment.count(_seg_path(self.root, seg), pos, count)
            self._counted = (seg, pos, count)
            end = seg + count
        c = _read_json(self._group_file)
        committed = c["offset"] if c else None
        # A group numbered records before a stretch in the last segment was damaged may be ahead.
        lag = max(0, end - (committed if committed is not None else (segs[0] if segs else 0)))
        held = 0
        for base in segs:
            try:
                held += _seg_path(self.root, base).stat().st_size
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
        _unlock(self._lock)


def _held(data: bytes) -> str:
    """What a damaged stretch held, when it starts with a block whose key is intact: its key
    names how many events (keys) were lost with it."""
    if len(data) < segment.HEADER.size:
        return ""
    klen = segment.HEADER.unpack_from(data)[3]
    n = block_size(data[segment.HEADER.size:segment.HEADER.size + min(klen, 64)])
    return f" (a block of {n} keys: their states are lost with it)" if n else ""


class FileMetaStore(MetaStore):
    """Documents in PATH/meta, created on the first ``put`` (reading creates nothing)."""

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.dir = _path(uri) / "meta"

    def put(self, name: str, doc: dict) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LogError(f"cannot use log directory {self.dir.parent}: {e}") from e
        _atomic_json(self.dir / f"{_safe(name)}.json", doc)

    def get(self, name: str) -> dict | None:
        return _read_json(self.dir / f"{_safe(name)}.json")

    def documents(self) -> dict[str, dict]:
        if not self.dir.is_dir():
            return {}
        docs = {unquote(p.stem): _read_json(p) for p in sorted(self.dir.glob("*.json"))}
        return {name: doc for name, doc in docs.items() if doc is not None}
