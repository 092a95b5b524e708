"""Capture from a Redis Cluster: every primary scanned, every primary subscribed, the topology watched.

The scan is a list of legs, one per primary (or per primary whose slots must be scanned again): a
leg SCANs one node (the primary, or with ``--read-from replica`` its replica) and keeps the keys of
the capture's slots. The checkpoint keeps every leg's cursor, the node it belongs to and that
node's run_id, and the slot table: a restarted capture resumes each leg whose node is still there
unchanged and rescans, on their current owner, only the slots whose owner changed meanwhile.

Keys are read through the cluster client (capture/cluster_source.py): MOVED and ASK are followed,
so a key read while its slot migrates is read where it is.

The topology is read again after each leg and, in live modes, about once a second. Slots that
changed owner (a failover, a reshard, a node added or removed) are a gap: the new primaries are
subscribed to, and those slots are scanned again on their new owner. A primary restarted (a new
run_id) or flushed (FLUSHALL/FLUSHDB counters, per node) is a gap of that primary's slots.
"""
from __future__ import annotations

import logging
import time

import redis
from redis.cluster import RedisCluster

from conveyor.capture.cluster_notes import NotificationsGroup
from conveyor.capture.cluster_source import ClusterStateReader
from conveyor.capture.notifications import check_notifications
from conveyor.capture.cluster_slots import Leg, describe, ranges_text
from conveyor.capture.process import WATCH_INTERVAL_S, Capture
from conveyor.capture.watch import SourceWatch, read_facts
from conveyor import cluster
from conveyor.progress import echo

log = logging.getLogger("conveyor.capture")

BARRIER_TIMEOUT_S = 30.0      # live + replica: how long a scan waits for the replica to catch up


