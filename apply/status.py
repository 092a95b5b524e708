"""What apply shows of itself: its state, and the status documents of its group and of this
member (read by ``conveyor status``, ``cutover`` and the other members)."""
from __future__ import annotations

import logging
import time
from typing import Callable

from conveyor.apply.stats import ApplyStats, status_name
from conveyor.events import now_millis
from conveyor.log import LogReader, MetaStore
from conveyor.members import member_name, process_facts

log = logging.getLogger("conveyor.apply")

STATUS_INTERVAL_S = 1.0


class StatusBoard:
    """``show(state)`` sets the state and, at most once a second unless forced, writes it down.
    ``targets()`` gives what the guard last read of the targets, ``collisions()`` the key names
    two source databases wrote into one target database."""

    def __init__(self, *, meta: MetaStore, reader: LogReader, group: str, stats: ApplyStats,
                 dry_run: bool, targets: Callable[[], dict], collisions: Callable[[], int]) -> None:
        self.meta, self.reader, self.group, self.stats = meta, reader, group, stats
        self.dry_run, self.targets, self.collisions = dry_run, targets, collisions
        self.state = "starting"
        self._last = 0.0
        self._facts = process_facts()

    @property
    def target_down(self) -> bool:
        return self.state.startswith("waiting for target")

    def show(self, state: str, force: bool = False) -> None:
        self.state = state
        now = time.monotonic()
        if not force and now - self._last < STATUS_INTERVAL_S:
            return
        self._last = now
        if self.dry_run:
            return      # a dry run changes nothing anyone sees later: no group or member document
        st = self.stats
        doc = {"state": state, "last_write_ms": st.last_write_ms, "records": st.records,
               "dead_letters": st.dead_letters, "retries": st.retries,
               "log_waits": st.log_waits, "replays": len(st.replays),
               "log_lost": len(st.log_lost), "updated_ms": now_millis(), "dry_run": self.dry_run,
               "collisions": self.collisions()}
        try:
            self.meta.put(status_name(self.group), {**doc, "targets": self.targets()})
            # This member's own document: several apply processes share the group's.
            self.meta.put(member_name(self.group, self.reader.consumer), {
                **doc, **self._facts, "group": self.group, "member": self.reader.consumer,
                "partitions": self.reader.held(), "last_read_ms": st.last_read_ms})
        except Exception as e:  # status is informative; never let it stop apply
            log.warning("could not record apply status: %s", e)
