"""The words of a run's outcome: the result lines of capture, apply and verify, each with whether
the run succeeded. The command functions (conveyor/commands.py) print them; tests match them."""
from __future__ import annotations

from conveyor.apply import ApplyStats
from conveyor.apply.report import fault_lines
from conveyor.capture import CaptureStats
from conveyor.capture.reader import ReadCounts
from conveyor.databases import TargetDbs
from conveyor.keys import quoted
from conveyor.words import counted
from conveyor.verify import Diff, VerifyReport


# -- capture ---------------------------------------------------------------------------------------
def capture_lines(st: CaptureStats) -> tuple[list[str], bool]:
    lines, ok = _capture_summary(st)
    per_db = getattr(st, "per_db", None)          # several databases (capture/databases.py)
    if per_db:
        busy = {db: d for db, d in per_db.items() if d.events}
        quiet = len(per_db) - len(busy)
        lines.insert(1, "capture: by database: " + "; ".join(
            [f"db {db}: {counted(d.keys, 'key')}, {counted(d.deletes, 'delete')}" for db, d in busy.items()]
            + ([f"{counted(quiet, 'database')} without events"] if quiet else [])))
    return lines, ok


def _capture_summary(st: CaptureStats) -> tuple[list[str], bool]:
    if st.mode == "snapshot":
        state = "complete" if st.complete else "interrupted (resumable: run capture again)"
        lines = [f"capture: {counted(st.keys, 'key')}, {st.deletes} vanished during the scan, "
                 f"{st.rate:,.0f} keys/s; snapshot {state}" + (" [resumed]" if st.resumed else "")]
        if st.rescans:
            lines.append(f"capture: the source restarted during the scan: scanned again from the "
                         f"start ({st.rescans} times)")
        lines += [f"  rescanned after {g}" for g in st.gaps]     # a cluster's topology changed
        return lines + _read_lines(st.reads), st.complete
    lines = [f"capture: {counted(st.events, 'event')} ({counted(st.keys, 'upsert')}, "
             f"{counted(st.deletes, 'delete')}), "
             f"{st.rate:,.0f} events/s, {counted(len(st.gaps), 'gap')}, {counted(st.resyncs, 'resync')} "
             f"({st.resyncs_done} finished)",
             f"  {counted(st.notifications, 'keyspace notification')} (a key already waiting is read "
             "once)"]
    lines += [f"  gap: {g}" for g in st.gaps]
    if st.source_waits or st.log_waits:
        lines.append(f"  waited out {st.source_waits} source and {st.log_waits} log failures "
                     "(see the warnings above)")
    lines += _read_lines(st.reads)
    if st.digests_read:
        lines.append(f"  rescans compared {counted(st.digests_read, 'digest')} with the key ledger "
                     f"and read again {counted(st.unseen_reread, 'key')} that changed, appeared or "
                     "vanished "
                     "(unchanged keys were neither logged nor written again)")
    if st.history_gap:
        lines.append(f"  the log no longer holds every key's last event ({st.history_gap}): "
                     "keys deleted while no capture ran cannot be found; check the target with "
                     "verify")
    if st.deletes_forgotten:
        lines.append(f"  {st.deletes_forgotten}; check the target with verify")
    if st.complete:
        lines.append("capture: converged: every change read from the source is on the log"
                     + (f"; {counted(len(st.gaps), 'gap was', 'gaps were')} healed by resyncs" if st.gaps else ""))
    else:
        lines.append(f"capture: CANNOT claim convergence: {st.incomplete_why}")
    return lines, st.complete


def _read_lines(rc: ReadCounts) -> list[str]:
    lines = []
    if rc.chunked_keys:
        lines.append(f"capture: {counted(rc.chunked_keys, 'key')} read in parts ({rc.chunks} part events: "
                     "big keys and values above the log's record limit)")
    if rc.over_limit:
        verb = "SKIPPED, not on the log" if rc.skipped else "migrated"
        lines.append(f"capture: {counted(rc.over_limit, 'key')} above --mem-limit ({verb}):")
        for key, size in rc.over_limit_keys:
            lines.append(f"  {quoted(key) if isinstance(key, bytes) else key}: {size:,} bytes")
        if rc.over_limit > len(rc.over_limit_keys):
            lines.append(f"  ... and {rc.over_limit - len(rc.over_limit_keys)} more")
    return lines


