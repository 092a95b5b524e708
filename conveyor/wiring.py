"""Building each process from its options, the one place that does: a capture for every topology
(one database, several databases of a standalone source, a cluster; also the capture child of
``replicate``), an apply and a verify, each ready to run. The command functions
(conveyor/commands.py) run what is built here and print the outcome."""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import redis

from conveyor.apply import Applier
from conveyor.capture import Capture, CaptureStats, checkpoint_name
from conveyor.capture.cluster_capture import ClusterCapture
from conveyor.capture.cluster_slots import prepare
from conveyor.capture.databases import Databases, SharedLog
from conveyor.capture.notifications import check_notifications
from conveyor.cluster import is_cluster
from conveyor.databases import ALL, TargetDbs, resolve
from conveyor.endpoints import ServerInfo, mask_uri, uri_db
from conveyor.errors import ConfigError
from conveyor.events import Codec
from conveyor.keys import KeyFilter
from conveyor.log import LogWriter, MetaStore, open_meta, open_reader, open_writer
from conveyor.members import process_facts
from conveyor.options import ApplyOptions, CaptureOptions, DbOptions, LogSpec, VerifyOptions
from conveyor.progress import Display, echo
from conveyor.rate import Pacer
from conveyor.runner import (Endpoint, default_target_db, open_waiting, refuse_log_on,
                             refuse_same_database, target_clients)
from conveyor.verify import Verifier, VerifyReport
from conveyor.verify.databases import Pair, verify_pairs

logger = logging.getLogger("conveyor")


@dataclass
class Built:
    """A process ready to run, and what to close once it ended (its log clients)."""
    proc: Capture | ClusterCapture | Databases | Applier
    resources: tuple = ()

    def close(self) -> None:
        close_all(*self.resources)


def close_all(*resources) -> None:
    for r in resources:
        try:
            r.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the run's own outcome
            logger.warning("closing %s: %s", type(r).__name__, e)


# -- capture ---------------------------------------------------------------------------------------
def capture_process(src: Endpoint, log: LogSpec, opts: CaptureOptions, display) -> Built:
    """``conveyor capture`` of ``src`` into the log, whatever the source is. ``display``: where
    progress goes (a Display, or the replicate child's forwarder)."""
    if opts.dbs and len(opts.dbs) > 1:
        return _databases_capture(src, log, opts, display)
    db = opts.dbs[0] if opts.dbs else None
    client = src.connect(db=db)
    info = src.info(client)
    if is_cluster(client):
        return _cluster_capture(src, client, info, log, opts, display)
    if opts.read_from != "primary" or opts.nodes:
        raise ConfigError(f"{'--node' if opts.nodes else '--read-from replica'} needs a Redis "
                          f"Cluster source; {src.masked} is a standalone server (give a "
                          "replica's URI to read from it)")
    refuse_log_on(client, src, log.uri, log.opts)
    _check_notifications(client, src, opts)
    writer, meta = open_log(log)
    proc = _db_capture(src, client, info, writer, meta, opts, log,
                       lambda st: show_capture(display, st, proc.scanning), pacer_of(opts))
    return Built(proc, (writer, meta))


def _databases_capture(src: Endpoint, log: LogSpec, opts: CaptureOptions, display) -> Built:
    """Several databases of a standalone source: one Capture per db sharing one log writer
    (capture/databases.py)."""
    clients = {db: src.connect(db=db) for db in opts.dbs}
    first = clients[opts.dbs[0]]
    if is_cluster(first):
        raise ConfigError(f"--db: source {src.masked} is a Redis Cluster, which has only database 0")
    infos = {db: src.info(client) for db, client in clients.items()}
    for client in clients.values():
        refuse_log_on(client, src, log.uri, log.opts)
    _check_notifications(first, src, opts)
    writer, meta = open_log(log)
    lock = threading.Lock()
    pacer = pacer_of(opts)                   # --max-rate holds for the source, all dbs together

    def progress(_st):
        with lock:                           # called from every database's thread
            show_capture(display, proc.stats, proc.scanning)

    proc = Databases(opts.dbs, SharedLog(writer, meta), opts.mode,
                     lambda db, view, store: _db_capture(src, clients[db], infos[db], view, store,
                                                         opts, log, progress, pacer))
    return Built(proc, (writer, meta))


def _cluster_capture(src: Endpoint, client, info: ServerInfo, log: LogSpec, opts: CaptureOptions,
                     display) -> Built:
    """A cluster source: every primary (or those of ``--node``) scanned and subscribed to."""
    refuse_log_on(client, src, log.uri, log.opts)
    captured = prepare(client, opts.key_filter, list(opts.nodes), opts.mode,
                       opts.enable_notifications)
    writer, meta = open_log(log)
    # One checkpoint per --node set: scale-out runs one capture per primary, each resuming its own.
    name = checkpoint_name(src.uri, info.db, opts.key_filter, nodes=opts.nodes)
    proc = _capture(ClusterCapture, client, info, writer, meta, opts, log, key_filter=captured,
                    checkpoint=name,
                    announce={**announce(src, info.db, captured), "node": ",".join(opts.nodes)},
                    on_progress=lambda st: show_capture(display, st, st.scanning),
                    read_from=opts.read_from, pacer=pacer_of(opts))
    return Built(proc, (writer, meta))


