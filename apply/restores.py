"""The common batch written without planning each key: every event a whole DUMP payload or a
delete (a snapshot's blocks), no merge policy, no part sequence open on the target. One RESTORE ...
REPLACE ABSTTL or DEL per event, in log order, in one packed pipeline with the data-loss probe at
its end, counted without a Planned write per key.

When the target refuses any of them (an older server that cannot read a payload, a key it will
not take), ``write_whole`` gives None and the caller writes the same events again the careful way
(apply/batch.py), which converts or dead-letters each refused key: every write here is harmless
to repeat. A refused permission or a target that went away is raised as the careful path raises it.
"""
from __future__ import annotations

import redis

from conveyor.apply.batch import BatchWriter, execute
from conveyor.apply.plan import BatchResult
from conveyor.events import Event, Kind, now_millis
from conveyor.log import Record
from conveyor.packed import Batch


def write_whole(writer: BatchWriter, target: redis.Redis, items: list[tuple[Event, Record]],
                probe=None) -> BatchResult | None:
    """The batch written and counted; None when it needs the careful path (before anything was
    sent when an event is not a whole state, after the pipeline when the target refused one)."""
    if writer.merge or writer.open_parts:
        return None
    now = now_millis()
    rename, upsert = writer.rename, Kind.UPSERT
    cmds: list[tuple] = []
    deleted = expired = removals = 0
    for ev, _ in items:
        if ev.chunk is not None or ev.value is not None:
            return None
        key = rename(ev.key) if rename else ev.key
        at = ev.expire_at_ms
        if ev.kind is upsert:
            if ev.payload is None:
                return None
            if at is None:
                cmds.append(("RESTORE", key, 0, ev.payload, "REPLACE", "ABSTTL"))
                continue
            removals += 1                   # the key may expire on the way (the data-loss check)
            if at > now:
                cmds.append(("RESTORE", key, at, ev.payload, "REPLACE", "ABSTTL"))
                continue
            expired += 1                    # expired while it waited in the log: a delete
        else:
            deleted += 1
            removals += 1
        cmds.append(("DEL", key))
    pipe = Batch()
    pipe.commands = cmds
    probed = probe is not None and probe.queue(pipe)
    # As the careful path sends it: per node on a cluster (redirections followed and counted),
    # connection failures and refused permissions classified the same way.
    replies = execute(target, pipe, writer.redirected)
    if any(isinstance(r, Exception) for r in replies):
        return None
    res = BatchResult(removals=removals, probe=replies[-3:] if probed else None)
    res.tally.restored = len(items) - deleted - expired
    res.tally.deleted, res.tally.expired = deleted, expired
    return res
