"""Noticing a target Redis Cluster that lost data (see :mod:`apply.watch` for a single server).

A reading asks every primary (all at once) for its run_id, DBSIZE and expiry/eviction counters;
DBSIZE and the counters are summed over the cluster (a resharding moves keys between primaries,
never out of the cluster). What changed between two readings means:

- a primary (same host:port) with another run_id restarted: judged as a single server's restart;
- a primary whose slots another node now serves (a failover, or its slots moved away) lost
  nothing when the old node still runs with the same run_id (CLUSTER FAILOVER waits for its
  replica to catch up; a resharding migrates keys). When the old node is gone or restarted (it
  was killed, its replica took over), the writes it acknowledged just before may not have
  reached the replica: an uncertain finding, which replays the log when it can;
- the summed DBSIZE fell by more than apply's deletes, expiries and evictions: keys were lost
  (a primary flushed or restarted empty).

A batch routed to several nodes carries no reading of its own: one is taken right after it, from
every primary at once (the fewer writes between two readings, the smaller a loss that new keys
cannot hide). The slot table is reloaded for a reading at most every REFRESH_INTERVAL_S.
"""
from __future__ import annotations

import logging
import time

import redis
from redis.cluster import ClusterNode, RedisCluster

from conveyor.apply.watch import Finding, Reading, TargetWatch, fell_by, persistence_of
from conveyor import cluster, packed

log = logging.getLogger("conveyor.apply")

REFRESH_INTERVAL_S = 1.0
PERSISTENCE_ORDER = ("none", "always", "unknown", "some")


class ClusterWatch(TargetWatch):
    def __init__(self, client: RedisCluster) -> None:
        super().__init__(client)
        self._refreshed = 0.0

    def queue(self, pipe) -> bool:
        return False                    # a batch goes to several nodes: read apart

    def read(self) -> Reading:
        if time.monotonic() - self._refreshed >= REFRESH_INTERVAL_S:
            cluster.refresh(self.client)    # a failover or a resharding since the last reading
            self._refreshed = time.monotonic()
        nodes = cluster.primaries(self.client)
        cmds = [("INFO", "server"), ("INFO", "stats"), ("DBSIZE",)]
        replies = packed.run_on([(cluster.node_client(self.client, n), cmds) for n in nodes])
        readings = []
        for node, r in zip(nodes, replies):
            for x in r:
                if isinstance(x, Exception):
                    raise x
            readings.append((node.name, self.parse(r)))
        return Reading(",".join(sorted(r.run_id for _, r in readings)),
                       sum(r.dbsize for _, r in readings), sum(r.expired for _, r in readings),
                       sum(r.evicted for _, r in readings),
                       tuple(sorted((name, r.run_id) for name, r in readings)))

    def observe_later(self, removals: int, late_removals: int) -> Finding | None:
        self.carry += removals + late_removals
        return self.check()

    def _compare(self, now: Reading, removals: int) -> Finding | None:
        found = cluster_lost(self.base, now, removals, self._still_runs) \
            if self.base is not None else None
        if found and not found.certain and "restarted" in found.why:
            found = self.judge_restart(found)
        self.base = now
        return found

    def since_last_run(self, before: dict, group: str) -> Finding | None:
        """Judged as between two readings: a failover since the previous run is no loss."""
        if not before.get("nodes"):
            return super().since_last_run(before, group)
        then = Reading(str(before.get("run_id")), int(before.get("dbsize") or 0), 0, 0,
                       tuple((str(n), str(r)) for n, r in before["nodes"]))
        found = cluster_lost(then, self.base, 0, self._still_runs)
        if found is None:
            return None
        found = Finding(f"since the last apply of group {group!r}: {found.why}", found.certain)
        return self.judge_restart(found) if not found.certain and "restarted" in found.why \
            else found

    def _still_runs(self, name: str, run_id: str) -> bool:
        """Whether the node ``name`` (host:port) still runs as the process ``run_id``."""
        host, _, port = name.rpartition(":")
        node = ClusterNode(host, int(port))
        try:
            self.client.nodes_manager.create_redis_connections([node])
            conn = node.redis_connection
            try:
                return str(conn.info("server").get("run_id", "")) == run_id
            finally:
                conn.close()
        except (redis.RedisError, OSError):
            return False

    def _persistence(self) -> str:
        """What every primary keeps: the weakest of theirs."""
        found = {persistence_of(n) for n in cluster.primary_clients(self.client)}
        return max(found, key=PERSISTENCE_ORDER.index) if found else "unknown"


def cluster_lost(before: Reading, now: Reading, removals: int, still_runs) -> Finding | None:
    """What two readings of a cluster say was lost (see the module's docstring)."""
    fell, allowed = fell_by(before, now, removals)
    ids = dict(now.nodes)
    sizes = f"{now.dbsize} keys, {before.dbsize} before, {allowed} removals allowed"
    restarted = [(n, r) for n, r in before.nodes if n in ids and ids[n] != r]
    if restarted:
        n, r = restarted[0]
        why = f"primary {n} of the target cluster restarted (run_id {r[:8]} -> {ids[n][:8]})"
        if fell:
            return Finding(f"{why} and the cluster holds {sizes}", True)
        return Finding(f"{why} and kept its keys (the cluster holds {sizes}), but writes "
                       "acknowledged just before it stopped may be missing", False)
    failed = [n for n, r in before.nodes if n not in ids and not still_runs(n, r)]
    if failed:
        why = (f"primary {failed[0]} of the target cluster failed and a replica took over its "
               "slots")
        if fell:
            return Finding(f"{why}; the cluster holds {sizes}", True)
        return Finding(f"{why}: writes it acknowledged just before it failed may not have reached "
                       "the replica", False)
    if fell:
        return Finding(f"the target cluster's DBSIZE fell ({sizes}): a primary was flushed or "
                       "lost keys", True)
    return None
