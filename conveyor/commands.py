"""What each CLI command does, one function each; they print results and return success."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from conveyor.endpoints import mask_uri
from conveyor.errors import ConveyorError, LogError
from conveyor.events import Codec
from conveyor.keys import KeyFilter, KeyRewriter
from conveyor.log import log_exists, open_meta, open_reader, open_writer
from conveyor.progress import Display, echo
from conveyor.runner import (Endpoint, Interrupts, default_target_db, open_waiting,
                             refuse_log_on,
                             refuse_same_database, target_clients)

log = logging.getLogger("conveyor")


# -- building the processes ----------------------------------------------------------------------
@dataclass
class CaptureOptions:
    mode: str = "snapshot"
    scan_count: int = 1000
    fresh: bool = False
    idle_timeout: float | None = None
    enable_notifications: bool = False
    max_dirty_keys: int = 1_000_000
    value_type: str = "dump"
    big_key_bytes: int | None = 8 * 1024 * 1024
    mem_limit: int | None = None
    mem_limit_skip: bool = False


@dataclass
class ApplyOptions:
    merge_policy: str = "overwrite"
    stream_ids: str = "keep"


def _capture_process(src: Endpoint, log_uri, log_opts, key_filter, opts: CaptureOptions, display):
    from capture import Capture, checkpoint_name
    from capture.notifications import check_notifications

    client = src.connect()
    info = src.info(client)
    refuse_log_on(client, src, log_uri, log_opts)
    if opts.mode != "snapshot":
        warning = check_notifications(client, enable=opts.enable_notifications,
                                      where=f"source {src.masked}")
        if warning:
            echo(f"capture: warning: {warning}")
    writer = open_waiting(lambda: open_writer(log_uri, log_opts), "opening it")
    meta = open_waiting(lambda: open_meta(log_uri, log_opts), "opening its metadata")

    def progress(st):
        if st.mode == "snapshot" or proc._cursor is not None:
            display.update("Scanning", st.events, st.total_hint, st.rate)
        if st.mode != "snapshot":
            note = st.waiting[:60] or (f"dirty {st.dirty_waiting}, gaps {len(st.gaps)}, "
                                       f"resyncs {st.resyncs_done}/{st.resyncs}")
            display.update("Live", st.events, None, st.rate, unit="events", note=note)

    proc = Capture(source=client, source_info=info, writer=writer, meta=meta, codec=Codec(),
                   key_filter=key_filter, checkpoint=checkpoint_name(src.uri, info.db, key_filter),
                   mode=opts.mode, scan_count=opts.scan_count, fresh=opts.fresh,
                   idle_timeout=opts.idle_timeout, connect=lambda: src.connect(),
                   dirty_limit=opts.max_dirty_keys, value_type=opts.value_type,
                   big_key_bytes=opts.big_key_bytes, mem_limit=opts.mem_limit,
                   mem_limit_skip=opts.mem_limit_skip,
                   enable_notifications=opts.enable_notifications, on_progress=progress)
    return proc, (writer, meta)


def _apply_process(dst: Endpoint, log_uri, log_opts, group, start, idle_timeout, batch, dry_run,
                   rewriter, display, done=None, source_db=None, first=None,
                   wopts: ApplyOptions | None = None):
    from apply import Applier

    first = first or dst.connect(db=source_db)
    refuse_log_on(first, dst, log_uri, log_opts)
    reader = open_waiting(lambda: open_reader(log_uri, group, log_opts, start), "opening it")
    meta = open_waiting(lambda: open_meta(log_uri, log_opts), "opening its metadata")

    def progress(st):
        display.update("Applying", st.keys, None, st.key_rate, unit="keys",
                       note="" if "waiting" not in proc.state else proc.state[:60])

    proc = Applier(target_for_db=target_clients(dst, first, source_db), reader=reader, meta=meta,
                   codec=Codec(), rewriter=rewriter, group=group, batch=batch,
                   idle_timeout=idle_timeout, done=done, dry_run=dry_run,
                   merge_policy=(wopts or ApplyOptions()).merge_policy,
                   stream_ids=(wopts or ApplyOptions()).stream_ids, on_progress=progress,
                   log_name=mask_uri(log_uri))
    return proc, (reader, meta)


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
    if st.mode == "snapshot":
        state = "complete" if st.complete else "interrupted (resumable: run capture again)"
        lines = [f"capture: {st.keys} keys, {st.deletes} vanished during the scan, "
                 f"{st.rate:,.0f} keys/s; snapshot {state}" + (" [resumed]" if st.resumed else "")]
        if st.rescans:
            lines.append(f"capture: the source restarted during the scan: scanned again from the "
                         f"start ({st.rescans} times)")
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
            progress, metrics=None) -> bool:
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
          metrics=None) -> bool:
    interrupts = Interrupts()
    display = Display(progress)
    proc, res = _apply_process(dst, log_uri, log_opts, group, start, idle_timeout, batch, dry_run,
                               rewriter, display, wopts=wopts)
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
    lines.append(f"apply: log lag {lag} for group {group!r}")
    if empty:
        lines.append(f"apply: the log {mask_uri(log_uri)} holds no records: nothing has captured "
                     "to it yet (check --log if capture ran)")
    for line in lines:
        echo(line)
    return ok


def verify(src: Endpoint, dst: Endpoint, key_filter, rewriter, kw, progress) -> bool:
    from verify import Verifier

    source = src.connect()
    target = dst.connect(db=default_target_db(src.uri, dst.uri))
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
              wopts: ApplyOptions | None = None, metrics=None) -> bool:
    source = src.connect()
    target_db = default_target_db(src.uri, dst.uri)
    target = dst.connect(db=target_db)
    refuse_same_database(source, target, dst)
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
                               source_db=target_db, first=target, wopts=wopts)
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
    ok &= aok
    for line in lines:
        echo(line)
    if interrupts.signalled.is_set() and copts.mode == "snapshot":
        echo("replicate: interrupted; run the same command again to continue")
        return False
    if run_verify and ok:
        ok &= verify(src, dst, key_filter, rewriter, kw, progress)
    return ok


def status(log_uri, log_opts, group, as_json: bool) -> None:
    from apply.applier import status_name

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
    applied = docs.get(status_name(group)) or {}
    captures = {name: doc for name, doc in docs.items() if name.startswith("capture-")}
    if as_json:
        echo(json.dumps({"log": st.uri, "group": group, "lag": st.lag, "apply": applied,
                         "captures": captures,
                         "partitions": [{"partition": p.partition, "committed": p.committed,
                                         "end": p.end, "lag": p.lag} for p in st.partitions]},
                        default=str))
        return
    for name, doc in sorted(captures.items()):
        saved = doc.get("saved_ms") or 0
        age = f" ({time.time() - saved / 1000:.0f}s ago)" if saved else ""
        echo(f"capture {name}: {doc.get('state')} ({doc.get('mode')}); {doc.get('keys', 0)} keys, "
             f"{doc.get('deletes', 0)} deletes; saved{age}")
    echo(f"log {st.uri}  group {group!r}  total lag {st.lag}")
    echo(f"{'partition':<24} {'committed':>22} {'end':>22} {'lag':>10}")
    for p in st.partitions:
        echo(f"{p.partition:<24} {str(p.committed):>22} {str(p.end):>22} {p.lag:>10}")
    if applied:
        last = applied.get("last_write_ms") or 0
        when = (datetime.fromtimestamp(last / 1000, timezone.utc).isoformat(timespec="seconds")
                if last else "never")
        age = f" ({time.time() - last / 1000:.0f}s ago)" if last else ""
        echo(f"apply: {applied.get('state')}; last wrote {when}{age}; "
             f"{applied.get('records', 0)} records, {applied.get('dead_letters', 0)} dead letters, "
             f"{applied.get('retries', 0)} retries")
    else:
        echo("apply: no status recorded for this group yet")
