"""``conveyor status`` as it is shown: every capture of a log, the log's partitions, the apply
members of a group and the group's own status, as lines or one JSON document."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from conveyor.apply.stats import status_name
from conveyor import members as m
from conveyor.log import LogStatus
from conveyor.words import counted


def status_lines(st: LogStatus, docs: dict[str, dict], group: str, as_json: bool,
                 gone_after: float) -> list[str]:
    """``st``: the log's status for ``group``; ``docs``: the documents of its MetaStore."""
    now = m.now_ms()
    applied = docs.get(status_name(group)) or {}
    captures = m.captures(docs, now, gone_after)
    members, forgotten = m.members(docs, group, now, gone_after)
    if as_json:
        return [json.dumps({"log": st.uri, "group": group, "lag": st.lag, "size": st.size,
                            "partition_count": len(st.partitions), "apply": applied,
                            "captures": {c.name: {**c.doc, "gone": c.gone, "seen_s_ago": c.age}
                                         for c in captures},
                            "members": [_member_json(x, st.partitions, now) for x in members],
                            "members_not_listed": forgotten,
                            "partitions": [{"partition": p.partition, "committed": p.committed,
                                            "end": p.end, "lag": p.lag} for p in st.partitions]},
                           default=str)]
    lines = [_capture_line(c, now) for c in captures]
    n = len(st.partitions)
    lines.append(f"log {st.uri} ({n} partition{'s' if n != 1 else ''})  group {group!r}  "
                 f"total lag {st.lag}")
    if st.size:
        lines.append(f"  holds {st.size}")
    lines.append(f"{'partition':<24} {'committed':>22} {'end':>22} {'lag':>10}")
    for p in st.partitions:
        lines.append(f"{p.partition:<24} {_shown(p.committed):>22} {str(p.end):>22} {p.lag:>10}")
    lines += [_member_line(x, st.partitions, now) for x in members]
    if forgotten:
        lines.append(f"  ({forgotten} members that stopped or vanished over a day ago not listed)")
    lines.append(_applied_line(applied))
    return lines


def _applied_line(applied: dict) -> str:
    if not applied:
        return "apply: no status recorded for this group yet"
    last = applied.get("last_write_ms") or 0
    when = (datetime.fromtimestamp(last / 1000, timezone.utc).isoformat(timespec="seconds")
            if last else "never")
    age = f" ({time.time() - last / 1000:.0f}s ago)" if last else ""
    return (f"apply: {applied.get('state')}; last wrote {when}{age}; "
            f"{counted(applied.get('records', 0), 'record')}, "
            f"{counted(applied.get('dead_letters', 0), 'dead letter')}, "
            f"{counted(applied.get('retries', 0), 'retry', 'retries')}"
            + (f", {applied['collisions']} key collisions between source databases"
               if applied.get("collisions") else ""))


def _capture_line(c: m.Seen, now: int) -> str:
    d = c.doc
    where = (f"{d.get('source', '?')} db {d.get('db', '?')} slots {d.get('slots', '?')}"
             + (f" node {d['node']}" if d.get("node") else "")
             + (f", pid {d['pid']} on {d['host']}" if d.get("pid") else ""))
    change = m.age_s(d, "last_event_ms", now)
    return (f"capture {c.name}: {c.shown_state} ({d.get('mode')}); {counted(d.get('keys', 0), 'key')}, "
            f"{counted(d.get('deletes', 0), 'delete')}; last change {m.ago(change)}"
            f"{' ago' if change is not None else ''}; saved {m.ago(c.age)} ago; {where}")


def _member_json(x: m.Seen, partitions, now: int) -> dict:
    lag = m.member_lag(x.doc, partitions)
    return {**x.doc, "gone": x.gone, "seen_s_ago": x.age, "lag": lag,
            "lag_s": m.lag_seconds(x.doc, lag, now)}


def _member_line(x: m.Seen, partitions, now: int) -> str:
    j = _member_json(x, partitions, now)
    lag = "?" if j["lag"] is None else counted(j["lag"], "record")
    secs = "" if j["lag_s"] is None else f" / {j['lag_s']:.1f}s"
    held = ",".join(j.get("partitions") or []) if j.get("partitions") is not None else "all"
    return (f"apply member {j.get('member')} (pid {j.get('pid')} on {j.get('host')}): "
            f"{x.shown_state}; {counted(j.get('records', 0), 'record')} applied; lag {lag}{secs}; "
            f"partitions {held or 'none'}; seen {m.ago(x.age)} ago")


def _shown(position) -> str:
    """A partition's position: "-" where nothing was committed yet."""
    return "-" if position is None else str(position)
