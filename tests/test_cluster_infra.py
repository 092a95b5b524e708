"""The cluster builder itself (tests/cluster.py): real clusters, facts read back from the servers."""
from __future__ import annotations

from collections import Counter

import pytest

N_SLOTS = 16384


def slot_owners(node) -> dict[int, int]:
    """slot -> port of its primary, from one node's CLUSTER SLOTS."""
    owners = {}
    for lo, hi, primary, *_ in node.client().execute_command("CLUSTER SLOTS"):
        for slot in range(lo, hi + 1):
            assert slot not in owners, f"slot {slot} listed twice"
            owners[slot] = primary[1]
    return owners


def assert_full_coverage(cluster) -> dict[int, int]:
    """Every live node reports all 16384 slots, each owned by a current primary, the same way."""
    views = [slot_owners(n) for n in cluster.live()]
    assert len(views[0]) == N_SLOTS
    assert all(v == views[0] for v in views)
    assert set(views[0].values()) <= {p.port for p in cluster.primaries()}
    return views[0]


def role(node) -> str:
    return node.client().info("replication")["role"]


def test_three_primaries_redis70_cover_every_slot_and_route_keys(cluster_factory):
    c = cluster_factory(3)
    owners = assert_full_coverage(c)
    assert Counter(owners.values()).keys() == {p.port for p in c.primaries()}
    assert len(c.primaries()) == 3 and c.replicas() == []
    client = c.client()
    for i in range(300):
        client.set(f"k{i}", i)
    # each key sits on the primary that owns its slot, read there with a plain connection
    for i in range(300):
        assert c.primary_of(f"k{i}").client().get(f"k{i}") == str(i).encode()
    assert sum(p.client().dbsize() for p in c.primaries()) == 300
