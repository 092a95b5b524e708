"""Compaction of the file log (``cleanup=compact``, the default): see conveyor/log/compaction.py.

Runs as a process of its own (``python -m conveyor.log.file.compact ROOT ...``, its lines in
``ROOT/compaction.out``), started by the writer or a reader when a sealed segment is due
(retention.py), so that capture keeps its core;
``compaction.lock`` lets one run at a time. A segment is due once every group has committed past
it and it is older than the retention. Its kept records are copied byte for byte (a rewritten
block gets a new frame with the old timestamp) into a new file that replaces it atomically;
consecutive compacted segments are merged while they fit in one. Records are numbered on from the
file's name as everywhere in the log, so numbers inside the compacted part close up, and the gap
before the next segment's number is one readers already step over. The key index
(``compaction.db``) is marked in doubt before a file is replaced and sure again once it follows
the new numbering; an index left in doubt by a crash is rebuilt from the segments.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
from pathlib import Path

from conveyor.events import Codec
from conveyor.log.compaction import KeyIndex, bounded, decide, rows_of
from conveyor.log.file import segment
from conveyor.log.file.paths import list_segments, seg_path
from conveyor.log.file.retention import due
from conveyor.log.file.segment import SegmentScan

log = logging.getLogger("conveyor.log")

INDEX = "compaction.db"
LOCK = "compaction.lock"


def _records(path: Path):
    """(timestamp, key, value) of each valid record of a sealed segment, damage skipped."""
    scan = SegmentScan(path)
    try:
        for _, _, ts, klen, body in scan.walk(0, sealed=True):
            if body is not None:
                yield ts, bytes(body[:klen]), bytes(body[klen:])
    finally:
        scan.close()


def _batches(path: Path, base: int, codec: Codec):
    """Lists of (number, timestamp, key, value, decoded) of a segment's records."""
    numbered = ((base + i, ts, key, value) for i, (ts, key, value) in enumerate(_records(path)))
    for batch in bounded(numbered, lambda r: len(r[3])):
        yield _decode(batch, codec)


def _decode(batch: list, codec: Codec) -> list:
    decoded = codec.decode_many([b[3] for b in batch])
    return [(*b, d) for b, d in zip(batch, decoded)]



