"""The capture process: SCAN and/or keyspace notifications -> state events on the log.

Modes: ``snapshot`` (one SCAN pass), ``live`` (subscribe first, then SCAN, then follow
notifications), ``liveonly`` (subscribe and follow). Everything is read and appended by one thread,
so events of a key land on the log in the order their values were read: a scan read and a
notification read of the same key can never overtake each other. The scan cursor is saved only
after a flush confirmed the events before it durable.

This module holds the scan and the checkpoint; the live loop is capture/live.py. Supervision
(capture/supervise.py): every source read and every log call waits out transient failures for as
long as it takes. In live modes the source's identity and its FLUSHDB / FLUSHALL / SWAPDB counters
are watched (capture/watch.py), and a lost log is resynced into the new one.

capture/cluster_capture.py's ClusterCapture replaces the source-specific steps (public methods
below: how the source is scanned, subscribed to and watched).
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import redis

from conveyor.capture.digests import DigestReader
from conveyor.capture.ledger import Ledger
from conveyor.capture.ledger_rebuild import prepare, rebuild
from conveyor.capture.live import LiveRun
from conveyor.capture.snapshot import SnapshotRun
from conveyor.capture.rescan import CatchUp
from conveyor.capture.notifications import DirtySet, Notifications
from conveyor.capture.reader import BIG_KEY_BYTES, StateReader
from conveyor.capture.stats import CaptureStats
from conveyor.capture.supervise import Interrupted, Supervisor, SupervisedWriter
from conveyor.capture.watch import Watcher
from conveyor.acl import user_of
from conveyor.endpoints import ServerInfo
from conveyor.errors import LogError, SourceError
from conveyor.events import Codec, Kind, now_millis
from conveyor.keys import KeyFilter
from conveyor.log import LogWriter, MetaStore
from conveyor.progress import echo
from conveyor.rate import UNLIMITED, Pacer
from conveyor.words import counted

log = logging.getLogger("conveyor.capture")

WATCH_INTERVAL_S = 1.0           # live: how often the source's run_id and flush counters are read
MODES = ("snapshot", "live", "liveonly")
EXPIRY_SLACK_MS = 2000           # rescan without PEXPIRETIME: expiries this close are unchanged


class Capture:
    reader_cls = StateReader                 # ClusterCapture reads through the cluster client

    def __init__(self, *, source: redis.Redis, source_info: ServerInfo, writer: LogWriter,
                 meta: MetaStore, codec: Codec, key_filter: KeyFilter, checkpoint: str,
                 mode: str = "snapshot", scan_count: int = 1000, fresh: bool = False,
                 idle_timeout: float | None = None, connect: Callable[[], redis.Redis] | None = None,
                 dirty_limit: int | None = None, ledger_root: str | Path | None = None,
                 value_type: str = "dump", big_key_bytes: int | None = BIG_KEY_BYTES,
                 mem_limit: int | None = None, mem_limit_skip: bool = False,
                 enable_notifications: bool = False, announce: dict | None = None,
                 on_progress: Callable[[CaptureStats], None] | None = None,
                 pacer: Pacer = UNLIMITED) -> None:
        """``announce``: what this process covers and where it runs (conveyor.members), added
        to every checkpoint it saves so that ``status`` can list the captures of a log.
        ``ledger_root``: where live modes keep the key ledger (capture/ledger.py); None: a
        temporary folder (rebuilt from the log at every start). ``pacer``: --max-rate, which
        holds scans, rescans and their re-reads (never the reads of changed keys)."""
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()    # a sign of life for /healthz
        self.sup = Supervisor(self.stopping, on_wait=self._waiting, user=user_of(source))
        self.source, self.info, self.meta = source, source_info, meta
        self.writer = SupervisedWriter(writer, self.sup)
        self.pacer = self.writer.pacer = pacer
        self.filter, self.checkpoint, self.mode = key_filter, checkpoint, mode
        self.scan_count, self.fresh, self.idle_timeout = scan_count, fresh, idle_timeout
        self.connect = connect
        self.enable_notifications = enable_notifications
        self.on_progress = on_progress
        self.stats = CaptureStats(mode=mode)
        self.reader = self.reader_cls(source=source, info=source_info, writer=self.writer, codec=codec,
                                      type_filter=key_filter.type, value_type=value_type,
                                      big_key_bytes=big_key_bytes, mem_limit=mem_limit,
                                      mem_limit_skip=mem_limit_skip)
        self.dirty = DirtySet(dirty_limit) if dirty_limit else DirtySet()
        self.ledger_root = ledger_root
        self.ledger: Ledger | None = None        # live modes: what was logged, per key, on disk
        self.digests = DigestReader(self.reader.source, source_info, big_key_bytes)
        self._catch = CatchUp()                  # a scan that reads digests, then re-reads
        self.resync = threading.Event()          # live: a gap was seen, a resync is due
        self.gap_lock = threading.Lock()
        self.cursor: int | None = None           # None: no scan in progress
        self.scan_run_id = ""               # snapshot: the source's run_id when its scan began
        self.scan_is_resync = False
        self.catch_up = False                # live: the first scan also looks for deleted keys
        self.doc: dict = {}                  # the checkpoint as last saved
        self.notes: Notifications | None = None
        self._watcher: Watcher | None = None  # live modes: start_watch (a cluster watches its own)
        self.next_watch = 0.0
        self.announce = announce or {}
        self._last_event_ms = 0              # when the last event was appended (status)
        self._events_seen = 0

    def stop(self) -> None:
        self.stopping.set()
        self.dirty.wake()            # wake the loop

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> CaptureStats:
        for warning in self.writer.warnings:
            echo(f"capture: warning: {warning}")
        if self.mode == "snapshot":
            return SnapshotRun(self).run()
        return LiveRun(self).run()

    # -- the source (ClusterCapture has its own) -------------------------------------------------
    def dbsize(self) -> int:
        return self.read(self.source.dbsize, "DBSIZE")

    def run_id(self) -> str:
        return str(self.read(lambda: self.source.info("server"), "INFO server").get("run_id", ""))

    def new_scan(self, slots: set[int] | None = None) -> None:
        """A scan from the start (``slots``: only keys of those, where the source knows slots)."""
        self.cursor = 0

    def resume_scan(self, cp: dict) -> None:
        """Continue the scan a checkpoint saved (started over if the source restarted since)."""
        self.cursor = int(cp["cursor"])
        self.scan_run_id = cp.get("run_id", "")
        self.restart_scan_if_source_restarted()

    def scan_doc(self) -> dict:
        """What the checkpoint keeps of the scan besides its cursor."""
        return {}

    def scan_page(self, cursor: int) -> tuple[int, list[bytes]]:
        cursor, keys = self.source.scan(cursor, count=self.pacer.batch_for(self.scan_count),
                                        **self.filter.scan_args())
        return int(cursor), self.filter.select(keys)

    def restart_scan_if_source_restarted(self) -> bool:
        """A SCAN cursor means nothing to a restarted server (its tables were rebuilt): keys
        can be skipped. A snapshot whose source restarted since its scan began starts over (keys
        already on the log are read again, which is harmless). Live modes resync instead."""
        now = self.run_id()
        if not self.scan_run_id or now == self.scan_run_id:
            self.scan_run_id = now
            return False
        log.warning("the source restarted during the scan (run_id %s -> %s): scanning again from "
                    "the start", self.scan_run_id[:12], now[:12])
        self.stats.rescans += 1
        self.scan_run_id = now
        self.new_scan()
        return True

    def in_scope(self) -> Callable[[bytes], bool] | None:
        """Which keys of the ledger the scan that ended covered (None: all)."""
        return None

    def subscribe(self) -> Notifications:
        notes = Notifications(connect=self.connect or (lambda: self.source), db=self.info.db,
                              dirty=self.dirty, key_filter=self.filter, on_gap=self.gap,
                              user=user_of(self.source))
        try:
            notes.start()                    # subscribed before the scan starts
        except TimeoutError as e:
            notes.stop()
            raise SourceError(f"cannot subscribe to keyspace notifications: {e}") from e
        return notes

    def start_watch(self) -> None:
        self._watcher = Watcher(source=self.source, version=self.info.version, read=self.read,
                                gap=self.gap, enable_notifications=self.enable_notifications)
        self._watcher.start()

    def watch_source(self) -> None:
        """A restart, FLUSHDB, FLUSHALL or SWAPDB since the last look is a gap."""
        self.next_watch = time.monotonic() + WATCH_INTERVAL_S
        if self._watcher is not None:
            self._watcher.look()

    def gap(self, why: str) -> None:
        """Changes may have been missed (called from either thread): count it and resync."""
        with self.gap_lock:
            self.stats.gaps.append(why)
        log.warning("gap detected: %s; a resync (catch-up scan) will heal it", why)
        self.resync.set()
        self.dirty.wake()

    def resync_slots(self) -> set[int] | None:
        """Which slots the resync scans (None: every key)."""
        return None

    # -- scanning ------------------------------------------------------------------------------
    @property
    def caught_up(self) -> bool:
        """The first scan is over (/readyz): what follows are changes as they happen. Before the
        first checkpoint is saved the first scan has not even begun."""
        return not self.scanning and bool(self.doc)

    @property
    def scanning(self) -> bool:
        """A scan (the first, a resync or a catch-up, with its re-reads) is in progress."""
        return self.cursor is not None or self._catch.rereads is not None

    @property
    def rereading(self) -> bool:
        """A rescan's SCAN ended and the keys it found changed are being read again."""
        return self._catch.rereads is not None

    def start_scan(self, slots: set[int] | None = None, *, rescan: bool) -> None:
        """A live scan from the start; ``rescan``: it reads digests and compares them with the
        ledger, and only the keys that differ are read and logged (see ``_scan_done``)."""
        self._catch.close()
        self._catch.began = None
        if rescan:
            self._catch.start(self.ledger, (time.monotonic(), self.stats.digests_read,
                                            self.stats.unseen_reread))
        self.new_scan(slots)

    def close_rescan(self) -> None:
        """A rescan's comparison still under way is dropped (a new scan covers it)."""
        self._catch.close()

    def scan_step(self) -> None:
        self.heartbeat = time.monotonic()
        cursor, keys = self.read(lambda: self.scan_page(self.cursor), "SCAN")
        self.pacer.charge(len(keys))
        if keys and self._catch.rescan is not None:
            crcs, exps = self.read(lambda: self.digests.read(keys), "reading digests")
            self._catch.rescan.saw(keys, crcs, exps)
            self.stats.digests_read += len(keys)
            self.progress()
        elif keys:
            self.read(lambda: self._paced(lambda: self.reader.read(keys, scanned=True)),
                      "reading scanned keys")
            self.sync_counts()
            self.progress()
        if cursor == 0 and self.mode == "snapshot" and self.restart_scan_if_source_restarted():
            return
        if cursor == 0:
            self._scan_done()
        else:
            self.cursor = cursor

    def _scan_done(self) -> None:
        self.cursor = None
        if self._catch.rescan is None:
            self._scan_finished()
            return
        # Every digest is in: what the ledger says was logged is compared with them once what
        # was read meanwhile is durable (its ledger entries committed).
        self.flush()
        slack = 0 if self.info.has_pexpiretime else EXPIRY_SLACK_MS
        self._catch.compare(self.in_scope(), slack)

    def reread_step(self) -> None:
        """One page of the keys a rescan found changed, new or vanished: read and logged (a
        vanished key becomes a DELETE)."""
        page = self._catch.next_page()
        if page is None:
            self._scan_finished()
            return
        self.pacer.charge(len(page))
        self.read(lambda: self._paced(lambda: self.reader.read(page, check_type=True)),
                  "re-reading changed keys")
        self.stats.unseen_reread += len(page)
        self.sync_counts()
        self.progress()

    def _scan_finished(self) -> None:
        if self._catch.began is not None:
            began, digests, reread = self._catch.began
            st = self.stats
            echo(f"capture: rescan of db {self.info.db} done in {time.monotonic() - began:.0f}s: "
                 f"{counted(st.digests_read - digests, 'digest')} compared with the key "
                 f"ledger, {counted(st.unseen_reread - reread, 'key')} that changed, appeared or "
                 "vanished read again and logged")
            self._catch.began = None
        if self.scan_is_resync:
            self.stats.resyncs_done += 1
        self.reader.marker(Kind.SNAPSHOT_END, self.stats.keys)
        self.scan_is_resync = False

    def open_ledger(self, previous: dict | None) -> None:
        """The key ledger as the previous run left it, when it can be trusted; otherwise
        rebuilt from what the log holds (``--fresh``: names only, every value logged again)."""
        ledger = self.ledger = Ledger(self.ledger_root or tempfile.mkdtemp(prefix="conveyor-ledger-"))
        self.writer.ledger = self.reader.ledger = ledger
        flt = self.filter
        accepts = ((lambda k: flt.accepts_name(k, check_glob=True))
                   if flt.checks_names or flt.match else (lambda _k: True))

        def from_log(led: Ledger):
            return self.sup.log(lambda: rebuild(led, self.writer.history(), self.reader.codec,
                                                self.info.db, accepts, digests=not self.fresh),
                                "reading its history")
        found = prepare(ledger, self.writer.log_id, previous, self.fresh, self.info.db, from_log)
        if found is not None:
            self.stats.history_records, self.stats.history_gap = found.records, found.gap

    def _paced(self, read):
        """``read()`` with the bytes it logs held to --max-bytes-rate (a big key's pages too)."""
        self.writer.paced = True
        try:
            return read()
        finally:
            self.writer.paced = False

    # -- bookkeeping ---------------------------------------------------------------------------
    def new_capture_id(self) -> None:
        self.stats.capture_id = self.reader.capture_id = uuid.uuid4().hex[:16]

    def source_facts(self) -> dict[str, str]:
        return {"source_version": self.info.version_text, "source_flavor": self.info.flavor,
                "mode": self.mode}

    def sync_counts(self) -> None:
        self.stats.keys, self.stats.deletes = self.reader.counts.upserts, self.reader.counts.deletes
        if self.stats.events != self._events_seen:
            self._events_seen, self._last_event_ms = self.stats.events, now_millis()
        self.stats.reads = self.reader.counts
        self.stats.dirty_waiting = len(self.dirty)
        self.stats.notifications = self.dirty.marked
        self.stats.source_waits, self.stats.log_waits = self.sup.source_waits, self.sup.log_waits

    def flush(self) -> None:
        """Everything appended is durable on the log; then the ledger counts its digests."""
        self.writer.flush()
        if self.ledger is not None:
            self.ledger.commit(self.stats.capture_id, self.reader.seq)

    def _state_of(self, phase: str) -> str:
        """What status shows: a live capture whose scan (the first, or a rescan) is under way is
        scanning."""
        return "scanning" if phase == "live" and self.scanning else phase

    def save(self, phase: str, state: str | None = None) -> None:
        """Flush first: the cursor is saved only once everything before it is durable on the log."""
        self.sync_counts()
        self.flush()
        st = self.stats
        doc = {"state": state or self._state_of(phase), "phase": phase, "mode": self.mode,
               "cursor": self.cursor or 0,
               "capture_id": st.capture_id, "seq": self.reader.seq, "keys": st.keys,
               "deletes": st.deletes, "run_id": self.scan_run_id, "saved_ms": now_millis(),
               "last_event_ms": self._last_event_ms, "dirty": len(self.dirty),
               **self.announce, **self.scan_doc()}
        self.sup.log(lambda: self.meta.put(self.checkpoint, doc), "saving the checkpoint")
        self.doc = doc

    def final_save(self, phase: str, state: str | None = None) -> bool:
        """The last save of a run; a stop while the log is away leaves the last checkpoint."""
        try:
            self.save(phase, state)
            return True
        except Interrupted as e:
            log.warning("%s; the checkpoint keeps its last saved position", e)
            return False

    def meta_get(self) -> dict | None:
        return self.sup.log(lambda: self.meta.get(self.checkpoint), "reading the checkpoint")

    def _waiting(self, msg: str | None) -> None:
        """Every wait shows in the checkpoint's ``state`` (best effort: the log may be the one
        that is away), with the position as last saved; ``None`` ends the wait."""
        self.stats.waiting = msg or ""
        self.heartbeat = time.monotonic()    # waiting is alive, not stuck
        self.stats.source_waits, self.stats.log_waits = self.sup.source_waits, self.sup.log_waits
        self.progress()
        if not self.doc or (msg or "").startswith("waiting for the log"):
            return                           # the checkpoint lives on the log that is away
        doc = {**self.doc, "state": msg or self._state_of(self.doc["phase"]),
               "saved_ms": now_millis()}
        try:
            self.meta.put(self.checkpoint, doc)
        except LogError as e:
            log.debug("cannot record the wait in the checkpoint: %s", e)

    def read(self, fn, what: str):
        """A source read, waited out while the source is away."""
        try:
            return self.sup.source(fn, what)
        except SourceError as e:
            if not isinstance(e.__cause__, redis.exceptions.NoScriptError):
                raise
            # A restarted source forgot the read script. StateReader loads it again when it has
            # none (its own check looks for "NOSCRIPT" in the text, which redis-py 8 strips).
            self.reader.forget_script()
            self.digests.forget_script()
            return self.sup.source(fn, what)

    def progress(self) -> None:
        self.stats.scanning = self.scanning
        if self.on_progress:
            self.stats.dirty_waiting = len(self.dirty)
            self.on_progress(self.stats)
