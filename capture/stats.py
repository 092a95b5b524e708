"""What a capture counts (its summary lines, status, metrics and checkpoints read these), and
the name of its checkpoint."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from conveyor.capture.reader import ReadCounts
from conveyor.endpoints import mask_uri
from conveyor.keys import KeyFilter


@dataclass
class CaptureStats:
    mode: str = "snapshot"
    capture_id: str = ""
    keys: int = 0                # UPSERT events
    deletes: int = 0             # DELETE events (gone when read, or filtered out by type)
    total_hint: int = 0          # DBSIZE at start
    resumed: bool = False
    complete: bool = False       # snapshot: the scan finished; live: every gap was healed
    gaps: list[str] = field(default_factory=list)
    resyncs: int = 0             # catch-up scans started
    resyncs_done: int = 0        # ... and finished
    dirty_waiting: int = 0
    notifications: int = 0       # keyspace notifications received (a key waiting is read once)
    unseen_reread: int = 0       # keys re-read after a rescan: changed, new, or no longer seen
    digests_read: int = 0        # keys whose digest a rescan read (no value moved)
    history_records: int = 0     # live: records read back from the log to rebuild the key ledger
    history_gap: str = ""        # ... and why that history is not everything ever appended
    deletes_forgotten: str = ""  # live: a lost log, and deletes older than the ledger keeps
    incomplete_why: str = ""     # live: why convergence cannot be claimed
    waiting: str = ""            # what the run waits for now ("" when nothing)
    scanning: bool = False       # a scan (first, resync or catch-up) is in progress
    rescans: int = 0             # snapshot: scans started over because the source restarted
    source_waits: int = 0        # retries after transient source failures
    log_waits: int = 0           # retries after the log was unavailable
    reads: ReadCounts = field(default_factory=ReadCounts)   # big keys, parts, --mem-limit
    started: float = field(default_factory=time.monotonic)

    @property
    def events(self) -> int:
        return self.keys + self.deletes

    @property
    def rate(self) -> float:
        return self.events / max(time.monotonic() - self.started, 1e-9)


def checkpoint_name(source_uri: str, db: int, key_filter: KeyFilter,
                    nodes: tuple[str, ...] | list[str] = ()) -> str:
    """One checkpoint per source database and filter set (a different filter is another snapshot),
    and per ``--node`` set of a cluster capture."""
    ident = repr((mask_uri(source_uri).split("@")[-1], db, key_filter.match, key_filter.type,
                  key_filter.include, key_filter.exclude, key_filter.slots)
                 + ((tuple(sorted(nodes)),) if nodes else ()))
    return "capture-" + hashlib.sha256(ident.encode()).hexdigest()[:16]
