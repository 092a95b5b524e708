"""What each CLI command does, one function each: run the processes conveyor/wiring.py builds,
print their outcome (worded by conveyor/summary.py), return success."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace as dc_replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.existing import check_existing
from conveyor.capture.child import CaptureChild
from conveyor import cutover, members, repair, summary
from conveyor.endpoints import server_info
from conveyor.errors import ConfigError, ConveyorError, LogError
from conveyor.log import log_exists, open_meta, open_reader, split_uri
from conveyor.log.file import remove_empty_file_log
from conveyor.options import (ApplyOptions, CaptureOptions, DbOptions, LogSpec, ReplicateOptions,
                              VerifyOptions)
from conveyor.progress import Display, counts, echo
from conveyor.runner import (Endpoint, Interrupts, default_target_db, refuse_log_on,
                             refuse_same_database)
from conveyor.status_view import status_lines
from conveyor.wiring import (announce, apply_process, capture_process, close_all, log_digest,
                             open_log, source_dbs, target_dbs, verify_process)
from conveyor.verify import VerifyReport
from conveyor.words import counted

logger = logging.getLogger("conveyor")

if TYPE_CHECKING:
    from conveyor.metrics import Metrics


def capture(src: Endpoint, log: LogSpec, opts: CaptureOptions, dbopts: DbOptions, *,
            progress: bool | None = None, metrics: Metrics | None = None) -> bool:
    opts.dbs = source_dbs(src, dbopts)
    interrupts = Interrupts()
    display = Display(progress)
    built = capture_process(src, log, opts, display)
    _watch(metrics, capture=built.proc)
    try:
        with interrupts.installed(), display:
            interrupts.register(built.proc)
            st = built.proc.run()
    finally:
        built.close()
    lines, ok = summary.capture_lines(st)
    _report(lines, counts(st))
    return ok


def _report(lines: list[str], fields: dict) -> None:
    """A final report: its first line carries the counts as JSON fields (--log-format json)."""
    for i, line in enumerate(lines):
        echo(line, **(fields if i == 0 else {}))


def apply(dst: Endpoint, log: LogSpec, opts: ApplyOptions, dbopts: DbOptions, *,
          progress: bool | None = None, metrics: Metrics | None = None) -> bool:
    interrupts = Interrupts()
    display = Display(progress)
    first = dst.connect(db=dbopts.target_db)
    existed = log_exists(log.uri, log.opts)
    if not existed:
        wait = (f"for {opts.idle_timeout:g}s (--idle-timeout)" if opts.idle_timeout is not None
                else "until stopped")
        echo(f"apply: there is no log at {log.masked} yet: waiting {wait} for a capture to "
             "write to it")
    built = apply_process(dst, log, opts, display, first=first,
                          targets=target_dbs(dst, dbopts.target_db))
    proc = built.proc
    try:
        check_existing(dst, first, proc, opts)
    except ConveyorError:
        built.close()
        if not existed:
            _forget_made(log)
        raise
    _watch(metrics, apply=proc)
    try:
        with interrupts.installed(), display:
            interrupts.register(proc)
            st = proc.run()
            empty = False
            try:
                ls = proc.reader.status()
                lag, empty = counted(ls.lag, "record"), ls.empty
            except LogError as e:
                lag = f"unknown ({e})"
    finally:
        built.close()
    lines, ok = summary.apply_lines(st, opts.dry_run)
    clines, cok = summary.collision_lines(proc.target_dbs, dbopts.allow_collisions)
    lines, ok = lines + clines, ok and cok
    lines += summary.apply_log_lines(lag, empty, opts.group, log.masked)
    if empty and not existed:
        lines.append(f"apply: nothing was applied: no capture wrote to {log.masked} "
                     f"(check --log){_forget_made(log)}")
    if st.dead_letters and not opts.dry_run:
        lines.append(f"apply: to bring back from the source the keys those records held: "
                     f"conveyor verify SOURCE {dst.masked} --repair --log {log.masked}, then "
                     "this apply again")
    _report(lines, counts(st))
    return ok


def _forget_made(log: LogSpec) -> str:
    """A file log apply itself created (it was waiting for a capture that never came) is
    removed again, so that a mistyped --log leaves nothing behind."""
    if split_uri(log.uri, log.opts)[0] != "file":
        return ""
    try:
        remove_empty_file_log(log.uri)
    except OSError as e:
        return f"; its directory stays: {e}"
    return "; the directory made for it was removed"


def verify(src: Endpoint, dst: Endpoint, opts: VerifyOptions, dbopts: DbOptions, *,
           progress: bool | None = None, repair: LogSpec | None = None) -> bool:
    """``repair``: the log the keys found different are appended to (verify --repair)."""
    dbs = source_dbs(src, dbopts)
    fixer = _Repairs(src, dst, repair, opts) if repair is not None else None
    try:
        display = Display(progress)
        proc = verify_process(src, dst, opts, dbs, dbopts.target_db, display)
        interrupts = Interrupts()
        with interrupts.installed(), display:
            interrupts.register(proc)
            report = proc.run()
        if dbs is not None:
            for line in summary.database_lines([(p.db, p.target_db) for p in proc.pairs], report):
                echo(line)
        _print_report(report, opts)
        if fixer is not None and report.differs:
            if not report.complete:
                echo("verify: interrupted: nothing was queued for repair")
            else:
                fixer.queue(report)
    finally:
        if fixer is not None:
            fixer.close()
    return not report.differs and report.complete


def compare_and_repair(src: Endpoint, dst: Endpoint, log: LogSpec, vopts: VerifyOptions,
                       aopts: ApplyOptions, dbopts: DbOptions, *,
                       progress: bool | None = None) -> bool:
    """``replicate --mode compare --repair``: verify, queue what differs on the log, apply the
    log, verify again; True only when the re-check finds the target identical."""
    if verify(src, dst, vopts, dbopts, progress=progress, repair=log):
        return True
    if not apply(dst, log, aopts, dbopts, progress=progress):
        return False
    echo("replicate: verifying again after the repair")
    return verify(src, dst, vopts, dbopts, progress=progress)


class _Repairs:
    """verify --repair: everything that can be refused is refused before verify reads a key."""

    def __init__(self, src: Endpoint, dst: Endpoint, log: LogSpec, opts: VerifyOptions) -> None:
        self.src, self.log, self.opts = src, log, opts
        repair.refuse_unmappable(opts.rewriter)
        if not log_exists(log.uri, log.opts):
            raise ConfigError(f"--repair: no log at {log.masked}: repairs go to the log the "
                              "pair's changes go through (check --log and --log-opt)")
        run_ids: set[str] = set()
        for ep in (src, dst):
            client = ep.connect()
            try:
                refuse_log_on(client, ep, log.uri, log.opts)
                if ep is src:
                    run_ids = set(server_info(client).run_id.split(","))
            finally:
                client.close()
        self.writer, self.meta = open_log(log)
        try:
            repair.check_log_identity(self.meta, announce(src, 0, opts.key_filter)["source"],
                                      run_ids, log.masked)
        except ConveyorError:
            self.close()
            raise

    def queue(self, report: VerifyReport) -> None:
        done = repair.queue(lambda db: self.src.connect(db=db), self.writer, report,
                            self.opts.key_filter)
        echo(repair.queued_line(done, self.log.masked), queued=done.keys, events=done.events,
             **{f"queued_{k}": n for k, n in done.by_kind.items()})

    def close(self) -> None:
        close_all(self.writer, self.meta)


def _print_report(report: VerifyReport, opts: VerifyOptions) -> None:
    if opts.show_diffs:
        for line in summary.diff_lines(report.diffs):
            echo(line)
    if opts.report_path:
        try:
            with open(opts.report_path, "w") as f:
                json.dump(report.to_json(), f, indent=2)
        except OSError as e:
            raise ConveyorError(f"cannot write report {opts.report_path}: {e}") from e
    echo(summary.verify_line(report), checked=report.checked, complete=report.complete,
         evicted=report.evicted, **report.counts)


def replicate(src: Endpoint, dst: Endpoint, log: LogSpec, opts: ReplicateOptions,
              dbopts: DbOptions, *, progress: bool | None = None,
              metrics: Metrics | None = None, embedded: bool = False,
              cleanup: bool = False) -> bool:
    """``embedded``: the log is the file log replicate keeps in --state-dir; ``cleanup``: remove
    it and the key ledgers after a run that succeeded."""
    ok = _replicate(src, dst, log, opts, dbopts, progress, metrics)
    if embedded:
        _state_left(log, opts.capture.state_dir, ok and cleanup, cleanup)
    return ok


def _state_left(log: LogSpec, state_dir: str, remove: bool, asked: bool) -> None:
    """Say where replicate left its embedded log and key ledgers (and how big), or remove them."""
    root = Path(log.uri.split(":", 1)[1])      # the embedded log is always file:ABSOLUTE_PATH
    ledgers = sorted((Path(state_dir).resolve() / "ledgers").glob(f"*-{log_digest(log.uri)}"))
    if remove:
        for path in [root, *ledgers]:
            shutil.rmtree(path, ignore_errors=True)
        echo(f"replicate: removed its log {root} and key ledgers (--cleanup)")
        return
    size = sum(f.stat().st_size for d in [root, *ledgers] if d.exists()
               for f in d.rglob("*") if f.is_file())
    if not size:
        return
    why = ("the run did not succeed, and " if asked else "")
    echo(f"replicate: {why}its log and key ledgers stay in {Path(state_dir).resolve()} "
         f"({_size(size)}): the same command run again resumes from them; "
         + ("" if asked else "--cleanup removes them after a run that succeeds, or ")
         + f"rm -r {root}" + (f" {Path(state_dir).resolve() / 'ledgers'}" if ledgers else ""))


def _replicate(src: Endpoint, dst: Endpoint, log: LogSpec, opts: ReplicateOptions,
               dbopts: DbOptions, progress: bool | None, metrics: Metrics | None) -> bool:
    dbs = opts.capture.dbs = source_dbs(src, dbopts)
    source = src.connect(db=dbs[0] if dbs else None)
    if dbs is None:
        target_db = (dbopts.target_db if dbopts.target_db is not None
                     else default_target_db(src.uri, dst.uri))
    else:
        target_db = dbopts.target_db
    target = dst.connect(db=target_db)
    targets = target_dbs(dst, dbopts.target_db, dbs)
    for db in dbs or ():
        targets.target_of(db)            # refused now, not at the first event (cluster, URI /N)
    if dbs is None:
        refuse_same_database(source, target, dst)
    for db in dbs or ():
        _refuse_same(src, dst, db, targets.target_of(db))
    existed = log_exists(log.uri, log.opts)
    refuse_log_on(source, src, log.uri, log.opts)      # before capture opens (and marks) the log
    refuse_log_on(target, dst, log.uri, log.opts)
    echo(f"replicate: {src.masked} -> {dst.masked} through {log.masked}")
    interrupts = Interrupts()
    display = Display(progress)
    # Capture runs in a process of its own: capture and apply each get a core (threads of one
    # process would share the interpreter lock).
    worker = CaptureChild(partial(capture_process, src, log, opts.capture), display)
    built = apply_process(dst, log, opts.apply, display, first=target, source_db=target_db,
                          targets=targets, done=lambda: not worker.is_alive())
    app = built.proc
    try:
        check_existing(dst, target, app, opts.apply)
    except ConveyorError:
        built.close()
        if not existed:
            _forget_made(log)
        raise
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
        built.close()
    ok = True
    if worker.error is not None:
        echo(f"capture: failed: {worker.error}")
        ok = False
    else:
        lines, cok = summary.capture_lines(worker.result)
        ok &= cok
        _report(lines, counts(worker.result))
    lines, aok = summary.apply_lines(ast, opts.apply.dry_run)
    clines, cok = summary.collision_lines(app.target_dbs, dbopts.allow_collisions)
    ok &= aok and cok
    _report(lines + clines, counts(ast))
    if interrupts.signalled.is_set() and opts.capture.mode == "snapshot":
        echo("replicate: interrupted; run the same command again to continue")
        return False
    if opts.verify is not None and ok:
        vopts = opts.verify if app.kept is None else dc_replace(opts.verify, kept=app.kept)
        ok &= verify(src, dst, vopts, dbopts, progress=progress)
    return ok


def _refuse_same(src: Endpoint, dst: Endpoint, db: int, target_db: int) -> None:
    source, target = src.connect(db=db), dst.connect(db=target_db)
    try:
        refuse_same_database(source, target, dst)
    finally:
        source.close()
        target.close()


def _watch(metrics: Metrics | None, capture=None, apply=None) -> None:
    """Expose the processes on --metrics-port (a no-op without it)."""
    if metrics is None:
        return
    if capture is not None:
        metrics.watch_capture(capture)
    if apply is not None:
        apply.track_lag = True
        metrics.watch_apply(apply)


def status(log: LogSpec, group: str, as_json: bool, gone_after: float | None = None) -> None:
    if not log_exists(log.uri, log.opts):      # status is read-only: it must not create the log
        raise LogError(f"no log at {log.masked}: nothing has captured to it or applied "
                       "from it yet (check --log and --log-opt)")
    reader = open_reader(log.uri, group, log.opts, observe=True)
    meta = open_meta(log.uri, log.opts)
    try:
        st = reader.status()
        docs = meta.documents()
    finally:
        close_all(reader, meta)
    gone_after = members.GONE_AFTER_S if gone_after is None else gone_after
    for line in status_lines(st, docs, group, as_json, gone_after):
        echo(line)


def wait_synced(log: LogSpec, groups: list[str] | None, timeout_s: float | None, as_json: bool,
                gone_after: float | None = None) -> bool:
    """``status --wait-synced`` (conveyor/cutover.py): True once the target holds every change
    the source made before the call."""
    if not log_exists(log.uri, log.opts):
        raise LogError(f"no log at {log.masked}: nothing has captured to it yet (check --log)")
    gone_after = members.GONE_AFTER_S if gone_after is None else gone_after
    meta = open_meta(log.uri, log.opts)
    readers: dict[str, object] = {}
    try:
        groups = groups or cutover.apply_groups(meta.documents())
        if not groups:
            raise LogError(f"no apply group has applied from {log.masked} yet: nothing can be "
                           "synced (start apply, or name the group with --group)")

        def status_of(g: str):
            if g not in readers:
                readers[g] = open_reader(log.uri, g, log.opts, observe=True)
            return readers[g].status()

        last = [0.0]

        def say(behind: list[str], waited: float) -> None:
            if waited - last[0] >= 10:
                last[0] = waited
                echo(f"status: waiting {waited:.0f}s: " + "; ".join(behind))

        ok, behind, waited = cutover.wait_synced(meta.documents, status_of, groups, timeout_s,
                                                 gone_after, None if as_json else say)
    finally:
        close_all(*readers.values(), meta)
    if as_json:
        echo(json.dumps({"synced": ok, "groups": groups, "behind": behind,
                         "waited_s": round(waited, 1)}))
    elif ok:
        echo(f"status: synced after {waited:.1f}s: every capture is live with nothing left to "
             f"read, and {', '.join(repr(g) for g in groups)} applied everything captured up "
             "to the call")
    else:
        echo(f"status: NOT synced after {waited:.0f}s: " + "; ".join(behind))
    return ok


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{-(-n // 1024)} KiB"
