"""What an apply run counts and reports (its summary lines, metrics and status read these)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from conveyor.apply.plan import Tally
from conveyor.log import Record


class Stopped(Exception):
    """stop() was called while waiting for the target or the log."""


@dataclass
class ApplyStats(Tally):
    records: int = 0
    markers: int = 0
    dead_letters: int = 0     # undecodable records, keys refused for good, corrupt log stretches
    retries: int = 0          # waits for the target
    log_waits: int = 0        # waits for the log
    snapshot_ends: int = 0
    superseded: int = 0       # events a later event of the same key in the same batch replaced
    kept: int = 0             # events of keys the target held before (--on-existing skip)
    handed_over: int = 0      # records given to another group member while the target was down
    cluster_redirects: int = 0  # MOVED/ASK/TRYAGAIN/CLUSTERDOWN and node failures followed
    last_write_ms: int = 0
    last_read_ms: int = 0     # source read time of the newest event applied (metrics: apply lag)
    log_lag: int | None = None  # the group's lag as last asked (metrics; None: not asked yet)
    dead_letter_reasons: list[str] = field(default_factory=list)
    replays: list[str] = field(default_factory=list)    # why the target lost data, each time
    log_lost: list[str] = field(default_factory=list)   # each time the log lost records
    unsure_restarts: list[str] = field(default_factory=list)  # restarts that may have lost writes
    pass_after_loss: bool = False   # a whole capture pass was applied after the last log loss
    started: float = field(default_factory=time.monotonic)
    last_active: float = 0.0

    @property
    def rate(self) -> float:
        """Records/s while there was work (idle time waiting for the log does not count)."""
        return self.records / max((self.last_active or time.monotonic()) - self.started, 1e-9)

    @property
    def keys(self) -> int:
        """Keys written (restored, typed, converted, deleted, expired) and parts: a record of a
        block log holds many, so this is what progress counts."""
        return self.restored + self.written + self.converted + self.deleted + self.expired + self.chunks

    @property
    def key_rate(self) -> float:
        return self.keys / max((self.last_active or time.monotonic()) - self.started, 1e-9)

    @property
    def log_loss_healed(self) -> bool:
        return not self.log_lost or self.pass_after_loss


    def outcomes(self) -> dict[str, int]:
        """Records by what became of them (conveyor_apply_events_total{outcome})."""
        return {"restored": self.restored, "written": self.written, "converted": self.converted,
                "deleted": self.deleted, "expired": self.expired, "part": self.chunks,
                "dead_letter": self.dead_letters}


def block_of(rec) -> Record:
    """The log record an event came from (a block's event carries (block, event))."""
    return rec[0] if isinstance(rec, tuple) else rec


def status_name(group: str) -> str:
    return f"apply-{group}"
