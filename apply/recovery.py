"""Healing what was lost. A target that lost data (restarted empty, flushed) is rebuilt by
replaying the log from its earliest record when the log still holds every key; otherwise apply
stops and says what to run. A log that lost records is read again from its new beginning, and
the run may end well only once a whole capture pass was applied after the loss."""
from __future__ import annotations

import logging
import time
from typing import Callable

import redis

from conveyor.apply.batch import BatchWriter
from conveyor.apply.guard import TargetGuard
from conveyor.apply.replies import TargetUnavailable
from conveyor.apply.stats import ApplyStats
from conveyor.apply.status import StatusBoard
from conveyor.apply.waits import Waits
from conveyor.apply.watch import Finding
from conveyor.errors import LogLost, TargetError
from conveyor.events import Kind
from conveyor.log import LogReader

log = logging.getLogger("conveyor.apply")

WATCH_INTERVAL_S = 1.0           # how often the target is checked for lost data
PASS_OPENERS = (Kind.SNAPSHOT_BEGIN, Kind.RESYNC)


class Passes:
    """Capture passes (SNAPSHOT_BEGIN or RESYNC ... SNAPSHOT_END of one capture) under way: one
    applied whole after the log lost records has rewritten every key of the source."""

    def __init__(self, stats: ApplyStats) -> None:
        self.stats = stats
        self.open: set[str] = set()          # capture ids

    def follow(self, markers: list[tuple[Kind, str]]) -> None:
        for kind, capture_id in markers:
            if kind in PASS_OPENERS:
                self.open.add(capture_id)
            elif kind is Kind.SNAPSHOT_END and capture_id in self.open:
                self.open.discard(capture_id)
                if self.stats.log_lost:
                    self.stats.pass_after_loss = True


class Recovery:
    def __init__(self, *, target_for_db: Callable[[int], redis.Redis], reader: LogReader,
                 writer: BatchWriter, stats: ApplyStats, waits: Waits, board: StatusBoard,
                 passes: Passes, guard: TargetGuard, log_name: str, dry_run: bool) -> None:
        self.target_for_db, self.reader, self.writer = target_for_db, reader, writer
        self.stats, self.waits, self.board, self.passes = stats, waits, board, passes
        self.guard, self.log_name, self.dry_run = guard, log_name, dry_run
        self._last_watch = 0.0

    # -- the log -------------------------------------------------------------------------------
    def log_lost(self, e: LogLost) -> None:
        """Take the log as it is now and read it from its beginning. What the lost records held
        is back only once a whole capture pass was applied (a live capture resyncs into the new
        log); until then the run cannot end successfully."""
        self.stats.log_lost.append(str(e))
        self.stats.pass_after_loss = False
        self.passes.open.clear()
        log.warning("%s; reading the new log from its earliest record", e)
        self.board.show(str(e), force=True)
        self.waits.log_call(self.reader.adopt_new_log)
        self.waits.log_call(self.reader.seek, "earliest")

    # -- a target that lost data -----------------------------------------------------------------
    def meet_previous_targets(self) -> None:
        """With nothing to write, the targets of the previous run are still checked."""
        if not self.guard.previous:
            return
        try:
            self.guard.meet_previous(self.target_for_db)
        except TargetUnavailable as e:
            log.warning("target unavailable (%s): checking it once it is back", e)
            self.waits.sleep(WATCH_INTERVAL_S)
            return
        self.handle_findings()

    def watch_targets(self, force: bool = False) -> bool:
        """Check the targets while idle (about once a second); True when one lost data and the
        replay from the earliest record started."""
        now = time.monotonic()
        if self.dry_run or (not force and now - self._last_watch < WATCH_INTERVAL_S):
            return False
        self._last_watch = now
        self.guard.check()
        return self.handle_findings()

    def handle_findings(self) -> bool:
        """After the batch was committed: the first loss the readings showed is healed (the
        replay rewrites everything, later findings included). True when a replay started."""
        return any(self._target_lost(found) for found in self.guard.take_findings())

    def targets_checked(self) -> bool:
        """The run ends only once every target could be read: one that is down right now may
        have lost what apply wrote."""
        down = [] if self.dry_run else self.guard.unreadable()
        if down:
            log.warning("waiting for the target before ending (it may have lost data): %s", down[0])
            self.board.show(f"waiting for target: {down[0]}", force=True)
            self.waits.sleep(WATCH_INTERVAL_S)
        return not down

    def _target_lost(self, found: Finding) -> bool:
        """Replay the log from its earliest record when it still holds every key; True when
        the replay started."""
        replayable, detail = self.waits.log_call(self.reader.replayable)
        if not replayable and found.certain:
            raise TargetError(
                f"the target lost writes ({found.why}) and the log no longer holds every key "
                f"({detail}): capture again with `conveyor capture SOURCE --log {self.log_name} "
                "--fresh` and let apply replay that snapshot, then check the target with "
                "`conveyor verify SOURCE TARGET`")
        if not replayable:
            log.warning("%s; the log cannot be replayed (%s): check the target with `conveyor "
                        "verify SOURCE TARGET`", found.why, detail)
            self.stats.unsure_restarts.append(found.why)
            return False
        log.warning("target lost data (%s): replaying the log from its earliest record", found.why)
        self.stats.replays.append(found.why)
        self.board.show("target lost data: replaying the log from its earliest record", force=True)
        self.waits.log_call(self.reader.seek, "earliest")
        self.writer.forget_targets()
        self.writer.open_parts.clear()
        self.passes.open.clear()
        self.guard.rebase()
        return True

    def sweep_temp_keys(self) -> None:
        """On a drained log: temporary keys of part sequences that can no longer complete. Only
        after a run that applied parts: a SCAN of a whole target is not free."""
        if self.dry_run or not (self.stats.chunks or self.writer.open_parts):
            return
        n = self.guard.sweep(self.writer.open_parts)
        if n:
            log.warning("deleted %d temporary keys of keys whose parts can no longer complete "
                        "(a capture stopped in the middle of a big key)", n)
        self.stats.temp_cleaned += n
        self.writer.open_parts.clear()
