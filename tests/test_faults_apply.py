"""Faults on the apply side, against real servers and the real CLI: a target that restarts empty
mid-apply, a target user without a permission, the merge policy replayed twice, a split payload
followed by a delete of its key, and temporary keys left by a capture killed mid big key.

Every outcome is checked with plain redis-py reads of source and target (``contents``), not with
conveyor's own verify.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from apply import Applier
from conveyor.events import Codec, Event, Kind, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import open_meta, open_reader, open_writer
from tests.cli import assert_one_line_error, run, start

REPLAY = "replaying the log from its earliest record"


# -- an independent compare --------------------------------------------------------------------
def contents(r) -> dict[bytes, tuple]:
    """Every key of the database with its type and whole value, read with plain commands."""
    keys = sorted(r.scan_iter(count=1000))
    out: dict[bytes, tuple] = {}
    for i in range(0, len(keys), 1000):
        page = keys[i:i + 1000]
        p = r.pipeline(transaction=False)
        for k in page:
            p.type(k)
        types = p.execute()
        for k, t in zip(page, types):
            {b"string": p.get, b"list": lambda k: p.lrange(k, 0, -1), b"set": p.smembers,
             b"hash": p.hgetall, b"zset": lambda k: p.zrange(k, 0, -1, withscores=True),
             b"stream": lambda k: p.xrange(k, "-", "+")}[t](k)
        for k, t, v in zip(page, types, p.execute()):
            out[k] = (t, sorted(v) if t == b"set" else v)
    return out


def assert_same(src, dst) -> None:
    s, t = contents(src.client()), contents(dst.client())
    missing = s.keys() - t.keys()
    extra = t.keys() - s.keys()
    differ = [k for k in s.keys() & t.keys() if s[k] != t[k]]
    assert not missing and not extra and not differ, (
        f"{len(missing)} missing, {len(extra)} extra, {len(differ)} differ: "
        f"{sorted(missing)[:3]} {sorted(extra)[:3]} {differ[:3]}")


def load_keys(r, n: int) -> None:
    for i in range(0, n, 5000):
        p = r.pipeline(transaction=False)
        for j in range(i, min(n, i + 5000)):
            p.set(b"k:%d" % j, b"v" * 20 + b"%d" % j)
        p.rpush("list", *range(i, i + 50))
        p.hset("hash", mapping={f"f{j}": j for j in range(i, i + 50)})
        p.execute()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def replayable(log: str, opts: dict) -> bool:
    reader = open_reader(log, "probe", opts)
    try:
        return reader.replayable()[0]
    finally:
        reader.close()


# -- 1. the target restarts empty mid-apply --------------------------------------------------
N = 60_000


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_target_restarted_empty_mid_apply_is_rebuilt_from_the_log(redis_factory, tmp_path, backend):
    """Given a captured log, when the target (no persistence) restarts empty while apply writes,
    then apply notices (run_id changed), replays the log from its earliest record and the target
    matches the source; or, when the log cannot tell it still holds every key, apply stops with
    exit 1 and the command to run, never exit 0 with keys missing."""
    src, dst = redis_factory(), redis_factory()
    load_keys(src.client(), N)
    if backend == "file":
        log, opts = f"file:{tmp_path / 'log'}", []
    else:
        log, opts = f"{redis_factory().url}/0", ["--log-opt", "trim=none"]
    run("capture", src.url, "--log", log, *opts, check=True)
    can_replay = replayable(log, dict(o.split("=", 1) for o in opts[1::2]))

    proc = start("apply", dst.url, "--log", log, *opts, "--batch", "50", "--idle-timeout", "2")
    t = dst.client()
    wait_for(lambda: t.dbsize() > N // 5, 60, "apply to be under way")
    dst.stop()
    time.sleep(0.5)
    dst.start()                                   # same port, empty
    out, err = proc.communicate(timeout=180)
    if can_replay:
        assert proc.returncode == 0, (out, err)
        assert REPLAY in err and "the target restarted" in err, err
        assert "the log was replayed from its earliest record" in out, out
        assert_same(src, dst)
    else:
        assert proc.returncode == 1, (out, err)
        line = [ln for ln in err.splitlines() if "conveyor: error:" in ln]
        assert len(line) == 1 and "the target lost writes (the target restarted" in line[0], err
        assert f"conveyor capture SOURCE --log {log}" in line[0] and "--fresh" in line[0], err
        assert "Traceback" not in err


class DeclaredReplayable:
    """A real file-log reader that declares it holds every record (what the file backend says
    once its retention is merged; here, to drive the replay path of this branch)."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def replayable(self):
        return True, ""


