"""The file log's directory (its layout is in the package docstring): the directory a ``file:``
URI names, segment file names, small JSON documents written atomically, and the log's identity."""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from conveyor.errors import LogError, LogLost

SEGMENT_RE = re.compile(r"^(\d{20})\.log$")
LOG_ID = "log-id"


def root_of(uri: str) -> Path:
    rest = uri[len("file:"):]
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise LogError(f"log URI {uri!r} names no directory (use file:PATH)")
    return Path(rest).expanduser()


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", lambda m: "%%%02X" % ord(m.group()), name)


def atomic_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise LogError(f"cannot write {path}: {e}") from e


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LogError(f"cannot read {path}: {e}") from e


def open_dir(uri: str) -> Path:
    """The log directory, created (with its identity) if it holds no log yet."""
    root = root_of(uri)
    try:
        for sub in ("", "groups", "meta"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LogError(f"cannot use log directory {root}: {e}") from e
    return root


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    """A directory holds a log when something created one there (an identity, segments, groups)."""
    root = root_of(uri)
    if not root.is_dir():
        return False
    return (root / LOG_ID).exists() or (root / "groups").is_dir() or bool(segments(root))


def remove_empty_file_log(uri: str) -> None:
    """Remove a log directory that holds no record (only what a reader made to wait in it)."""
    root = root_of(uri)
    if any(p.stat().st_size for p in root.glob("*.log")) or (root / "dead-letter.jsonl").exists():
        return
    shutil.rmtree(root)


def segments(root: Path) -> list[int]:
    try:
        return list_segments(root)
    except OSError as e:
        raise LogError(f"cannot list log directory {root}: {e}") from e


def list_segments(root: Path) -> list[int]:
    """The numbers of the segments in ``root``, oldest first; an OSError is raised as it is (for
    compaction: a pass that cannot list the directory is not started)."""
    return sorted(int(m.group(1)) for n in os.listdir(root) if (m := SEGMENT_RE.match(n)))


def seg_path(root: Path, base: int) -> Path:
    return root / f"{base:020d}.log"


# -- identity ----------------------------------------------------------------------------------------
def read_id(root: Path) -> str:
    try:
        return (root / LOG_ID).read_text().strip()
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise LogError(f"cannot read {root / LOG_ID}: {e}") from e


def ensure_id(root: Path) -> str:
    """The log's id, created if the directory has none (a new log, or one older than identities).
    Linking a complete temporary file makes two processes starting at once agree on one id."""
    if found := read_id(root):
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
    return read_id(root)


def check_log_id(root: Path, log_id: str) -> None:
    now = read_id(root)
    if now != log_id:
        raise LogLost(f"the log directory {root} was removed or recreated (its log-id was {log_id}, "
                      f"it is now {now or 'missing'})")
