"""When an apply run may end: its producer finished or it was idle long enough, every snapshot
capture still alive finished its scan, and the group's lag on the log is zero."""
from __future__ import annotations

import logging
import time
from typing import Callable

from conveyor.apply.waits import Waits
from conveyor.errors import LogError, LogLost
from conveyor.log import LogReader, MetaStore
from conveyor.members import stale_snapshots, unfinished_snapshots

log = logging.getLogger("conveyor.apply")


class Ending:
    def __init__(self, *, reader: LogReader, meta: MetaStore, waits: Waits,
                 done: Callable[[], bool] | None, idle_timeout: float | None,
                 dry_run: bool) -> None:
        """``done()`` (replicate) says the producer finished: the run ends once the log is
        drained. ``idle_timeout``: seconds without a record after which the run may end."""
        self.reader, self.meta, self.waits = reader, meta, waits
        self.done, self.idle_timeout, self.dry_run = done, idle_timeout, dry_run
        self.idle_note = ""                  # what an idle apply waits for before it may end

    def may_end(self, last_record: float) -> bool:
        producer_done = self.done is not None and self.done()
        idle_over = (self.idle_timeout is not None
                     and time.monotonic() - last_record >= self.idle_timeout)
        return producer_done or idle_over

    def captures_done(self) -> bool:
        """Several captures may feed the log: the run ends only once every snapshot capture that
        is still alive has finished its scan (its checkpoint says done after its SNAPSHOT_END
        was stored; the group's lag of 0, checked next, says it was applied). A capture gone for
        good (no sign of life for members.GONE_AFTER_S) does not hold apply: it is reported."""
        try:
            docs = self.waits.log_call(self.meta.documents)
        except LogLost:
            raise
        except LogError as e:
            log.warning("cannot read the captures' checkpoints (%s): not waiting for them", e)
            return True
        waiting = unfinished_snapshots(docs)
        for c in stale_snapshots(docs):
            log.warning("capture %s stopped in the middle of its snapshot (%s keys, no sign of "
                        "life for %.0fs): the target lacks what it did not capture; run it again",
                        c.name, c.doc.get("keys", 0), c.age or 0)
        self.idle_note = (f"waiting for {len(waiting)} capture(s) to finish their snapshot "
                          f"({', '.join(c.name for c in waiting)})" if waiting else "")
        if waiting:
            log.info("%s", self.idle_note)
        return not waiting

    def drained(self) -> bool:
        """Nothing left to read: the group's lag on the log is zero. (An empty poll alone is not
        enough: a Kafka consumer may still be joining its group.)"""
        try:
            lag = self.waits.log_call(self.reader.status).lag
        except LogLost:
            raise
        except LogError as e:
            log.warning("cannot read the log's lag (%s); not treating the log as drained", e)
            return False
        if lag and not self.dry_run:
            log.info("log not drained yet: %d records to go", lag)
            return False
        return True
