"""Type-based replication and cross-version targets, against real servers.

A newer server's DUMP payload is refused by an older one (Valkey 8.1 -> Redis 7.0, Redis 7.0 ->
Redis 6.2): apply converts such payloads into type-based writes itself, and ``--type struct``
replicates with typed reads and writes from the start. Each pair is checked with verify and with
direct reads of what verify does not look at (stream metadata, consumer groups, HyperLogLogs).
"""
from __future__ import annotations

import re

import pytest

from conveyor.sample import load_mixed
from tests.cli import run

PAIRS = [("valkey8.1", "redis7.0"), ("redis7.0", "redis6.2")]
CLEAN = "verify: 0 missing, 0 type, 0 value, 0 ttl, 0 extra"


def load_streams_and_edges(r) -> int:
    """What load_mixed lacks: consumer groups part-way through a stream, deleted entries, an
    emptied stream that still has a group, repeated field names, infinite scores, TTLs on
    collections, empty strings. Returns how many keys it wrote."""
    for i in range(1, 31):
        r.xadd("edge:stream", {"n": i, "payload": "x" * (i % 7)}, id=f"{1000 + i}-{i % 3}")
    r.xdel("edge:stream", "1005-2", "1010-1")
    r.xgroup_create("edge:stream", "readers", id="0")
    r.xreadgroup("readers", "alice", {"edge:stream": ">"}, count=7)
    r.xack("edge:stream", "readers", *[f"{1000 + i}-{i % 3}" for i in range(1, 5)])
    r.xgroup_create("edge:stream", "late", id="1020-2")
    r.execute_command("XADD", "edge:dupfields", "5-1", "f", "1", "f", "2", "g", "3")
    r.xadd("edge:emptied", {"a": 1}, id="7-7")
    r.xgroup_create("edge:emptied", "g", id="$")
    r.xdel("edge:emptied", "7-7")
    r.zadd("edge:zset", {"lo": float("-inf"), "hi": float("inf"), "mid": 0.1 + 0.2,
                         "tiny": 5e-324, "neg": -0.0})
    r.hset("edge:hash:ttl", mapping={"a": "1", "b": ""})
    r.pexpire("edge:hash:ttl", 3_600_000)
    r.rpush("edge:list:ttl", "", "x", "-1", "9223372036854775807")
    r.expire("edge:list:ttl", 7200)
    r.set("edge:empty", b"")
    r.set("edge:int", -9223372036854775808)
    r.pfadd("edge:hll:dense", *[f"e{j}" for j in range(20000)])
    return 9


def source_target(redis_factory, pair):
    src, dst = redis_factory(pair[0]), redis_factory(pair[1])
    r = src.client()
    n = load_mixed(r, 200) + load_streams_and_edges(r)
    return src, dst, n


def raw(server):
    """A client whose XRANGE replies keep repeated field names (redis-py makes dicts)."""
    c = server.client()
    c.set_response_callback("XRANGE", lambda response, **_: response)
    c.set_response_callback("XPENDING", lambda response, **_: response)
    return c


