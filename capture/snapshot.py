"""Snapshot mode of a capture: one SCAN pass onto the log, its cursor saved in the checkpoint
about once a second (after a flush made everything before it durable), resumed by the next run
when it stopped in the middle."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from conveyor.capture.stats import CaptureStats
from conveyor.capture.supervise import Interrupted
from conveyor.events import Kind

if TYPE_CHECKING:
    from conveyor.capture.process import Capture

log = logging.getLogger("conveyor.capture")

CHECKPOINT_INTERVAL_S = 1.0      # flush the log and save the cursor at most this often


class SnapshotRun:
    def __init__(self, cap: "Capture") -> None:
        self.cap = cap

    def run(self) -> CaptureStats:
        cap, st = self.cap, self.cap.stats
        try:
            self._begin()
            last_save = time.monotonic()
            while (not cap.stopping.is_set() and cap.cursor is not None
                   and cap.pacer.wait(cap.stopping)):
                cap.scan_step()
                if cap.cursor is not None and time.monotonic() - last_save >= CHECKPOINT_INTERVAL_S:
                    cap.save("scanning")
                    last_save = time.monotonic()
        except Interrupted as e:
            log.warning("%s", e)
        st.complete = cap.cursor is None and bool(st.capture_id)
        if st.capture_id:
            cap.final_save("done" if st.complete else "scanning",
                           None if st.complete
                           else "stopped during the scan: run it again to continue")
        cap.progress()
        return st

    def _begin(self) -> None:
        cap, st = self.cap, self.cap.stats
        st.total_hint = cap.dbsize()
        cp = None if cap.fresh else cap.meta_get()
        phase = cp and cp.get("phase", cp.get("state"))      # "state" may name a wait
        if cp and phase == "scanning" and cp.get("mode", "snapshot") == "snapshot":
            st.capture_id, st.resumed = cp["capture_id"], True
            st.keys, st.deletes, cap.reader.seq = cp["keys"], cp["deletes"], cp["seq"]
            cap.reader.counts.upserts, cap.reader.counts.deletes = st.keys, st.deletes
            cap.reader.capture_id = st.capture_id
            cap.resume_scan(cp)
            log.info("resuming snapshot %s at cursor %s after %d keys", st.capture_id,
                     cap.cursor, st.keys)
            return
        cap.new_capture_id()
        cap.reader.marker(Kind.SNAPSHOT_BEGIN, st.total_hint, cap.source_facts())
        cap.new_scan()
        cap.scan_run_id = cap.run_id()
        cap.save("scanning")
