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

from apply.writes import (CHUNK_SCRIPT, chunk_kind, convertible, script_args, temp_key)
from conveyor import values
from conveyor.endpoints import server_info
from conveyor.errors import CodecError, LogError
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import LogReader, MetaStore, Record
from conveyor.rdb import decode_dump

log = logging.getLogger("conveyor.apply")

POLL_TIMEOUT_S = 0.5
STATUS_INTERVAL_S = 1.0
RETRY_MAX_WAIT_S = 30.0
BATCH_BYTES = 1024 * 1024    # record bytes per batch (decoded, a part takes several times more)
FIRST_POLL = 16                  # records asked first, before their size is known
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
    written: int = 0          # typed values written (--type struct events, merge policy)
    converted: int = 0        # DUMP payloads the target refused, written from their decoded value
    chunks: int = 0           # parts of keys that arrived in chunks
    chunked_keys: int = 0     # such keys completed on the target
    orphan_chunks: int = 0    # parts whose first part was not read (replay started mid-key)
    duplicate_chunks: int = 0  # parts already applied before a restart
    pending_dropped: int = 0  # stream consumer-group pending entries plain commands cannot rebuild
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
                 merge_policy: str = "overwrite", stream_ids: str = "keep",
                 on_progress: Callable[[ApplyStats], None] | None = None) -> None:
        """``target_for_db(db)`` gives the client that writes events of source database ``db``;
        ``done()`` (replicate) says the producer finished: the run ends once the log is drained."""
        self.target_for_db, self.reader, self.meta, self.codec = target_for_db, reader, meta, codec
        self.rewriter, self.group, self.batch = rewriter, group, batch
        self.idle_timeout, self.done, self.dry_run = idle_timeout, done, dry_run
        self.on_progress = on_progress
        self.merge, self.stream_ids = merge_policy == "merge", stream_ids
        self._v7: dict[int, bool] = {}
        self._poll_n = min(batch, FIRST_POLL)
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
                records = self.reader.poll(self._poll_n, POLL_TIMEOUT_S)
                if records:
                    self._size_batches(records)
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

    def _size_batches(self, records: list[Record]) -> None:
        """Bounded memory: ask for as many records as fit in BATCH_BYTES at their recent size."""
        avg = sum(len(r.value) for r in records) / len(records)
        self._poll_n = max(1, min(self.batch, int(BATCH_BYTES / max(avg, 1.0))))

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
            if ev.chunk is not None:
                # Parts of a key are applied one by one, in order. A whole state of the key read
                # before them is superseded by them (the last part replaces the key).
                latest.pop((ev.db, ev.key), None)
                latest[(ev.db, ev.key, ev.chunk["id"], ev.chunk["index"])] = (ev, rec)
            elif ev.kind in (Kind.UPSERT, Kind.DELETE):
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
        for k, item in events.items():
            by_db.setdefault(k[0], []).append(item)
        for db, items in by_db.items():
            self._write_db(self.target_for_db(db), items)

    def _write_db(self, target: redis.Redis, items: list[tuple[Event, Record]]) -> None:
        now = now_millis()
        pipe = target.pipeline(transaction=False)
        rename = None if self.rewriter.identity else self.rewriter
        v7 = self._target_v7(target)
        plan = []            # (event, record, key, what, first reply index, commands, tolerated)
        failed: list[tuple[Record, str]] = []
        for ev, rec in items:
            key = rename(ev.key) if rename else ev.key
            start = len(pipe)
            value = None
            if ev.kind is Kind.UPSERT and ev.chunk is not None:
                cmds, tolerated = self._chunk_commands(ev, key, now, v7)
                what = "chunk"
            elif ev.kind is not Kind.UPSERT or ev.expired(now):
                cmds, tolerated = [("DEL", key)], set()
                what = "expired" if ev.kind is Kind.UPSERT else "deleted"
            elif ev.payload is not None and not self.merge:
                cmds, tolerated = [("RESTORE", key, ev.expire_at_ms or 0, ev.payload, "REPLACE",
                                    "ABSTTL")], set()
                what = "restored"
            else:
                try:
                    value = ev.value if ev.value is not None else self._decoded(ev)
                except CodecError as e:
                    failed.append((rec, f"key {ev.key!r}: {e}"))
                    continue
                w = self._typed(key, value, ev.expire_at_ms, v7)
                cmds, tolerated = w.commands, w.tolerated
                what = "written" if ev.value is not None else "converted"
            for c in cmds:
                pipe.execute_command(*c)
            plan.append((ev, rec, key, what, start, len(cmds), tolerated, value))
        try:
            replies = pipe.execute(raise_on_error=False) if len(pipe) else []
        except (*TRANSIENT_ERRORS, OSError) as e:
            raise TargetUnavailable(f"{type(e).__name__}: {e}") from e
        done: list[str] = []
        convert: list[tuple[Event, Record, bytes, bytes, bytes | None]] = []
        for ev, rec, key, what, start, n, tolerated, value in plan:
            errors = [(i, r) for i, r in enumerate(replies[start:start + n])
                      if isinstance(r, Exception) and i not in tolerated]
            for _, r in errors:
                if isinstance(r, TRANSIENT_ERRORS) or str(r).startswith(TRANSIENT_PREFIXES):
                    raise TargetUnavailable(str(r))
            if what == "restored" and errors and convertible(errors[0][1]):
                convert.append((ev, rec, key, ev.payload, None))
            elif errors:
                failed.append((rec, f"target refused key {ev.key!r}: {errors[0][1]}"))
                if what in ("written", "converted"):
                    pipe.execute_command("DEL", temp_key(key, b"w"))   # no half-built leftovers
            elif what == "chunk":
                self._chunk_done(ev, rec, key, replies[start + n - 1], convert, done, failed)
            else:
                done.append(what)
                if value is not None:
                    done.append(("pending_dropped", values.pending_dropped(value, self.stream_ids)))
        if len(pipe):
            pipe.execute(raise_on_error=False)
        if convert:
            failed += self._convert(target, convert, v7, done)
        # Counted only now: a TargetUnavailable above retries the whole batch, counting nothing.
        for rec, why in failed:
            self._dead_letter(rec, why)
        for item in done:
            what, n = item if isinstance(item, tuple) else (item, 1)
            setattr(self.stats, what, getattr(self.stats, what) + n)

    def _chunk_commands(self, ev: Event, key: bytes, now: int, v7: bool):
        ch = ev.chunk
        first, last = ch["index"] == 0, ch["last"]
        if self.merge and ev.value is not None:
            # Merge: the parts go straight into the key; nothing to guard, nothing to rename.
            cmds: list[tuple] = []
            tolerated: set[int] = set()
            values.add_value(cmds, tolerated, key, ev.value, stream_ids=self.stream_ids,
                             merge=True, first=first, v7=v7)
            if last:
                if ev.expired(now):
                    cmds.append(("DEL", key))
                elif ev.expire_at_ms is not None:
                    cmds.append(("PEXPIREAT", key, ev.expire_at_ms))
                else:
                    cmds.append(("PERSIST", key))
            return cmds, tolerated
        tmp = temp_key(key, ch["id"].encode())
        inner: list[tuple] = []
        if ev.payload is not None:
            inner.append(("APPEND", tmp, ev.payload))
            count = len(ev.payload)
        else:
            values.add_value(inner, set(), tmp, ev.value, stream_ids=self.stream_ids, first=first,
                             v7=v7)
            count = values.elements(ev.value)
        expire = -1 if ev.expire_at_ms is None else (0 if ev.expired(now) else ev.expire_at_ms)
        return [("EVAL", CHUNK_SCRIPT, 2, tmp, key, ch["index"], ch["offset"], count,
                 1 if last else 0, expire, chunk_kind(ev), *script_args(inner))], set()

    def _chunk_done(self, ev, rec, key, reply, convert, done, failed) -> None:
        done.append("chunks")
        if isinstance(reply, list) and reply and reply[0] == b"refused":
            if convertible(reply[1]):
                tmp = temp_key(key, ev.chunk["id"].encode())
                convert.append((ev, rec, key, bytes(reply[2]), tmp))
            else:
                failed.append((rec, f"target refused key {ev.key!r}: {reply[1]!r}"))
            return
        if reply == b"orphan":
            done.append("orphan_chunks")
            if ev.chunk["last"]:
                log.warning("key %r: last part applied without its first part (the log was "
                            "replayed from the middle of the key); the key is not written", ev.key)
        elif reply == b"duplicate":
            done.append("duplicate_chunks")
        elif ev.chunk["last"]:
            done.append("chunked_keys")
            if ev.value is not None:
                done.append(("pending_dropped",
                             values.pending_dropped(ev.value, self.stream_ids, whole=False)))

    def _convert(self, target: redis.Redis, items, v7: bool, done: list) -> list:
        """Write refused DUMP payloads as typed values; returns the records that failed."""
        failed, plan = [], []
        pipe = target.pipeline(transaction=False)
        now = now_millis()
        for ev, rec, key, payload, chunk_tmp in items:
            try:
                value = values.from_rdb(decode_dump(payload))
            except (CodecError, ValueError) as e:
                failed.append((rec, f"target refused key {ev.key!r} and its DUMP payload cannot "
                                    f"be converted: {e}"))
                continue
            start = len(pipe)
            if ev.expired(now):
                cmds = [("DEL", key)]
            else:
                w = self._typed(key, value, ev.expire_at_ms, v7)
                cmds = w.commands
            if chunk_tmp is not None:
                cmds = cmds + [("DEL", chunk_tmp)]
            for c in cmds:
                pipe.execute_command(*c)
            plan.append((ev, rec, key, start, len(cmds), value, chunk_tmp))
        try:
            replies = pipe.execute(raise_on_error=False) if len(pipe) else []
        except (*TRANSIENT_ERRORS, OSError) as e:
            raise TargetUnavailable(f"{type(e).__name__}: {e}") from e
        for ev, rec, key, start, n, value, chunk_tmp in plan:
            errors = [r for r in replies[start:start + n] if isinstance(r, Exception)]
            if any(isinstance(r, TRANSIENT_ERRORS) or str(r).startswith(TRANSIENT_PREFIXES)
                   for r in errors):
                raise TargetUnavailable(str(errors[0]))
            if errors:
                failed.append((rec, f"target refused the converted value of key {ev.key!r}: "
                                    f"{errors[0]}"))
                target.delete(temp_key(key, b"w"))
            else:
                done.append("converted")
                if chunk_tmp is not None:
                    done.append("chunked_keys")
                done.append(("pending_dropped", values.pending_dropped(value, self.stream_ids)))
        return failed

    def _decoded(self, ev: Event) -> dict:
        try:
            return values.from_rdb(decode_dump(ev.payload))
        except ValueError as e:
            raise CodecError(str(e)) from e

    def _typed(self, key: bytes, value: dict, expire_at_ms, v7: bool) -> values.Writes:
        return values.write_commands(key, value, into=None if self.merge else temp_key(key, b"w"),
                                     expire_at_ms=expire_at_ms, stream_ids=self.stream_ids, v7=v7)

    def _target_v7(self, target: redis.Redis) -> bool:
        """Whether the target knows Redis 7.0's stream metadata options."""
        k = id(target)
        if k not in self._v7:
            try:
                version = server_info(target).version
            except (*TRANSIENT_ERRORS, OSError) as e:
                raise TargetUnavailable(f"{type(e).__name__}: {e}") from e
            except redis.RedisError:
                version = (0,)
            self._v7[k] = tuple(version) >= (7, 0)
            target.set_response_callback("XCLAIM", lambda response, **_: response)
        return self._v7[k]

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

