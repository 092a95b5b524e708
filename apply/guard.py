"""The target databases apply writes to, each watched for lost data (see :mod:`apply.watch`).

The guard keeps one watch per target client, what the previous apply of the group last read of
each target (kept in the apply status, so a restart between two runs is noticed too), and the
findings of the readings taken in batches; the Applier decides what a finding means (a replay
from the earliest record, or a stop with the command to run).
"""
from __future__ import annotations

import logging
from typing import Callable

import redis

from conveyor.apply.plan import BatchResult
from conveyor.apply.cluster_watch import ClusterWatch
from conveyor.apply.replies import raise_for_connection
from conveyor.apply.watch import Finding, TargetWatch, sweep_temp_keys
from conveyor.acl import user_of
from conveyor.cluster import is_cluster

log = logging.getLogger("conveyor.apply")


class TargetGuard:
    def __init__(self, group: str, previous: dict[str, dict]) -> None:
        """``previous``: source db -> {"run_id", "dbsize"} the previous run last read."""
        self.group, self.previous = group, previous
        self.watches: dict[int, TargetWatch] = {}      # id(client) -> its watch
        self.dbs: dict[int, set[int]] = {}             # id(client) -> source dbs it writes
        self.findings: list[Finding] = []              # losses seen, not handled yet

    def watch_for(self, db: int, target: redis.Redis) -> TargetWatch:
        """The watch of ``target``, with its baseline read before apply's first write to it."""
        k = id(target)
        watch = self.watches.get(k)
        if watch is None:
            watch = self.watches[k] = (ClusterWatch(target) if is_cluster(target)
                                       else TargetWatch(target))
        self.dbs.setdefault(k, set()).add(db)
        if watch.base is None:
            try:
                watch.start()
            except Exception as e:  # noqa: BLE001 - classified in one place
                raise_for_connection(e, user_of(target))
        self._since_last_run(db, watch)
        return watch

    def meet_previous(self, target_for_db: Callable[[int], redis.Redis]) -> None:
        """Read the targets of the previous run even when there is nothing to write (raises
        TargetUnavailable while one is down)."""
        for db in [int(d) for d in self.previous]:
            self.watch_for(db, target_for_db(db))

    def _since_last_run(self, db: int, watch: TargetWatch) -> None:
        """The target the previous apply of this group wrote to restarted since (or this is
        another target): what it kept is judged as for a restart seen while running."""
        before = self.previous.pop(str(db), None)
        if not before or watch.base is None or before.get("run_id") == watch.base.run_id:
            return
        found = watch.since_last_run(before, self.group)
        if found:
            self.findings.append(found)

    def observe(self, watch: TargetWatch, res: BatchResult) -> None:
        """The reading a batch took at the end of its own pipeline."""
        if res.probe is not None:
            found = watch.observe(res.probe, res.removals, res.late_removals)
        else:
            found = watch.observe_later(res.removals, res.late_removals)
        if found:
            self.findings.append(found)

    def check(self) -> None:
        """A reading of each target of its own (apply is idle)."""
        for watch in self.watches.values():
            found = watch.check()
            if found:
                self.findings.append(found)

    def take_findings(self) -> list[Finding]:
        findings, self.findings = self.findings, []
        return findings

    def unreadable(self) -> list[str]:
        """Why targets could not be read (down right now, or not met yet)."""
        down = [w.unreadable for w in self.watches.values() if w.unreadable]
        if self.previous:
            down.append("the target the previous run wrote to was not read yet")
        return down

    def rebase(self) -> None:
        """After a replay started: a new baseline before the next write."""
        self.findings.clear()
        for watch in self.watches.values():
            watch.base = None

    def doc(self) -> dict[str, dict]:
        """run_id and DBSIZE of each target database at its last reading, for the next run
        (a target that was not written in this run keeps what the previous run saw)."""
        doc = dict(self.previous)
        for k, watch in self.watches.items():
            if watch.base is not None:
                for db in self.dbs.get(k, ()):
                    doc[str(db)] = {"run_id": watch.base.run_id, "dbsize": watch.base.dbsize}
                    if watch.base.nodes:            # a cluster's primaries, each
                        doc[str(db)]["nodes"] = [list(n) for n in watch.base.nodes]
        return doc

    def sweep(self, open_parts: dict[tuple[int, bytes], bytes]) -> int:
        """Delete temporary keys of part sequences that can no longer complete (on a drained
        log): those of ``open_parts`` and any other untouched for a while. Returns how many."""
        ours: dict[int, set[bytes]] = {}
        for (db, _), tmp in open_parts.items():
            ours.setdefault(db, set()).add(tmp)
        deleted = 0
        for k, watch in self.watches.items():
            mine = set().union(*(ours.get(db, set()) for db in self.dbs.get(k, ())))
            try:
                deleted += sweep_temp_keys(watch.client, mine)
            except redis.RedisError as e:
                log.warning("could not clean temporary keys on the target: %s", e)
        return deleted
