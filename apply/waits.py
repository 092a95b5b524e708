"""Waiting out a target or a log that is unavailable, for as long as it takes, while the group
keeps hearing from this member and ``stop()`` still ends the wait."""
from __future__ import annotations

import logging
import threading
import time

from conveyor import retry
from conveyor.apply.replies import TargetUnavailable
from conveyor.apply.stats import ApplyStats, Stopped
from conveyor.apply.status import StatusBoard
from conveyor.errors import LogError, LogUnavailable
from conveyor.log import LogReader

log = logging.getLogger("conveyor.apply")

KEEPALIVE_S = 1.0                # how often the group hears from us while we wait for the target


class Waits:
    def __init__(self, *, reader: LogReader, stats: ApplyStats, board: StatusBoard) -> None:
        self.reader, self.stats, self.board = reader, stats, board
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()    # a sign of life for /healthz, even while waiting

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise Stopped()

    def for_target(self, seconds: float) -> None:
        """Sleep, in slices: the group must keep hearing from this member meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.beat()
            if self.stopping.wait(min(left, KEEPALIVE_S)):
                raise Stopped()
            try:
                self.reader.keepalive()
            except LogError as e:
                log.debug("keepalive failed: %s", e)
            if self.board.target_down:       # status shows this member alive, waiting
                self.board.show(self.board.state)

    def target_policy(self):
        """Retrying a batch while the target is unavailable (a tenacity Retrying)."""
        return retry.policy(on=TargetUnavailable, max_wait_s=retry.TARGET_MAX_WAIT_S,
                            sleep=self.for_target, before_sleep=self._target_retry)

    def _target_retry(self, state) -> None:
        self.stats.retries += 1
        why = state.outcome.exception()
        log.warning("target unavailable (%s); batch not committed, retrying in %.1fs", why,
                    state.next_action.sleep)
        self.board.show(f"waiting for target: {why}", force=True)

    def log_call(self, fn, *args):
        """Call the log; while it is unavailable, wait with backoff for as long as it takes and
        call again with the same arguments (a commit of the same records)."""
        retrying = retry.policy(on=LogUnavailable, max_wait_s=retry.LOG_MAX_WAIT_S,
                                sleep=self.for_target, before_sleep=self._log_wait)
        return retrying(fn, *args)           # keepalive meanwhile: the group keeps this member

    def _log_wait(self, state) -> None:
        self.stats.log_waits += 1
        why = state.outcome.exception()
        log.warning("waiting for the log: %s; calling again in %.1fs", why, state.next_action.sleep)
        self.board.show(f"waiting for the log: {why}", force=True)
