"""Event blocks: capture appends UPSERTs and DELETEs of whole DUMP payloads as one record per block
of one partition (columns, one fastavro call), apply decodes them and commits a block once the
target took all of it. Real CLI, real Redis servers and logs; outcomes checked with plain redis-py
reads (tests/compare.py) and by reading the log's records back here."""
from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from pathlib import Path

import pytest

from conveyor.events import (BLOCK_KEY, Codec, CodecError, Columns, Event, Kind, block_record_key,
                             block_size)
from conveyor.log import open_reader, open_writer
from tests import cli
from tests.compare import differences
from tests.datasets import load_mixed


def log_records(uri: str) -> list:
    """Every record the log hands out, read by a group of its own."""
    r = open_reader(uri, f"look-{uuid.uuid4().hex}", start="earliest")
    out = []
    try:
        while got := r.poll(10_000, 0.5):
            out += got
    finally:
        r.close()
    return out


def dead_letters(log_dir: Path) -> list[dict]:
    path = log_dir / "dead-letter.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# -- the codec ---------------------------------------------------------------------------------------
def test_a_block_decodes_to_its_events_in_order_next_to_per_event_records():
    codec, old = Codec(), Codec(("event.v1.avsc",))
    cols = Columns()
    cols.add(b"a", b"payload-a", None, 1_000)
    cols.add(b"gone", None, None, 900)                  # a DELETE
    cols.add(b"ttl", b"payload-t", 1_700_000_000_123, 1_100)
    block = codec.encode_block(3, "cap1", 41, cols)
    single = codec.encode(Event(Kind.UPSERT, 3, b"z", b"pz", None, 5, "cap1", 7))
    older = old.encode(Event(Kind.DELETE, 3, b"y", None, None, 5, "cap0", 2))

    got = codec.decode_many([block, single, older, block[:-4]])

    evs = got[0]
    assert [(e.kind, e.key, e.payload, e.expire_at_ms, e.seq) for e in evs] == [
        (Kind.UPSERT, b"a", b"payload-a", None, 41), (Kind.DELETE, b"gone", None, None, 42),
        (Kind.UPSERT, b"ttl", b"payload-t", 1_700_000_000_123, 43)]
    assert {(e.db, e.capture_id, e.read_time_ms) for e in evs} == {(3, "cap1", 900)}  # earliest
    assert got[1].key == b"z" and got[2].key == b"y" and got[2].kind is Kind.DELETE
    assert isinstance(got[3], CodecError) and "block" in str(got[3])
    assert codec.decode_all(block) == evs and codec.decode_all(single) == [got[1]]
    assert block_size(block_record_key(3, 3)) == 3 and block_size(b"3:a") is None


def test_a_block_whose_columns_disagree_is_undecodable():
    codec = Codec()
    cols = Columns()
    cols.add(b"a", b"p", None, 1)
    cols.payloads.append(b"extra")                      # one payload too many
    with pytest.raises(CodecError, match="unequal"):
        codec.decode_all(codec.encode_block(0, "c", 1, cols))
    cols = Columns()
    cols.add(b"a", b"p", None, 1)
    cols.deletes.append(5)                              # a DELETE past the end
    assert isinstance(codec.decode_many([codec.encode_block(0, "c", 1, cols)])[0], CodecError)


