"""Live modes of a capture: subscribe first, then scan (a rescan after an earlier capture), then
follow keyspace notifications until stopped or idle. Gaps (a source restarted or flushed, a
subscription broken, a log that lost records) start a resync: a catch-up scan into the log.
"Converged" needs the keyspace subscription up and unbroken since the last resync started."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from conveyor.capture.stats import CaptureStats
from conveyor.capture.supervise import Interrupted
from conveyor.errors import LOG_LOST, LogLost
from conveyor.events import Kind, now_millis
from conveyor.members import HEARTBEAT_S

if TYPE_CHECKING:
    from conveyor.capture.process import Capture

log = logging.getLogger("conveyor.capture")

LIVE_FLUSH_INTERVAL_S = 0.05     # how long an event may wait in the producer's buffer
IDENTITY_INTERVAL_S = 5.0        # how often the log is asked whether it is still ours


class LiveRun:
    """One live run of ``cap`` (the capture holds the scan, the checkpoint and the source; this
    holds the loop: what is pending, when the log was last asked who it is)."""

    def __init__(self, cap: "Capture") -> None:
        self.cap = cap
        self.sub_epoch = 0                   # the subscription the last resync started under
        self.pending = False                 # events appended and not flushed yet
        self.last_activity = self.last_flush = time.monotonic()
        self.next_identity = 0.0

    def run(self) -> CaptureStats:
        cap, st = self.cap, self.cap.stats
        notes = None
        try:
            st.total_hint = cap.dbsize()
            previous = None if cap.fresh else cap.meta_get()
            cap.new_capture_id()
            cap.open_ledger(previous)
            notes = cap.notes = cap.subscribe()
            self.sub_epoch = notes.epoch
            cap.start_watch()
            self._begin(previous)
            self._loop()
        except Interrupted as e:
            log.warning("%s", e)
        finally:
            if notes is not None:
                notes.stop()
            cap.close_rescan()
        self._end()
        return st

    def _begin(self, previous: dict | None) -> None:
        cap, st = self.cap, self.cap.stats
        if cap.mode == "live":
            cap.reader.marker(Kind.SNAPSHOT_BEGIN, st.total_hint, cap.source_facts())
            # After an earlier capture (the ledger knows keys), the scan reads digests and only
            # changed, new and vanished keys are read and logged again.
            cap.catch_up = bool(previous or st.history_gap or not cap.ledger.empty)
            cap.start_scan(rescan=cap.catch_up)
        elif previous:
            cap.gap(f"capture restarted (changes made since the previous run "
                    f"{previous.get('capture_id')} were not seen)")
        cap.save("live")

    def _end(self) -> None:
        cap, st = self.cap, self.cap.stats
        if not st.capture_id:
            return                           # stopped before anything was written
        blind = ((bool(st.history_gap) and bool(st.gaps or cap.catch_up))
                 or bool(st.deletes_forgotten))
        healthy = self.healthy()
        st.complete = (not cap.resync.is_set() and not cap.scanning and not blind
                       and healthy)
        if not st.complete:
            st.incomplete_why = self._why_incomplete(blind, healthy)
        saved = cap.final_save("live" if not st.complete else "stopped",
                               None if st.complete else "stopped with changes still to read: "
                                                        "run it again to catch up")
        if cap.ledger is not None:
            cap.ledger.close(clean=saved)
        cap.progress()

    def _why_incomplete(self, blind: bool, healthy: bool) -> str:
        if self.cap.scanning or self.cap.resync.is_set():
            return ("stopped before the last resync finished; run again (the restart triggers "
                    "a catch-up scan)")
        if blind:
            return ("keys deleted while changes were not seen may be missing from the log (see "
                    "above); check the target with verify")
        return ("the keyspace subscription was down when the run stopped (changes since then "
                "were not seen); run again (the restart triggers a catch-up scan)")

    def healthy(self) -> bool:
        """The subscription is up now and has not broken since the last resync started."""
        notes = self.cap.notes
        return notes is not None and notes.healthy and notes.epoch == self.sub_epoch

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        self.pending = False
        self.last_activity = self.last_flush = time.monotonic()
        while not self.cap.stopping.is_set():
            try:
                if self._step():
                    break
            except LogLost as e:
                self._log_lost(e)
        if self.pending:
            self.cap.flush()
            self.pending = False

    def _step(self) -> bool:
        """One round: watch, read dirty keys, scan, flush; True when the idle timeout ends the run."""
        cap = self.cap
        cap.heartbeat = time.monotonic()
        if cap.notes is not None and cap.notes.fatal is not None:
            raise cap.notes.fatal
        self._supervise()
        if cap.resync.is_set() and not cap.scanning:
            self._start_resync()
        worked = False
        keys = cap.dirty.take(cap.scan_count)
        if keys:      # changed keys are never held back: a full dirty set would be a gap
            cap.read(lambda: cap.reader.read(keys, check_type=True), "reading changed keys")
            worked = True
        held = cap.scanning and cap.pacer.delay() > 0       # --max-rate: the scan waits
        if not held and cap.cursor is not None:
            cap.scan_step()
            worked = True
        elif not held and cap.rereading:
            cap.reread_step()
            worked = True
        if worked:
            self.pending = True
            self.last_activity = time.monotonic()
            cap.sync_counts()
        if self.pending and (not worked
                             or time.monotonic() - self.last_flush >= LIVE_FLUSH_INTERVAL_S):
            cap.flush()
            self.pending, self.last_flush = False, time.monotonic()
            cap.progress()
        if worked:
            return False
        idle = time.monotonic() - self.last_activity
        # Changes that arrived while this step waited (a flush waiting for the log) are not
        # idleness: the run ends only with nothing left to read.
        if (cap.idle_timeout is not None and idle >= cap.idle_timeout and not len(cap.dirty)
                and not cap.resync.is_set() and not cap.scanning and self.healthy()):
            cap.watch_source()               # a last look: a FLUSHDB just now is not missed,
            cap.writer.check_identity()      # nor a log lost just now (LogLost: a resync)
            if not cap.resync.is_set():
                return True
        cap.dirty.wait(min(0.1, cap.pacer.delay()) if held else 0.1)
        return False

    def _supervise(self) -> None:
        """About once a second the source's identity and flush counters; every few seconds the
        log's identity (LogLost from it is handled by the loop)."""
        cap = self.cap
        now = time.monotonic()
        if now >= cap.next_watch:
            cap.watch_source()
        if now >= self.next_identity:
            self.next_identity = now + IDENTITY_INTERVAL_S
            cap.writer.check_identity()
        if cap.doc and now_millis() - cap.doc["saved_ms"] >= HEARTBEAT_S * 1000:
            cap.save(cap.doc["phase"])       # a sign of life for status (members.GONE_AFTER_S)

    # -- resyncs -------------------------------------------------------------------------------
    def _start_resync(self) -> None:
        cap = self.cap
        cap.resync.clear()
        self.sub_epoch = cap.notes.epoch if cap.notes else 0
        cap.stats.resyncs += 1
        cap.reader.marker(Kind.RESYNC, None, {"reason": cap.stats.gaps[-1] if cap.stats.gaps else ""})
        cap.start_scan(cap.resync_slots(), rescan=True)
        cap.scan_is_resync = True

    def _log_lost(self, e: LogLost) -> None:
        """The log was reset under us: take the new one and write the whole source into it. The
        ledger keeps the names (every digest forgotten), so keys deleted meanwhile become deletes
        at the end of the scan."""
        cap = self.cap
        detail = str(e).removeprefix(LOG_LOST).lstrip(": ")
        why = f"{LOG_LOST} ({detail})"
        with cap.gap_lock:
            cap.stats.gaps.append(why)
        log.warning("%s; resyncing the whole source into the new log", why)
        cap.writer.adopt_new_log()
        cap.close_rescan()
        cap.ledger.forget_digests(cap.writer.log_id)
        cap.stats.deletes_forgotten = cap.ledger.forgotten_deletes()
        if cap.stats.deletes_forgotten:
            log.warning("%s", cap.stats.deletes_forgotten)
        self.pending = False
        cap.resync.clear()                   # this full scan heals every gap reported so far
        self.sub_epoch = cap.notes.epoch if cap.notes else 0
        cap.stats.resyncs += 1
        cap.reader.marker(Kind.SNAPSHOT_BEGIN, cap.stats.total_hint,
                          {**cap.source_facts(), "reason": why})
        cap.resync_slots()                   # a whole scan covers whatever was pending
        cap.start_scan(rescan=True)
        cap.scan_is_resync = True
        cap.save("live")
