"""Who works on a log: the status documents capture and apply processes keep in its MetaStore.

Each capture process keeps its checkpoint document (``capture-<hash>``: one per source, database
and filter, so captures of different ``--key-slots`` ranges or nodes never share one), and each
apply process a member document (``apply-member:<group>:<member>``) besides the group's own
(``apply-<group>``). Both are written about once a second while the process works or waits, so a
document not refreshed for GONE_AFTER_S belongs to a process that is gone (killed, host lost).
Nothing secret goes into them: hosts and ports, never credentials.

``status`` lists them; apply uses ``unfinished_snapshots`` to wait for every capture's snapshot
before an idle timeout ends it.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

# A document not refreshed for this long is a process that is gone. Captures refresh theirs every
# second while scanning and every HEARTBEAT_S while live; apply members every second.
GONE_AFTER_S = 30.0
HEARTBEAT_S = 5.0
# Members of a group that stopped or vanished this long ago are no longer listed one by one.
FORGET_AFTER_S = 24 * 3600.0
CAPTURE_PREFIX = "capture-"
MEMBER_PREFIX = "apply-member:"
FINISHED = ("done", "stopped")      # capture phases of a process that ended by itself


def process_facts() -> dict:
    """Where this process runs: shown by ``status`` to tell the processes apart."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def member_name(group: str, member: str) -> str:
    return f"{MEMBER_PREFIX}{group}:{member}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def age_s(doc: dict, field: str, now: int) -> float | None:
    when = doc.get(field) or 0
    return max(now - when, 0) / 1000 if when else None


@dataclass
class Seen:
    """A process as its document shows it now."""
    name: str
    doc: dict
    age: float | None           # seconds since the document was refreshed (None: never)
    gone_after: float = GONE_AFTER_S

    @property
    def state(self) -> str:
        return str(self.doc.get("state") or "unknown")

    @property
    def finished(self) -> bool:
        return self.doc.get("phase", self.state) in FINISHED or self.state.startswith("stopped")

    @property
    def gone(self) -> bool:
        """Not refreshed for GONE_AFTER_S while it said it was working."""
        return not self.finished and (self.age is None or self.age > self.gone_after)

    @property
    def shown_state(self) -> str:
        if self.gone:
            return f"GONE (last seen {ago(self.age)} ago; it said: {self.state})"
        return self.state


def captures(docs: dict[str, dict], now: int | None = None,
             gone_after: float = GONE_AFTER_S) -> list[Seen]:
    now = now or now_ms()
    return [Seen(name, doc, age_s(doc, "saved_ms", now), gone_after)
            for name, doc in sorted(docs.items()) if name.startswith(CAPTURE_PREFIX)]


def members(docs: dict[str, dict], group: str, now: int | None = None,
            gone_after: float = GONE_AFTER_S) -> tuple[list[Seen], int]:
    """The apply members of ``group`` worth listing, and how many older ones were left out."""
    now = now or now_ms()
    prefix = member_name(group, "")
    out, forgotten = [], 0
    for name, doc in sorted(docs.items()):
        if not name.startswith(prefix):
            continue
        seen = Seen(name, doc, age_s(doc, "updated_ms", now), gone_after)
        if (seen.finished or seen.gone) and (seen.age or 0) > FORGET_AFTER_S:
            forgotten += 1
            continue
        out.append(seen)
    return out, forgotten


def unfinished_snapshots(docs: dict[str, dict], now: int | None = None) -> list[Seen]:
    """Snapshot captures still scanning and alive: apply's idle timeout waits for their end.
    One gone for GONE_AFTER_S no longer holds apply (it may never come back); apply says so."""
    return [c for c in captures(docs, now)
            if c.doc.get("mode", "snapshot") == "snapshot" and not c.finished and not c.gone]


def stale_snapshots(docs: dict[str, dict], now: int | None = None) -> list[Seen]:
    return [c for c in captures(docs, now)
            if c.doc.get("mode", "snapshot") == "snapshot" and c.gone]


def member_lag(doc: dict, partitions) -> int:
    """Records of the partitions this member holds not yet committed (``partitions``: the log's
    PartitionStatus list); a member that reads every partition (None) has the group's lag."""
    held = doc.get("partitions")
    return sum(p.lag for p in partitions if held is None or p.partition in set(held))


def lag_seconds(doc: dict, lag: int | None, now: int) -> float | None:
    """How far behind the source this member is: 0 with nothing to apply, else the age of the
    newest event it applied (its source read time), which the waiting records are younger than."""
    if lag == 0:
        return 0.0
    read = doc.get("last_read_ms") or 0
    return max(now - read, 0) / 1000 if read else None


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"

