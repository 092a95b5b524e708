"""Pure logic, no server: codec, key filters and rewriting, URI masking and validation."""
from __future__ import annotations

import pytest
from redis.crc import key_slot

from conveyor.endpoints import mask_text, mask_uri, uri_db, validate_redis_uri
from conveyor.errors import CodecError, ConfigError
from conveyor.events import Codec, Event, Kind
from conveyor.keys import KeyFilter, KeyRewriter, glob_to_regex, parse_slots
from conveyor.log import split_uri


# -- codec -------------------------------------------------------------------------------------------
def test_codec_round_trips_binary_keys_and_payloads():
    c = Codec()
    ev = Event(Kind.UPSERT, 3, b"\x00\xff\r\nkey", bytes(range(256)), 1_900_000_000_000, 5, "cap", 9)
    assert c.decode(c.encode(ev)) == ev


def test_codec_round_trips_markers_with_counts_and_info():
    c = Codec()
    ev = Event(Kind.SNAPSHOT_BEGIN, 0, capture_id="x", seq=1, count=42, info={"source_version": "7.0"})
    assert c.decode(c.encode(ev)) == ev


def test_record_is_tagged_with_the_schema_fingerprint():
    c = Codec()
    data = c.encode(Event(Kind.DELETE, 0, b"k"))
    assert data[:2] == b"\xc3\x01" and data[2:10] == c.fingerprint


@pytest.mark.parametrize("bad", [b"", b"junk", b"\xc3\x01" + b"\x00" * 8 + b"x",
                                 b"\xc3\x01" + Codec().fingerprint + b"\xff\xff\xff"])
def test_corrupt_records_raise_codec_error(bad):
    with pytest.raises(CodecError):
        Codec().decode(bad)


def test_truncated_record_raises_codec_error():
    c = Codec()
    data = c.encode(Event(Kind.UPSERT, 0, b"key", b"payload" * 10, None, 1, "c", 1))
    with pytest.raises(CodecError):
        c.decode(data[:-20])


def test_record_key_is_db_plus_key():
    assert Event(Kind.UPSERT, 2, b"a:b").record_key() == b"2:a:b"


def test_expired_compares_absolute_expiry_with_now():
    assert Event(Kind.UPSERT, 0, b"k", expire_at_ms=1000).expired(now_ms=1000)
    assert not Event(Kind.UPSERT, 0, b"k", expire_at_ms=1001).expired(now_ms=1000)
    assert not Event(Kind.UPSERT, 0, b"k").expired(now_ms=10**15)


# -- filters and rewriting ---------------------------------------------------------------------------
@pytest.mark.parametrize("glob,key,hit", [
    (b"user:*", b"user:1", True), (b"user:*", b"users", False), (b"h?llo", b"hallo", True),
    (b"h[ae]llo", b"hillo", False), (b"h[^e]llo", b"hallo", True), (b"h[^e]llo", b"hello", False),
    (b"a\\*b", b"a*b", True), (b"a\\*b", b"axb", False), (b"*", b"\x00\xff", True),
])
def test_glob_follows_redis_semantics(glob, key, hit):
    assert bool(glob_to_regex(glob).match(key)) is hit


def test_slots_parse_and_select_keys_by_hash_slot():
    assert parse_slots(["0-100,200", "300-400"]) == [(0, 100), (200, 200), (300, 400)]
    f = KeyFilter(slots=parse_slots(["0-8000"]))
    keys = [f"k{i}".encode() for i in range(200)]
    assert f.select(keys) == [k for k in keys if key_slot(k) <= 8000]


@pytest.mark.parametrize("spec", ["8000-0", "0-16384", "a-b", ""])
def test_bad_slot_ranges_are_config_errors(spec):
    with pytest.raises(ConfigError):
        parse_slots([spec])


def test_include_and_exclude_regexes():
    f = KeyFilter(include=["^user:", "^acct:"], exclude=[r":tmp$"])
    assert f.select([b"user:1", b"acct:2", b"other", b"user:tmp"]) == [b"user:1", b"acct:2"]


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError):
        KeyFilter(include=["("])


def test_rewriter_applies_substitutions_then_prefix_and_inverts_a_prefix():
    assert KeyRewriter("new:", [("^old:", "")])(b"old:k") == b"new:k"
    r = KeyRewriter("p:")
    assert r.invertible and r.inverse(b"p:x") == b"x" and r.inverse(b"q:x") is None
    assert KeyRewriter().identity


# -- endpoints and URIs -------------------------------------------------------------------------------
def test_passwords_are_masked_in_uris_and_text():
    assert mask_uri("redis://user:s3cret@h:6379/1") == "redis://user:***@h:6379/1"
    assert "s3cret" not in mask_text("cannot reach redis://:s3cret@h:1 (s3cret)", ("s3cret",))


@pytest.mark.parametrize("uri", ["http://h:1", "redis://h:99999", "redis:///0", "redis://h:1/x"])
def test_bad_redis_uris_are_config_errors(uri):
    with pytest.raises(ConfigError):
        validate_redis_uri(uri, "source")


