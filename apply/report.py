"""The lines apply adds to its summary about the faults it met (printed by the CLI)."""
from __future__ import annotations

from conveyor.apply.stats import ApplyStats


def fault_lines(st: ApplyStats) -> list[str]:
    """What apply survived: a target that lost data, a log that lost records, waits."""
    lines = [f"apply: the target lost data ({why}): the log was replayed from its earliest record"
             for why in st.replays]
    lines += [f"apply: {why}: the log cannot be replayed; check the target with `conveyor verify "
              "SOURCE TARGET`" for why in st.unsure_restarts]
    if st.lists_replaced:
        lines.append(f"apply: merge policy: {st.lists_replaced} lists were replaced whole (a list "
                     "cannot be merged idempotently: a replay would append its elements again)")
    if st.temp_cleaned:
        lines.append(f"apply: {st.temp_cleaned} temporary keys of big keys whose parts can no "
                     "longer complete were deleted from the target")
    if st.cluster_redirects:
        lines.append(f"apply: the target cluster redirected or failed batches {st.cluster_redirects} "
                     "times (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a node down): followed and sent "
                     "again, nothing skipped")
    if st.log_waits:
        lines.append(f"apply: waited {st.log_waits} times for the log to be available again")
    if st.handed_over:
        lines.append(f"apply: {st.handed_over} records were handed to another member of the "
                     "group while the target was down (left to it, unwritten here)")
    for why in st.log_lost:
        lines.append(f"apply: {why}; read the new log from its earliest record")
    if not st.log_loss_healed:
        lines.append("apply: no whole capture pass was applied since the log lost records: the "
                     "target may miss keys; run a live capture (it resyncs) or capture again "
                     "with --fresh, then apply")
    return lines

