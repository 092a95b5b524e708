"""One conformance suite for every log backend (file, Redis Streams, Kafka), on real servers."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from conveyor.log import open_meta, open_reader, open_writer


def write(uri, items, **kw):
    w = open_writer(uri, kw.get("opts"))
    for k, v in items:
        w.append(k, v)
    w.flush()
    w.close()


def drain(reader, want: int, timeout: float = 30.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out += reader.poll(1000, 0.5)
    return out


def spread(log_uri: str, n: int) -> dict:
    """Options of a log of ``n`` partitions (the fixture's Redis log was made with one: another
    stream name is another log)."""
    if log_uri.startswith("file"):
        return {}
    return {"partitions": str(n), **({"stream": f"p{n}"} if log_uri.startswith("redis") else {})}


BINARY = [(b"0:\x00\xff key %d" % i, bytes(range(256)) + b"%d" % i) for i in range(50)]


def test_append_poll_commit_round_trip_is_binary_safe(log_uri):
    write(log_uri, BINARY)
    r = open_reader(log_uri, "g")
    got = drain(r, len(BINARY))
    assert [(x.key, x.value) for x in got] == BINARY
    r.commit(got)
    assert r.status().lag == 0
    r.close()


def test_uncommitted_records_are_redelivered_after_a_crash(log_uri):
    write(log_uri, BINARY)
    r = open_reader(log_uri, "g")
    got = drain(r, 50)
    r.commit(got[:20])
    r.close()                                 # "crash": the last 30 were never committed
    r2 = open_reader(log_uri, "g")
    again = drain(r2, 30)
    assert [x.key for x in again][:30] == [k for k, _ in BINARY[20:]]
    r2.commit(again)
    assert r2.status().lag == 0
    r2.close()


def test_per_key_order_holds_across_partitions(log_uri):
    opts = spread(log_uri, 4)
    items = [(b"0:key%d" % (i % 7), b"%d" % i) for i in range(700)]
    write(log_uri, items, opts=opts)
    r = open_reader(log_uri, "g", opts)
    got = drain(r, 700)
    assert len(got) == 700
    for k in {k for k, _ in items}:
        assert [x.value for x in got if x.key == k] == [v for kk, v in items if kk == k]
    if opts:
        assert len({x.partition for x in got}) > 1   # really spread over partitions
    r.close()


def test_seek_earliest_latest_and_time(log_uri):
    # a Redis Stream log trims what its groups are past, so keep everything for this test
    log_uri += "?trim=none" if log_uri.startswith("redis") else ""
    write(log_uri, [(b"0:old%d" % i, b"o") for i in range(10)])
    time.sleep(1.2)
    cut = datetime.now(timezone.utc)
    time.sleep(0.2)
    write(log_uri, [(b"0:new%d" % i, b"n") for i in range(5)])
    r = open_reader(log_uri, "g", start=cut)
    got = drain(r, 5)
    assert [x.key for x in got] == [b"0:new%d" % i for i in range(5)]
    r.commit(got)
    r.close()
    r = open_reader(log_uri, "g", start="earliest")
    assert len(drain(r, 15)) == 15
    r.close()
    r = open_reader(log_uri, "g2", start="latest")
    assert r.poll(100, 2.0) == []
    r.close()
    write(log_uri, [(b"0:later", b"l")])
    r = open_reader(log_uri, "g2")
    assert [x.key for x in drain(r, 1)] == [b"0:later"]
    r.close()


def test_lag_falls_as_records_are_committed_and_groups_are_independent(log_uri):
    write(log_uri, BINARY)
    a, b = open_reader(log_uri, "a"), open_reader(log_uri, "b")
    got = drain(a, 50)
    assert a.status().lag == 50
    a.commit(got[:10])
    assert a.status().lag == 40
    a.commit(got)
    assert a.status().lag == 0
    assert b.status().lag == 50
    assert len(drain(b, 50)) == 50
    a.close()
    b.close()


def stored_dead_letters(uri: str) -> list[tuple[bytes, bytes, str, str]]:
    """(key, value, reason, group) of every dead letter, read with the backend's own client."""
    if uri.startswith("file:"):
        import base64
        import json
        from pathlib import Path
        path = Path(uri[len("file:"):]) / "dead-letter.jsonl"
        return [(base64.b64decode(d["key"]), base64.b64decode(d["value"]), d["reason"], d["group"])
                for d in map(json.loads, path.read_text().splitlines())]
    if uri.startswith("redis://"):
        import redis
        r = redis.Redis.from_url(uri)
        return [(f[b"k"], f[b"v"], f[b"reason"].decode(), f[b"group"].decode())
                for _id, f in r.xrange("conveyor:dead-letter")]
    from confluent_kafka import Consumer, TopicPartition
    hosts, topic = uri[len("kafka://"):].split("?")[0].split("/", 1)
    c = Consumer({"bootstrap.servers": hosts, "group.id": "dead-letter-reader",
                  "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(f"{topic}.dead-letter", 0, 0)])
        out, deadline = [], time.monotonic() + 30
        while not out and time.monotonic() < deadline:
            m = c.poll(1.0)
            if m is not None and m.error() is None:
                h = {k: v.decode() for k, v in m.headers()}
                out.append((m.key(), m.value(), h["reason"], h["group"]))
        return out
    finally:
        c.close()


def test_dead_letter_is_kept(log_uri):
    write(log_uri, BINARY[:1])
    r = open_reader(log_uri, "g")
    rec = drain(r, 1)[0]
    r.dead_letter(rec, "cannot decode")        # raises LogError if it cannot be stored
    r.close()
    # read back as stored, bytes intact
    assert stored_dead_letters(log_uri) == [(BINARY[0][0], BINARY[0][1], "cannot decode", "g")]


def test_meta_store_survives_reopening(log_uri):
    m = open_meta(log_uri)
    assert m.get("checkpoint") is None
    m.put("checkpoint", {"cursor": 42})
    m.put("checkpoint", {"cursor": 43})
    m.close()
    m = open_meta(log_uri)
    assert m.get("checkpoint") == {"cursor": 43}
    m.close()


def test_reader_follows_records_appended_while_it_waits(log_uri):
    r = open_reader(log_uri, "g")
    assert r.poll(10, 0.5) == []
    write(log_uri, [(b"0:x", b"1")])
    assert [x.value for x in drain(r, 1)] == [b"1"]
    r.close()


def test_history_holds_every_record_in_order_without_joining_a_group(log_uri):
    opts = spread(log_uri, 3)
    items = [(b"0:key%d" % (i % 11), b"%d" % i) for i in range(500)]
    write(log_uri, items, opts=opts)
    w = open_writer(log_uri, opts)
    w.append(b"0:unflushed", b"x")             # history() flushes first: it is there too
    h = w.history()
    got = list(h.records)
    w.close()
    assert h.complete and h.why == ""
    assert sorted(got) == sorted(items + [(b"0:unflushed", b"x")])
    for k in {k for k, _ in items}:
        assert [v for kk, v in got if kk == k] == [v for kk, v in items if kk == k]
    r = open_reader(log_uri, "apply", opts)     # history took nothing from a group
    assert r.status().lag == 501
    r.close()


@pytest.mark.parametrize("log_uri", ["redis", "kafka"], indirect=True)   # a file log never trims
def test_history_of_a_trimmed_log_says_it_is_incomplete(log_uri):
    if log_uri.startswith("kafka"):
        log_uri += "&topic.cleanup.policy=delete"      # Kafka deletes records of those only
    write(log_uri, BINARY)
    if log_uri.startswith("redis"):
        r = open_reader(log_uri, "apply")
        r.commit(drain(r, 50))
        r.trim()                                 # trim=acked: every group is past them
        r.close()
    else:
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient

        host, topic = log_uri.split("?")[0].split("://")[1].split("/")
        admin = AdminClient({"bootstrap.servers": host})
        admin.delete_records([TopicPartition(topic, 0, 20)])[TopicPartition(topic, 0, 20)].result(30)
    w = open_writer(log_uri)
    h = w.history()
    left = list(h.records)
    w.close()
    assert not h.complete and h.why
    assert len(left) < 50