# -- capture writes blocks, apply reads them -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["file", "redis-3-partitions"])
def test_capture_appends_blocks_of_one_partition_and_apply_restores_every_key(redis_factory,
                                                                              tmp_path, backend):
    # given a source with strings, collections, expiring keys
    source, target = redis_factory(), redis_factory()
    n = load_mixed(source.client(), 5000)
    if backend == "file":
        uri, opts = f"file:{tmp_path / 'log'}", ()
    else:
        uri, opts = f"{redis_factory().url}/0?stream=b", ("--log-opt", "partitions=3")

    # when capture runs
    cli.run("capture", source.url, "--log", uri, *opts, check=True)

    # then the log holds blocks, far fewer records than keys, two markers around them
    recs = log_records(uri + ("&partitions=3" if opts else ""))
    blocks = [r for r in recs if BLOCK_KEY in r.key]
    codec = Codec()
    keys = [ev.key for r in blocks for ev in codec.decode_all(r.value)]
    assert sorted(keys) == sorted(source.client().keys("*")) and len(keys) == n
    assert len(recs) == len(blocks) + 2 and len(blocks) < n // 100
    for r in blocks:
        evs = codec.decode_all(r.value)
        assert block_size(r.key) == len(evs) <= 1000
        if opts:          # every key of a block belongs to the stream the block was appended to
            assert {f"b:{zlib.crc32(b'0:' + e.key) % 3}" for e in evs} == {r.partition}

    # when apply replays it
    cli.run("apply", target.url, "--log", uri, *opts, "--idle-timeout", "1", check=True)

    # then the target equals the source (values, types, expiries), and the log is drained
    assert differences(source.client(), target.client()) == []
    st = json.loads(cli.run("status", "--log", uri, *opts, "--json", check=True).stdout)
    assert st["lag"] == 0, st


def test_deletes_travel_in_blocks_and_a_live_capture_learns_keys_from_blocks(redis_factory,
                                                                             tmp_path):
    # given a snapshot captured (blocks) and applied
    source, target = redis_factory(), redis_factory()
    s = source.client()
    for i in range(3000):
        s.set(f"k:{i}", i)
    uri = f"file:{tmp_path / 'log'}"
    cli.run("capture", source.url, "--log", uri, check=True)
    # when keys are deleted while no capture runs, and a live capture starts afterwards
    s.delete(*[f"k:{i}" for i in range(0, 3000, 7)])
    p = cli.run("capture", source.url, "--log", uri, "--mode", "live", "--idle-timeout", "1",
                "--enable-notifications")
    assert p.returncode == 0, p.stdout + p.stderr
    cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1", check=True)

    # then the live capture knew those keys from the blocks and wrote their deletes (in blocks)
    codec = Codec()
    deletes = [e.key for r in log_records(uri) if BLOCK_KEY in r.key
               for e in codec.decode_all(r.value) if e.kind is Kind.DELETE]
    assert sorted(deletes) == sorted(b"k:%d" % i for i in range(0, 3000, 7))
    assert differences(s, target.client()) == []


def test_a_block_apply_cannot_decode_is_dead_lettered_once_naming_its_keys(redis_factory,
                                                                           tmp_path):
    # given a captured log followed by a block whose body is not Avro (its frame is intact)
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 2000)
    log_dir = tmp_path / "log"
    uri = f"file:{log_dir}"
    cli.run("capture", source.url, "--log", uri, check=True)
    good = Codec().encode_block(0, "c", 1, Columns())
    w = open_writer(uri)
    w.append(block_record_key(0, 7), good[:10] + b"\xff" * 40)
    w.close()

    # when apply replays the log
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")

    # then the block is one dead letter that says how many keys it held, the run fails, and every
    # key of the valid blocks arrived
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    (letter,) = dead_letters(log_dir)
    assert "undecodable block of 7 keys" in letter["reason"], letter
    assert "undecodable block of 7 keys" in p.stdout + p.stderr
    assert differences(source.client(), target.client()) == []


def test_a_key_of_a_block_the_target_refuses_is_dead_lettered_alone(redis_factory, tmp_path):
    # given a block with one DUMP payload no server takes (a wrong checksum) among good ones
    source, target = redis_factory(), redis_factory()
    s = source.client()
    for i in range(50):
        s.set(f"k:{i}", f"v{i}")
    cols = Columns()
    for i in range(50):
        payload = s.dump(f"k:{i}")
        cols.add(b"k:%d" % i, payload[:-1] + bytes([payload[-1] ^ 0xFF]) if i == 17 else payload,
                 None, 1)
    log_dir = tmp_path / "log"
    uri = f"file:{log_dir}"
    w = open_writer(uri)
    w.append(block_record_key(0, 50), Codec().encode_block(0, "c", 1, cols))
    w.close()

    # when apply replays it
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")

    # then only that key is missing and dead-lettered: the dead letter holds its event alone
    assert p.returncode != 0, p.stdout + p.stderr
    t = target.client()
    assert sorted(t.keys("*")) == sorted(b"k:%d" % i for i in range(50) if i != 17)
    (letter,) = dead_letters(log_dir)
    assert base64.b64decode(letter["key"]) == b"0:k:17"
    ev = Codec().decode(base64.b64decode(letter["value"]))
    assert ev.key == b"k:17" and ev.kind is Kind.UPSERT and "k:17" in letter["reason"]