# -- apply -----------------------------------------------------------------------------------------
def apply_lines(st: ApplyStats, dry_run: bool) -> tuple[list[str], bool]:
    verb = "would apply" if dry_run else "applied"
    events = st.keys + st.superseded + st.kept
    lines = [f"apply: {verb} {counted(st.records, 'record')} holding {counted(events, 'event')} "
             f"({st.restored} "
             f"restored, {st.written} typed, {st.converted} converted, {st.deleted} deleted, "
             f"{st.expired} expired on arrival"
             + (f", {st.chunks} parts" if st.chunks else "")
             + (f", {st.superseded} superseded by a later event of the same key in the same "
                "batch" if st.superseded else "")
             + (f", {st.kept} of keys the target held before, left alone (--on-existing skip)"
                if st.kept else "")
             + f"), {st.key_rate:,.0f} keys/s, {st.retries} target retries, "
             f"{counted(st.dead_letters, 'dead letter')}"]
    if st.converted:
        lines.append(f"apply: {st.converted} keys the target refused as DUMP payloads (older "
                     "server or no RESTORE) were converted to type-based writes")
    if st.chunks:
        lines.append(f"apply: {counted(st.chunked_keys, 'key')} completed from {counted(st.chunks, 'part')}"
                     + (f"; {st.duplicate_chunks} parts already applied were skipped"
                        if st.duplicate_chunks else ""))
    if st.orphan_chunks:
        lines.append(f"apply: {st.orphan_chunks} parts skipped because the replay started after "
                     "their key's first part (use --from earliest, or capture again)")
    if st.pending_dropped:
        lines.append(f"apply: {st.pending_dropped} pending entries of stream consumer groups "
                     "were not recreated (new stream ids, no owner, or their entry was deleted); "
                     "the groups, their consumers and positions were")
    lines += fault_lines(st)
    for why in st.dead_letter_reasons:
        lines.append(f"  dead letter: {why}")
    if st.dead_letters:
        lines.append(f"apply: {counted(st.dead_letters, 'record was', 'records were')} dead-lettered (kept in the log's "
                     "dead-letter place); the target is NOT complete")
    return lines, st.dead_letters == 0 and st.log_loss_healed


def collision_lines(dbs: TargetDbs | None, allow: bool) -> tuple[list[str], bool]:
    """Key names written from several source databases into one target database (``dbs``: where
    apply wrote each source database)."""
    c = dbs.collisions if dbs is not None else None
    if c is None:
        return [], True
    lines = []
    if c.count:
        lines.append(f"apply: {counted(c.count, 'key collision')}: the same key name in several source "
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


def apply_log_lines(lag: str, empty: bool, group: str, log_masked: str) -> list[str]:
    """The log as apply left it: its lag for the group, and a hint when it never held a record."""
    lines = [f"apply: log lag {lag} for group {group!r}"]
    if empty:
        lines.append(f"apply: the log {log_masked} holds no records: nothing has captured "
                     "to it yet (check --log if capture ran)")
    return lines


# -- verify ----------------------------------------------------------------------------------------
def diff_lines(diffs: list[Diff]) -> list[str]:
    """Every differing key (--show-diffs)."""
    return [f"  {d.kind:<8} {quoted(d.key)}"
            + (f" -> {quoted(d.target_key)}" if d.target_key != d.key else "")
            + (f": {d.detail}" if d.detail else "") for d in diffs]


def database_lines(pairs: list[tuple[int, int]], report) -> list[str]:
    """Each source database's result (``pairs``: source db, target db), from a DatabasesReport;
    databases empty on both sides are counted in one line, not listed."""
    shown = [(db, t) for db, t in pairs
             if report.per_db[db].checked or report.per_db[db].diffs]
    lines = [f"verify: db {db} -> db {target_db}: {report.per_db[db].summary_line()}"
             for db, target_db in shown]
    if len(shown) < len(pairs):
        lines.append(f"verify: {counted(len(pairs) - len(shown), 'other database')} empty on "
                     "both sides")
    return lines


def verify_line(report: VerifyReport) -> str:
    return f"verify: {report.summary_line()}" + ("" if report.complete else " [interrupted]")
