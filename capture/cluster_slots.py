"""The slots of a cluster capture: scan legs (one node's SCAN, with the checkpoint's form), slot
ranges as text, topology moves described in one line each, and the key filter of ``--node``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from redis.cluster import RedisCluster

from conveyor import cluster
from conveyor.capture.cluster_source import node_slots
from conveyor.capture.notifications import check_notifications
from conveyor.errors import ConfigError
from conveyor.progress import echo

MAX_NAMED_RANGES = 8


@dataclass
class Leg:
    primary: str                  # whose keys: the primary (host:port) that owned them
    node: str                     # the node scanned: that primary or its replica
    slots: list[tuple[int, int]] | None = None   # only these slots (None: all of the capture's)
    cursor: int = 0
    run_id: str = ""              # of ``node`` when the leg began (a cursor is per server run)

    def __post_init__(self) -> None:
        self.slots = [tuple(r) for r in self.slots] if self.slots is not None else None
        self.slot_set = (frozenset(s for lo, hi in self.slots for s in range(lo, hi + 1))
                         if self.slots is not None else None)

    def doc(self) -> dict:
        d = asdict(self)
        d.pop("slot_set", None)
        return d


def ranges_text(slots) -> str:
    rs = cluster.slot_ranges(slots)
    parts = [f"{a}-{b}" if a != b else str(a) for a, b in rs[:MAX_NAMED_RANGES]]
    more = f" and {len(rs) - MAX_NAMED_RANGES} more ranges" if len(rs) > MAX_NAMED_RANGES else ""
    return ",".join(parts) + more


def describe(moves: dict[tuple[str | None, str], set[int]], primaries: set[str],
             owned_before: dict[str, set[int]]) -> list[str]:
    """One line per (old owner -> new owner) move of slots."""
    lines = []
    for (old, new), slots in sorted(moves.items(), key=lambda kv: min(kv[1])):
        if old is None:
            lines.append(f"topology changed: slots {ranges_text(slots)} now served by {new}")
        elif old not in primaries and slots == owned_before.get(old):
            lines.append(f"failover: {new} replaced {old} (slots {ranges_text(slots)})")
        else:
            lines.append(f"topology changed: slots {ranges_text(slots)} moved from {old} to {new}")
    return lines



def prepare(client: RedisCluster, key_filter, nodes: list[str], mode: str, enable: bool):
    """The key filter of a cluster capture (``--node``: the slots those primaries serve now, unless
    --key-slots gives them) and, in live modes, notifications checked on every primary involved
    (a primary lacking them is one line naming it)."""
    if nodes and key_filter.slots:
        raise ConfigError("--node and --key-slots: give one (--node captures the slots its "
                          "primaries serve, --key-slots names slots)")
    if nodes:
        key_filter = replace(key_filter, slots=node_slots(client, nodes))
    if mode != "snapshot":
        ranges = key_filter.slots or [(0, cluster.SLOTS - 1)]
        want = {s for lo, hi in ranges for s in range(lo, hi + 1)}
        for name in sorted({n for s, n in cluster.topology(client).items() if s in want}):
            node = client.get_node(node_name=name)
            warning = check_notifications(cluster.node_client(client, node), enable=enable,
                                          where=f"source node {name}")
            if warning:
                echo(f"capture: warning: {warning}")
    return key_filter
