"""Snapshot capture: SCAN the source, read DUMP + absolute expiry in pipelined batches, append
events to the log, and save the scan cursor only after the log confirmed the events durable."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from conveyor.endpoints import ServerInfo, mask_uri
from conveyor.errors import SourceError
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.keys import KeyFilter
from conveyor.log import LogWriter, MetaStore

log = logging.getLogger("conveyor.capture")

CHECKPOINT_INTERVAL_S = 1.0      # flush the log and save the cursor at most this often
SOURCE_RETRY_ATTEMPTS = 6        # a source that stays unreachable this long ends the run
SOURCE_ERRORS = (redis.ConnectionError, redis.TimeoutError)


@dataclass
class CaptureStats:
    capture_id: str = ""
    keys: int = 0                # UPSERT events
    deletes: int = 0             # keys that vanished between SCAN and read
    total_hint: int = 0          # DBSIZE at start
    resumed: bool = False
    complete: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.keys / max(time.monotonic() - self.started, 1e-9)


def checkpoint_name(source_uri: str, db: int, key_filter: KeyFilter) -> str:
    """One checkpoint per source database and filter set (a different filter is another snapshot)."""
    ident = repr((mask_uri(source_uri).split("@")[-1], db, key_filter.match, key_filter.type,
                  key_filter.include, key_filter.exclude, key_filter.slots))
    return "capture-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


class SnapshotCapture:
    """One pass over the source keyspace; restartable from the last saved cursor."""

    def __init__(self, *, source: redis.Redis, source_info: ServerInfo, writer: LogWriter,
                 meta: MetaStore, codec: Codec, key_filter: KeyFilter, checkpoint: str,
                 scan_count: int = 1000, fresh: bool = False,
                 on_progress: Callable[[CaptureStats], None] | None = None) -> None:
        self.source, self.info, self.writer, self.meta = source, source_info, writer, meta
        self.codec, self.filter, self.checkpoint = codec, key_filter, checkpoint
        self.scan_count, self.fresh, self.on_progress = scan_count, fresh, on_progress
        self.stats = CaptureStats()
        self._stop = threading.Event()
        self._seq = 0

    def stop(self) -> None:
        self._stop.set()

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> CaptureStats:
        cursor = self._begin()
        last_save = time.monotonic()
        while not self._stop.is_set():
            cursor, keys = self._retry(lambda c=cursor: self._scan(c))
            if keys:
                self._emit_batch(keys)
            if cursor == 0:
                break
            if time.monotonic() - last_save >= CHECKPOINT_INTERVAL_S:
                self._save(cursor, "scanning")
                last_save = time.monotonic()
        if cursor == 0 and not self._stop.is_set():
            self._append(Event(Kind.SNAPSHOT_END, self.info.db, capture_id=self.stats.capture_id,
                               seq=self._next_seq(), read_time_ms=now_millis(),
                               count=self.stats.keys))
            self._save(0, "done")
            self.stats.complete = True
        else:
            self._save(cursor, "scanning")
        self._progress()
        return self.stats

    def _begin(self) -> int:
        st = self.stats
        st.total_hint = self._retry(self.source.dbsize)
        cp = None if self.fresh else self.meta.get(self.checkpoint)
        if cp and cp.get("state") == "scanning":
            st.capture_id, st.resumed = cp["capture_id"], True
            st.keys, st.deletes, self._seq = cp["keys"], cp["deletes"], cp["seq"]
            log.info("resuming snapshot %s at cursor %s after %d keys", st.capture_id,
                     cp["cursor"], st.keys)
            return int(cp["cursor"])
        st.capture_id = uuid.uuid4().hex[:16]
        self._append(Event(Kind.SNAPSHOT_BEGIN, self.info.db, capture_id=st.capture_id,
                           seq=self._next_seq(), read_time_ms=now_millis(), count=st.total_hint,
                           info={"source_version": self.info.version_text,
                                 "source_flavor": self.info.flavor}))
        self._save(0, "scanning")
        return 0

    # -- reading -------------------------------------------------------------------------------
    def _scan(self, cursor: int) -> tuple[int, list[bytes]]:
        cursor, keys = self.source.scan(cursor, count=self.scan_count, **self.filter.scan_args())
        return int(cursor), self.filter.select(keys)

    def _emit_batch(self, keys: list[bytes]) -> None:
        read_ms, replies = self._retry(lambda: self._read(keys))
        db, cid, st = self.info.db, self.stats.capture_id, self.stats
        absolute = self.info.has_pexpiretime
        encode, append = self.codec.encode, self.writer.append
        for i, key in enumerate(keys):
            payload, ttl = replies[2 * i], replies[2 * i + 1]
            self._seq += 1
            if payload is None or ttl == -2:
                ev = Event(Kind.DELETE, db, key, read_time_ms=read_ms, capture_id=cid, seq=self._seq)
                st.deletes += 1
            else:
                expire = None if ttl == -1 else (ttl if absolute else read_ms + ttl)
                ev = Event(Kind.UPSERT, db, key, payload, expire, read_ms, cid, self._seq)
                st.keys += 1
            append(ev.record_key(), encode(ev))
        self._progress()

    def _read(self, keys: list[bytes]) -> tuple[int, list]:
        # The read time is taken before the pipeline: an expiry derived from PTTL can then only be
        # early, never late, so a replayed key never lives longer than on the source.
        read_ms = now_millis()
        pipe = self.source.pipeline(transaction=False)
        expiry = "PEXPIRETIME" if self.info.has_pexpiretime else "PTTL"
        for key in keys:
            pipe.execute_command("DUMP", key)
            pipe.execute_command(expiry, key)
        return read_ms, pipe.execute()

    # -- writing -------------------------------------------------------------------------------
    def _append(self, ev: Event) -> None:
        self.writer.append(ev.record_key(), self.codec.encode(ev))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _save(self, cursor: int, state: str) -> None:
        """Flush first: the cursor is saved only once everything before it is durable on the log."""
        self.writer.flush()
        st = self.stats
        self.meta.put(self.checkpoint, {
            "state": state, "cursor": cursor, "capture_id": st.capture_id, "seq": self._seq,
            "keys": st.keys, "deletes": st.deletes, "saved_ms": now_millis()})

    def _retry(self, fn):
        try:
            for attempt in Retrying(retry=retry_if_exception_type(SOURCE_ERRORS),
                                    wait=wait_exponential(multiplier=0.5, max=10),
                                    stop=stop_after_attempt(SOURCE_RETRY_ATTEMPTS),
                                    before_sleep=self._log_retry, reraise=True):
                with attempt:
                    return fn()
        except SOURCE_ERRORS as e:
            raise SourceError(f"source unreachable after {SOURCE_RETRY_ATTEMPTS} attempts: "
                              f"{type(e).__name__}: {e}") from e
        except redis.ResponseError as e:
            raise SourceError(f"source refused a read: {e}") from e

    @staticmethod
    def _log_retry(state) -> None:
        log.warning("source read failed (%s), retrying in %.1fs", state.outcome.exception(),
                    state.next_action.sleep)

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.stats)