def test_uri_db():
    assert uri_db("redis://h:1/3") == 3 and uri_db("redis://h:1") is None


def test_log_uris_dispatch_and_merge_query_options():
    scheme, base, opts = split_uri("kafka://a:1,b:2/topic?partitions=6", {"acks": "all"})
    assert (scheme, base, opts) == ("kafka", "kafka://a:1,b:2/topic", {"partitions": "6", "acks": "all"})
    with pytest.raises(ConfigError):
        split_uri("s3://bucket/x")


# -- dirty-key set (live capture) ------------------------------------------------------------------
def test_a_key_already_waiting_is_not_queued_twice():
    from conveyor.capture.notifications import DirtySet

    d = DirtySet(limit=10)
    for k in (b"a", b"b", b"a", b"a", b"c", b"b"):
        assert d.add(k)
    assert len(d) == 3 and d.marked == 6
    assert d.take(2) == [b"a", b"b"]          # first marked, first read
    assert d.add(b"a")                        # read since: a new change queues it again
    assert d.take(10) == [b"c", b"a"] and len(d) == 0


def test_a_full_dirty_set_refuses_new_keys_but_not_waiting_ones():
    from conveyor.capture.notifications import DirtySet

    d = DirtySet(limit=2)
    assert d.add(b"a") and d.add(b"b")
    assert d.add(b"a")                        # already waiting: no room needed
    assert not d.add(b"c")                    # full: the caller turns this into a gap
    assert d.clear() == 2 and d.add(b"c")


def test_global_options_after_the_command_move_before_it():
    from conveyor.cli import hoist_global_options as hoist
    # the value of a group option before the command is no command name
    assert hoist(["--log-format", "json", "verify", "--source", "x", "-v"]) == \
        ["--log-format", "json", "-v", "verify", "--source", "x"]
    assert hoist(["verify", "--source", "x", "--log-format", "json", "-vv"]) == \
        ["--log-format", "json", "-vv", "verify", "--source", "x"]
    assert hoist(["--log-format=json", "status", "d"]) == ["--log-format=json", "status", "d"]
    # nothing after "--" moves
    assert hoist(["apply", "--", "-v"]) == ["apply", "--", "-v"]


def test_kafka_removals_tell_deletions_from_cleanup():
    from conveyor.log.kafka import Removals, removal_window
    assert removal_window({"cleanup.policy": "compact"}) == float("inf")
    assert removal_window({"cleanup.policy": "delete", "retention.ms": "60000",
                           "retention.bytes": "-1"}) == 60.0
    # size-based retention may remove young records: no check then
    assert removal_window({"cleanup.policy": "delete", "retention.ms": "60000",
                           "retention.bytes": "1000000"}) is None
    r = Removals(float("inf"))
    r.observe({0: 10, 1: 0})
    assert r.check({0: 10, 1: 0}) == ""                 # up to the end seen: not provably young
    assert "partition 0 starts at offset 11, past its end 10" in r.check({0: 11, 1: 0})
    old = Removals(0.0)                                 # every observation is older than the window
    old.observe({0: 10})
    assert old.check({0: 50}) == ""


def test_merged_capture_stats_sum_every_count_of_every_database():
    from dataclasses import fields

    from conveyor.capture.databases import merged
    from conveyor.capture.stats import CaptureStats
    a, b = CaptureStats(), CaptureStats()
    counters = [f.name for f in fields(CaptureStats) if f.type in ("int", int)]
    read_counters = [f.name for f in fields(type(a.reads)) if f.type in ("int", int)]
    for i, name in enumerate(counters):
        setattr(a, name, i + 1)
        setattr(b, name, 100 * (i + 1))
    for i, name in enumerate(read_counters):
        setattr(a.reads, name, i + 1)
        setattr(b.reads, name, 1000 * (i + 1))
    out = merged({0: a, 3: b}, "live")
    assert counters and read_counters
    assert {n: getattr(out, n) for n in counters} == {n: 101 * (i + 1) for i, n in enumerate(counters)}
    assert {n: getattr(out.reads, n) for n in read_counters} == \
        {n: 1001 * (i + 1) for i, n in enumerate(read_counters)}


def test_log_durations_are_read_one_way_by_every_backend():
    from conveyor.errors import ConfigError
    from conveyor.log.file.options import duration
    from conveyor.log.options import duration_s
    from conveyor.log.streams.base import duration_ms
    assert duration_s("1.5d", "retention") == 1.5 * 86400 and duration_s("90", "x") == 90
    assert duration("7d") == 7 * 86400 and duration_ms("1.5h") == 5_400_000
    for bad in ("7w", "-1d", "1e3s", "7D", ""):
        for parse in (duration, duration_ms, lambda t: duration_s(t, "compact_after")):
            with pytest.raises(ConfigError, match="expected a number with s, m, h or d"):
                parse(bad)
