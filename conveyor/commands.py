"""What each CLI command does, one function each; they print results and return success."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from conveyor.cluster import is_cluster
from conveyor.endpoints import mask_uri, uri_db
from conveyor.errors import ConfigError, ConveyorError, LogError
from conveyor.events import Codec
from conveyor.keys import KeyFilter, KeyRewriter
from conveyor.log import log_exists, open_meta, open_reader, open_writer
from conveyor.progress import Display, echo
from conveyor.runner import (Endpoint, Interrupts, default_target_db, open_waiting,
                             refuse_log_on, refuse_same_database, target_clients)

log = logging.getLogger("conveyor")


# -- building the processes ----------------------------------------------------------------------
@dataclass
class CaptureOptions:
    mode: str = "snapshot"
    scan_count: int = 1000
    fresh: bool = False
    read_from: str = "primary"       # cluster source: scan and read the primaries or replicas
    nodes: tuple[str, ...] = ()      # cluster source: only the slots of these primaries
    idle_timeout: float | None = None
    enable_notifications: bool = False
    max_dirty_keys: int = 1_000_000
    value_type: str = "dump"
    big_key_bytes: int | None = 8 * 1024 * 1024
    mem_limit: int | None = None
    mem_limit_skip: bool = False
    dbs: list[int] | None = None         # --db, resolved: the source databases to capture


@dataclass
class DbOptions:
    """--db (as given: None, "all" or numbers), --target-db and --allow-collisions."""
    dbs: list[int] | str | None = None
    target_db: int | None = None
    allow_collisions: bool = False
    resolved: list[int] | None = None    # --db resolved against the source, once per command


@dataclass
class ApplyOptions:
    merge_policy: str = "overwrite"
    stream_ids: str = "keep"


def _capture_process(src: Endpoint, log_uri, log_opts, key_filter, opts: CaptureOptions, display):
    if opts.dbs and len(opts.dbs) > 1:
        return _databases_process(src, log_uri, log_opts, key_filter, opts, display)
    db = opts.dbs[0] if opts.dbs else None
    client = src.connect(db=db)
    info = src.info(client)
    from capture.cluster_capture import cluster_capture_process   # None: a standalone source
    built = cluster_capture_process(client, info, src, log_uri, log_opts, key_filter, opts, display)
    if built is not None:
        return built
    refuse_log_on(client, src, log_uri, log_opts)
    _check_notifications(client, src, opts)
    writer = open_waiting(lambda: open_writer(log_uri, log_opts), "opening it")
    meta = open_waiting(lambda: open_meta(log_uri, log_opts), "opening its metadata")
    proc = _make_capture(src, client, info, writer, meta, key_filter, opts,
                         lambda st: _show_capture(display, st, proc._cursor is not None))
    return proc, (writer, meta)


def _databases_process(src: Endpoint, log_uri, log_opts, key_filter, opts: CaptureOptions,
                       display):
    """Several databases of a standalone source: one Capture per db sharing one log writer
    (capture/databases.py)."""
    import threading

    from capture.databases import Databases, SharedLog

    clients = {db: src.connect(db=db) for db in opts.dbs}
    first = clients[opts.dbs[0]]
    if is_cluster(first):
        raise ConfigError(f"--db: source {src.masked} is a Redis Cluster, which has only database 0")
    infos = {db: src.info(client) for db, client in clients.items()}
    for client in clients.values():
        refuse_log_on(client, src, log_uri, log_opts)
    _check_notifications(first, src, opts)
    writer = open_waiting(lambda: open_writer(log_uri, log_opts), "opening it")
    meta = open_waiting(lambda: open_meta(log_uri, log_opts), "opening its metadata")
    lock = threading.Lock()

    def progress(_st):
        with lock:                           # called from every database's thread
            _show_capture(display, proc.stats, proc.scanning)

    proc = Databases(opts.dbs, SharedLog(writer, meta), opts.mode,
                     lambda db, view, store: _make_capture(src, clients[db], infos[db], view, store,
                                                           key_filter, opts, progress))
    return proc, (writer, meta)


def _check_notifications(client, src: Endpoint, opts: CaptureOptions) -> None:
    from capture.notifications import check_notifications

    if opts.mode != "snapshot":
        warning = check_notifications(client, enable=opts.enable_notifications,
                                      where=f"source {src.masked}")
        if warning:
            echo(f"capture: warning: {warning}")


def _show_capture(display, st, scanning: bool) -> None:
    if st.mode == "snapshot" or scanning:
        display.update("Scanning", st.events, st.total_hint, st.rate)
    if st.mode != "snapshot":
        note = st.waiting[:60] or (f"dirty {st.dirty_waiting}, gaps {len(st.gaps)}, "
                                   f"resyncs {st.resyncs_done}/{st.resyncs}")
        display.update("Live", st.events, None, st.rate, unit="events", note=note)


def _make_capture(src: Endpoint, client, info, writer, meta, key_filter, opts: CaptureOptions,
                  progress):
    from capture import Capture, checkpoint_name

    db = info.db if opts.dbs else None      # reconnects (the subscriber) to the same database
    return Capture(source=client, source_info=info, writer=writer, meta=meta, codec=Codec(),
                   key_filter=key_filter, checkpoint=checkpoint_name(src.uri, info.db, key_filter),
                   mode=opts.mode, scan_count=opts.scan_count, fresh=opts.fresh,
                   idle_timeout=opts.idle_timeout, connect=lambda: src.connect(db=db),
                   dirty_limit=opts.max_dirty_keys, value_type=opts.value_type,
                   big_key_bytes=opts.big_key_bytes, mem_limit=opts.mem_limit,
                   mem_limit_skip=opts.mem_limit_skip,
                   enable_notifications=opts.enable_notifications,
                   announce=_announce(src, info.db, key_filter), on_progress=progress)


def _announce(src: Endpoint, db: int, key_filter: KeyFilter) -> dict:
    """What a capture process covers, for ``status`` (no credentials: host and port only)."""
    from conveyor.members import process_facts

    slots = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in key_filter.slots)
    host_port = src.uri.split("://", 1)[-1].rpartition("@")[2].split("/")[0].split("?")[0]
    return {"source": host_port, "db": db, "slots": slots or "all",
            **process_facts()}


def _apply_process(dst: Endpoint, log_uri, log_opts, group, start, idle_timeout, batch, dry_run,
                   rewriter, display, done=None, source_db=None, first=None,
                   wopts: ApplyOptions | None = None, target_dbs=None):
    from apply import Applier

    first = first or dst.connect(db=source_db)
    refuse_log_on(first, dst, log_uri, log_opts)
    reader = open_waiting(lambda: open_reader(log_uri, group, log_opts, start), "opening it")
    meta = open_waiting(lambda: open_meta(log_uri, log_opts), "opening its metadata")

    def progress(st):
        display.update("Applying", st.keys, None, st.key_rate, unit="keys",
                       note="" if "waiting" not in proc.state else proc.state[:60])

    target_dbs = target_dbs or _target_dbs(dst, None)
    proc = Applier(target_for_db=target_clients(dst, first, source_db, target_dbs), reader=reader,
                   meta=meta, codec=Codec(), rewriter=rewriter, group=group, batch=batch,
                   idle_timeout=idle_timeout, done=done, dry_run=dry_run,
                   merge_policy=(wopts or ApplyOptions()).merge_policy,
                   stream_ids=(wopts or ApplyOptions()).stream_ids, on_progress=progress,
                   log_name=mask_uri(log_uri), target_dbs=target_dbs)
    return proc, (reader, meta)


def _target_dbs(dst: Endpoint, target_db: int | None, sources: list[int] | None = None):
    """Where each source db goes on ``dst`` (connected once: cluster mode is known). Collisions
    are tracked with --target-db unless the source dbs are known to be one."""
    from conveyor.databases import TargetDbs

    return TargetDbs(explicit=target_db, uri_db=uri_db(dst.uri), cluster=bool(dst.cluster),
                     masked=dst.masked, track=sources is None or len(sources) > 1)


def _close(*resources) -> None:
    for r in resources:
        try:
            r.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the run's own outcome
            log.warning("closing %s: %s", type(r).__name__, e)


# -- reporting -----------------------------------------------------------------------------------
def _read_lines(rc) -> list[str]:
    lines = []
    if rc.chunked_keys:
        lines.append(f"capture: {rc.chunked_keys} keys read in parts ({rc.chunks} part events: "
                     "big keys and values above the log's record limit)")
    if rc.over_limit:
        verb = "SKIPPED, not on the log" if rc.skipped else "migrated"
        lines.append(f"capture: {rc.over_limit} keys above --mem-limit ({verb}):")
        for key, size in rc.over_limit_keys:
            lines.append(f"  {key!r}: {size:,} bytes")
        if rc.over_limit > len(rc.over_limit_keys):
            lines.append(f"  ... and {rc.over_limit - len(rc.over_limit_keys)} more")
    return lines


def _capture_lines(st) -> tuple[list[str], bool]:
    lines, ok = _capture_summary(st)
    per_db = getattr(st, "per_db", None)          # several databases (capture/databases.py)
    if per_db:
        busy = {db: d for db, d in per_db.items() if d.events}
        quiet = len(per_db) - len(busy)
        lines.insert(1, "capture: by database: " + "; ".join(
            [f"db {db}: {d.keys} keys, {d.deletes} deletes" for db, d in busy.items()]
            + ([f"{quiet} databases without events"] if quiet else [])))
    return lines, ok


def _capture_summary(st) -> tuple[list[str], bool]:
    if st.mode == "snapshot":
        state = "complete" if st.complete else "interrupted (resumable: run capture again)"
        lines = [f"capture: {st.keys} keys, {st.deletes} vanished during the scan, "
                 f"{st.rate:,.0f} keys/s; snapshot {state}" + (" [resumed]" if st.resumed else "")]
        if st.rescans:
            lines.append(f"capture: the source restarted during the scan: scanned again from the "
                         f"start ({st.rescans} times)")
        lines += [f"  rescanned after {g}" for g in st.gaps]     # a cluster's topology changed
        return lines + _read_lines(st.reads), st.complete
    lines = [f"capture: {st.events} events ({st.keys} upserts, {st.deletes} deletes), "
             f"{st.rate:,.0f} events/s, {len(st.gaps)} gaps, {st.resyncs} resyncs "
             f"({st.resyncs_done} finished)",
             f"  {st.notifications} keyspace notifications (a key already waiting is read once)"]
    lines += [f"  gap: {g}" for g in st.gaps]
    if st.source_waits or st.log_waits:
        lines.append(f"  waited out {st.source_waits} source and {st.log_waits} log failures "
                     "(see the warnings above)")
    lines += _read_lines(st.reads)
    if st.unseen_reread:
        lines.append(f"  {st.unseen_reread} keys on the log but not seen by the scan were re-read "
                     "(deleted or renamed while changes were not seen)")
    if st.untracked and st.gaps:
        lines.append("  too many keys to track names: deletes made during a gap may be missing "
                     "on the target")
    if st.history_gap:
        lines.append(f"  the log no longer holds every key's last event ({st.history_gap}): "
                     "keys deleted while no capture ran cannot be found; check the target with "
                     "verify")
    if st.complete:
        lines.append("capture: converged: every change read from the source is on the log"
                     + (f"; {len(st.gaps)} gaps were healed by resyncs" if st.gaps else ""))
    else:
        lines.append(f"capture: CANNOT claim convergence: {st.incomplete_why}")
    return lines, st.complete


def _apply_lines(st, dry_run: bool) -> tuple[list[str], bool]:
    verb = "would apply" if dry_run else "applied"
    lines = [f"apply: {verb} {st.records} records ({st.restored} restored, {st.written} typed, "
             f"{st.converted} converted, {st.deleted} deleted, "
             f"{st.expired} expired on arrival), {st.key_rate:,.0f} keys/s, "
             f"{st.retries} target retries, {st.dead_letters} dead letters"]
    if st.converted:
        lines.append(f"apply: {st.converted} keys the target refused as DUMP payloads (older "
                     "server or no RESTORE) were converted to type-based writes")
    if st.chunks:
        lines.append(f"apply: {st.chunked_keys} keys completed from {st.chunks} parts"
                     + (f"; {st.duplicate_chunks} parts already applied were skipped"
                        if st.duplicate_chunks else ""))
    if st.orphan_chunks:
        lines.append(f"apply: {st.orphan_chunks} parts skipped because the replay started after "
                     "their key's first part (use --from earliest, or capture again)")
    if st.pending_dropped:
        lines.append(f"apply: {st.pending_dropped} pending entries of stream consumer groups "
                     "were not recreated (new stream ids, no owner, or their entry was deleted); "
                     "the groups, their consumers and positions were")
    from apply.report import fault_lines
    lines += fault_lines(st)
    for why in st.dead_letter_reasons:
        lines.append(f"  dead letter: {why}")
    if st.dead_letters:
        lines.append(f"apply: {st.dead_letters} records were dead-lettered (kept in the log's "
                     "dead-letter place); the target is NOT complete")
    return lines, st.dead_letters == 0 and st.log_loss_healed


def _watch(metrics, capture=None, apply=None) -> None:
    """Expose the processes on --metrics-port (a no-op without it)."""
    if metrics is None:
        return
    if capture is not None:
        metrics.watch_capture(capture)
    if apply is not None:
        apply.track_lag = True
        metrics.watch_apply(apply)


# -- commands ------------------------------------------------------------------------------------
def capture(src: Endpoint, log_uri, log_opts, key_filter: KeyFilter, opts: CaptureOptions,
            progress, metrics=None, dbopts: DbOptions | None = None) -> bool:
    opts.dbs = _source_dbs(src, dbopts or DbOptions())
    interrupts = Interrupts()
    display = Display(progress)
    proc, res = _capture_process(src, log_uri, log_opts, key_filter, opts, display)
    _watch(metrics, capture=proc)
    try:
        with interrupts.installed(), display:
            interrupts.register(proc)
            st = proc.run()
    finally:
        _close(*res)
    lines, ok = _capture_lines(st)
    for line in lines:
        echo(line)
    return ok


def apply(dst: Endpoint, log_uri, log_opts, group, start, idle_timeout, batch, dry_run,
          rewriter: KeyRewriter, progress, wopts: ApplyOptions | None = None,
          metrics=None, dbopts: DbOptions | None = None) -> bool:
    dbopts = dbopts or DbOptions()
    interrupts = Interrupts()
    display = Display(progress)
    first = dst.connect(db=dbopts.target_db)
    proc, res = _apply_process(dst, log_uri, log_opts, group, start, idle_timeout, batch, dry_run,
                               rewriter, display, wopts=wopts, first=first,
                               target_dbs=_target_dbs(dst, dbopts.target_db))
    _watch(metrics, apply=proc)
    try:
        with interrupts.installed(), display:
            interrupts.register(proc)
            st = proc.run()
            empty = False
            try:
                ls = res[0].status()
                lag, empty = f"{ls.lag} records", ls.empty
            except LogError as e:
                lag = f"unknown ({e})"
    finally:
        _close(*res)
    lines, ok = _apply_lines(st, dry_run)
    clines, cok = _collision_lines(proc, dbopts.allow_collisions)
    lines, ok = lines + clines, ok and cok
    lines.append(f"apply: log lag {lag} for group {group!r}")
    if empty:
        lines.append(f"apply: the log {mask_uri(log_uri)} holds no records: nothing has captured "
                     "to it yet (check --log if capture ran)")
    for line in lines:
        echo(line)
    return ok


def verify(src: Endpoint, dst: Endpoint, key_filter, rewriter, kw, progress,
           dbopts: DbOptions | None = None) -> bool:
    from verify import Verifier

    dbopts = dbopts or DbOptions()
    dbs = _source_dbs(src, dbopts)
    if dbs is not None:
        return _verify_databases(src, dst, dbs, dbopts, key_filter, rewriter, kw, progress)
    source = src.connect()
    target = dst.connect(db=dbopts.target_db if dbopts.target_db is not None
                         else default_target_db(src.uri, dst.uri))
    refuse_same_database(source, target, dst)
    display = Display(progress)
    proc = Verifier(source=source, target=target, key_filter=key_filter, rewriter=rewriter,
                    ttl_tolerance_ms=kw["ttl_tolerance"], recheck_delay=kw["recheck_delay"],
                    scan_count=kw["scan_count"], stream_ids=kw.get("stream_ids") or "keep",
                    on_progress=lambda n, total: display.update("Verifying", n, total))
    interrupts = Interrupts()
    with interrupts.installed(), display:
        interrupts.register(proc)
        report = proc.run()
    _print_report(report, kw)
    return not report.differs and report.complete


def _verify_databases(src: Endpoint, dst: Endpoint, dbs: list[int], dbopts: DbOptions,
                      key_filter, rewriter, kw, progress) -> bool:
    """Each source database against the target database it maps to (verify/databases.py)."""
    from verify import Verifier
    from verify.databases import Pair, verify_pairs

    target = dst.connect(db=dbopts.target_db)
    tdbs = _target_dbs(dst, dbopts.target_db, dbs)
    for_db = target_clients(dst, target, None, tdbs)
    pairs = [Pair(d, tdbs.target_of(d), src.connect(db=d), for_db(d)) for d in dbs]
    for p in pairs:
        refuse_same_database(p.source, p.target, dst)
    display = Display(progress)
    interrupts = Interrupts()

    def make(**sides):
        proc = Verifier(key_filter=key_filter, rewriter=rewriter,
                        ttl_tolerance_ms=kw["ttl_tolerance"], recheck_delay=kw["recheck_delay"],
                        scan_count=kw["scan_count"], stream_ids=kw.get("stream_ids") or "keep",
                        on_progress=lambda n, total: display.update("Verifying", n, total),
                        **sides)
        interrupts.register(proc)
        return proc

    with interrupts.installed(), display:
        report = verify_pairs(pairs, make, key_filter, rewriter)
    for p in pairs:
        echo(f"verify: db {p.db} -> db {p.target_db}: {report.per_db[p.db].summary_line()}")
    _print_report(report, kw)
    return not report.differs and report.complete


def _source_dbs(src: Endpoint, dbopts: DbOptions) -> list[int] | None:
    """--db resolved against the source (once: replicate's verify reuses it); None without it."""
    from conveyor.databases import ALL, resolve

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


def _collision_lines(app, allow: bool) -> tuple[list[str], bool]:
    """Key names written from several source databases into one target database."""
    dbs = app.target_dbs
    c = dbs.collisions if dbs is not None else None
    if c is None:
        return [], True
    lines = []
    if c.count:
        lines.append(f"apply: {c.count} key collisions: the same key name in several source "
                     f"databases written into target db {dbs.explicit} (the last write wins: "
                     "the target cannot equal the source)"
                     + ("; accepted with --allow-collisions" if allow else
                        "; --allow-collisions accepts this"))
        lines += [f"  collision: {n}" for n in c.named]
        if c.count > len(c.named):
            lines.append(f"  ... and {c.count - len(c.named)} more")
    if c.stopped:
        lines.append(f"apply: more than {c.limit:,} keys in target db {dbs.explicit}: key "
                     "collisions were no longer detected after that (check with verify)")
    return lines, allow or not c.count


def _print_report(report, kw) -> None:
    if kw.get("show_diffs"):
        for d in report.diffs:
            echo(f"  {d.kind:<8} {d.key!r}" + (f" -> {d.target_key!r}" if d.target_key != d.key else "")
                 + (f": {d.detail}" if d.detail else ""))
    if kw.get("report_path"):
        try:
            with open(kw["report_path"], "w") as f:
                json.dump(report.to_json(), f, indent=2)
        except OSError as e:
            raise ConveyorError(f"cannot write report {kw['report_path']}: {e}") from e
    echo(f"verify: {report.summary_line()}" + ("" if report.complete else " [interrupted]"))


def replicate(src: Endpoint, dst: Endpoint, log_uri, log_opts, group, key_filter, rewriter,
              copts: CaptureOptions, dry_run, run_verify, kw, progress,
              wopts: ApplyOptions | None = None, metrics=None,
              dbopts: DbOptions | None = None) -> bool:
    dbopts = dbopts or DbOptions()
    dbs = copts.dbs = _source_dbs(src, dbopts)
    source = src.connect(db=dbs[0] if dbs else None)
    if dbs is None:
        target_db = (dbopts.target_db if dbopts.target_db is not None
                     else default_target_db(src.uri, dst.uri))
    else:
        target_db = dbopts.target_db
    target = dst.connect(db=target_db)
    target_dbs = _target_dbs(dst, dbopts.target_db, dbs)
    for db in dbs or ():
        target_dbs.target_of(db)         # refused now, not at the first event (cluster, URI /N)
    if dbs is None:
        refuse_same_database(source, target, dst)
    for db in dbs or ():
        _refuse_same(src, dst, db, target_dbs.target_of(db))
    refuse_log_on(source, src, log_uri, log_opts)      # before capture opens (and marks) the log
    refuse_log_on(target, dst, log_uri, log_opts)
    echo(f"replicate: {src.masked} -> {dst.masked} through {mask_uri(log_uri)}")
    interrupts = Interrupts()
    display = Display(progress)
    # Capture runs in a process of its own: capture and apply each get a core (threads of one
    # process would share the interpreter lock).
    from capture.child import CaptureChild

    worker = CaptureChild(src, log_uri, log_opts, key_filter, copts, display)
    app, ares = _apply_process(dst, log_uri, log_opts, group, "committed", None, 2000, dry_run,
                               rewriter, display, done=lambda: not worker.is_alive(),
                               source_db=target_db, first=target, wopts=wopts,
                               target_dbs=target_dbs)
    _watch(metrics, capture=worker, apply=app)
    try:
        with interrupts.installed(), display:
            interrupts.register(worker)
            interrupts.register(app)
            worker.start()
            try:
                ast = app.run()
            finally:
                worker.stop()            # apply failed or was stopped: capture must not go on
                worker.join()
    finally:
        _close(*ares)
    ok = True
    if worker.error is not None:
        echo(f"capture: failed: {worker.error}")
        ok = False
    else:
        lines, cok = _capture_lines(worker.result)
        ok &= cok
        for line in lines:
            echo(line)
    lines, aok = _apply_lines(ast, dry_run)
    clines, cok = _collision_lines(app, dbopts.allow_collisions)
    ok &= aok and cok
    for line in lines + clines:
        echo(line)
    if interrupts.signalled.is_set() and copts.mode == "snapshot":
        echo("replicate: interrupted; run the same command again to continue")
        return False
    if run_verify and ok:
        ok &= verify(src, dst, key_filter, rewriter, kw, progress, dbopts)
    return ok


def _refuse_same(src: Endpoint, dst: Endpoint, db: int, target_db: int) -> None:
    source, target = src.connect(db=db), dst.connect(db=target_db)
    try:
        refuse_same_database(source, target, dst)
    finally:
        source.close()
        target.close()


def status(log_uri, log_opts, group, as_json: bool, gone_after: float | None = None) -> None:
    from apply.applier import status_name
    from conveyor import members as m

    if not log_exists(log_uri, log_opts):      # status is read-only: it must not create the log
        raise LogError(f"no log at {mask_uri(log_uri)}: nothing has captured to it or applied "
                       "from it yet (check --log and --log-opt)")
    reader = open_reader(log_uri, group, log_opts, observe=True)
    meta = open_meta(log_uri, log_opts)
    try:
        st = reader.status()
        docs = meta.documents()
    finally:
        _close(reader, meta)
    now = m.now_ms()
    applied = docs.get(status_name(group)) or {}
    gone_after = m.GONE_AFTER_S if gone_after is None else gone_after
    captures = m.captures(docs, now, gone_after)
    members, forgotten = m.members(docs, group, now, gone_after)
    if as_json:
        echo(json.dumps({"log": st.uri, "group": group, "lag": st.lag,
                         "partition_count": len(st.partitions), "apply": applied,
                         "captures": {c.name: {**c.doc, "gone": c.gone, "seen_s_ago": c.age}
                                      for c in captures},
                         "members": [_member_json(x, st.partitions, now) for x in members],
                         "members_not_listed": forgotten,
                         "partitions": [{"partition": p.partition, "committed": p.committed,
                                         "end": p.end, "lag": p.lag} for p in st.partitions]},
                        default=str))
        return
    for c in captures:
        echo(_capture_line(c, now))
    n = len(st.partitions)
    echo(f"log {st.uri} ({n} partition{'s' if n != 1 else ''})  group {group!r}  total lag {st.lag}")
    echo(f"{'partition':<24} {'committed':>22} {'end':>22} {'lag':>10}")
    for p in st.partitions:
        echo(f"{p.partition:<24} {str(p.committed):>22} {str(p.end):>22} {p.lag:>10}")
    for x in members:
        echo(_member_line(x, st.partitions, now))
    if forgotten:
        echo(f"  ({forgotten} members that stopped or vanished over a day ago not listed)")
    if applied:
        last = applied.get("last_write_ms") or 0
        when = (datetime.fromtimestamp(last / 1000, timezone.utc).isoformat(timespec="seconds")
                if last else "never")
        age = f" ({time.time() - last / 1000:.0f}s ago)" if last else ""
        echo(f"apply: {applied.get('state')}; last wrote {when}{age}; "
             f"{applied.get('records', 0)} records, {applied.get('dead_letters', 0)} dead letters, "
             f"{applied.get('retries', 0)} retries"
             + (f", {applied['collisions']} key collisions between source databases"
                if applied.get("collisions") else ""))
    else:
        echo("apply: no status recorded for this group yet")


def _capture_line(c, now: int) -> str:
    from conveyor.members import ago, age_s

    d = c.doc
    where = (f"{d.get('source', '?')} db {d.get('db', '?')} slots {d.get('slots', '?')}"
             + (f" node {d['node']}" if d.get("node") else "")
             + (f", pid {d['pid']} on {d['host']}" if d.get("pid") else ""))
    change = age_s(d, "last_event_ms", now)
    return (f"capture {c.name}: {c.shown_state} ({d.get('mode')}); {d.get('keys', 0)} keys, "
            f"{d.get('deletes', 0)} deletes; last change {ago(change)}"
            f"{' ago' if change is not None else ''}; saved {ago(c.age)} ago; {where}")


def _member_json(x, partitions, now: int) -> dict:
    from conveyor.members import lag_seconds, member_lag

    lag = member_lag(x.doc, partitions)
    return {**x.doc, "gone": x.gone, "seen_s_ago": x.age, "lag": lag,
            "lag_s": lag_seconds(x.doc, lag, now)}


def _member_line(x, partitions, now: int) -> str:
    from conveyor.members import ago

    j = _member_json(x, partitions, now)
    lag = "?" if j["lag"] is None else f"{j['lag']} records"
    secs = "" if j["lag_s"] is None else f" / {j['lag_s']:.1f}s"
    held = ",".join(j.get("partitions") or []) if j.get("partitions") is not None else "all"
    return (f"apply member {j.get('member')} (pid {j.get('pid')} on {j.get('host')}): "
            f"{x.shown_state}; {j.get('records', 0)} records applied; lag {lag}{secs}; "
            f"partitions {held or 'none'}; seen {ago(x.age)} ago")
