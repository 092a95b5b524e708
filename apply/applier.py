"""Apply: replay log records into the target with pipelined RESTORE ... REPLACE ABSTTL and DEL,
and commit the log position only after the target acknowledged the whole batch.

A target that is down, loading, out of memory or read-only is waited for, with backoff, for as
long as it takes; nothing is skipped. A record that cannot be decoded, or that the target refuses
for good, goes to the log's dead-letter place, is counted, and makes the run end non-zero.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from conveyor.errors import CodecError, LogError
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import LogReader, MetaStore, Record

log = logging.getLogger("conveyor.apply")

POLL_TIMEOUT_S = 0.5
STATUS_INTERVAL_S = 1.0
RETRY_MAX_WAIT_S = 30.0
# Replies that mean "not now" rather than "never": the batch is retried, never skipped. Auth and
# permission errors are here too: a target whose password changed is waited for, not written around.
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                    redis.exceptions.OutOfMemoryError, redis.ReadOnlyError, redis.exceptions.TryAgainError,
                    redis.exceptions.ClusterDownError, redis.exceptions.MasterDownError,
                    redis.AuthenticationError, redis.exceptions.NoPermissionError)
TRANSIENT_PREFIXES = ("BUSY ", "NOREPLICAS", "MISCONF", "NOAUTH", "LOADING", "OOM")


class TargetUnavailable(Exception):
    """The batch could not be written now; retried (internal, never escapes the Applier)."""


class Stopped(Exception):
    """stop() was called while waiting for the target."""


@dataclass
class ApplyStats:
    records: int = 0
    restored: int = 0
    deleted: int = 0
    expired: int = 0          # UPSERTs whose expiry had passed: applied as deletes
    markers: int = 0
    dead_letters: int = 0     # undecodable records + keys the target refused for good
    retries: int = 0
    snapshot_ends: int = 0
    last_write_ms: int = 0
    dead_letter_reasons: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    last_active: float = 0.0

    @property
    def rate(self) -> float:
        """Records/s while there was work (idle time waiting for the log does not count)."""
        return self.records / max((self.last_active or time.monotonic()) - self.started, 1e-9)


def status_name(group: str) -> str:
    return f"apply-{group}"


class Applier:
    def __init__(self, *, target_for_db: Callable[[int], redis.Redis], reader: LogReader,
                 meta: MetaStore, codec: Codec, rewriter: KeyRewriter, group: str,
                 batch: int = 2000, idle_timeout: float | None = None,
                 done: Callable[[], bool] | None = None, dry_run: bool = False,
                 on_progress: Callable[[ApplyStats], None] | None = None) -> None:
        """``target_for_db(db)`` gives the client that writes events of source database ``db``;
        ``done()`` (replicate) says the producer finished: the run ends once the log is drained."""
        self.target_for_db, self.reader, self.meta, self.codec = target_for_db, reader, meta, codec
        self.rewriter, self.group, self.batch = rewriter, group, batch
        self.idle_timeout, self.done, self.dry_run = idle_timeout, done, dry_run
        self.on_progress = on_progress
        self.stats = ApplyStats()
        self._stop = threading.Event()
        self._last_status = 0.0
        self.state = "starting"

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> ApplyStats:
        last_record = time.monotonic()
        self._status("running", force=True)
        try:
            while not self._stop.is_set():
                records = self.reader.poll(self.batch, POLL_TIMEOUT_S)
                if records:
                    self._apply(records)
                    last_record = time.monotonic()
                    continue
                producer_done = self.done is not None and self.done()
                idle_over = (self.idle_timeout is not None
                             and time.monotonic() - last_record >= self.idle_timeout)
                if producer_done or idle_over:
                    if self._drained():
                        break
                    last_record = time.monotonic()
                self._status("idle")
        except Stopped:
            pass
        self._status("stopped", force=True)
        return self.stats

    def _drained(self) -> bool:
        """Nothing left to read: the group's lag on the log is zero. (An empty poll alone is not
        enough: a Kafka consumer may still be joining its group.)"""
        try:
            lag = self.reader.status().lag
        except LogError as e:
            log.warning("cannot read the log's lag (%s); not treating the log as drained", e)
            return False
        if lag and not self.dry_run:
            log.info("log not drained yet: %d records to go", lag)
            return False
        return True

    # -- one batch -----------------------------------------------------------------------------
    def _apply(self, records: list[Record]) -> None:
        events = self._decode(records)
        if not self.dry_run:
            self._write_with_retry(events)
            self.reader.commit(records)
            self.stats.last_write_ms = now_millis()
        self.stats.records += len(records)
        self.stats.last_active = time.monotonic()
        self._status("running")
        if self.on_progress:
            self.on_progress(self.stats)

    def _decode(self, records: list[Record]) -> dict[tuple[int, bytes], tuple[Event, Record]]:
        """Latest event per (db, key) in the batch: events are whole states, so the last one wins."""
        latest: dict[tuple[int, bytes], tuple[Event, Record]] = {}
        decode = self.codec.decode
        for rec in records:
            try:
                ev = decode(rec.value)
            except CodecError as e:
                self._dead_letter(rec, f"undecodable record: {e}")
                continue
            if ev.kind in (Kind.UPSERT, Kind.DELETE):
                latest.pop((ev.db, ev.key), None)   # re-insert: keep log order among keys
                latest[(ev.db, ev.key)] = (ev, rec)
            else:
                self.stats.markers += 1
                if ev.kind is Kind.SNAPSHOT_END:
                    self.stats.snapshot_ends += 1
                log.info("marker %s of capture %s (count %s)", ev.kind.value, ev.capture_id, ev.count)
        return latest

    def _write_with_retry(self, events: dict) -> None:
        retrying = Retrying(retry=retry_if_exception_type(TargetUnavailable),
                            wait=wait_exponential(multiplier=0.2, max=RETRY_MAX_WAIT_S),
                            sleep=self._sleep, before_sleep=self._log_retry)
        for attempt in retrying:
            with attempt:
                self._write(events)
        self.state = "running"

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped()

    def _log_retry(self, state) -> None:
        self.stats.retries += 1
        why = state.outcome.exception()
        log.warning("target unavailable (%s); batch not committed, retrying in %.1fs", why,
                    state.next_action.sleep)
        self._status(f"waiting for target: {why}", force=True)

    def _write(self, events: dict) -> None:
        by_db: dict[int, list[tuple[Event, Record]]] = {}
        for (db, _), item in events.items():
            by_db.setdefault(db, []).append(item)
        for db, items in by_db.items():
            self._write_db(self.target_for_db(db), items)

    def _write_db(self, target: redis.Redis, items: list[tuple[Event, Record]]) -> None:
        now = now_millis()
        pipe = target.pipeline(transaction=False)
        rename = None if self.rewriter.identity else self.rewriter
        kinds = []
        for ev, _ in items:
            key = rename(ev.key) if rename else ev.key
            if ev.kind is Kind.UPSERT and not ev.expired(now):
                pipe.execute_command("RESTORE", key, ev.expire_at_ms or 0, ev.payload,
                                     "REPLACE", "ABSTTL")
                kinds.append("restored")
            else:
                pipe.execute_command("DEL", key)
                kinds.append("expired" if ev.kind is Kind.UPSERT else "deleted")
        try:
            replies = pipe.execute(raise_on_error=False)
        except (*TRANSIENT_ERRORS, OSError) as e:
            raise TargetUnavailable(f"{type(e).__name__}: {e}") from e
        failed, done = [], []
        for (ev, rec), reply, kind in zip(items, replies, kinds):
            if not isinstance(reply, Exception):
                done.append(kind)
            elif isinstance(reply, TRANSIENT_ERRORS) or str(reply).startswith(TRANSIENT_PREFIXES):
                raise TargetUnavailable(str(reply))
            else:
                failed.append((rec, f"target refused key {ev.key!r}: {reply}"))
        for rec, why in failed:
            self._dead_letter(rec, why)
        for kind in done:
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)

    # -- reporting -----------------------------------------------------------------------------
    def _dead_letter(self, rec: Record, reason: str) -> None:
        self.reader.dead_letter(rec, reason)
        self.stats.dead_letters += 1
        if len(self.stats.dead_letter_reasons) < 20:
            self.stats.dead_letter_reasons.append(reason)
        log.error("dead-lettered record %s@%s: %s", rec.partition, rec.offset, reason)

    def _status(self, state: str, force: bool = False) -> None:
        self.state = state
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_INTERVAL_S:
            return
        self._last_status = now
        st = self.stats
        try:
            self.meta.put(status_name(self.group), {
                "state": state, "last_write_ms": st.last_write_ms, "records": st.records,
                "dead_letters": st.dead_letters, "retries": st.retries, "updated_ms": now_millis(),
                "dry_run": self.dry_run})
        except Exception as e:  # status is informative; never let it stop apply
            log.warning("could not record apply status: %s", e)