class ClusterCapture(Capture):
    reader_cls = ClusterStateReader

    def __init__(self, *, read_from: str = "primary", **kw) -> None:
        super().__init__(**kw)
        self.cl: RedisCluster = self.source
        # The ACL user named when a permission is refused (a cluster client has no single pool).
        self.sup.user = self.cl.nodes_manager.connection_kwargs.get("username") or None
        self.read_from = read_from
        ranges = self.filter.slots or [(0, cluster.SLOTS - 1)]
        self.slots = {s for lo, hi in ranges for s in range(lo, hi + 1)}
        self._topo = self._topology()
        self._legs: list[Leg] = []
        self._scan_slots: set[int] | None = None   # the slots the scan in progress covers
        self._migrations_seen: set[tuple[int, str]] = set()
        self._resync_pending: set[int] | None = set()
        self._node_watch: dict[str, SourceWatch] = {}
        self._facts_refused = False
        self._no_replica_warned: set[str] = set()
        self.topology_changes = 0

    # -- the cluster as it is now ------------------------------------------------------------------
    def _topology(self) -> dict[int, str]:
        return {s: n for s, n in cluster.topology(self.cl).items() if s in self.slots}

    def _primaries(self) -> list[str]:
        """Primaries serving slots of this capture, by name."""
        return sorted(set(self._topo.values()))

    def _owned(self, topo: dict[int, str] | None = None) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for s, n in (self._topo if topo is None else topo).items():
            out.setdefault(n, set()).add(s)
        return out

    def _slots_of(self, name: str) -> set[int]:
        return self._owned().get(name, set())

    def _client(self, name: str) -> redis.Redis:
        node = self.cl.get_node(node_name=name)
        if node is None:
            raise redis.ConnectionError(f"node {name} is no longer part of the cluster")
        return cluster.node_client(self.cl, node)

    def _serving(self) -> set[str]:
        """Every node that holds slots of this capture: primaries and their replicas."""
        names = set()
        for s in self.slots:
            for n in self.cl.nodes_manager.slots_cache.get(s, ()):
                names.add(n.name)
        return names

    def _node_run_id(self, name: str) -> str:
        return str(self._client(name).info("server").get("run_id", ""))

    def dbsize(self) -> int:
        return self.read(lambda: sum(self._client(n).dbsize() for n in self._primaries()),
                          "DBSIZE of every primary")

    def run_id(self) -> str:
        return ""                            # per leg (Leg.run_id)

    def restart_scan_if_source_restarted(self) -> bool:
        return False                         # per leg, when it ends

    # -- legs --------------------------------------------------------------------------------------
    def _scan_node(self, primary: str) -> str:
        if self.read_from != "replica":
            return primary
        node = self.cl.get_node(node_name=primary)
        replica = cluster.replica_of(self.cl, node) if node is not None else None
        if replica is None:
            if primary not in self._no_replica_warned:
                self._no_replica_warned.add(primary)
                echo(f"capture: warning: --read-from replica: the shard of primary {primary} has "
                     "no replica; reading it from the primary")
            return primary
        return replica.name

    def _leg(self, primary: str, slots: set[int] | None) -> Leg:
        node = self._scan_node(primary)
        run_id = self.read(lambda: self._node_run_id(node), f"INFO server of {node}")
        return Leg(primary, node, cluster.slot_ranges(slots) if slots is not None else None,
                   0, run_id)

    def _legs_for(self, slots: set[int] | None) -> list[Leg]:
        """Legs covering ``slots`` (None: every slot of the capture, one whole-node leg each)."""
        owned = self._owned()
        if slots is None:
            return [self._leg(p, None) for p in sorted(owned)]
        return [self._leg(p, mine & slots) for p, mine in sorted(owned.items()) if mine & slots]

    def new_scan(self, slots: set[int] | None = None) -> None:
        self._migrations_seen: set[tuple[int, str]] = set()
        self._scan_slots = set(slots) if slots is not None else None
        self._legs = self._legs_for(slots)
        self.cursor = 0

    def scan_step(self) -> None:
        """Scanned keys are read where they were scanned (a replica with --read-from replica);
        changed keys are read from primaries (a replica may not have applied the change yet)."""
        self.reader.source.replica = self.read_from == "replica"
        try:
            super().scan_step()
        finally:
            self.reader.source.replica = False

    def scan_page(self, cursor: int) -> tuple[int, list[bytes]]:
        while self._legs:
            leg = self._legs[0]
            try:
                if self.mode != "snapshot" and leg.node != leg.primary:
                    self._barrier(leg)
                nxt, keys = self._client(leg.node).scan(leg.cursor,
                                                        count=self.pacer.batch_for(self.scan_count),
                                                        **self.filter.scan_args())
            except (redis.ConnectionError, redis.TimeoutError):
                if not self._check_topology() and self._legs and self._legs[0] is leg:
                    raise                    # the node is still in the cluster: wait for it
                continue
            nxt = int(nxt)
            keys = self.filter.select(keys)
            if leg.slot_set is not None:
                keys = [k for k in keys if self.cl.keyslot(k) in leg.slot_set]
            else:
                keys = [k for k in keys if self.cl.keyslot(k) in self.slots]
            if nxt:
                leg.cursor = nxt
            else:
                self._leg_done(leg)
            # One SCAN call per step, keys or not: changed keys are read between steps.
            return (1 if self._legs else 0), keys
        return 0, []

    def _leg_done(self, leg: Leg) -> None:
        """A leg's SCAN ended: over, unless its node restarted meanwhile (then again)."""
        now = self.read(lambda: self._node_run_id(leg.node), f"INFO server of {leg.node}")
        if now != leg.run_id:
            log.warning("source node %s restarted during the scan (run_id %s -> %s): scanning its "
                        "keys again", leg.node, leg.run_id[:12], now[:12])
            self.stats.rescans += 1
            leg.cursor, leg.run_id = 0, now
            return
        self._legs.remove(leg)
        self._check_topology()
        if not self._legs:
            self._legs += self._migration_legs()

    def _migration_legs(self) -> list[Leg]:
        """The scan is ending while slots are migrating: a key moved to the importing node after
        that node was scanned was seen by neither, so those slots are scanned there once more
        (once per slot and node in a scan)."""
        wanted: dict[str, set[int]] = {}
        for name in self._primaries():
            try:
                nodes = self._client(name).execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue                     # a failing node: the topology watch follows it
            by_id = {d["node_id"]: addr for addr, d in nodes.items()}
            me = next((d for d in nodes.values() if "myself" in d["flags"]), None)
            for m in (me or {}).get("migrations", []):
                slot, dst = int(m["slot"]), by_id.get(m["node_id"])
                if m["state"] == "migrating" and dst and slot in self.slots \
                        and (slot, dst) not in self._migrations_seen:
                    self._migrations_seen.add((slot, dst))
                    wanted.setdefault(dst, set()).add(slot)
        for dst, slots in wanted.items():
            log.warning("slots %s are migrating to %s: scanning them there too", ranges_text(slots),
                        dst)
        return [self._leg(dst, slots) for dst, slots in sorted(wanted.items())]

    def _barrier(self, leg: Leg) -> None:
        """Live modes reading a replica: a change already read from the primary (after its
        notification) must not be overwritten by the replica's older value. Wait until the
        replica has applied everything the primary had done when this scan batch starts."""
        target = int(self._client(leg.primary).info("replication").get("master_repl_offset", 0))
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while True:
            info = self._client(leg.node).info("replication")
            if int(info.get("slave_repl_offset", info.get("master_repl_offset", 0))) >= target:
                return
            if time.monotonic() > deadline:
                raise redis.TimeoutError(f"replica {leg.node} is more than {BARRIER_TIMEOUT_S:.0f}s "
                                         f"behind its primary {leg.primary}")
            time.sleep(0.01)

    # -- topology ----------------------------------------------------------------------------------
    def _check_topology(self) -> bool:
        """Read the slot table again; slots that changed owner are reported (a gap in live modes)
        and scanned again on their new owner. True when something changed."""
        cluster.refresh(self.cl)
        new = self._topology()
        moves: dict[tuple[str | None, str], set[int]] = {}
        for s, owner in new.items():
            old = self._topo.get(s)
            if owner != old:
                moves.setdefault((old, owner), set()).add(s)
        owned_before = self._owned()
        if not moves:
            again = self._drop_dead_legs(owned_before)
            self._legs += self._legs_for(again) if again else []
            return bool(again)
        self._topo = {**self._topo, **new}   # an uncovered slot keeps its last owner for now
        self.topology_changes += 1
        moved = set().union(*moves.values())
        lines = describe(moves, set(new.values()), owned_before)
        for line in lines:
            log.warning("%s", line)
        again = self._drop_dead_legs(owned_before)
        if self.cursor is not None:
            self._legs += self._legs_for(moved | again)   # this scan covers them where they are
            if self._scan_slots is not None:
                self._scan_slots |= moved | again
        if self.mode != "snapshot" and self.notes is not None:
            self._resubscribe()
            for line in lines:
                self.gap(line, moved)
        else:
            self.stats.gaps.extend(lines)
        return True

    def _drop_dead_legs(self, owned: dict[str, set[int]]) -> set[int]:
        """Legs scanning a node that no longer serves the capture's slots are dropped; returns
        their slots (``owned``: what each primary served when the leg began), to scan on their
        owners now."""
        serving = self._serving()
        again: set[int] = set()
        for leg in [leg for leg in self._legs if leg.node not in serving]:
            self._legs.remove(leg)
            slots = set(leg.slot_set) if leg.slot_set is not None else owned.get(leg.primary, set())
            log.warning("source node %s no longer serves slots %s: scanning them on their current "
                        "owner", leg.node, ranges_text(slots) if slots else "-")
            again |= slots
        return again

    def _resubscribe(self) -> None:
        wanted = self._primaries()
        for name in wanted:
            if name not in self.notes.members:
                self._check_notifications(name)
        added, removed = self.notes.update(wanted)
        if added or removed:
            log.warning("keyspace notifications: subscribed to %s%s", ", ".join(added) or "-",
                        f"; dropped {', '.join(removed)}" if removed else "")

    def _check_notifications(self, name: str) -> None:
        warning = self.read(lambda: check_notifications(self._client(name),
                                                         enable=self.enable_notifications,
                                                         where=f"source node {name}"),
                             f"CONFIG GET notify-keyspace-events on {name}")
        if warning:
            log.warning("%s", warning)

    # -- live modes --------------------------------------------------------------------------------
    def _subscriber(self, name: str) -> redis.Redis:
        """A client of its own for a node's subscription: the cluster client's node pools are
        renewed by topology refreshes, which would drop (and silently redo) the subscription."""
        pool = self._client(name).connection_pool
        kw = dict(pool.connection_kwargs)
        kw.pop("redis_connect_func", None)
        return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kw))

    def subscribe(self) -> NotificationsGroup:
        group = NotificationsGroup(connect=self._subscriber, db=self.info.db, dirty=self.dirty,
                                   key_filter=self.filter,
                                   on_gap=lambda name, why: self.gap(why, self._slots_of(name)))
        self.notes = group
        try:
            group.update(self._primaries())
        except BaseException:
            group.stop()
            raise
        return group

    def gap(self, why: str, slots: set[int] | None = None) -> None:
        with self.gap_lock:
            if slots is None or self._resync_pending is None:
                self._resync_pending = None
            else:
                self._resync_pending |= slots
        super().gap(why)

    def resync_slots(self) -> set[int] | None:
        with self.gap_lock:
            pending, self._resync_pending = self._resync_pending, set()
        return pending or None

    def in_scope(self):
        """A resync of some slots did not see the ledger's keys of the others: not deleted."""
        slots, keyslot = self._scan_slots, self.cl.keyslot
        return None if slots is None else (lambda k: keyslot(k) in slots)

    def start_watch(self) -> None:
        self._node_watch = {}
        self._watch_nodes()

    def watch_source(self) -> None:
        self.next_watch = time.monotonic() + WATCH_INTERVAL_S
        self._check_topology()
        self._watch_nodes()

    def _watch_nodes(self) -> None:
        """Per primary: a restart or FLUSHALL/FLUSHDB since the last look is a gap of its slots."""
        if self._facts_refused:
            return
        for name in self._primaries():
            try:
                facts = read_facts(self._client(name), self.info.version)
            except (redis.ConnectionError, redis.TimeoutError):
                continue                     # a failing node: the topology watch follows it
            except redis.ResponseError as e:
                self._facts_refused = True
                log.warning("INFO refused on source node %s (%s): restarts and FLUSHALL/FLUSHDB "
                            "of a primary cannot be detected in this run", name, e)
                return
            w = self._node_watch.get(name)
            if w is None:
                self._node_watch[name] = SourceWatch(facts)
                continue
            restarted = facts.run_id != w.last.run_id
            for why in w.changes(facts):
                self.gap(f"node {name}: {why}", self._slots_of(name))
            if restarted:
                self._check_notifications(name)

    # -- checkpoints -------------------------------------------------------------------------------
    def scan_doc(self) -> dict:
        return {"legs": [leg.doc() for leg in self._legs],
                "topology": {n: cluster.slot_ranges(s) for n, s in self._owned().items()},
                "read_from": self.read_from}

    def resume_scan(self, cp: dict) -> None:
        """Each leg whose node is still there, unrestarted, resumes at its cursor; slots whose
        owner changed while no capture ran, and those of legs that cannot resume, are scanned on
        their current owner."""
        if "legs" not in cp:
            self.new_scan()
            return
        owned = {n: {s for lo, hi in rs for s in range(lo, hi + 1)}
                 for n, rs in cp.get("topology", {}).items()}
        before = {s: n for n, ss in owned.items() for s in ss}
        cluster.refresh(self.cl)
        self._topo = self._topology()
        moved = {s for s, n in self._topo.items() if before.get(s) != n}
        serving = self._serving()
        self._legs, stale = [], set(moved)
        for d in cp["legs"]:
            leg = Leg(**d)
            if leg.node in serving and self._safe_run_id(leg.node) == leg.run_id:
                self._legs.append(leg)
            else:
                stale |= set(leg.slot_set) if leg.slot_set is not None else owned.get(leg.primary, set())
        if stale:
            log.warning("the topology changed or nodes restarted since the checkpoint: scanning "
                        "slots %s again", ranges_text(stale))
            self._legs += self._legs_for(stale)
        self.cursor = 0
        log.info("resuming %d scan legs (%s)", len(self._legs),
                 ", ".join(f"{leg.node}@{leg.cursor}" for leg in self._legs))

    def _safe_run_id(self, name: str) -> str | None:
        try:
            return self._node_run_id(name)
        except redis.RedisError:
            return None