def _db_capture(src: Endpoint, client: redis.Redis, info: ServerInfo, writer: LogWriter,
                meta: MetaStore, opts: CaptureOptions, log: LogSpec,
                progress: Callable[[CaptureStats], None], pacer: Pacer) -> Capture:
    """The Capture of one database of a standalone source."""
    db = info.db if opts.dbs else None      # reconnects (the subscriber) to the same database
    return _capture(Capture, client, info, writer, meta, opts, log, key_filter=opts.key_filter,
                    checkpoint=checkpoint_name(src.uri, info.db, opts.key_filter),
                    announce=announce(src, info.db, opts.key_filter), on_progress=progress,
                    connect=lambda: src.connect(db=db), pacer=pacer)


def _capture(cls: type[Capture], client, info: ServerInfo, writer: LogWriter, meta: MetaStore,
             opts: CaptureOptions, log: LogSpec, *, key_filter: KeyFilter, checkpoint: str,
             announce: dict, on_progress: Callable[[CaptureStats], None], **topology) -> Capture:
    """A Capture (or ClusterCapture: ``topology`` holds what only one of them takes), given
    the options every capture shares."""
    return cls(ledger_root=ledger_root(opts.state_dir, checkpoint, log.uri),
               source=client, source_info=info, writer=writer, meta=meta, codec=Codec(),
               key_filter=key_filter, checkpoint=checkpoint, mode=opts.mode,
               scan_count=opts.scan_count, fresh=opts.fresh, idle_timeout=opts.idle_timeout,
               dirty_limit=opts.max_dirty_keys, value_type=opts.value_type,
               big_key_bytes=opts.big_key_bytes, mem_limit=opts.mem_limit,
               mem_limit_skip=opts.mem_limit_skip, enable_notifications=opts.enable_notifications,
               announce=announce, on_progress=on_progress, **topology)


def pacer_of(opts: CaptureOptions | VerifyOptions) -> Pacer:
    """--max-rate and --max-bytes-rate: one pacer per source (every database, shard and leg of
    one capture or verify shares it)."""
    return Pacer(opts.max_rate, opts.max_bytes_rate)


def ledger_root(state_dir: str, checkpoint: str, log_uri: str) -> Path:
    """Where a capture keeps its key ledger: one per checkpoint and log (no credentials in the
    name: the masked URI is hashed)."""
    return Path(state_dir).resolve() / "ledgers" / f"{checkpoint}-{log_digest(log_uri)}"


def log_digest(log_uri: str) -> str:
    """The tag of one log in the names of its key ledgers."""
    return hashlib.sha256(mask_uri(log_uri).encode()).hexdigest()[:8]


def open_log(log: LogSpec) -> tuple[LogWriter, MetaStore]:
    writer = open_waiting(lambda: open_writer(log.uri, log.opts), "opening it", log.wait_s)
    meta = open_waiting(lambda: open_meta(log.uri, log.opts), "opening its metadata",
                        log.wait_s)
    return writer, meta


def _check_notifications(client, src: Endpoint, opts: CaptureOptions) -> None:
    if opts.mode != "snapshot":
        warning = check_notifications(client, enable=opts.enable_notifications,
                                      where=f"source {src.masked}")
        if warning:
            echo(f"capture: warning: {warning}")


def show_capture(display, st: CaptureStats, scanning: bool) -> None:
    """A capture's progress: the scan while one runs, and the live changes in live modes."""
    if st.mode == "snapshot" or scanning:
        display.update("Scanning", st.events, st.total_hint, st.rate)
    if st.mode != "snapshot":
        note = st.waiting[:60] or (f"{st.dirty_waiting} changed keys waiting, "
                                   f"{len(st.gaps)} gaps, {st.resyncs_done} of {st.resyncs} "
                                   "resyncs done")
        display.update("Live", st.events, None, st.rate, unit="events", note=note)


def announce(src: Endpoint, db: int, key_filter: KeyFilter) -> dict:
    """What a capture process covers, for ``status`` (no credentials: host and port only)."""
    slots = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in key_filter.slots)
    host_port = src.uri.split("://", 1)[-1].rpartition("@")[2].split("/")[0].split("?")[0]
    return {"source": host_port, "db": db, "slots": slots or "all",
            **process_facts()}


# -- databases -------------------------------------------------------------------------------------
def source_dbs(src: Endpoint, dbopts: DbOptions) -> list[int] | None:
    """--db resolved against the source (once: replicate's verify reuses it); None without it."""
    if dbopts.resolved is not None or dbopts.dbs is None:
        return dbopts.resolved
    client = src.connect()
    if src.cluster:
        if dbopts.dbs not in (ALL, [0]):
            raise ConfigError(f"--db: source {src.masked} is a Redis Cluster, which has only "
                              "database 0")
        dbopts.resolved = [0]
        return dbopts.resolved
    try:
        sel = resolve(client, dbopts.dbs, lambda db: src.connect_node(db))
    finally:
        client.close()
    if sel.note:
        echo(sel.note)
    dbopts.resolved = sel.dbs
    return sel.dbs


