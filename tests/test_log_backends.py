"""What only one backend does: file framing and locking, stream trimming and claiming, Kafka topics."""
from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from conveyor.errors import LogError
from conveyor.log import open_reader, open_writer
from tests.kafka_broker import kafka_log_uri
from tests.test_log import BINARY, drain, write


# -- file ----------------------------------------------------------------------------------------
def segment(tmp_path):
    return sorted((tmp_path / "log").glob("*.log"))[-1]


def test_file_torn_tail_is_truncated_by_the_next_writer(tmp_path):
    uri = f"file:{tmp_path / 'log'}"
    write(uri, BINARY[:3])
    with open(segment(tmp_path), "ab") as f:
        f.write(b"\x50\x00\x00\x00partial")        # a crash mid-write
    write(uri, BINARY[3:5])
    r = open_reader(uri, "g")
    assert [x.key for x in drain(r, 5)] == [k for k, _ in BINARY[:5]]


def test_file_second_writer_is_refused(tmp_path):
    uri = f"file:{tmp_path / 'log'}"
    w = open_writer(uri)
    with pytest.raises(LogError, match="another process"):
        open_writer(uri)
    w.close()
    open_writer(uri).close()                         # free again once the first one closed


def test_file_segments_roll_and_the_reader_crosses_them(tmp_path):
    uri = f"file:{tmp_path / 'log'}"
    w = open_writer(uri, {"segment_bytes": "4000"})
    for k, v in BINARY:
        w.append(k, v)
        w.flush()
    w.close()
    assert len(list((tmp_path / "log").glob("*.log"))) > 3
    r = open_reader(uri, "g")
    got = drain(r, 50)
    assert [x.key for x in got] == [k for k, _ in BINARY]
    r.commit(got)
    assert r.status().lag == 0


# -- Redis Streams -----------------------------------------------------------------------------------
def test_stream_trims_only_what_every_group_acknowledged(redis_factory):
    buf = redis_factory()
    uri = f"{buf.url}/0?partitions=1"      # one stream: records in append order
    write(uri, BINARY)
    fast, slow = open_reader(uri, "fast"), open_reader(uri, "slow")
    slow_got = drain(slow, 50)
    slow.commit(slow_got[:10])
    fast.commit(drain(fast, 50))
    fast.trim()
    assert buf.client().xlen("conveyor:0") == 40     # slow still needs 40
    slow.commit(slow_got)
    slow.trim()
    assert buf.client().xlen("conveyor:0") == 0


def test_stream_pending_entries_of_a_dead_consumer_are_claimed(redis_factory):
    buf = redis_factory()
    uri = f"{buf.url}/0?partitions=1"      # one stream: records in append order
    write(uri, BINARY[:10])
    dead = open_reader(uri, "g", {"consumer": "a"})
    assert len(drain(dead, 10)) == 10                # delivered, never acknowledged
    dead.close()
    time.sleep(0.3)
    heir = open_reader(uri, "g", {"consumer": "b", "claim_idle_ms": "100"})
    got = drain(heir, 10)
    assert [x.key for x in got] == [k for k, _ in BINARY[:10]]


def test_stream_wrong_password_and_unreachable_are_log_errors(redis_factory):
    buf = redis_factory(password="pw-right")
    with pytest.raises(LogError) as e:
        open_writer(f"redis://:pw-wrong@127.0.0.1:{buf.port}/0")
    assert "pw-wrong" not in str(e.value) and "pw-right" not in str(e.value)
    with pytest.raises(LogError, match="cannot connect"):
        open_writer("redis://127.0.0.1:1/0")


# -- Kafka ---------------------------------------------------------------------------------------------
def test_kafka_topic_is_created_compacted(kafka_broker):
    uri = kafka_log_uri(kafka_broker)
    write(uri, BINARY[:1])
    topic = uri.rsplit("/", 1)[1]
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    cfg = admin.describe_configs([res])[res].result(10)
    assert cfg["cleanup.policy"].value == "compact"


def test_kafka_unreachable_broker_is_a_quick_log_error():
    t0 = time.monotonic()
    with pytest.raises(LogError, match="cannot reach Kafka"):
        open_writer("kafka://127.0.0.1:1/topic")
    assert time.monotonic() - t0 < 30


def test_kafka_librdkafka_properties_pass_through(kafka_broker):
    uri = kafka_log_uri(kafka_broker)
    with pytest.raises(Exception):
        open_writer(uri, {"no.such.property": "1"})   # librdkafka itself rejects it
    write(uri, BINARY[:2], opts={"client.id": "conveyor-test", "linger.ms": "0"})