def applying(src, dst, tmp_path) -> tuple[Applier, threading.Thread]:
    """A captured source, and an Applier on the real file log running in a thread, under way."""
    load_keys(src.client(), N)
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, check=True)
    t = dst.client()
    applier = Applier(target_for_db=lambda db: t, reader=DeclaredReplayable(open_reader(log, "a", {})),
                      meta=open_meta(log, {}), codec=Codec(), rewriter=KeyRewriter(), group="a",
                      batch=50, idle_timeout=2)
    worker = threading.Thread(target=applier.run)
    worker.start()
    wait_for(lambda: t.dbsize() > N // 5, 60, "apply to be under way")
    return applier, worker


def test_replay_after_the_target_restarted_converges(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    applier, worker = applying(src, dst, tmp_path)
    dst.restart()
    worker.join(180)
    assert not worker.is_alive()
    stats = applier.stats
    assert len(stats.replays) == 1 and "the target restarted" in stats.replays[0], stats.replays
    assert stats.records > N                      # part of the log was read twice
    assert_same(src, dst)


def test_a_flushed_target_is_noticed_by_its_dbsize(redis_factory, tmp_path):
    """Same run_id, but DBSIZE fell with no deletes applied: the target lost data."""
    src, dst = redis_factory(), redis_factory()
    applier, worker = applying(src, dst, tmp_path)
    dst.client().flushall()
    worker.join(180)
    assert not worker.is_alive()
    assert len(applier.stats.replays) >= 1 and "DBSIZE fell" in applier.stats.replays[0]
    assert_same(src, dst)


# -- 2. a target user without a permission ------------------------------------------------------
def test_a_refused_permission_stops_apply_with_one_line(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    src.client().set("a", "1")
    dst.client().execute_command("ACL", "SETUSER", "writer", "on", ">secret-pw", "~*", "&*",
                                 "+@all", "-restore")
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, check=True)
    began = time.monotonic()
    p = run("apply", f"redis://writer:secret-pw@127.0.0.1:{dst.port}", "--log", log,
            "--idle-timeout", "1", timeout=60)
    line = assert_one_line_error(p, 1)
    assert "RESTORE" in line and "NOPERM" in line, line
    assert "secret-pw" not in p.stderr + p.stdout
    assert time.monotonic() - began < 30               # not waited for
    assert dst.client().dbsize() == 0


# -- 3. the merge policy replayed twice -----------------------------------------------------------
@pytest.mark.parametrize("value_type", ["dump", "struct"])
def test_merge_policy_replayed_twice_gives_the_same_target(redis_factory, tmp_path, value_type):
    src, dst = redis_factory(), redis_factory()
    s = src.client()
    s.rpush("list", "a", "b", "a")
    s.rpush("big:list", *range(30_000))                  # in parts
    s.set("big:string", os.urandom(300_000))             # in parts
    s.hset("hash", mapping={"f": "1", "g": "2"})
    s.sadd("set", "x", "y")
    s.zadd("zset", {"m": 1.5})
    s.set("string", "v")
    for i in range(1, 6):
        s.xadd("stream", {"n": i}, id=f"{i}-1")
    s.xgroup_create("stream", "g", id="2-1")
    t = dst.client()
    t.rpush("list", "old")                                # the target's own elements
    t.hset("hash", "own", "o")
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, "--type", value_type, "--big-key-bytes", "64KiB",
        check=True)
    apply = ("apply", dst.url, "--log", log, "--merge-policy", "merge", "--idle-timeout", "1")
    first = run(*apply, check=True)
    assert "0 dead letters" in first.stdout, first.stdout
    assert "lists were replaced whole" in first.stdout, first.stdout
    before = contents(t)
    again = run(*apply, "--from", "earliest", check=True)
    assert contents(t) == before
    assert t.lrange("list", 0, -1) == [b"a", b"b", b"a"]           # replaced, not appended
    assert t.llen("big:list") == 30_000
    assert t.hgetall("hash") == {b"f": b"1", b"g": b"2", b"own": b"o"}   # merged
    assert "0 dead letters" in again.stdout, again.stdout


def test_merge_policy_with_new_stream_ids_is_refused(redis_factory, tmp_path):
    dst = redis_factory()
    p = run("apply", dst.url, "--log", f"file:{tmp_path / 'log'}", "--merge-policy", "merge",
            "--stream-id", "drop", "--idle-timeout", "1")
    line = assert_one_line_error(p, 2)
    assert "--stream-id drop is refused" in line, line


# -- 4. a split payload followed by a later event of its key in one batch -----------------------
def test_a_converted_split_payload_keeps_per_key_order(redis_factory, tmp_path):
    """A Valkey 8.1 payload is refused by Redis 6.2 and converted; written in parts, it used to
    be converted after a later DEL (or UPSERT) of the same key in its batch."""
    src, dst = redis_factory("valkey8.1"), redis_factory("redis6.2")
    s = src.client()
    s.rpush("gone", *range(200))
    s.rpush("newer", *range(200))
    old = {k: s.dump(k) for k in ("gone", "newer")}
    s.rpush("newer", "last")
    fresh = s.dump("newer")
    log = f"file:{tmp_path / 'log'}"
    codec, now = Codec(), now_millis()
    with open_writer(log, {}) as w:
        for n, key in enumerate((b"gone", b"newer")):
            payload = old[key.decode()]
            step = len(payload) // 3 + 1
            starts = list(range(0, len(payload), step))
            for i, at in enumerate(starts):
                ev = Event(Kind.UPSERT, 0, key, payload=payload[at:at + step], read_time_ms=now,
                           capture_id="c", seq=n, chunk={"id": f"c-{n}", "index": i, "offset": at,
                                                         "last": i == len(starts) - 1})
                w.append(ev.record_key(), codec.encode(ev), ev.partition_key())
        later = [Event(Kind.DELETE, 0, b"gone", read_time_ms=now, capture_id="c", seq=9),
                 Event(Kind.UPSERT, 0, b"newer", payload=fresh, read_time_ms=now, capture_id="c",
                       seq=10)]
        for ev in later:
            w.append(ev.record_key(), codec.encode(ev), ev.partition_key())
        w.flush()
    p = run("apply", dst.url, "--log", log, "--idle-timeout", "1", check=True)
    assert "0 dead letters" in p.stdout and "converted" in p.stdout, p.stdout
    t = dst.client()
    assert t.exists("gone") == 0, "a deleted key came back"
    assert t.lrange("newer", 0, -1) == s.lrange("newer", 0, -1)
    assert list(t.scan_iter(match="*conveyor-tmp*")) == []


# -- 5. temporary keys left by a capture killed mid big key --------------------------------------
def log_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_temporary_keys_of_a_capture_killed_mid_big_key_are_cleaned(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    s = src.client()
    for i in range(0, 1_500_000, 50_000):
        s.rpush("big", *[b"element:%d" % j for j in range(i, i + 50_000)])
    s.set("small", "x")
    path = tmp_path / "log"
    log = f"file:{path}"
    cap = start("capture", src.url, "--log", log, "--big-key-bytes", "64KiB")
    wait_for(lambda: path.exists() and log_bytes(path) > 1_000_000, 60, "parts on the log")
    cap.send_signal(signal.SIGKILL)
    cap.wait()
    t = dst.client()
    # The parts written so far go into a temporary key that no part will ever finish.
    p = run("apply", dst.url, "--log", log, "--idle-timeout", "1", check=True)
    assert "temporary keys of big keys whose parts can no longer complete" in p.stdout, p.stdout
    assert list(t.scan_iter(match="*conveyor-tmp*")) == []
    assert t.exists("big") == 0                                # never a partial key
    # Capture again: a new part sequence of the key. A target rebuilt from the earliest record
    # meets the dead sequence first, then the new one, which supersedes it in the same run.
    run("capture", src.url, "--log", log, "--big-key-bytes", "64KiB", "--fresh", check=True)
    run("apply", dst.url, "--log", log, "--idle-timeout", "1", check=True)
    other = redis_factory()
    p = run("apply", other.url, "--log", log, "--group", "rebuild", "--from", "earliest",
            "--idle-timeout", "1", check=True)
    assert "temporary keys" in p.stdout, p.stdout
    for target in (dst, other):
        assert list(target.client().scan_iter(match="*conveyor-tmp*")) == []
        assert_same(src, target)
