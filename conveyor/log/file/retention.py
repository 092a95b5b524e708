"""Cleanup of the file log: which sealed segments are due (every group has committed past them and
they are older than the retention), and what happens to them: deleted whole (``cleanup=delete``) or
compacted by a process of its own (``cleanup=compact``, the default; compact.py)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from conveyor.errors import ConfigError, LogError
from conveyor.log.file.options import CLEANUP, DEFAULT_RETENTION, SEGMENT_BYTES, duration, size_option
from conveyor.log.file.paths import list_segments, read_json, seg_path, segments

log = logging.getLogger("conveyor.log")


class Cleanup:
    """``cleanup=compact`` (default): sealed segments every group is past and older than the
    retention (default 1h) lose the records later ones supersede (compact.py);
    ``apply --from earliest`` still rebuilds an empty target. ``cleanup=delete``: such segments
    (older than a retention of 7d by default) are deleted whole, and the log is no longer
    replayable from its start."""

    def __init__(self, opts: dict[str, str]) -> None:
        self.mode = opts.get("cleanup", "compact")
        if self.mode not in CLEANUP:
            raise ConfigError(f"log option cleanup={self.mode!r}: expected compact or delete")
        self.retention_s = duration(opts.get("retention", DEFAULT_RETENTION[self.mode]))
        self.segment_bytes = size_option(opts, "segment_bytes", SEGMENT_BYTES)
        self._running = None

    def __call__(self, root: Path) -> None:
        if self.mode == "delete":
            _retire(root, self.retention_s)
            return
        if self._running is not None and self._running.poll() is None:
            return                          # the last pass is still at work
        try:
            self._running = start_compaction(root, self.retention_s, self.segment_bytes)
        except OSError as e:
            log.warning("log %s: cannot start a compaction: %s", root, e)


def _retire(root: Path, retention_s: float) -> None:
    """Delete the oldest segments every group has committed past and older than the retention."""
    groups = [read_json(p) for p in (root / "groups").glob("*.json")]
    groups = [g for g in groups if g]
    if not groups:
        return                           # nobody read the log yet: it keeps everything
    past = min(g["segment"] for g in groups)
    now = time.time()
    for base in segments(root)[:-1]:
        path = seg_path(root, base)
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


def due(root: Path, retention_s: float) -> list[int]:
    """Sealed segments every group has committed past and older than the retention."""
    segs = list_segments(root)[:-1]
    groups = _groups(root)
    if groups == [] and any((root / "groups").glob("*.json")):
        return []
    past = min((g["segment"] for g in groups), default=None)
    now = time.time()
    out = []
    for base in segs:
        if past is not None and base >= past:
            break
        try:
            if now - seg_path(root, base).stat().st_mtime < retention_s:
                break
        except FileNotFoundError:
            continue
        out.append(base)
    return out


def _groups(root: Path) -> list[dict]:
    out = []
    for p in (root / "groups").glob("*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            return []                        # a group being written: no compaction this time
    return out


def start_compaction(root: Path, retention_s: float, segment_bytes: int) -> subprocess.Popen | None:
    """Start a compaction pass in a process of its own when a segment is due."""
    if not due(root, retention_s):
        return None
    # Its lines go to a file of the log (compaction.out), not to the pipes of the process that
    # started it: a pass may outlive that process, and must not hold its output open.
    with open(root / "compaction.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "conveyor.log.file.compact", str(root),
                                 str(retention_s), str(segment_bytes)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)


def gone(segs: list[int]) -> str:
    """Why the log no longer holds every record ever appended, "" if it does."""
    if segs and segs[0] > 0:
        return f"segments before record {segs[0]} were deleted by retention"
    return ""
