"""Compaction bounds a long run's log without losing what a rebuild needs.

Unit tests of the rule (conveyor/log/compaction.py) on decoded events; then a live run on a real
file log with small segments: keys rewritten over and over, a dropped notification connection and
a capture restart. The log's bytes must come down to about the live data's while capture and apply
run, and ``apply --from earliest`` into an empty target must still rebuild the source exactly
(independent compare).
"""
from __future__ import annotations

import pytest

from conveyor.errors import CodecError
from conveyor.events import Codec, Columns, Event, Kind
from conveyor.log.compaction import decide, index_key, rows_of
from tests import cli
from tests.compare import differences, wait_until

codec = Codec()


def block(*items):
    cols = Columns()
    for key, payload in items:
        cols.add(key, payload, None, 1)
    return codec.decode_all(codec.encode_block(0, "c", 1, cols))


def test_a_block_keeps_only_events_no_later_record_supersedes():
    evs = block((b"a", b"1"), (b"b", b"2"), (b"c", None))
    latest = {index_key(evs[0]): (7, None), index_key(evs[1]): (9, None),
              index_key(evs[2]): (7, None)}
    o = decide(7, evs, latest, codec)
    assert o.keep and o.value is not None              # rewritten: b is superseded by record 9
    kept = codec.decode_all(o.value)
    assert [e.key for e in kept] == [b"a"]              # c's latest word is a delete: dropped too
    assert o.latest == [index_key(evs[0])] and o.forget == [index_key(evs[2])]
    assert not decide(5, evs, latest, codec).keep       # every key has a later record


def test_parts_of_the_latest_read_markers_and_undecodable_records_are_kept():
    part = Event(Kind.UPSERT, 0, b"big", value={"type": "HASH", "items": [b"f", b"v"]},
                 chunk={"id": "c-5", "index": 0, "offset": 0, "last": False})
    k = index_key(part)
    assert decide(3, part, {k: (4, "c-5")}, codec).keep       # a later part of the same read
    assert not decide(3, part, {k: (4, "c-9")}, codec).keep   # a newer read replaced it
    marker = Event(Kind.SNAPSHOT_END, 0, capture_id="c")
    assert decide(1, marker, {}, codec).keep and rows_of(1, marker) == []
    assert decide(1, CodecError("bad"), {}, codec).keep
    # an index behind the log (the record is newer than what it knows) keeps the event
    assert decide(8, part, {k: (4, "c-5")}, codec).keep


def file_log(redis_factory, tmp_path):
    log_dir = tmp_path / "log"
    held = lambda: sum(p.stat().st_size for p in log_dir.glob("*.log"))   # noqa: E731
    # twelve rewrites of every key were logged (about 12x the first copy): about one is kept
    return (f"file:{log_dir}", ("--log-opt", "segment_bytes=32768", "--log-opt", "retention=0s"),
            held, lambda first: held() < 3 * first)


def stream_log(redis_factory, tmp_path):
    """What a Redis Streams log holds is counted in entries (XDEL frees whole stream nodes only)."""
    buffer = redis_factory(extra=("--appendonly", "yes"))
    b = buffer.client()
    streams = lambda: list(b.scan_iter("conveyor:*", _type="stream"))   # noqa: E731
    held = lambda: sum(b.xlen(k) for k in streams())                    # noqa: E731
    added = lambda: sum(b.xinfo_stream(k)["entries-added"] for k in streams())   # noqa: E731
    # entries added by the twelve rounds (Redis's own count) against those still held
    return f"{buffer.url}/0", ("--log-opt", "retention=0s"), held, lambda first: held() < added() / 4


@pytest.mark.parametrize("make_log", [file_log, stream_log], ids=["file", "redis"])
def test_a_long_live_run_keeps_a_bounded_log_that_still_rebuilds_an_empty_target(
        redis_factory, tmp_path, make_log):
    source = redis_factory(extra=("--notify-keyspace-events", "KEA"))
    target, rebuilt = redis_factory(), redis_factory()
    s = source.client()
    n = 1500
    s.mset({f"k:{i}": f"v0-{i}" * 8 for i in range(n)})
    uri, opts, log_bytes, bounded = make_log(redis_factory, tmp_path)
    live = ("capture", source.url, "--log", uri, "--mode", "live", *opts)
    cap = cli.start(*live)
    app = cli.start("apply", target.url, "--log", uri, *opts)
    try:
        wait_until(lambda: target.client().dbsize() >= n, timeout=60)
        first = log_bytes()
        for rnd in range(1, 13):
            s.mset({f"k:{i}": f"v{rnd}-{i}" * 8 for i in range(n)})
            s.delete(*[f"k:{i}" for i in range(rnd * 10, rnd * 10 + 10)])
            if rnd == 4:
                s.client_kill_filter(_type="pubsub")          # a gap: a rescan
            if rnd == 8:                                        # a restart
                cap.terminate()
                assert cap.wait(60) == 0
                cap = cli.start(*live)
            # each round is on the target before the next: every key's new value was logged
            wait_until(lambda: differences(s, target.client()) == [], timeout=60)
        wait_until(lambda: bounded(first), timeout=60,
                   what=f"compaction (log {log_bytes()} bytes, first copy {first})")
    finally:
        for p in (cap, app):
            p.terminate()
            p.wait(60)
    cli.run("apply", rebuilt.url, "--log", uri, "--from", "earliest", "--group", "rebuild",
            "--idle-timeout", "1", *opts, check=True)
    assert differences(s, rebuilt.client()) == []
    assert rebuilt.client().dbsize() == s.dbsize()