def test_a_block_damaged_on_disk_loses_exactly_its_keys_and_says_how_many(redis_factory, tmp_path):
    # given a captured file log with a block in the middle of its segment damaged on disk
    source, target = redis_factory(), redis_factory()
    s = source.client()
    for i in range(5000):
        s.set(f"k:{i}", f"value-{i}")
    log_dir = tmp_path / "log"
    uri = f"file:{log_dir}"
    cli.run("capture", source.url, "--log", uri, check=True)
    recs = log_records(uri)
    blocks = [r for r in recs if BLOCK_KEY in r.key]
    victim = blocks[len(blocks) // 2]
    lost = {e.key for e in Codec().decode_all(victim.value)}
    seg = sorted(log_dir.glob("*.log"))[0]
    data = bytearray(seg.read_bytes())
    at = data.find(victim.value)
    data[at + len(victim.value) // 2] ^= 0xFF          # its CRC no longer matches
    seg.write_bytes(bytes(data))

    # when apply replays the log
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")

    # then it says the block and how many keys went with it, and every other key arrived
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert f"a block of {len(lost)} keys" in p.stderr, p.stderr
    t = target.client()
    assert set(t.keys("*")) == {k for k in s.keys("*") if k not in lost}
    assert len(lost) == block_size(victim.key) > 0


# -- Kafka: state records and blocks ---------------------------------------------------------------------------
def test_a_whole_state_record_round_trips_next_to_other_records():
    codec = Codec()
    recs = [codec.encode_state(2, b"a", b"payload-a", None, 10, "cap", 1),
            codec.encode_state(2, b"gone", None, None, 11, "cap", 2),
            codec.encode_state(2, b"ttl", b"payload-t", 1_700_000_000_123, 12, "cap", 3),
            codec.encode(Event(Kind.SNAPSHOT_END, 2, capture_id="cap", seq=4, count=2))]
    got = codec.decode_many(recs + [recs[0][:-3]])
    assert [(e.kind, e.db, e.key, e.payload, e.expire_at_ms, e.read_time_ms, e.seq)
            for e in got[:3]] == [
        (Kind.UPSERT, 2, b"a", b"payload-a", None, 10, 1), (Kind.DELETE, 2, b"gone", None, None, 11, 2),
        (Kind.UPSERT, 2, b"ttl", b"payload-t", 1_700_000_000_123, 12, 3)]
    assert got[3].kind is Kind.SNAPSHOT_END and isinstance(got[4], CodecError)
    assert codec.decode(recs[1]) == got[1] and codec.decode_all(recs[2]) == [got[2]]


def _kafka_records(uri: str) -> tuple[list, list]:
    """(blocks, other records but markers) the topic holds now."""
    recs = [r for r in log_records(uri) if b"conveyor-marker" not in r.key]
    return [r for r in recs if BLOCK_KEY in r.key], [r for r in recs if BLOCK_KEY not in r.key]


def _topic_ends(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ends", "log_level": 0})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts]
    finally:
        c.close()


def _liveonly_capture(source, uri: str, change, idle_timeout: float = 2) -> str:
    """A liveonly capture (no scan) that reads what ``change()`` does to the source."""
    from tests.test_live import wait_for_subscriber
    proc = cli.start("capture", source.url, "--log", uri, "--mode", "liveonly", "--idle-timeout",
                     str(idle_timeout), "--enable-notifications")
    wait_for_subscriber(source)
    change()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    return out


def test_a_compacted_kafka_topic_keeps_scans_as_blocks_and_rebuilds_a_new_target(redis_factory,
                                                                                  kafka_broker):
    # given a compacted topic (the default) whose segments roll every second and get compacted
    from tests.kafka_broker import kafka_log_uri
    source, target = redis_factory(), redis_factory()
    s = source.client()
    load_mixed(s, 3000)
    uri = (kafka_log_uri(kafka_broker) + "?topic.segment.ms=1000&topic.min.compaction.lag.ms=0"
           "&topic.min.cleanable.dirty.ratio=0.01")

    # when a snapshot is captured: the scan appends blocks, each under a record key of its own
    cli.run("capture", source.url, "--log", uri, check=True)
    blocks, singles = _kafka_records(uri)
    assert not singles and 3000 // 1000 <= len(blocks) < 3000 // 100
    assert len({r.key for r in blocks}) == len(blocks)
    codec = Codec()
    assert sorted(e.key for r in blocks for e in codec.decode_all(r.value)) == sorted(s.keys("*"))

    # when live changes follow, some seconds apart: every changed key written twice, some keys
    # deleted, one key written a third time
    names = sorted(s.keys("*"))
    changed, gone = names[:600:2], names[601:1200:7]

    def changes():
        time.sleep(2)       # after the run's resync scan (it did not see what happened before)
        s.mset({k: b"first" for k in changed})
        s.delete(*gone)
        # a record more than segment.ms after the first of a segment rolls it (records are
        # stamped when capture read the change: a second and a half to spare)
        time.sleep(2.5)
        s.mset({k: b"second" for k in changed})
        time.sleep(2.5)
        s.set(changed[0], b"last")
        s.mset({k: b"roll" for k in rollers})     # a record in every partition rolls them all
    rollers, hit = [], set()
    for i in range(1000):
        p = zlib.crc32(b"0:roll:%d" % i) % 6
        if p not in hit:
            hit.add(p)
            rollers.append(b"roll:%d" % i)
    out = _liveonly_capture(source, uri, changes, idle_timeout=5)
    blocks, _ = _kafka_records(uri)
    # (the topic's end offsets count every record appended, compacted away or not: beside the
    # blocks, a few markers and the live records; a change made while the run's resync scan
    # read the key may travel in its block instead)
    appended = sum(_topic_ends(kafka_broker.bootstrap, uri.split("/")[-1].split("?")[0]))
    live = appended - len(blocks)
    assert live >= 2 * len(changed) - 50, out

    # then live changes are records of their own under the key's record key, and compaction
    # removes superseded ones (the "first" writes: 300, spread over 6 partitions; the broker's
    # cleaner may leave a partition for later) while every block stays
    deadline = time.monotonic() + 90
    while True:
        after, singles = _kafka_records(uri)
        if live - len(singles) >= 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert live - len(singles) >= 200, ("compaction never ran", live, len(singles))
    assert sorted(r.key for r in after) == sorted(r.key for r in blocks)
    assert {r.key for r in singles} == {b"0:" + k for k in changed + gone + rollers}
    for r in singles:
        (ev,) = codec.decode_all(r.value)
        assert r.key == b"0:" + ev.key

    # and a new target rebuilt from the compacted topic alone equals the source
    cli.run("apply", target.url, "--log", uri, "--idle-timeout", "3", check=True)
    assert differences(s, target.client()) == []
    assert target.client().get(changed[0]) == b"last" and not target.client().exists(*gone)


def test_a_kafka_topic_that_deletes_by_age_takes_live_changes_in_blocks_too(redis_factory,
                                                                         kafka_broker):
    from tests.kafka_broker import kafka_log_uri
    source, target = redis_factory(), redis_factory()
    s = source.client()
    uri = kafka_log_uri(kafka_broker) + "?topic.cleanup.policy=delete"
    _liveonly_capture(source, uri, lambda: s.mset({f"k:{i}": i for i in range(2000)}))
    blocks, singles = _kafka_records(uri)
    assert blocks and not singles
    cli.run("apply", target.url, "--log", uri, "--idle-timeout", "3", check=True)
    assert differences(s, target.client()) == [] and target.client().dbsize() == 2000