class FileCompactor:
    def __init__(self, root: Path, retention_s: float, segment_bytes: int) -> None:
        self.root, self.retention_s, self.segment_bytes = root, retention_s, segment_bytes
        self.codec = Codec()
        self.index = KeyIndex(root / INDEX)
        if self.index.get_meta("in_doubt") or self.index.get_meta("log_id") != self._log_id():
            self.index.clear()
            self.index.set_meta("log_id", self._log_id())

    def _log_id(self) -> str:
        try:
            return (self.root / "log-id").read_text().strip()
        except OSError:
            return ""

    def close(self) -> None:
        self.index.close()

    def _catch_up(self, sealed: list[int]) -> None:
        """Index the sealed segments not indexed yet, in order."""
        done = self.index.get_meta("indexed_below", 0)
        for base in sealed:
            if base < done:
                continue
            self.index.db.execute("BEGIN")
            for batch in _batches(seg_path(self.root, base), base, self.codec):
                rows = [r for (n, _, _, _, d) in batch for r in rows_of(n, d)]
                self.index.note(rows)
            nxt = [s for s in list_segments(self.root) if s > base]
            self.index.set_meta("indexed_below", nxt[0] if nxt else base + 1)
            self.index.db.execute("COMMIT")

    def run(self) -> tuple[int, int]:
        """One pass: (bytes before, bytes after) of the segments compacted."""
        segs = list_segments(self.root)
        self._catch_up(segs[:-1])
        before, outputs = 0, {}
        into: tuple[int, int, int] | None = None      # (base, next number, size) of the last output
        for base in due(self.root, self.retention_s):
            path = seg_path(self.root, base)
            before += path.stat().st_size
            into = self._compact(base, path, into)
            outputs[into[0]] = into[2]
        return before, sum(outputs.values())

    def _compact(self, base: int, path: Path, into: tuple[int, int, int] | None):
        """Rewrite segment ``base``, at the end of ``into`` (the previous compacted segment) when
        both fit in one; (base, next number, size) of the file written."""
        if into is not None and into[2] < self.segment_bytes // 2:
            done = self._write(base, path, into)
            if done is not None:
                return done
        return self._write(base, path, None)

    def _write(self, base: int, path: Path, into: tuple[int, int, int] | None):
        """Write what segment ``base`` keeps to a temporary file (after a copy of ``into``'s
        file when merging), streamed: neither the records nor the index updates are held in
        memory (``moves`` and ``forgets`` are tables of the index). None when the merge would
        not fit in one segment."""
        target = seg_path(self.root, into[0]) if into is not None else path
        tmp = path.with_suffix(".compacting")
        db = self.index.db
        db.execute("CREATE TABLE IF NOT EXISTS moves (k BLOB PRIMARY KEY, rec INTEGER) WITHOUT ROWID")
        db.execute("CREATE TABLE IF NOT EXISTS forgets (k BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM moves")
        db.execute("DELETE FROM forgets")
        n = into[1] if into is not None else base
        with open(tmp, "wb") as f:
            if into is not None:
                with open(target, "rb") as old:
                    shutil.copyfileobj(old, f)
            start = f.tell()
            for batch in _batches(path, base, self.codec):
                latest = self.index.lookup([r[0] for (num, _, _, _, d) in batch
                                            for r in rows_of(num, d)])
                moves, forget = [], []
                for num, ts, key, value, d in batch:
                    o = decide(num, d, latest, self.codec)
                    forget += o.forget
                    if not o.keep:
                        continue
                    if o.value is not None:
                        key, value = o.key, o.value
                    moves += [(k, n) for k in o.latest]
                    f.write(segment.frame(key, value, ts))
                    f.write(key)
                    f.write(value)
                    n += 1
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO moves VALUES (?, ?)", moves)
                db.executemany("INSERT OR REPLACE INTO forgets VALUES (?)", [(k,) for k in forget])
                db.execute("COMMIT")
                if into is not None and f.tell() > self.segment_bytes:
                    break
            size = f.tell() - start
            if into is not None and f.tell() > self.segment_bytes:
                f.close()
                tmp.unlink()
                return None                              # too big to merge: on its own
            if into is None and size == path.stat().st_size:
                f.close()
                tmp.unlink()
                return base, n, size                      # nothing superseded: left as it is
            f.flush()
            os.fsync(f.fileno())
        mtime = target.stat().st_mtime
        os.utime(tmp, (mtime, mtime))                     # as old as it was: due again next time
        self.index.set_meta("in_doubt", 1)
        os.replace(tmp, target)
        if into is not None:
            path.unlink()
        _sync_dir(self.root)
        db.execute("BEGIN")
        db.execute("UPDATE latest SET rec = (SELECT m.rec FROM moves m WHERE m.k = latest.k) "
                   "WHERE k IN (SELECT k FROM moves)")
        db.execute("DELETE FROM latest WHERE k IN (SELECT k FROM forgets)")
        self.index.set_meta("in_doubt", 0)
        db.execute("COMMIT")
        if into is not None:
            return into[0], n, into[2] + size
        return base, n, size


def _sync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compact(root: Path, retention_s: float, segment_bytes: int) -> tuple[int, int] | None:
    """One compaction pass under ``compaction.lock``; None when another one holds it."""
    with open(root / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        for stale in root.glob("*.compacting"):
            stale.unlink()                   # a pass killed before it replaced a segment
        c = FileCompactor(root, retention_s, segment_bytes)
        try:
            return c.run()
        finally:
            c.close()



def main() -> None:
    ap = argparse.ArgumentParser(description="compact a file log once")
    ap.add_argument("root")
    ap.add_argument("retention_s", type=float)
    ap.add_argument("segment_bytes", type=int)
    a = ap.parse_args()
    logging.basicConfig(format="conveyor: log compaction: %(message)s", level=logging.INFO)
    done = compact(Path(a.root), a.retention_s, a.segment_bytes)
    if done and done[0]:
        log.info("log %s: compacted %d MiB of superseded records into %d MiB", a.root,
                 done[0] >> 20, done[1] >> 20)


if __name__ == "__main__":
    main()
