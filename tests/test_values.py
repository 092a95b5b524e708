"""Unit tests of the pure logic behind type-based writes and parts (no server needed)."""
from __future__ import annotations

import click
import pytest
from redis.crc import key_slot

from conveyor.apply.writes import temp_key
from conveyor.capture.splitting import cuts_of
from conveyor import values
from conveyor.cli import ByteSize


def test_overwrite_builds_in_a_temporary_key_and_expires_after_the_rename():
    v = values.value("HASH", [b"f1", b"v1", b"f2", b"v2"])
    w = values.write_commands(b"k", v, into=b"tmp", expire_at_ms=123)
    assert w.commands == [("DEL", b"tmp"), ("HSET", b"tmp", b"f1", b"v1", b"f2", b"v2"),
                          ("RENAME", b"tmp", b"k"), ("PEXPIREAT", b"k", 123)]


def test_merge_writes_into_the_key_and_persists_it():
    w = values.write_commands(b"k", values.value("SET", [b"a"]), into=None, expire_at_ms=None)
    assert w.commands == [("SADD", b"k", b"a"), ("PERSIST", b"k")]


def test_commands_stay_under_the_argument_limit_and_hash_pairs_are_never_split():
    items = [b"x%d" % i for i in range(2 * values.ARGS_PER_COMMAND + 2)]
    cmds: list = []
    values.add_value(cmds, set(), b"d", values.value("HASH", items))
    assert all(len(c) - 2 <= values.ARGS_PER_COMMAND and (len(c) - 2) % 2 == 0 for c in cmds)
    assert [a for c in cmds for a in c[2:]] == items


def test_scores_round_trip_exactly():
    for s in (0.1 + 0.2, 5e-324, -1e308, 1 / 3, float("inf"), float("-inf")):
        assert float(values.score_arg(s)) == s


def test_dropped_stream_ids_create_each_group_after_the_entries_it_had_read():
    s = values.stream_doc([(b"1-0", [b"a", b"1"]), (b"2-0", [b"a", b"2"]), (b"3-0", [b"a", b"3"])],
                          b"3-0", 3, None,
                          [values.group_doc(b"none", b"0-0"), values.group_doc(b"two", b"2-0"),
                           values.group_doc(b"all", b"3-0")])
    cmds: list = []
    values.add_value(cmds, set(), b"d", values.value("STREAM", stream=s), stream_ids="drop")
    order = [(c[0], c[3] if c[0] == "XGROUP" else None) for c in cmds]
    assert order == [("XGROUP", b"none"), ("XADD", None), ("XADD", None), ("XGROUP", b"two"),
                     ("XADD", None), ("XGROUP", b"all")]
    assert cmds[0][4] == "0" and cmds[3][4] == "$" and cmds[5][4] == "$"


def test_kept_stream_ids_set_the_last_id_and_7_0_metadata_only_on_7_0():
    s = values.stream_doc([(b"5-1", [b"f", b"v"])], b"9-0", 7, b"4-0",
                          [values.group_doc(b"g", b"5-1", entries_read=1)])
    for v7, setid, create in ((True, ("XSETID", b"d", b"9-0", "ENTRIESADDED", 7, "MAXDELETEDID", b"4-0"),
                               ("XGROUP", "CREATE", b"d", b"g", b"5-1", "ENTRIESREAD", 1)),
                              (False, ("XSETID", b"d", b"9-0"), ("XGROUP", "CREATE", b"d", b"g", b"5-1"))):
        cmds: list = []
        values.add_value(cmds, set(), b"d", values.value("STREAM", stream=s), v7=v7)
        assert cmds == [("XADD", b"d", b"5-1", b"f", b"v"), setid, create]


def test_cuts_respect_the_limit_with_at_least_one_element_each():
    assert cuts_of([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]
    assert cuts_of([50, 1, 1], 10) == [(0, 1), (1, 3)]          # an element above the limit alone
    assert cuts_of([], 10) == [(0, 0)]


def test_temporary_keys_share_the_slot_of_their_key():
    for key in (b"plain", b"{tag}rest", b"a{}b", b"\xff\x00binary", b"x}y{z}"):
        assert key_slot(temp_key(key, b"id")) == key_slot(key), key


@pytest.mark.parametrize("text, size", [("1048576", 1048576), ("512KiB", 524288), ("64MB", 64 << 20),
                                        ("1.5g", 3 << 29), ("0", 0)])
def test_sizes_parse_with_units(text, size):
    assert ByteSize().convert(text, None, None) == size


def test_a_size_without_a_number_is_refused():
    with pytest.raises(click.BadParameter):
        ByteSize().convert("lots", None, None)
