"""``conveyor status --wait-synced``: may clients switch to the target now?

Synced means: every capture of the log is live, with no scan under way and no changed key
waiting to be read, in a checkpoint saved after the call (so every change the source made before
the call is on the log); and every apply group has committed the log up to the end it had once
that was true (so every such change is on the target). Writes to the source should be paused
first (``CLIENT PAUSE … WRITE``): otherwise the answer is only true of the moment it was given.
"""
from __future__ import annotations

import time

from conveyor import members as m
from conveyor.apply.stats import status_name
from conveyor.log import LogStatus
from conveyor.words import counted

POLL_S = 0.5


def capture_behind(docs: dict[str, dict], called_ms: int, gone_after: float) -> list[str]:
    """Why the captures of the log do not yet hold every change made before ``called_ms``."""
    caps = m.captures(docs, m.now_ms(), gone_after)
    if not caps:
        return ["no capture has written to this log"]
    out = []
    for c in caps:
        d = c.doc
        if c.gone or c.finished or d.get("mode") not in ("live", "liveonly"):
            out.append(f"capture {c.name} is not following the source ({c.shown_state}, "
                       f"mode {d.get('mode')}): changes made since it stopped are not on the log")
        elif c.state != "live":
            out.append(f"capture {c.name} is {c.state}")
        elif (d.get("saved_ms") or 0) < called_ms:
            out.append(f"capture {c.name} has not reported since the call")
        elif d.get("dirty"):
            out.append(f"capture {c.name} has {counted(d['dirty'], 'changed key')} to read")
    return out


def group_behind(group: str, st: LogStatus, ends: dict) -> str | None:
    parts = {p.partition: p for p in st.partitions}
    late = [p for name, end in ends.items()
            if not ((p := parts.get(name)) is not None and p.reached(end))]
    if not late:
        return None
    return (f"group {group!r} has not applied the log up to the position taken at the call in "
            f"{counted(len(late), 'partition')} (lag now {counted(sum(p.lag for p in late), 'record')})")


def wait_synced(docs_now, status_of, groups: list[str], timeout_s: float | None,
                gone_after: float, on_wait=None) -> tuple[bool, list[str], float]:
    """``docs_now()``: the log's documents; ``status_of(group)``: its LogStatus. Returns
    (synced, what is still behind, seconds waited)."""
    called = m.now_ms()
    began = time.monotonic()
    ends = None
    while True:
        behind = [] if ends is not None else capture_behind(docs_now(), called, gone_after)
        if not behind and ends is None:
            # the captures hold every change made before the call: the log's end now is where
            # every group must get to
            ends = {p.partition: p.end for p in status_of(groups[0]).partitions}
        if ends is not None:
            behind = [why for g in groups if (why := group_behind(g, status_of(g), ends))]
        if not behind:
            return True, [], time.monotonic() - began
        waited = time.monotonic() - began
        if timeout_s is not None and waited >= timeout_s:
            return False, behind, waited
        if on_wait:
            on_wait(behind, waited)
        time.sleep(POLL_S)


def apply_groups(docs: dict[str, dict]) -> list[str]:
    """Every group an apply recorded its status for on this log."""
    prefix = status_name("")
    return sorted(name[len(prefix):] for name in docs
                  if name.startswith(prefix) and not name.startswith(m.MEMBER_PREFIX))
