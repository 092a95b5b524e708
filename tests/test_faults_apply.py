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

from conveyor.apply import Applier
from conveyor.errors import LogLost, LogUnavailable
from conveyor.events import BLOCK_KEY, Codec, Event, Kind, now_millis
from conveyor.keys import KeyRewriter
from conveyor.log import open_meta, open_reader, open_writer
from tests.cli import assert_one_line_error, run, start
from tests.compare import differences, wait_until

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
    diffs = differences(src.client(), dst.client())
    assert diffs == [], f"{len(diffs)} keys differ, e.g. {diffs[:3]}"


def load_keys(r, n: int) -> None:
    for i in range(0, n, 5000):
        p = r.pipeline(transaction=False)
        for j in range(i, min(n, i + 5000)):
            p.set(b"k:%d" % j, b"v" * 20 + b"%d" % j)
        p.rpush("list", *range(i, i + 50))
        p.hset("hash", mapping={f"f{j}": j for j in range(i, i + 50)})
        p.execute()


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
    # a fresh file log, and a stream never trimmed, hold every record: a replay heals
    assert replayable(log, dict(o.split("=", 1) for o in opts[1::2])) is True

    proc = start("apply", dst.url, "--log", log, *opts, "--batch", "50", "--idle-timeout", "2")
    t = dst.client()
    wait_until(lambda: t.dbsize() > N // 5, 60, "apply to be under way")
    dst.stop()
    time.sleep(0.5)
    dst.start()                                   # same port, empty
    assert_healed(proc, src, dst)


def assert_healed(proc, src, dst) -> None:
    """apply replayed the log and the target matches (exit 0)."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (out, err)
    assert REPLAY in err and "the target restarted" in err, err
    assert "the log was replayed from its earliest record" in out, out
    assert_same(src, dst)


def assert_stopped(proc, log: str) -> None:
    """On a log that cannot tell it holds every key, apply stopped with one line naming the
    command to run (exit 1)."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    line = [ln for ln in err.splitlines() if "conveyor: error:" in ln]
    assert len(line) == 1 and "the target lost writes (the target restarted" in line[0], err
    assert f"conveyor capture SOURCE --log {log}" in line[0] and "--fresh" in line[0], err
    assert "Traceback" not in err


def test_a_target_down_when_apply_would_end_is_waited_for_and_checked(redis_factory, tmp_path):
    """The log is drained and idle, but the target is down: apply does not end before it could
    see what the target kept."""
    src, dst = redis_factory(), redis_factory()
    load_keys(src.client(), 2000)
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, check=True)
    proc = start("apply", dst.url, "--log", log, "--idle-timeout", "1")
    t = dst.client()
    wait_until(lambda: t.dbsize() == len(contents(src.client())), 60, "every key applied")
    dst.stop()
    time.sleep(3)                                 # longer than --idle-timeout: apply must wait
    assert proc.poll() is None, proc.communicate()
    dst.start()                                   # empty
    assert replayable(log, {}) is True
    assert_healed(proc, src, dst)


