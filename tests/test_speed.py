"""The throughput work of issue 11 that changes behaviour: replicate's capture in a process of its
own, and batches sent packed with replies parsed by hiredis (conveyor/packed.py). Real servers;
outcomes checked with tests/compare.py."""
from __future__ import annotations

import json
import signal
import time

import pytest
import redis

from conveyor import packed
from tests import cli
from tests.compare import differences
from tests.datasets import load_mixed


def _wait_for_capture_progress(log_dir, keys: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        docs = [json.loads(p.read_text()) for p in (log_dir / "meta").glob("capture-*.json")]
        if docs and docs[0].get("keys", 0) > keys:
            return
        time.sleep(0.05)
    raise AssertionError("capture saved no progress")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_replicate_stops_its_capture_process_and_resumes(redis_factory, tmp_path, sig):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 60000)
    log_uri = f"file:{tmp_path / 'log'}"
    proc = cli.start("replicate", source.url, target.url, "--log", log_uri, "--scan-count", "10")
    _wait_for_capture_progress(tmp_path / "log", 1000)
    proc.send_signal(sig)                   # to the parent only: it must stop its capture child
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "interrupted; run the same command again" in out, out
    assert "snapshot interrupted (resumable" in out, out
    # The capture process let go of the log (a capture still running would hold its lock).
    again = cli.run("replicate", source.url, target.url, "--log", log_uri, check=True)
    assert "[resumed]" in again.stdout and "snapshot complete" in again.stdout, again.stdout
    assert differences(source.client(), target.client()) == []


def test_replicate_reports_a_capture_failure_in_one_line(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    source.client().set("k", "v")
    source.client().acl_setuser("nodump", enabled=True, passwords=["+pw"],
                                commands=["+@all", "-dump", "-evalsha", "-eval"], keys=["*"])
    url = source.url.replace("redis://", "redis://nodump:pw@")
    p = cli.run("replicate", url, target.url, "--log", f"file:{tmp_path / 'log'}")
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "pw@" not in p.stdout + p.stderr


def test_packed_batch_keeps_error_replies_in_place(redis_factory):
    r = redis_factory().client()
    replies = packed.run(r, [("SET", "a", 1), ("LPUSH", "a", "x"), ("INCRBY", "a", 2.5),
                             ("GET", "a"), ("SET", "b", bytearray(b"ba"))])
    assert replies[0] == b"OK" and replies[3] == b"1" and replies[4] == b"OK"
    assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
    assert isinstance(replies[2], redis.ResponseError)
    assert r.get("b") == b"ba"
    with pytest.raises(redis.DataError):
        packed.run(r, [("SET", "c", True)])
    assert r.ping()                         # the connection is still usable after a refusal


def test_packed_batch_bigger_than_one_send(redis_factory):
    r = redis_factory().client()
    value = b"x" * 100_000
    n = 2 * packed.SEND_BYTES // len(value) + 3     # replies arrive while the rest is sent
    replies = packed.run(r, [("SET", f"k{i}", value) for i in range(n)]
                         + [("GET", f"k{i}") for i in range(n)])
    assert replies[:n] == [b"OK"] * n and replies[n:] == [value] * n
    assert r.dbsize() == n


def test_packed_batches_on_two_servers_and_a_lost_connection(redis_factory):
    a, b = redis_factory(), redis_factory()
    ra, rb = a.client(), b.client()
    sa, sb = packed.run_on([(ra, [("SET", "x", "1"), ("GET", "x")]), (rb, [("GET", "x")])])
    assert sa == [b"OK", b"1"] and sb == [None]
    b.stop()
    with pytest.raises(redis.ConnectionError) as e:
        packed.run_on([(ra, [("GET", "x")]), (rb, [("GET", "x")])])
    assert e.value.batch == 1               # the failure names the batch it belongs to
    assert packed.run(ra, [("GET", "x")]) == [b"1"]


def test_verify_compares_differently_encoded_collections_by_content(redis_factory):
    source, target = redis_factory(), redis_factory()
    s, t = source.client(), target.client()
    for r in (t,):               # the target stores them in another encoding: DUMP bytes differ
        r.config_set("hash-max-listpack-entries", 0)
        r.config_set("set-max-intset-entries", 0)
        r.config_set("zset-max-listpack-entries", 0)
    for r in (s, t):
        r.hset("h", mapping={"a": 1, "b": 2})
        r.sadd("s", 1, 2, 3)
        r.zadd("z", {"a": 1.5, "b": 2})
        r.sadd("big", *range(2500))                 # more than one SCAN page
        r.hset("h2", mapping={"a": 1})
        r.sadd("big2", *range(2500))
    assert s.dump("h") != t.dump("h") and s.dump("s") != t.dump("s")
    out = cli.run("verify", source.url, target.url)
    assert out.returncode == 0 and "0 value" in out.stdout, out.stdout + out.stderr
    t.hset("h2", "a", 9)                             # one page: settled from the page
    t.srem("big2", 7)
    t.sadd("big2", "x")                              # several pages: read page by page
    t.zadd("z", {"a": 1.25})
    out = cli.run("verify", source.url, target.url, "--show-diffs")
    assert out.returncode == 1, out.stdout
    assert "3 value" in out.stdout and '"h2"' in out.stdout and '"big2"' in out.stdout, out.stdout
    assert '"z"' in out.stdout and '"big"' not in out.stdout, out.stdout
    assert len(differences(s, t)) == 3


def test_batch_decode_matches_one_by_one_and_isolates_a_bad_record():
    from conveyor.events import DECODE_RUN, Codec, CodecError, Event, Kind
    codec, old = Codec(), Codec(("event.v1.avsc",))
    events = [Event(Kind.UPSERT, 0, b"k%d" % i, b"p" * (i % 40), None if i % 3 else i, 5, "c", i)
              for i in range(DECODE_RUN * 2 + 7)]
    records = [(old if i % 11 == 0 else codec).encode(e) for i, e in enumerate(events)]
    records[DECODE_RUN + 3] = records[DECODE_RUN + 3][:-2]          # torn in the second run
    got = codec.decode_many(records)
    assert isinstance(got[DECODE_RUN + 3], CodecError)
    for i, (g, r) in enumerate(zip(got, records)):
        if i != DECODE_RUN + 3:
            assert g == codec.decode(r), i
    assert [g.key for g in got[:3]] == [b"k0", b"k1", b"k2"]