def assert_streams_alike(src, dst, keep_ids: bool = True) -> None:
    s, t = raw(src), raw(dst)
    for key in (b"edge:stream", b"edge:emptied", b"edge:dupfields"):
        se = s.execute_command("XRANGE", key, "-", "+")
        te = t.execute_command("XRANGE", key, "-", "+")
        if keep_ids:
            assert se == te, key
        else:
            assert [e[1] for e in se] == [e[1] for e in te], key
        sg = {g["name"]: g for g in s.xinfo_groups(key)}
        tg = {g["name"]: g for g in t.xinfo_groups(key)}
        assert sorted(sg) == sorted(tg), key
        for name in sg:
            assert (sorted(c["name"] for c in s.xinfo_consumers(key, name))
                    == sorted(c["name"] for c in t.xinfo_consumers(key, name))), (key, name)
        if keep_ids:
            for name in sg:
                assert sg[name]["last-delivered-id"] == tg[name]["last-delivered-id"], (key, name)
                # pending entries: same ids, owners and delivery counts (XCLAIM ... FORCE)
                sp = [(p[0], p[1], p[3]) for p in s.execute_command("XPENDING", key, name, "-", "+", 100)]
                tp = [(p[0], p[1], p[3]) for p in t.execute_command("XPENDING", key, name, "-", "+", 100)]
                assert sp == tp, (key, name, sp, tp)
            assert s.xinfo_stream(key)["last-generated-id"] == t.xinfo_stream(key)["last-generated-id"]
    assert t.execute_command("XRANGE", b"edge:dupfields", "-", "+")[0][1] == [b"f", b"1", b"f", b"2",
                                                                              b"g", b"3"]
    assert t.pfcount("edge:hll:dense") == s.pfcount("edge:hll:dense")
    assert t.execute_command("PFADD", "edge:hll:dense") == 0     # still a HyperLogLog
    assert t.zscore("edge:zset", "hi") == float("inf") and t.zscore("edge:zset", "tiny") == 5e-324


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_default_type_converts_refused_payloads_and_converges(redis_factory, tmp_path, pair):
    src, dst, n = source_target(redis_factory, pair)
    p = run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), check=True)
    assert CLEAN in p.stdout, p.stdout
    converted = int(re.search(r"(\d+) converted", p.stdout).group(1))
    # Every payload of the newer server is refused by the older one, so every key converts.
    assert converted == n, p.stdout
    assert f"{n} keys the target refused as DUMP payloads" in p.stdout
    assert "0 dead letters" in p.stdout
    assert "pending entries" not in p.stdout          # alice's 3 pending entries were recreated
    assert_streams_alike(src, dst)
    assert dst.client().dbsize() == n


@pytest.mark.parametrize("pair", PAIRS + [("redis7.0", "redis7.0")], ids=lambda p: f"{p[0]}->{p[1]}")
def test_struct_type_converges_for_every_type(redis_factory, tmp_path, pair):
    src, dst, n = source_target(redis_factory, pair)
    p = run("replicate", src.url, dst.url, "--type", "struct", "--state-dir", str(tmp_path),
            check=True)
    assert CLEAN in p.stdout, p.stdout
    assert f"({n} typed" in p.stdout.replace("0 restored, ", "("), p.stdout
    assert "0 restored" in p.stdout and "0 converted" in p.stdout
    assert "pending entries" not in p.stdout          # alice's 3 pending entries were recreated
    assert_streams_alike(src, dst)
    if pair[1] != "redis6.2":
        # 7.0 targets also get the stream metadata 7.0 added.
        s, t = src.client(), dst.client()
        for key in (b"edge:stream", b"edge:emptied"):
            for field in ("entries-added", "max-deleted-entry-id"):
                assert s.xinfo_stream(key)[field] == t.xinfo_stream(key)[field], (key, field)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_struct_with_stream_id_drop_keeps_entries_with_new_ids(redis_factory, tmp_path, pair):
    src, dst, _ = source_target(redis_factory, pair)
    p = run("replicate", src.url, dst.url, "--type", "struct", "--stream-id", "drop",
            "--state-dir", str(tmp_path), check=True)
    assert CLEAN in p.stdout, p.stdout     # replicate verifies with --stream-id drop
    # new ids: the pending entries cannot point at them; counted and said, not hidden
    assert "3 pending entries of stream consumer groups were not recreated" in p.stdout, p.stdout
    assert_streams_alike(src, dst, keep_ids=False)
    t = raw(dst)
    assert t.execute_command("XRANGE", "edge:stream", "-", "+")[0][0] != b"1001-1"   # new ids
    # A group points at the same entry as on the source: the one it had read up to.
    s = raw(src)
    for name in (b"readers", b"late"):
        s_last = next(g for g in s.xinfo_groups("edge:stream") if g["name"] == name)["last-delivered-id"]
        t_last = next(g for g in t.xinfo_groups("edge:stream") if g["name"] == name)["last-delivered-id"]
        s_ids = [e[0] for e in s.execute_command("XRANGE", "edge:stream", "-", "+")]
        t_ids = [e[0] for e in t.execute_command("XRANGE", "edge:stream", "-", "+")]
        assert s_ids.index(s_last) == t_ids.index(t_last), name
    # Plain verify (ids kept) sees the difference: the ids really are new.
    v = run("verify", src.url, dst.url)
    assert v.returncode == 1 and " value" in v.stdout


