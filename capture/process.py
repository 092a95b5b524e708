"""The capture process: SCAN and/or keyspace notifications -> state events on the log.

Modes: ``snapshot`` (one SCAN pass), ``live`` (subscribe first, then SCAN, then follow
notifications), ``liveonly`` (subscribe and follow). Everything is read and appended by one thread,
so events of a key land on the log in the order their values were read: a scan read and a
notification read of the same key can never overtake each other. The scan cursor is saved only
after a flush confirmed the events before it durable.

Supervision (capture/supervise.py): every source read and every log call waits out transient
failures for as long as it takes. In live modes the source's identity and its FLUSHDB / FLUSHALL /
SWAPDB counters are watched (capture/watch.py), a lost log is resynced into the new one, and
"converged" needs the keyspace subscription up and unbroken since the last resync started.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import redis

from conveyor.capture.digests import DigestReader
from conveyor.capture.ledger import Ledger
from conveyor.capture.ledger_rebuild import rebuild
from conveyor.capture.rescan import Rescan
from conveyor.capture.notifications import DirtySet, Notifications, check_notifications
from conveyor.words import counted
from conveyor.capture.reader import BIG_KEY_BYTES, ReadCounts, StateReader
from conveyor.capture.supervise import Interrupted, Supervisor, SupervisedWriter
from conveyor.capture.watch import SourceFacts, SourceWatch, read_facts
from conveyor.acl import user_of
from conveyor.endpoints import ServerInfo, mask_uri
from conveyor.errors import LOG_LOST, LogError, LogLost, SourceError
from conveyor.events import Codec, Kind, now_millis
from conveyor.keys import KeyFilter
from conveyor.log import LogWriter, MetaStore
from conveyor.members import HEARTBEAT_S
from conveyor.progress import echo
from conveyor.rate import UNLIMITED, Pacer

log = logging.getLogger("conveyor.capture")

CHECKPOINT_INTERVAL_S = 1.0      # snapshot: flush the log and save the cursor at most this often
LIVE_FLUSH_INTERVAL_S = 0.05     # live: how long an event may wait in the producer's buffer
WATCH_INTERVAL_S = 1.0           # live: how often the source's run_id and flush counters are read
IDENTITY_INTERVAL_S = 5.0        # live: how often the log is asked whether it is still ours
MODES = ("snapshot", "live", "liveonly")
EXPIRY_SLACK_MS = 2000           # rescan without PEXPIRETIME: expiries this close are unchanged


@dataclass
class CaptureStats:
    mode: str = "snapshot"
    capture_id: str = ""
    keys: int = 0                # UPSERT events
    deletes: int = 0             # DELETE events (gone when read, or filtered out by type)
    total_hint: int = 0          # DBSIZE at start
    resumed: bool = False
    complete: bool = False       # snapshot: the scan finished; live: every gap was healed
    gaps: list[str] = field(default_factory=list)
    resyncs: int = 0             # catch-up scans started
    resyncs_done: int = 0        # ... and finished
    dirty_waiting: int = 0
    notifications: int = 0       # keyspace notifications received (a key waiting is read once)
    unseen_reread: int = 0       # keys re-read after a rescan: changed, new, or no longer seen
    digests_read: int = 0        # keys whose digest a rescan read (no value moved)
    history_records: int = 0     # live: records read back from the log to rebuild the key ledger
    history_gap: str = ""        # ... and why that history is not everything ever appended
    incomplete_why: str = ""     # live: why convergence cannot be claimed
    waiting: str = ""            # what the run waits for now ("" when nothing)
    scanning: bool = False       # a scan (first, resync or catch-up) is in progress
    rescans: int = 0             # snapshot: scans started over because the source restarted
    source_waits: int = 0        # retries after transient source failures
    log_waits: int = 0           # retries after the log was unavailable
    reads: ReadCounts = field(default_factory=ReadCounts)   # big keys, parts, --mem-limit
    started: float = field(default_factory=time.monotonic)

    @property
    def events(self) -> int:
        return self.keys + self.deletes

    @property
    def rate(self) -> float:
        return self.events / max(time.monotonic() - self.started, 1e-9)


def checkpoint_name(source_uri: str, db: int, key_filter: KeyFilter,
                    nodes: tuple[str, ...] | list[str] = ()) -> str:
    """One checkpoint per source database and filter set (a different filter is another snapshot),
    and per ``--node`` set of a cluster capture."""
    ident = repr((mask_uri(source_uri).split("@")[-1], db, key_filter.match, key_filter.type,
                  key_filter.include, key_filter.exclude, key_filter.slots)
                 + ((tuple(sorted(nodes)),) if nodes else ()))
    return "capture-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


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
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()    # a sign of life for /healthz
        self.sup = Supervisor(self._stop, on_wait=self._waiting, user=user_of(source))
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
        self._rescan: Rescan | None = None       # a scan that reads digests, not values
        self._rereads: Iterator[list[bytes]] | None = None   # ... then the keys that changed
        self._resync = threading.Event()
        self._gap_lock = threading.Lock()
        self._cursor: int | None = None     # None: no scan in progress
        self._scan_run_id = ""               # snapshot: the source's run_id when its scan began
        self._scan_is_resync = False
        self._rescan_began: tuple[float, int, int] | None = None   # a rescan: when, counts then
        self._catch_up = False               # live: the first scan also looks for deleted keys
        self._doc: dict = {}                 # the checkpoint as last saved
        self._notes: Notifications | None = None
        self._sub_epoch = 0                  # the subscription the last resync started under
        self._watch: SourceWatch | None = None
        self._next_watch = self._next_identity = 0.0
        self._pending = False                # live: events appended and not flushed yet
        self._last_activity = self._last_flush = time.monotonic()
        self.announce = announce or {}
        self._last_event_ms = 0              # when the last event was appended (status)
        self._events_seen = 0

    def stop(self) -> None:
        self._stop.set()
        self.dirty.wake()            # wake the loop

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> CaptureStats:
        for warning in self.writer.warnings:
            echo(f"capture: warning: {warning}")
        if self.mode == "snapshot":
            return self._run_snapshot()
        return self._run_live()

    def _run_snapshot(self) -> CaptureStats:
        try:
            self._begin_snapshot()
            last_save = time.monotonic()
            while (not self._stop.is_set() and self._cursor is not None
                   and self.pacer.wait(self._stop)):
                self._scan_step()
                if self._cursor is not None and time.monotonic() - last_save >= CHECKPOINT_INTERVAL_S:
                    self._save("scanning")
                    last_save = time.monotonic()
        except Interrupted as e:
            log.warning("%s", e)
        self.stats.complete = self._cursor is None and bool(self.stats.capture_id)
        if self.stats.capture_id:
            self._final_save("done" if self.stats.complete else "scanning",
                             None if self.stats.complete
                             else "stopped during the scan: run it again to continue")
        self._progress()
        return self.stats

    def _begin_snapshot(self) -> None:
        st = self.stats
        st.total_hint = self._dbsize()
        cp = None if self.fresh else self._meta_get()
        phase = cp and cp.get("phase", cp.get("state"))      # "state" may name a wait
        if cp and phase == "scanning" and cp.get("mode", "snapshot") == "snapshot":
            st.capture_id, st.resumed = cp["capture_id"], True
            st.keys, st.deletes, self.reader.seq = cp["keys"], cp["deletes"], cp["seq"]
            self.reader.counts.upserts, self.reader.counts.deletes = st.keys, st.deletes
            self.reader.capture_id = st.capture_id
            self._resume_scan(cp)
            log.info("resuming snapshot %s at cursor %s after %d keys", st.capture_id,
                     self._cursor, st.keys)
            return
        self._new_capture_id()
        self.reader.marker(Kind.SNAPSHOT_BEGIN, st.total_hint, self._source_facts())
        self._new_scan()
        self._scan_run_id = self._run_id()
        self._save("scanning")

    def _dbsize(self) -> int:
        return self._read(self.source.dbsize, "DBSIZE")

    def _new_scan(self, slots: set[int] | None = None) -> None:
        """A scan from the start (``slots``: only keys of those, where the source knows slots)."""
        self._cursor = 0

    def _resume_scan(self, cp: dict) -> None:
        """Continue the scan a checkpoint saved (started over if the source restarted since)."""
        self._cursor = int(cp["cursor"])
        self._scan_run_id = cp.get("run_id", "")
        self._restart_scan_if_source_restarted()

    def _scan_doc(self) -> dict:
        """What the checkpoint keeps of the scan besides its cursor."""
        return {}

    def _run_live(self) -> CaptureStats:
        st = self.stats
        notes = None
        try:
            st.total_hint = self._dbsize()
            previous = None if self.fresh else self._meta_get()
            self._new_capture_id()
            self._open_ledger(previous)
            notes = self._notes = self._subscribe()
            self._sub_epoch = notes.epoch
            self._start_watch()
            self._begin_live(previous)
            self._live_loop()
        except Interrupted as e:
            log.warning("%s", e)
        finally:
            if notes is not None:
                notes.stop()
            self._close_rescan()
        self._end_live()
        return st

    def _start_watch(self) -> None:
        facts = self._facts()
        self._watch = SourceWatch(facts) if facts else None

    def _subscribe(self) -> Notifications:
        notes = Notifications(connect=self.connect or (lambda: self.source), db=self.info.db,
                              dirty=self.dirty, key_filter=self.filter, on_gap=self._gap,
                              user=user_of(self.source))
        try:
            notes.start()                    # subscribed before the scan starts
        except TimeoutError as e:
            notes.stop()
            raise SourceError(f"cannot subscribe to keyspace notifications: {e}") from e
        return notes

    def _begin_live(self, previous: dict | None) -> None:
        st = self.stats
        if self.mode == "live":
            self.reader.marker(Kind.SNAPSHOT_BEGIN, st.total_hint, self._source_facts())
            # After an earlier capture (the ledger knows keys), the scan reads digests and only
            # changed, new and vanished keys are read and logged again.
            self._catch_up = bool(previous or st.history_gap or not self.ledger.empty)
            self._start_scan(rescan=self._catch_up)
        elif previous:
            self._gap(f"capture restarted (changes made since the previous run "
                      f"{previous.get('capture_id')} were not seen)")
        self._save("live")

    def _end_live(self) -> None:
        st = self.stats
        if not st.capture_id:
            return                           # stopped before anything was written
        blind = bool(st.history_gap) and bool(st.gaps or self._catch_up)
        healthy = self._healthy()
        st.complete = (not self._resync.is_set() and not self.scanning and not blind
                       and healthy)
        if not st.complete:
            st.incomplete_why = self._why_incomplete(blind, healthy)
        saved = self._final_save("live" if not st.complete else "stopped",
                                 None if st.complete else "stopped with changes still to read: "
                                                          "run it again to catch up")
        if self.ledger is not None:
            self.ledger.close(clean=saved)
        self._progress()

    def _why_incomplete(self, blind: bool, healthy: bool) -> str:
        if self.scanning or self._resync.is_set():
            return ("stopped before the last resync finished; run again (the restart triggers "
                    "a catch-up scan)")
        if blind:
            return ("keys deleted while changes were not seen may be missing from the log (see "
                    "above); check the target with verify")
        return ("the keyspace subscription was down when the run stopped (changes since then "
                "were not seen); run again (the restart triggers a catch-up scan)")

    def _healthy(self) -> bool:
        """The subscription is up now and has not broken since the last resync started."""
        notes = self._notes
        return notes is not None and notes.healthy and notes.epoch == self._sub_epoch

    # -- the live loop -------------------------------------------------------------------------
    def _live_loop(self) -> None:
        self._pending = False
        self._last_activity = self._last_flush = time.monotonic()
        while not self._stop.is_set():
            try:
                if self._live_step():
                    break
            except LogLost as e:
                self._log_lost(e)
        if self._pending:
            self._flush()
            self._pending = False

    @property
    def caught_up(self) -> bool:
        """The first scan is over (/readyz): what follows are changes as they happen. Before the
        first checkpoint is saved the first scan has not even begun."""
        return not self.scanning and bool(self._doc)

    @property
    def scanning(self) -> bool:
        """A scan (the first, a resync or a catch-up, with its re-reads) is in progress."""
        return self._cursor is not None or self._rereads is not None

    def _live_step(self) -> bool:
        """One round: watch, read dirty keys, scan, flush; True when the idle timeout ends the run."""
        self.heartbeat = time.monotonic()
        if self._notes is not None and self._notes.fatal is not None:
            raise self._notes.fatal
        self._supervise()
        if self._resync.is_set() and not self.scanning:
            self._start_resync()
        worked = False
        keys = self.dirty.take(self.scan_count)
        if keys:      # changed keys are never held back: a full dirty set would be a gap
            self._read(lambda: self.reader.read(keys, check_type=True), "reading changed keys")
            worked = True
        held = self.scanning and self.pacer.delay() > 0       # --max-rate: the scan waits
        if not held and self._cursor is not None:
            self._scan_step()
            worked = True
        elif not held and self._rereads is not None:
            self._reread_step()
            worked = True
        if worked:
            self._pending = True
            self._last_activity = time.monotonic()
            self._sync_counts()
        if self._pending and (not worked
                              or time.monotonic() - self._last_flush >= LIVE_FLUSH_INTERVAL_S):
            self._flush()
            self._pending, self._last_flush = False, time.monotonic()
            self._progress()
        if worked:
            return False
        idle = time.monotonic() - self._last_activity
        # Changes that arrived while this step waited (a flush waiting for the log) are not
        # idleness: the run ends only with nothing left to read.
        if (self.idle_timeout is not None and idle >= self.idle_timeout and not len(self.dirty)
                and not self._resync.is_set() and not self.scanning and self._healthy()):
            self._watch_source()             # a last look: a FLUSHDB just now is not missed
            if not self._resync.is_set():
                return True
        self.dirty.wait(min(0.1, self.pacer.delay()) if held else 0.1)
        return False

    def _supervise(self) -> None:
        """About once a second the source's identity and flush counters; every few seconds the
        log's identity (LogLost from it is handled by the loop)."""
        now = time.monotonic()
        if now >= self._next_watch:
            self._watch_source()
        if now >= self._next_identity:
            self._next_identity = now + IDENTITY_INTERVAL_S
            self.writer.check_identity()
        if self._doc and now_millis() - self._doc["saved_ms"] >= HEARTBEAT_S * 1000:
            self._save(self._doc["phase"])   # a sign of life for status (members.GONE_AFTER_S)

    def _watch_source(self) -> None:
        """A restart, FLUSHDB, FLUSHALL or SWAPDB since the last look is a gap."""
        self._next_watch = time.monotonic() + WATCH_INTERVAL_S
        facts = self._facts() if self._watch is not None else None
        if facts is None or self._watch is None:
            return
        restarted = facts.run_id != self._watch.last.run_id
        for why in self._watch.changes(facts):
            self._gap(why)
        if restarted:
            self._recheck_notifications()

    def _recheck_notifications(self) -> None:
        """A restarted source may have lost notify-keyspace-events set with CONFIG SET: without
        them no change would arrive, silently. Set them again (--enable-notifications) or stop."""
        warning = self._read(lambda: check_notifications(self.source,
                                                         enable=self.enable_notifications,
                                                         where="the restarted source"),
                             "CONFIG GET notify-keyspace-events")
        if warning:
            log.warning("%s", warning)

    def _facts(self) -> SourceFacts | None:
        try:
            return self._read(lambda: read_facts(self.source, self.info.version),
                              "INFO (run_id and FLUSHDB/FLUSHALL/SWAPDB counters)")
        except SourceError as e:
            # INFO refused (a managed service): the rest of the capture works; say what is blind.
            log.warning("%s: restarts, FLUSHDB, FLUSHALL and SWAPDB on the source cannot be "
                        "detected in this run", e)
            self._watch = None
            return None

    # -- gaps ----------------------------------------------------------------------------------
    def _gap(self, why: str) -> None:
        """Changes may have been missed (called from either thread): count it and resync."""
        with self._gap_lock:
            self.stats.gaps.append(why)
        log.warning("gap detected: %s; a resync (catch-up scan) will heal it", why)
        self._resync.set()
        self.dirty.wake()

    def _start_resync(self) -> None:
        self._resync.clear()
        self._sub_epoch = self._notes.epoch if self._notes else 0
        self.stats.resyncs += 1
        self.reader.marker(Kind.RESYNC, None, {"reason": self.stats.gaps[-1] if self.stats.gaps else ""})
        self._start_scan(self._resync_slots(), rescan=True)
        self._scan_is_resync = True

    def _resync_slots(self) -> set[int] | None:
        """Which slots the resync scans (None: every key)."""
        return None

    def _log_lost(self, e: LogLost) -> None:
        """The log was reset under us: take the new one and write the whole source into it. The
        ledger keeps the names (every digest forgotten), so keys deleted meanwhile become deletes
        at the end of the scan."""
        detail = str(e).removeprefix(LOG_LOST).lstrip(": ")
        why = f"{LOG_LOST} ({detail})"
        with self._gap_lock:
            self.stats.gaps.append(why)
        log.warning("%s; resyncing the whole source into the new log", why)
        self.writer.adopt_new_log()
        self._close_rescan()
        self.ledger.forget_digests(self.writer.log_id)
        self._pending = False
        self._resync.clear()                 # this full scan heals every gap reported so far
        self._sub_epoch = self._notes.epoch if self._notes else 0
        self.stats.resyncs += 1
        self.reader.marker(Kind.SNAPSHOT_BEGIN, self.stats.total_hint,
                           {**self._source_facts(), "reason": why})
        self._resync_slots()                 # a whole scan covers whatever was pending
        self._start_scan(rescan=True)
        self._scan_is_resync = True
        self._save("live")

    # -- scanning ------------------------------------------------------------------------------
    def _start_scan(self, slots: set[int] | None = None, *, rescan: bool) -> None:
        """A live scan from the start; ``rescan``: it reads digests and compares them with the
        ledger, and only the keys that differ are read and logged (see ``_scan_done``)."""
        self._close_rescan()
        self._rescan = Rescan(self.ledger) if rescan else None
        self._rescan_began = ((time.monotonic(), self.stats.digests_read, self.stats.unseen_reread)
                              if rescan else None)
        self._new_scan(slots)

    def _close_rescan(self) -> None:
        """A rescan's comparison still under way is dropped (a new scan covers it)."""
        if self._rereads is not None:
            close = getattr(self._rereads, "close", None)
            if close:
                close()
        self._rescan = self._rereads = None

    def _scan_step(self) -> None:
        self.heartbeat = time.monotonic()
        cursor, keys = self._read(lambda: self._scan(self._cursor), "SCAN")
        self.pacer.charge(len(keys))
        if keys and self._rescan is not None:
            crcs, exps = self._read(lambda: self.digests.read(keys), "reading digests")
            self._rescan.saw(keys, crcs, exps)
            self.stats.digests_read += len(keys)
            self._progress()
        elif keys:
            self._read(lambda: self._paced(lambda: self.reader.read(keys, scanned=True)),
                       "reading scanned keys")
            self._sync_counts()
            self._progress()
        if cursor == 0 and self.mode == "snapshot" and self._restart_scan_if_source_restarted():
            return
        if cursor == 0:
            self._scan_done()
        else:
            self._cursor = cursor

    def _run_id(self) -> str:
        return str(self._read(lambda: self.source.info("server"), "INFO server").get("run_id", ""))

    def _restart_scan_if_source_restarted(self) -> bool:
        """A SCAN cursor means nothing to a restarted server (its tables were rebuilt): keys
        can be skipped. A snapshot whose source restarted since its scan began starts over (keys
        already on the log are read again, which is harmless). Live modes resync instead."""
        now = self._run_id()
        if not self._scan_run_id or now == self._scan_run_id:
            self._scan_run_id = now
            return False
        log.warning("the source restarted during the scan (run_id %s -> %s): scanning again from "
                    "the start", self._scan_run_id[:12], now[:12])
        self.stats.rescans += 1
        self._scan_run_id = now
        self._new_scan()
        return True

    def _scan_done(self) -> None:
        self._cursor = None
        if self._rescan is None:
            self._scan_finished()
            return
        # Every digest is in: what the ledger says was logged is compared with them once what
        # was read meanwhile is durable (its ledger entries committed).
        self._flush()
        slack = 0 if self.info.has_pexpiretime else EXPIRY_SLACK_MS
        self._rereads = self._rescan.to_read(self._in_scope(), slack)
        self._rescan = None

    def _reread_step(self) -> None:
        """One page of the keys a rescan found changed, new or vanished: read and logged (a
        vanished key becomes a DELETE)."""
        page = next(self._rereads, None)
        if page is None:
            self._rereads = None
            self._scan_finished()
            return
        self.pacer.charge(len(page))
        self._read(lambda: self._paced(lambda: self.reader.read(page, check_type=True)),
                   "re-reading changed keys")
        self.stats.unseen_reread += len(page)
        self._sync_counts()
        self._progress()

    def _scan_finished(self) -> None:
        if self._rescan_began is not None:
            began, digests, reread = self._rescan_began
            st = self.stats
            echo(f"capture: rescan of db {self.info.db} done in {time.monotonic() - began:.0f}s: "
                 f"{counted(st.digests_read - digests, 'digest')} compared with the key "
                 f"ledger, {counted(st.unseen_reread - reread, 'key')} that changed, appeared or "
                 "vanished read again and logged")
            self._rescan_began = None
        if self._scan_is_resync:
            self.stats.resyncs_done += 1
        self.reader.marker(Kind.SNAPSHOT_END, self.stats.keys)
        self._scan_is_resync = False

    def _in_scope(self) -> Callable[[bytes], bool] | None:
        """Which keys of the ledger the scan that ended covered (None: all)."""
        return None

    def _open_ledger(self, previous: dict | None) -> None:
        """The key ledger as the previous run left it, when it can be trusted; otherwise
        rebuilt from what the log holds (``--fresh``: names only, every value logged again)."""
        st = self.stats
        root = self.ledger_root or tempfile.mkdtemp(prefix="conveyor-ledger-")
        ledger = self.ledger = Ledger(root)
        self.writer.ledger = self.reader.ledger = ledger
        log_id = self.writer.log_id
        trust = ledger.check(log_id, previous.get("capture_id") if previous else None,
                             previous.get("seq") if previous else None)
        if trust.trusted and not self.fresh:
            echo(f"capture: key ledger {root} is as the previous run left it: nothing is read "
                 "from the log; a rescan compares the source's digests with it")
            return
        if trust.trusted:
            ledger.forget_digests(log_id)
            return
        ledger.reset(log_id)
        flt = self.filter
        accepts = ((lambda k: flt.accepts_name(k, check_glob=True))
                   if flt.checks_names or flt.match else (lambda _k: True))
        began = time.monotonic()
        found = self.sup.log(lambda: rebuild(ledger, self.writer.history(), self.reader.codec,
                                             self.info.db, accepts, digests=not self.fresh),
                             "reading its history")
        st.history_records, st.history_gap = found.records, found.gap
        if found.records:
            echo(f"capture: key ledger {root} rebuilt from the log ({trust.why}): "
                 f"{counted(found.records, 'record')} read in "
                 f"{time.monotonic() - began:.0f}s, {counted(found.keys, 'key')} of db "
                 f"{self.info.db}")

    def _paced(self, read):
        """``read()`` with the bytes it logs held to --max-bytes-rate (a big key's pages too)."""
        self.writer.paced = True
        try:
            return read()
        finally:
            self.writer.paced = False

    def _scan(self, cursor: int) -> tuple[int, list[bytes]]:
        cursor, keys = self.source.scan(cursor, count=self.pacer.batch_for(self.scan_count),
                                        **self.filter.scan_args())
        return int(cursor), self.filter.select(keys)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _new_capture_id(self) -> None:
        self.stats.capture_id = self.reader.capture_id = uuid.uuid4().hex[:16]

    def _source_facts(self) -> dict[str, str]:
        return {"source_version": self.info.version_text, "source_flavor": self.info.flavor,
                "mode": self.mode}

    def _sync_counts(self) -> None:
        self.stats.keys, self.stats.deletes = self.reader.counts.upserts, self.reader.counts.deletes
        if self.stats.events != self._events_seen:
            self._events_seen, self._last_event_ms = self.stats.events, now_millis()
        self.stats.reads = self.reader.counts
        self.stats.dirty_waiting = len(self.dirty)
        self.stats.notifications = self.dirty.marked
        self.stats.source_waits, self.stats.log_waits = self.sup.source_waits, self.sup.log_waits

    def _flush(self) -> None:
        """Everything appended is durable on the log; then the ledger counts its digests."""
        self.writer.flush()
        if self.ledger is not None:
            self.ledger.commit(self.stats.capture_id, self.reader.seq)

    def _state_of(self, phase: str) -> str:
        """What status shows: a live capture whose scan (the first, or a rescan) is under way is
        scanning."""
        return "scanning" if phase == "live" and self.scanning else phase

    def _save(self, phase: str, state: str | None = None) -> None:
        """Flush first: the cursor is saved only once everything before it is durable on the log."""
        self._sync_counts()
        self._flush()
        st = self.stats
        doc = {"state": state or self._state_of(phase), "phase": phase, "mode": self.mode, "cursor": self._cursor or 0,
               "capture_id": st.capture_id, "seq": self.reader.seq, "keys": st.keys,
               "deletes": st.deletes, "run_id": self._scan_run_id, "saved_ms": now_millis(),
               "last_event_ms": self._last_event_ms, "dirty": len(self.dirty),
               **self.announce, **self._scan_doc()}
        self.sup.log(lambda: self.meta.put(self.checkpoint, doc), "saving the checkpoint")
        self._doc = doc

    def _final_save(self, phase: str, state: str | None = None) -> bool:
        """The last save of a run; a stop while the log is away leaves the last checkpoint."""
        try:
            self._save(phase, state)
            return True
        except Interrupted as e:
            log.warning("%s; the checkpoint keeps its last saved position", e)
            return False

    def _meta_get(self) -> dict | None:
        return self.sup.log(lambda: self.meta.get(self.checkpoint), "reading the checkpoint")

    def _waiting(self, msg: str | None) -> None:
        """Every wait shows in the checkpoint's ``state`` (best effort: the log may be the one
        that is away), with the position as last saved; ``None`` ends the wait."""
        self.stats.waiting = msg or ""
        self.heartbeat = time.monotonic()    # waiting is alive, not stuck
        self.stats.source_waits, self.stats.log_waits = self.sup.source_waits, self.sup.log_waits
        self._progress()
        if not self._doc or (msg or "").startswith("waiting for the log"):
            return                           # the checkpoint lives on the log that is away
        doc = {**self._doc, "state": msg or self._state_of(self._doc["phase"]),
               "saved_ms": now_millis()}
        try:
            self.meta.put(self.checkpoint, doc)
        except LogError as e:
            log.debug("cannot record the wait in the checkpoint: %s", e)

    def _read(self, fn, what: str):
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

    def _progress(self) -> None:
        self.stats.scanning = self.scanning
        if self.on_progress:
            self.stats.dirty_waiting = len(self.dirty)
            self.on_progress(self.stats)