def target_dbs(dst: Endpoint, target_db: int | None, sources: list[int] | None = None):
    """Where each source db goes on ``dst`` (connected once: cluster mode is known). Collisions
    are tracked with --target-db unless the source dbs are known to be one."""
    return TargetDbs(explicit=target_db, uri_db=uri_db(dst.uri), cluster=bool(dst.cluster),
                     masked=dst.masked, track=sources is None or len(sources) > 1)


# -- apply -----------------------------------------------------------------------------------------
def apply_process(dst: Endpoint, log: LogSpec, opts: ApplyOptions, display, *,
                  first: redis.Redis | None = None, source_db: int | None = None,
                  targets: TargetDbs | None = None,
                  done: Callable[[], bool] | None = None) -> Built:
    """``conveyor apply`` of the log into ``dst``. ``first``: a target client already open (else
    one of ``source_db``); ``targets``: where each source database goes; ``done``: replicate's
    capture has ended (apply then ends once the log is drained)."""
    first = first or dst.connect(db=source_db)
    refuse_log_on(first, dst, log.uri, log.opts)
    reader = open_waiting(lambda: open_reader(log.uri, opts.group, log.opts, opts.start,
                                              peek=opts.dry_run),
                          "opening it", log.wait_s)
    meta = open_waiting(lambda: open_meta(log.uri, log.opts), "opening its metadata",
                        log.wait_s)

    def progress(st):
        display.update("Applying", st.keys, None, st.key_rate, unit="keys",
                       note="" if "waiting" not in proc.state else proc.state[:60])

    targets = targets or target_dbs(dst, None)
    proc = Applier(target_for_db=target_clients(dst, first, source_db, targets), reader=reader,
                   meta=meta, codec=Codec(), rewriter=opts.rewriter, group=opts.group,
                   batch=opts.batch, idle_timeout=opts.idle_timeout, done=done,
                   dry_run=opts.dry_run, merge_policy=opts.merge_policy,
                   stream_ids=opts.stream_ids, on_progress=progress, log_name=log.masked,
                   target_dbs=targets)
    return Built(proc, (reader, meta))


# -- verify ----------------------------------------------------------------------------------------
def verify_process(src: Endpoint, dst: Endpoint, opts: VerifyOptions, dbs: list[int] | None,
                   target_db: int | None, display: Display) -> Verifier | DatabasesVerify:
    """``conveyor verify`` of ``src`` against ``dst``: of the URIs' databases, or with ``dbs``
    (--db resolved) each source database against the target database it maps to."""
    if dbs is not None:
        return _databases_verify(src, dst, opts, dbs, target_db, display)
    source = src.connect()
    target = dst.connect(db=target_db if target_db is not None
                         else default_target_db(src.uri, dst.uri))
    refuse_same_database(source, target, dst)
    return _verifier(opts, display, source=source, target=target)


def _databases_verify(src: Endpoint, dst: Endpoint, opts: VerifyOptions, dbs: list[int],
                      target_db: int | None, display: Display) -> DatabasesVerify:
    target = dst.connect(db=target_db)
    targets = target_dbs(dst, target_db, dbs)
    for_db = target_clients(dst, target, None, targets)
    pairs = [Pair(d, targets.target_of(d), src.connect(db=d), for_db(d)) for d in dbs]
    for p in pairs:
        refuse_same_database(p.source, p.target, dst)
    return DatabasesVerify(pairs, lambda **sides: _verifier(opts, display, **sides), opts)


def _verifier(opts: VerifyOptions, display: Display, **sides) -> Verifier:
    """A Verifier given the options (``sides``: source=, target=, and maybe check_extra=)."""
    return Verifier(key_filter=opts.key_filter, rewriter=opts.rewriter,
                    ttl_tolerance_ms=opts.ttl_tolerance_ms, recheck_delay=opts.recheck_delay,
                    scan_count=opts.scan_count, stream_ids=opts.stream_ids,
                    pacer=pacer_of(opts), sample=opts.sample, kept=opts.kept,
                    on_progress=lambda n, total: display.update("Verifying", n, total), **sides)


class DatabasesVerify:
    """Several source databases, each against the target database it maps to
    (verify/databases.py); runs and stops like one Verifier."""

    def __init__(self, pairs: list[Pair], make: Callable[..., Verifier],
                 opts: VerifyOptions) -> None:
        self.pairs, self._make, self._opts = pairs, make, opts
        self._made: list[Verifier] = []
        self._stopped = False

    def run(self) -> VerifyReport:
        return verify_pairs(self.pairs, self._verifier, self._opts.key_filter, self._opts.rewriter)

    def _verifier(self, **sides) -> Verifier:
        proc = self._make(**sides)
        self._made.append(proc)
        if self._stopped:                    # stopped before this pair's turn came
            proc.stop()
        return proc

    def stop(self) -> None:
        self._stopped = True
        for proc in self._made:
            proc.stop()