def test_merge_policy_merges_collections_overwrite_replaces(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    s, t = src.client(), dst.client()
    s.hset("h", mapping={"a": "1", "b": "2"})
    s.sadd("s", "x")
    s.zadd("z", {"m": 1})
    for policy, want_h, want_s in (("merge", {b"a": b"1", b"b": b"2", b"old": b"o"}, {b"x", b"y"}),
                                   ("overwrite", {b"a": b"1", b"b": b"2"}, {b"x"})):
        t.flushall()
        t.hset("h", mapping={"old": "o", "a": "stale"})
        t.sadd("s", "y")
        t.zadd("z", {"n": 2})
        log = f"file:{tmp_path / policy}"
        run("capture", src.url, "--log", log, check=True)
        p = run("apply", dst.url, "--log", log, "--merge-policy", policy, "--idle-timeout", "1",
                check=True)
        assert "0 dead letters" in p.stdout
        assert t.hgetall("h") == want_h, policy
        assert t.smembers("s") == want_s, policy
        assert t.zrange("z", 0, -1) == ([b"m", b"n"] if policy == "merge" else [b"m"])


def test_dump_and_struct_events_share_a_log(redis_factory, tmp_path):
    """A capture with --type struct and a DUMP capture can share one log: apply takes both."""
    src, dst = redis_factory(), redis_factory()
    s = src.client()
    s.set("a", "1")
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, check=True)
    s.set("a", "2")
    s.hset("b", "f", "v")
    run("capture", src.url, "--log", log, "--type", "struct", "--scan-match", "b*", check=True)
    p = run("apply", dst.url, "--log", log, "--idle-timeout", "1", check=True)
    assert "1 restored, 1 typed" in p.stdout, p.stdout
    assert dst.client().get("a") == b"1" and dst.client().hgetall("b") == {b"f": b"v"}


def test_a_target_without_restore_gets_type_based_writes(redis_factory, tmp_path):
    src = redis_factory()
    dst = redis_factory(extra=("--rename-command", "RESTORE", ""))
    n = load_mixed(src.client(), 100)
    p = run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), check=True)
    assert f"{n} converted" in p.stdout and CLEAN in p.stdout, p.stdout


def test_module_value_the_target_cannot_load_is_dead_lettered_not_dropped(redis_factory, tmp_path):
    # No module server is installable here, so the value is a ReJSON-RL DUMP payload built by hand
    # (RDB 10, valid CRC): the real target refuses it ("Bad data format"), apply cannot convert a
    # module value, and the record is dead-lettered, named, and fails the run.
    import struct

    from conveyor.events import Codec, Event, Kind, record_key
    from conveyor.log import open_writer
    from conveyor.rdb import crc64

    charset = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    module_id = 0
    for ch in "ReJSON-RL":
        module_id = (module_id << 6) | charset.index(ch)
    body = b"\x07\x81" + ((module_id << 10) | 3).to_bytes(8, "big") + b"\x00" + b"\x0a\x00"
    payload = body + struct.pack("<Q", crc64(body))
    log = f"file:{tmp_path / 'log'}"
    codec, w = Codec(), open_writer(log)
    for key, value in ((b"doc", payload), (b"plain", None)):
        ev = Event(Kind.UPSERT, 0, key, payload=value)
        if value is None:
            ev.value = {"type": "STRING", "items": [b"ok"], "scores": [], "stream": None}
        w.append(record_key(0, key), codec.encode(ev))
    w.flush()
    w.close()
    target = redis_factory()
    p = run("apply", target.url, "--log", log, "--idle-timeout", "1")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 dead letter" in p.stdout
    assert "ReJSON-RL" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    client = target.client()
    assert client.exists("doc") == 0 and client.get("plain") == b"ok"