def test_superseded_blocks_of_a_compacted_kafka_topic_are_replaced_by_empty_ones(
        redis_factory, kafka_broker):
    """Kafka compacts by record key; blocks have keys of their own. Two full copies of the same
    keys: apply replaces every block of the first (all superseded) with an empty block under the
    same key, so the broker's compaction drops them; the second copy's blocks stay, and a
    rebuild from earliest is exact."""
    from confluent_kafka import Consumer, TopicPartition

    from conveyor.events import block_size
    from tests.kafka_broker import kafka_log_uri
    source, target, rebuilt = redis_factory(), redis_factory(), redis_factory()
    s = source.client()
    s.mset({f"k:{i}": f"first-{i}" * 4 for i in range(3000)})
    uri = kafka_log_uri(kafka_broker) + "?partitions=2"
    cli.run("capture", source.url, "--log", uri, check=True)
    s.mset({f"k:{i}": f"second-{i}" * 4 for i in range(0, 3000, 2)})
    cli.run("capture", source.url, "--log", uri, "--fresh", check=True)    # a second full copy
    cli.run("apply", target.url, "--log", uri, "--idle-timeout", "8", "--log-opt",
            "compact_after=0s", check=True)

    def latest_blocks():
        """Per partition, block record keys whose latest value still holds events."""
        c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": "t-inspect",
                      "enable.partition.eof": True, "enable.auto.commit": False})
        topic = uri.split("/")[-1].split("?")[0]
        c.assign([TopicPartition(topic, p, 0) for p in range(2)])
        latest, eof = {}, set()
        while len(eof) < 2:
            for m in c.consume(500, 5.0):
                if m.error():
                    eof.add(m.partition())
                elif block_size(m.key() or b""):
                    latest[m.key()] = codec.decode_all(m.value())
        c.close()
        return latest

    blocks = latest_blocks()
    live = [k for k, evs in blocks.items() if evs]
    emptied = [k for k, evs in blocks.items() if not evs]
    # every key of the first copy has a later record: all its blocks were emptied
    assert emptied and len(live) < len(blocks)
    assert sum(len(blocks[k]) for k in live) == 3000      # the second copy, whole
    cli.run("apply", rebuilt.url, "--log", uri, "--from", "earliest", "--group", "rebuild",
            "--idle-timeout", "2", check=True)
    assert differences(s, rebuilt.client()) == []


def test_a_compaction_killed_at_any_moment_loses_nothing(redis_factory, tmp_path):
    """SIGKILL a file log's compaction pass again and again at different moments (mid-index,
    mid-rewrite, between a segment's replacement and the index update): the next pass finds its
    way (a leftover file removed, an index in doubt rebuilt) and a rebuild is exact."""
    import subprocess
    import sys
    import time
    source, rebuilt = redis_factory(), redis_factory()
    s = source.client()
    s.mset({f"k:{i}": f"v-{i}" * 6 for i in range(3000)})
    log_dir = tmp_path / "log"
    uri = f"file:{log_dir}"
    opts = ("--log-opt", "segment_bytes=32768")          # retention 1h: nothing due on its own
    for rnd in range(6):                                   # six full copies, each newer
        s.mset({f"k:{i}": f"r{rnd}-{i}" * 6 for i in range(rnd, 3000, 3)})
        cli.run("capture", source.url, "--log", uri, "--fresh", *opts, check=True)
    cli.run("apply", redis_factory().url, "--log", uri, "--idle-timeout", "1", *opts, check=True)
    whole = sum(p.stat().st_size for p in log_dir.glob("*.log"))
    compact = [sys.executable, "-m", "conveyor.log.file.compact", str(log_dir), "0", "32768"]
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8, 1.2):
        p = subprocess.Popen(compact, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        p.wait()
    subprocess.run(compact, check=True, capture_output=True)
    assert not list(log_dir.glob("*.compacting"))
    held = sum(p.stat().st_size for p in log_dir.glob("*.log"))
    assert held < whole / 3, (held, whole)                 # about one copy of six is left
    cli.run("apply", rebuilt.url, "--log", uri, "--from", "earliest", "--group", "rebuild",
            "--idle-timeout", "1", *opts, check=True)
    assert differences(s, rebuilt.client()) == []
