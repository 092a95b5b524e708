"""Apply: replay log records into the target with pipelined RESTORE ... REPLACE ABSTTL and DEL,
and commit the log position only after the target acknowledged the whole batch.

A target that is down, loading, out of memory or read-only is waited for, with backoff, for as
long as it takes; nothing is skipped (apply/waits.py). A target that refuses a permission or our
credentials stops apply with one line. A target that lost data, or a log that lost records, is
healed by apply/recovery.py. The run ends when apply/ending.py says so. A record that cannot be
decoded, or that the target refuses for good, goes to the log's dead-letter place, is counted,
and makes the run end non-zero.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import redis

from conveyor.apply.batch import BatchWriter
from conveyor.apply.plan import BatchResult
from conveyor.apply.decode import Decoder
from conveyor.apply.ending import Ending
from conveyor.apply.guard import TargetGuard
from conveyor.apply.recovery import Passes, Recovery
from conveyor.kept import KeptKeys
from conveyor.apply.restores import write_whole
from conveyor.apply.stats import ApplyStats, Stopped, block_of, status_name
from conveyor.apply.status import StatusBoard
from conveyor.apply.waits import Waits
from conveyor.apply.watch import TargetWatch
from conveyor.errors import ConfigError, LogError, LogLost
from conveyor.events import Codec, Event, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import LogReader, MetaStore, Record

if TYPE_CHECKING:
    from conveyor.databases import TargetDbs

log = logging.getLogger("conveyor.apply")

LAG_INTERVAL_S = 2.0         # metrics: how often the group's lag is asked
POLL_TIMEOUT_S = 0.5
IDENTITY_INTERVAL_S = 5.0        # how often the log is checked for having been reset
BATCH_BYTES = 1024 * 1024        # record bytes per batch (decoded, a part takes several times more)
FIRST_POLL = 1                   # records asked first, before their size is known (a block holds 1000 keys)
MAX_REASONS = 20


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
        self.group, self.batch, self.dry_run = group, batch, dry_run
        self.on_progress = on_progress
        self.writer = BatchWriter(rewriter=rewriter, merge=merge_policy == "merge",
                                  stream_ids=stream_ids)
        self._poll_n = min(batch, FIRST_POLL)
        self._per_record = 1000.0          # until seen, a record may be a block of 1000 events
        self.stats = ApplyStats()
        self.decoder = Decoder(codec, self.stats, self._dead_letter)
        self.track_lag = False               # metrics: ask the group's lag every LAG_INTERVAL_S
        self._next_lag = 0.0
        self.kept: KeptKeys | None = None    # --on-existing skip: keys the target held before
        self.board = StatusBoard(meta=meta, reader=reader, group=group, stats=self.stats,
                                 dry_run=dry_run, targets=lambda: self.recovery.guard.doc(),
                                 collisions=lambda: self.collisions)
        self.waits = Waits(reader=reader, stats=self.stats, board=self.board)
        self.passes = Passes(self.stats)
        self.recovery = Recovery(target_for_db=target_for_db, reader=reader, writer=self.writer,
                                 stats=self.stats, waits=self.waits, board=self.board,
                                 passes=self.passes, guard=TargetGuard(group, {}),
                                 log_name=log_name, dry_run=dry_run)
        self.ending = Ending(reader=reader, meta=meta, waits=self.waits, done=done,
                             idle_timeout=idle_timeout, dry_run=dry_run)
        self._damaged_seen = 0
        self._last_identity = 0.0

    def stop(self) -> None:
        self.waits.stopping.set()

    @property
    def heartbeat(self) -> float:
        """A sign of life for /healthz, even while waiting."""
        return self.waits.heartbeat

    @property
    def state(self) -> str:
        return self.board.state

    @property
    def target_down(self) -> bool:
        return self.board.target_down

    @property
    def guard(self) -> TargetGuard:
        return self.recovery.guard

    def run(self) -> ApplyStats:
        self.recovery.guard = TargetGuard(self.group, self._previous_targets())
        self.board.show("running", force=True)
        for w in self.reader.warnings:
            log.warning("log: %s", w)
        try:
            self._loop()
        except Stopped:
            pass
        finally:
            self.board.show("stopped", force=True)
        return self.stats

    def _loop(self) -> None:
        last_record = time.monotonic()
        rec, end = self.recovery, self.ending
        while not self.waits.stopping.is_set():
            try:
                self.waits.beat()
                self._track_lag()
                self._check_identity()
                records = self.waits.log_call(self.reader.poll, self._poll_n, POLL_TIMEOUT_S)
                self._count_damaged()
                if records:
                    events = self._apply(records)
                    self._size_batches(records, events)
                    last_record = time.monotonic()
                    continue
                rec.meet_previous_targets()
                rec.watch_targets()
                if end.may_end(last_record):
                    if (end.captures_done() and end.drained()
                            and not rec.watch_targets(force=True) and rec.targets_checked()):
                        rec.sweep_temp_keys()
                        return
                    last_record = time.monotonic()
                self.board.show(end.idle_note or "idle")
            except LogLost as e:
                rec.log_lost(e)
                last_record = time.monotonic()

    def _previous_targets(self) -> dict[str, dict]:
        """What the previous apply of this group last read of its targets (run_id, DBSIZE)."""
        try:
            doc = self.meta.get(status_name(self.group)) or {}
        except Exception as e:  # noqa: BLE001 - status is informative: never stop apply for it
            log.warning("could not read the previous apply status: %s", e)
            return {}
        return {} if self.dry_run else dict(doc.get("targets") or {})

    def _size_batches(self, records: list[Record], events: int) -> None:
        """Bounded memory: ask for as many records as fit in BATCH_BYTES at their recent size,
        and (a block holds many events) as hold about ``batch`` events, at least one record."""
        avg = sum(len(r.value) for r in records) / len(records)
        # Events per record as seen, forgotten slowly: a batch of markers must not make the next
        # poll take a batch's worth of blocks.
        self._per_record = per_record = max(max(events, 1) / len(records), self._per_record / 2)
        self._poll_n = max(1, min(int(self.batch / per_record), int(BATCH_BYTES / max(avg, 1.0))))

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
            self.waits.log_call(self.reader.commit, records)
            self.stats.last_write_ms = now_millis()
            self.stats.last_read_ms = max(self.stats.last_read_ms, max(
                (ev.read_time_ms for ev, _ in events.values()), default=0))
            self.recovery.handle_findings()
        self.passes.follow(markers)
        self.stats.records += len(records)
        self.stats.last_active = time.monotonic()
        self.board.show("running")
        if self.on_progress:
            self.on_progress(self.stats)
        return len(events) + len(markers)

    def _write_with_retry(self, records: list[Record], events: dict) -> list[Record]:
        """Write the batch until the target took it; returns the records to commit (after a
        wait, only those this member still holds)."""
        for attempt in self.waits.target_policy():
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    records, events = self._still_owned(records, events)
                results = self._write(events)
        for watch, res in results:
            self._settle(watch, res)
        self.stats.cluster_redirects = self.writer.redirects
        self.board.state = "running"
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
        owned = self.waits.log_call(self.reader.owned, records)
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

    def _track_lag(self) -> None:
        now = time.monotonic()
        if not self.track_lag or now < self._next_lag:
            return
        self._next_lag = now + LAG_INTERVAL_S
        try:
            self.stats.log_lag = self.reader.status().lag
        except LogError as e:
            log.debug("cannot read the log's lag for metrics: %s", e)

    # -- the log -------------------------------------------------------------------------------
    def _check_identity(self) -> None:
        now = time.monotonic()
        if now - self._last_identity >= IDENTITY_INTERVAL_S:
            self._last_identity = now
            self.waits.log_call(self.reader.check_identity)

    def _count_damaged(self) -> None:
        """Corrupt stretches the reader skipped (it dead-lettered them itself) are dead letters."""
        damaged = self.reader.damaged
        while self._damaged_seen < len(damaged):
            why = damaged[self._damaged_seen]
            self._damaged_seen += 1
            self._count_dead_letter(f"corrupt log records: {why}")

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