@pytest.mark.parametrize("backend", ["file", "trimmed stream"])
def test_a_target_restarted_empty_between_two_runs_is_noticed(redis_factory, tmp_path, backend):
    """The next apply of the group compares the target with what the previous run last read:
    it replays a log that holds every record, and stops on one that was trimmed."""
    src, dst = redis_factory(), redis_factory()
    load_keys(src.client(), 2000)
    buffer = redis_factory() if backend != "file" else None
    log = f"file:{tmp_path / 'log'}" if buffer is None else f"{buffer.url}/0?partitions=1"
    run("capture", src.url, "--log", log, check=True)
    run("apply", dst.url, "--log", log, "--idle-timeout", "1", check=True)
    if buffer is not None:                        # an operator trims the buffer's first entries
        b = buffer.client()
        first = b.xrange("conveyor:0", count=2)[1][0]
        b.xtrim("conveyor:0", minid=first)
    dst.restart()                                 # empty; the log has nothing new
    proc = start("apply", dst.url, "--log", log, "--idle-timeout", "1")
    if buffer is None:
        assert_healed(proc, src, dst)
    else:
        assert_stopped(proc, log)


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
    wait_until(lambda: t.dbsize() > N // 5, 60, "apply to be under way")
    return applier, worker


def test_replay_after_the_target_restarted_converges(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    applier, worker = applying(src, dst, tmp_path)
    dst.restart()
    worker.join(180)
    assert not worker.is_alive()
    stats = applier.stats
    assert len(stats.replays) == 1 and "the target restarted" in stats.replays[0], stats.replays
    assert stats.restored > N                     # part of the log was read twice
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
    before = contents(t)
    again = run(*apply, "--from", "earliest", check=True)
    assert contents(t) == before
    assert t.lrange("list", 0, -1) == [b"a", b"b", b"a"]           # replaced, not appended
    assert t.llen("big:list") == 30_000
    assert t.hgetall("hash") == {b"f": b"1", b"g": b"2", b"own": b"o"}   # merged
    for p in (first, again):
        assert "0 dead letters" in p.stdout, p.stdout
        assert "lists were replaced whole" in p.stdout, p.stdout


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
    wait_until(lambda: path.exists() and log_bytes(path) > 1_000_000, 60, "parts on the log")
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


# -- 6. the log supervised from the apply side -----------------------------------------------------
class FlakyLog:
    """A real file-log reader whose log fails as a buffer restart would: ``unavailable`` calls
    raise LogUnavailable first (then the same call succeeds), and once the log is 'reset' under
    apply (LogLost from check_identity), after which it reads the log again from the start."""

    def __init__(self, reader, unavailable: int = 0, lost_after_commits: int | None = None,
                 new_log_empty: bool = False) -> None:
        self.reader, self.unavailable, self.lost_after = reader, unavailable, lost_after_commits
        self.commits = self.adopted = self.keepalives = 0
        self.damaged: list[str] = []

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def _maybe_down(self, what: str) -> None:
        if self.unavailable > 0:
            self.unavailable -= 1
            raise LogUnavailable(f"{what}: connection reset (buffer restarting)")

    def poll(self, *a):
        self._maybe_down("poll")
        return self.reader.poll(*a)

    def commit(self, records):
        self._maybe_down("commit")
        self.commits += 1
        return self.reader.commit(records)

    def check_identity(self):
        if self.lost_after is not None and self.commits >= self.lost_after and not self.adopted:
            raise LogLost("the log was recreated (test)")

    def adopt_new_log(self):
        self.adopted += 1

    def keepalive(self):
        self.keepalives += 1


def through_flaky_log(src, dst, tmp_path, monkeypatch, **flaws):
    """Capture a source, then apply it through a FlakyLog; (reader, stats)."""
    load_keys(src.client(), 3000)
    log = f"file:{tmp_path / 'log'}"
    # blocks of at most 100 keys: apply's batches of 100 keys are one record each
    run("capture", src.url, "--log", log, "--scan-count", "100", check=True)
    t = dst.client()
    reader = FlakyLog(open_reader(log, "a", {}), **flaws)
    if flaws.get("new_log_empty"):
        reader.seek = lambda where: reader.reader.seek("latest")
    monkeypatch.setattr("conveyor.apply.applier.IDENTITY_INTERVAL_S", 0)   # checked before every poll
    stats = Applier(target_for_db=lambda db: t, reader=reader, meta=open_meta(log, {}),
                    codec=Codec(), rewriter=KeyRewriter(), group="a", batch=100,
                    idle_timeout=1).run()
    return reader, stats


def test_log_unavailable_is_waited_for_and_a_lost_log_is_read_again(redis_factory, tmp_path,
                                                                     monkeypatch):
    src, dst = redis_factory(), redis_factory()
    reader, stats = through_flaky_log(src, dst, tmp_path, monkeypatch, unavailable=3,
                                      lost_after_commits=2)
    assert stats.log_waits == 3 and reader.adopted == 1, stats
    assert len(stats.log_lost) == 1 and stats.log_lost[0].startswith("the log lost records")
    assert stats.pass_after_loss and stats.log_loss_healed     # the whole snapshot came again
    assert_same(src, dst)


def test_a_lost_log_without_a_whole_pass_afterwards_fails_the_run(redis_factory, tmp_path,
                                                                  monkeypatch):
    """The log is 'reset' mid-snapshot and the new log holds nothing yet: no complete pass
    follows the loss, so the run cannot succeed."""
    src, dst = redis_factory(), redis_factory()
    _, stats = through_flaky_log(src, dst, tmp_path, monkeypatch, lost_after_commits=2,
                                 new_log_empty=True)
    assert len(stats.log_lost) == 1 and not stats.log_loss_healed
    from conveyor.summary import apply_lines
    lines, ok = apply_lines(stats, False)
    assert not ok and any("no whole capture pass" in ln for ln in lines), lines


class HandedOver(FlakyLog):
    """While the target is down, the group gives half of the partitions to another member
    (here: the blocks at odd offsets)."""

    def owned(self, records):
        if not self.keepalives:
            return records
        return [r for r in records if BLOCK_KEY not in r.key or r.offset % 2 == 0]

    def poll(self, *a):             # after the rebalance, the others are delivered elsewhere
        return self.owned(self.reader.poll(*a))


def test_waiting_for_the_target_keeps_the_member_alive_and_drops_what_it_no_longer_owns(
        redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    s = src.client()
    for i in range(400):
        s.set(f"k:{i}", i)
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, "--scan-count", "20", check=True)   # blocks of 20 keys
    look = open_reader(log, "look", {})
    kept = {e.key.decode() for r in look.poll(1000, 1)
            if BLOCK_KEY in r.key and r.offset % 2 == 0 for e in Codec().decode_all(r.value)}
    look.close()
    reader = HandedOver(open_reader(log, "a", {}))
    reader.damaged = ["corrupt record at byte 123 of segment 0 (test)"]
    t = dst.client()
    applier = Applier(target_for_db=lambda db: t, reader=reader, meta=open_meta(log, {}),
                      codec=Codec(), rewriter=KeyRewriter(), group="a", batch=1000, idle_timeout=1)
    dst.stop()                                   # down before the first batch is written
    worker = threading.Thread(target=applier.run)
    worker.start()
    wait_until(lambda: reader.keepalives >= 3, 30, "keepalives while the target is down")
    dst.start()
    worker.join(60)
    assert not worker.is_alive()
    stats = applier.stats
    assert stats.handed_over > 0 and stats.dead_letters == 1, stats
    written = {k.decode() for k in dst.client().keys("k:*")}
    assert written and written == kept, sorted(written ^ kept)[:5]
