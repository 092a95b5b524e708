"""conveyor.cluster's pure parts (slot tags, ranges, routing keys); the batches against real
clusters are in test_cluster_core_live.py."""
from __future__ import annotations

from redis.crc import key_slot

from conveyor import cluster


def test_a_slot_tag_puts_any_key_into_its_slot():
    for slot in (0, 1, 866, 5460, 5461, 10922, 16383):
        tag = cluster.slot_tag(slot)
        assert tag.startswith(b"{") and tag.endswith(b"}")
        for rest in (b"", b"conveyor:tmp:abc", b"{other}x"):
            assert key_slot(tag + rest) == slot


def test_every_slot_has_a_distinct_short_tag():
    tags = {cluster.slot_tag(s) for s in range(cluster.SLOTS)}
    assert len(tags) == cluster.SLOTS
    assert max(len(t) for t in tags) <= 8


def test_slot_ranges_are_inclusive_and_merged():
    assert cluster.slot_ranges([7, 1, 2, 3, 3]) == [(1, 3), (7, 7)]
    assert cluster.slot_ranges([]) == []
    assert cluster.slot_ranges(range(100, 200)) == [(100, 199)]


def test_hot_path_commands_are_routed_by_their_key():
    assert cluster.key_of((b"DUMP", b"k")) == b"k"
    assert cluster.key_of(("RESTORE", b"k", 0, b"x", "REPLACE")) == b"k"
    assert cluster.key_of((b"MEMORY", b"USAGE", b"k")) == b"k"
    assert cluster.key_of((b"EVALSHA", b"abc", 1, b"k")) is None     # redis-py's parser decides
