"""Apply: replay log records into the target with pipelined RESTORE ... REPLACE ABSTTL and DEL,
and commit the log position only after the target acknowledged the whole batch.

A target that is down, loading, out of memory or read-only is waited for, with backoff, for as
long as it takes; nothing is skipped. A target that refuses a permission or our credentials stops
apply with one line. A target that lost data (restarted empty, flushed) is noticed and rebuilt by
replaying the log from its earliest record when the log still holds every key; otherwise apply
stops and says what to run. A log that is unavailable is waited for; a log that lost records is
read again from its new beginning and the run ends non-zero unless a whole capture pass followed.
A record that cannot be decoded, or that the target refuses for good, goes to the log's
dead-letter place, is counted, and makes the run end non-zero.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

import redis

from conveyor.apply.batch import BatchWriter
from conveyor.apply.plan import BatchResult
from conveyor.apply.decode import Decoder
from conveyor.apply.guard import TargetGuard
from conveyor.kept import KeptKeys
from conveyor.apply.replies import TargetUnavailable
from conveyor.apply.restores import write_whole
from conveyor.apply.stats import ApplyStats, Stopped, block_of, status_name
from conveyor.apply.watch import Finding, TargetWatch
from conveyor import retry
from conveyor.errors import ConfigError, LogError, LogLost, LogUnavailable, TargetError
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import LogReader, MetaStore, Record
from conveyor.members import member_name, process_facts, stale_snapshots, unfinished_snapshots

if TYPE_CHECKING:
    from conveyor.databases import TargetDbs

log = logging.getLogger("conveyor.apply")

LAG_INTERVAL_S = 2.0         # metrics: how often the group's lag is asked
POLL_TIMEOUT_S = 0.5
STATUS_INTERVAL_S = 1.0
KEEPALIVE_S = 1.0                # how often the group hears from us while we wait for the target
WATCH_INTERVAL_S = 1.0           # how often the target is checked for lost data
IDENTITY_INTERVAL_S = 5.0        # how often the log is checked for having been reset
BATCH_BYTES = 1024 * 1024        # record bytes per batch (decoded, a part takes several times more)
FIRST_POLL = 1                   # records asked first, before their size is known (a block holds 1000 keys)
MAX_REASONS = 20
PASS_OPENERS = (Kind.SNAPSHOT_BEGIN, Kind.RESYNC)


class Applier:
    def __init__(self, *, target_for_db: Callable[[int], redis.Redis], reader: LogReader,
                 meta: MetaStore, codec: Codec, rewriter: KeyRewriter, group: str,
                 batch: int = 2000, idle_timeout: float | None = None,
                 done: Callable[[], bool] | None = None, dry_run: bool = False,
                 merge_policy: str = "overwrite", stream_ids: str = "keep",
                 on_progress: Callable[[ApplyStats], None] | None = None,
                 log_name: str = "URI", target_dbs: "TargetDbs | None" = None) -> None:
        """``target_for_db(db)`` gives the client that writes events of source database ``db``
        (``target_dbs``: the mapping behind it, which counts key collisions);
        ``done()`` (replicate) says the producer finished: the run ends once the log is drained.
        ``log_name``: the log's (masked) URI, for the commands apply tells the user to run."""
        if merge_policy == "merge" and stream_ids != "keep":
            raise ConfigError("--merge-policy merge with --stream-id drop is refused: stream "
                              "entries would get new ids on every replay and be added again "
                              "(use --stream-id keep, or --merge-policy overwrite)")
        self.target_for_db, self.reader, self.meta, self.codec = target_for_db, reader, meta, codec
        self.target_dbs = target_dbs
        self.group, self.batch, self.log_name = group, batch, log_name
        self.idle_timeout, self.done, self.dry_run = idle_timeout, done, dry_run
        self.on_progress = on_progress
        self.writer = BatchWriter(rewriter=rewriter, merge=merge_policy == "merge",
                                  stream_ids=stream_ids)
        self._poll_n = min(batch, FIRST_POLL)
        self._per_record = 1000.0          # until seen, a record may be a block of 1000 events
        self.stats = ApplyStats()
        self.decoder = Decoder(codec, self.stats, self._dead_letter)
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()    # a sign of life for /healthz, even while waiting
        self.track_lag = False               # metrics: ask the group's lag every LAG_INTERVAL_S
        self._next_lag = 0.0
        self.guard = TargetGuard(group, {})
        self.kept: KeptKeys | None = None    # --on-existing skip: keys the target held before
        self._open_passes: set[str] = set()                # capture ids of passes under way
        self._damaged_seen = 0
        self._last_status = self._last_watch = self._last_identity = 0.0
        self.state = "starting"
        self._idle_note = ""                 # what an idle apply waits for before it may end
        self._facts = process_facts()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> ApplyStats:
        self.guard = TargetGuard(self.group, self._previous_targets())
        self._status("running", force=True)
        for w in self.reader.warnings:
            log.warning("log: %s", w)
        try:
            self._loop()
        except Stopped:
            pass
        finally:
            self._status("stopped", force=True)
        return self.stats

    def _loop(self) -> None:
        last_record = time.monotonic()
        while not self._stop.is_set():
            try:
                self.heartbeat = time.monotonic()
                self._track_lag()
                self._check_identity()
                records = self._log_call(self.reader.poll, self._poll_n, POLL_TIMEOUT_S)
                self._count_damaged()
                if records:
                    events = self._apply(records)
                    self._size_batches(records, events)
                    last_record = time.monotonic()
                    continue
                self._meet_previous_targets()
                self._watch_targets()
                if self._may_end(last_record):
                    if (self._captures_done() and self._drained()
                            and not self._watch_targets(force=True) and self._targets_checked()):
                        self._sweep_temp_keys()
                        return
                    last_record = time.monotonic()
                self._status(self._idle_note or "idle")
            except LogLost as e:
                self._log_lost(e)
                last_record = time.monotonic()

    def _previous_targets(self) -> dict[str, dict]:
        """What the previous apply of this group last read of its targets (run_id, DBSIZE)."""
        try:
            doc = self.meta.get(status_name(self.group)) or {}
        except Exception as e:  # noqa: BLE001 - status is informative: never stop apply for it
            log.warning("could not read the previous apply status: %s", e)
            return {}
        return {} if self.dry_run else dict(doc.get("targets") or {})

    def _may_end(self, last_record: float) -> bool:
        producer_done = self.done is not None and self.done()
        idle_over = (self.idle_timeout is not None
                     and time.monotonic() - last_record >= self.idle_timeout)
        return producer_done or idle_over

    def _size_batches(self, records: list[Record], events: int) -> None:
        """Bounded memory: ask for as many records as fit in BATCH_BYTES at their recent size,
        and (a block holds many events) as hold about ``batch`` events, at least one record."""
        avg = sum(len(r.value) for r in records) / len(records)
        # Events per record as seen, forgotten slowly: a batch of markers must not make the next
        # poll take a batch's worth of blocks.
        self._per_record = per_record = max(max(events, 1) / len(records), self._per_record / 2)
        self._poll_n = max(1, min(int(self.batch / per_record), int(BATCH_BYTES / max(avg, 1.0))))

    def _captures_done(self) -> bool:
        """Several captures may feed the log: the run ends only once every snapshot capture that
        is still alive has finished its scan (its checkpoint says done after its SNAPSHOT_END
        was stored; the group's lag of 0, checked next, says it was applied). A capture gone for
        good (no sign of life for members.GONE_AFTER_S) does not hold apply: it is reported."""
        try:
            docs = self._log_call(self.meta.documents)
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
        self._idle_note = (f"waiting for {len(waiting)} capture(s) to finish their snapshot "
                           f"({', '.join(c.name for c in waiting)})" if waiting else "")
        if waiting:
            log.info("%s", self._idle_note)
        return not waiting

    def _drained(self) -> bool:
        """Nothing left to read: the group's lag on the log is zero. (An empty poll alone is not
        enough: a Kafka consumer may still be joining its group.)"""
        try:
            lag = self._log_call(self.reader.status).lag
        except LogLost:
            raise
        except LogError as e:
            log.warning("cannot read the log's lag (%s); not treating the log as drained", e)
            return False
        if lag and not self.dry_run:
            log.info("log not drained yet: %d records to go", lag)
            return False
        return True

    # -- one batch -----------------------------------------------------------------------------
    def _apply(self, records: list[Record]) -> int:
        """Write and commit a batch; returns how many events it held."""
        events, markers = self.decoder.decode(records)
        if self.kept is not None:
            events = self.decoder.keep(events, self.kept, self.writer.rename, self.target_dbs)
        if self.dry_run:
            self.decoder.count_dry(events)
        else:
            records = self._write_with_retry(records, events)
            self._log_call(self.reader.commit, records)
            self.stats.last_write_ms = now_millis()
            self.stats.last_read_ms = max(self.stats.last_read_ms, max(
                (ev.read_time_ms for ev, _ in events.values()), default=0))
            self._handle_findings()
        self._passes(markers)
        self.stats.records += len(records)
        self.stats.last_active = time.monotonic()
        self._status("running")
        if self.on_progress:
            self.on_progress(self.stats)
        return len(events) + len(markers)

    def _passes(self, markers: list[tuple[Kind, str]]) -> None:
        """Follow capture passes (SNAPSHOT_BEGIN or RESYNC ... SNAPSHOT_END of one capture): one
        applied whole after the log lost records has rewritten every key of the source."""
        for kind, capture_id in markers:
            if kind in PASS_OPENERS:
                self._open_passes.add(capture_id)
            elif kind is Kind.SNAPSHOT_END and capture_id in self._open_passes:
                self._open_passes.discard(capture_id)
                if self.stats.log_lost:
                    self.stats.pass_after_loss = True

    def _write_with_retry(self, records: list[Record], events: dict) -> list[Record]:
        """Write the batch until the target took it; returns the records to commit (after a
        wait, only those this member still holds)."""
        retrying = retry.policy(on=TargetUnavailable, max_wait_s=retry.TARGET_MAX_WAIT_S,
                                sleep=self._wait_for_target, before_sleep=self._log_retry)
        for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    records, events = self._still_owned(records, events)
                results = self._write(events)
        for watch, res in results:
            self._settle(watch, res)
        self.stats.cluster_redirects = self.writer.redirects
        self.state = "running"
        return records

    def _write(self, events: dict) -> list[tuple[TargetWatch, BatchResult]]:
        by_db: dict[int, list[tuple[Event, Record]]] = {}
        for k, item in events.items():
            by_db.setdefault(k[0], []).append(item)
        # Every database's target first: a batch with a database that cannot be written is
        # refused before any of it is written.
        targets = {db: self.target_for_db(db) for db in by_db}
        out = []
        for db, items in by_db.items():
            target = targets[db]
            if self.target_dbs is not None:
                self.target_dbs.see(db, items)
            watch = self.guard.watch_for(db, target)
            # Whole states only (a snapshot's blocks): no planning per key; else, or when the
            # target refused one, the careful way.
            res = write_whole(self.writer, target, items, probe=watch)
            out.append((watch, res or self.writer.write(target, db, items, probe=watch)))
        return out

    def _settle(self, watch: TargetWatch, res: BatchResult) -> None:
        """Counted only once every database took its part: a retried batch counts nothing."""
        self.stats.add(res.tally)
        for rec, why in res.failed:
            self._dead_letter(rec, why)
        self.guard.observe(watch, res)

    def _still_owned(self, records: list[Record], events: dict) -> tuple[list[Record], dict]:
        owned = self._log_call(self.reader.owned, records)
        if len(owned) == len(records):
            return records, events
        keep = {id(r) for r in owned}
        self.stats.handed_over += len(records) - len(owned)
        events = {k: v for k, v in events.items() if id(block_of(v[1])) in keep}
        log.warning("%d records were handed to another member of group %r while the target was "
                    "down: left unwritten, that member applies them", len(records) - len(owned),
                    self.group)
        return owned, events

    @property
    def collisions(self) -> int:
        """Key names written from two source databases into one target database."""
        c = self.target_dbs.collisions if self.target_dbs is not None else None
        return c.count if c is not None else 0

    @property
    def target_down(self) -> bool:
        return self.state.startswith("waiting for target")

    def _track_lag(self) -> None:
        now = time.monotonic()
        if not self.track_lag or now < self._next_lag:
            return
        self._next_lag = now + LAG_INTERVAL_S
        try:
            self.stats.log_lag = self.reader.status().lag
        except LogError as e:
            log.debug("cannot read the log's lag for metrics: %s", e)

    def _wait_for_target(self, seconds: float) -> None:
        """Sleep, in slices: the group must keep hearing from this member meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.heartbeat = time.monotonic()
            if self._stop.wait(min(left, KEEPALIVE_S)):
                raise Stopped()
            try:
                self.reader.keepalive()
            except LogError as e:
                log.debug("keepalive failed: %s", e)
            if self.target_down:             # status shows this member alive, waiting
                self._status(self.state)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped()

    def _log_retry(self, state) -> None:
        self.stats.retries += 1
        why = state.outcome.exception()
        log.warning("target unavailable (%s); batch not committed, retrying in %.1fs", why,
                    state.next_action.sleep)
        self._status(f"waiting for target: {why}", force=True)

    # -- the log -------------------------------------------------------------------------------
    def _log_call(self, fn, *args):
        """Call the log; while it is unavailable, wait with backoff for as long as it takes and
        call again with the same arguments (a commit of the same records)."""
        retrying = retry.policy(on=LogUnavailable, max_wait_s=retry.LOG_MAX_WAIT_S,
                                sleep=self._wait_for_target, before_sleep=self._log_wait)
        return retrying(fn, *args)           # keepalive meanwhile: the group keeps this member

    def _log_wait(self, state) -> None:
        self.stats.log_waits += 1
        why = state.outcome.exception()
        log.warning("waiting for the log: %s; calling again in %.1fs", why, state.next_action.sleep)
        self._status(f"waiting for the log: {why}", force=True)

    def _check_identity(self) -> None:
        now = time.monotonic()
        if now - self._last_identity >= IDENTITY_INTERVAL_S:
            self._last_identity = now
            self._log_call(self.reader.check_identity)

    def _log_lost(self, e: LogLost) -> None:
        """Take the log as it is now and read it from its beginning. What the lost records held
        is back only once a whole capture pass was applied (a live capture resyncs into the new
        log); until then the run cannot end successfully."""
        self.stats.log_lost.append(str(e))
        self.stats.pass_after_loss = False
        self._open_passes.clear()
        log.warning("%s; reading the new log from its earliest record", e)
        self._status(str(e), force=True)
        self._log_call(self.reader.adopt_new_log)
        self._log_call(self.reader.seek, "earliest")

    def _count_damaged(self) -> None:
        """Corrupt stretches the reader skipped (it dead-lettered them itself) are dead letters."""
        damaged = self.reader.damaged
        while self._damaged_seen < len(damaged):
            why = damaged[self._damaged_seen]
            self._damaged_seen += 1
            self._count_dead_letter(f"corrupt log records: {why}")

    # -- a target that lost data -----------------------------------------------------------------
    def _meet_previous_targets(self) -> None:
        """With nothing to write, the targets of the previous run are still checked."""
        if not self.guard.previous:
            return
        try:
            self.guard.meet_previous(self.target_for_db)
        except TargetUnavailable as e:
            log.warning("target unavailable (%s): checking it once it is back", e)
            self._sleep(WATCH_INTERVAL_S)
            return
        self._handle_findings()

    def _watch_targets(self, force: bool = False) -> bool:
        """Check the targets while idle (about once a second); True when one lost data and the
        replay from the earliest record started."""
        now = time.monotonic()
        if self.dry_run or (not force and now - self._last_watch < WATCH_INTERVAL_S):
            return False
        self._last_watch = now
        self.guard.check()
        return self._handle_findings()

    def _handle_findings(self) -> bool:
        """After the batch was committed: the first loss the readings showed is healed (the
        replay rewrites everything, later findings included). True when a replay started."""
        return any(self._target_lost(found) for found in self.guard.take_findings())

    def _targets_checked(self) -> bool:
        """The run ends only once every target could be read: one that is down right now may
        have lost what apply wrote."""
        down = [] if self.dry_run else self.guard.unreadable()
        if down:
            log.warning("waiting for the target before ending (it may have lost data): %s", down[0])
            self._status(f"waiting for target: {down[0]}", force=True)
            self._sleep(WATCH_INTERVAL_S)
        return not down

    def _target_lost(self, found: Finding) -> bool:
        """Replay the log from its earliest record when it still holds every key; True when
        the replay started."""
        replayable, detail = self._log_call(self.reader.replayable)
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
        self._status("target lost data: replaying the log from its earliest record", force=True)
        self._log_call(self.reader.seek, "earliest")
        self.writer.forget_targets()
        self.writer.open_parts.clear()
        self._open_passes.clear()
        self.guard.rebase()
        return True

    def _sweep_temp_keys(self) -> None:
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

    # -- reporting -----------------------------------------------------------------------------
    def _dead_letter(self, rec: Record, reason: str) -> None:
        if isinstance(rec, tuple):
            # One key of a block: the dead letter holds its event alone (the block's other keys
            # were written), at the block's position.
            b, ev = rec
            rec = Record(b.partition, b.offset, ev.record_key(), self.codec.encode(ev),
                         b.timestamp_ms)
        self.reader.dead_letter(rec, reason)
        log.error("dead-lettered record %s@%s: %s", rec.partition, rec.offset, reason)
        self._count_dead_letter(reason)

    def _count_dead_letter(self, reason: str) -> None:
        self.stats.dead_letters += 1
        if len(self.stats.dead_letter_reasons) < MAX_REASONS:
            self.stats.dead_letter_reasons.append(reason)

    def _status(self, state: str, force: bool = False) -> None:
        self.state = state
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_INTERVAL_S:
            return
        self._last_status = now
        if self.dry_run:
            return      # a dry run changes nothing anyone sees later: no group or member document
        st = self.stats
        doc = {"state": state, "last_write_ms": st.last_write_ms, "records": st.records,
               "dead_letters": st.dead_letters, "retries": st.retries,
               "log_waits": st.log_waits, "replays": len(st.replays),
               "log_lost": len(st.log_lost), "updated_ms": now_millis(), "dry_run": self.dry_run,
               "collisions": self.collisions}
        try:
            self.meta.put(status_name(self.group), {**doc, "targets": self.guard.doc()})
            # This member's own document: several apply processes share the group's.
            self.meta.put(member_name(self.group, self.reader.consumer), {
                **doc, **self._facts, "group": self.group, "member": self.reader.consumer,
                "partitions": self.reader.held(), "last_read_ms": st.last_read_ms})
        except Exception as e:  # status is informative; never let it stop apply
            log.warning("could not record apply status: %s", e)
