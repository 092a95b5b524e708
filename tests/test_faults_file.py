"""Faults of the file log itself: bytes flipped in the middle of a segment, a torn tail, a second
apply of one group, retention, a status that must not create a log. Real CLI, real Redis, real
bytes on disk; outcomes checked with plain redis-py and by walking the segment files here."""
from __future__ import annotations

import fcntl
import json
import os
import struct
import time
import uuid
from pathlib import Path

import pytest
import redis

from conveyor.errors import LogLost
from conveyor.events import Codec, block_size
from conveyor.log import open_reader, open_writer
from tests import cli
from tests.compare import differences
from tests.servers import terminate

HEADER = struct.Struct("<IIqI")          # length, crc32, timestamp ms, key length: the file format


# -- helpers -----------------------------------------------------------------------------------------
def segments(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("*.log"))


def frames(seg: Path) -> list[tuple[int, int, bytes]]:
    """(start, end, key) of each record, by the length fields alone (valid while they are intact)."""
    data, out, pos = seg.read_bytes(), [], 0
    while pos + HEADER.size <= len(data):
        length, _, _, klen = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        out.append((pos, end, data[pos + HEADER.size:pos + HEADER.size + klen]))
        pos = end
    return out


def middle_key_record(seg: Path) -> tuple[int, int, bytes]:
    """A record of a key (not a capture marker) in the middle of the segment."""
    recs = [r for r in frames(seg) if b"conveyor-marker" not in r[2]]
    return recs[len(recs) // 2]


def count_events(uri: str) -> int:
    """Events in the valid records the log hands out (a block counts its keys), read by a group
    of its own."""
    r = open_reader(uri, f"count-{uuid.uuid4().hex}", start="earliest")
    codec, n = Codec(), 0
    try:
        while got := r.poll(10_000, 0.5):
            n += sum(len(codec.decode_all(rec.value)) for rec in got)
    finally:
        r.close()
    return n


def load(client: redis.Redis, prefix: str, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:{i}", f"value-{i}-" + "x" * (i % 50))
        if i % 7 == 0:
            pipe.hset(f"{prefix}:h{i}", mapping={"a": i, "b": "y" * (i % 30)})
    pipe.execute()


def dead_letters(log_dir: Path, group: str) -> list[dict]:
    path = log_dir / "dead-letter.jsonl"
    if not path.exists():
        return []
    return [d for line in path.read_text().splitlines() if (d := json.loads(line))["group"] == group]


def captured_log(redis_factory, tmp_path, n: int = 3000, opts: tuple[str, ...] = ()):
    source, target = redis_factory(), redis_factory()
    load(source.client(), "k", n)
    log_dir = tmp_path / "log"
    uri = f"file:{log_dir}"
    cli.run("capture", source.url, "--log", uri, *opts, check=True)
    return source, target, log_dir, uri


def flip(seg: Path, at: int, mask: bytes) -> None:
    with open(seg, "r+b") as f:
        f.seek(at)
        old = f.read(len(mask))
        f.seek(at)
        f.write(bytes(a ^ b for a, b in zip(old, mask)))


def group_locked(log_dir: Path, group: str) -> bool:
    """Whether some process holds the group's lock (tried here with flock, not through conveyor)."""
    path = log_dir / "groups" / f"{group}.lock"
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# -- damage in the middle of a segment -----------------------------------------------------------------
@pytest.mark.parametrize("damage, again", [("value byte", ("--fresh",)),
                                           ("length field", ("--mode", "live", "--idle-timeout", "1",
                                                             "--enable-notifications"))])
def test_damage_in_the_middle_is_kept_dead_lettered_once_and_the_rest_arrives(redis_factory, tmp_path,
                                                                             damage, again):
    # given a captured log with one record in the middle of its segment damaged on disk
    source, target, log_dir, uri = captured_log(redis_factory, tmp_path)
    seg = segments(log_dir)[0]
    before = count_events(uri)
    start, end, key = middle_key_record(seg)
    if damage == "value byte":
        flip(seg, end - 3, b"\xff")                   # its CRC no longer matches
    else:
        flip(seg, start + 2, b"\xff")                 # its length points 16 MB on: past the end
    damaged = seg.read_bytes()

    # when capture runs again (new keys on the source) and appends to that log
    old_keys = source.client().dbsize()
    load(source.client(), "new", 200)
    new_keys = source.client().dbsize() - old_keys
    cap = cli.run("capture", source.url, "--log", uri, *again)
    if "live" in again:
        # a live capture learns from the log which keys exist: with a stretch unreadable it cannot
        # know them all, and says so instead of claiming convergence
        assert cap.returncode == 1 and "damaged stretch" in cap.stdout, cap.stdout + cap.stderr
        assert "CANNOT claim convergence" in cap.stdout
    else:
        assert cap.returncode == 0, cap.stdout + cap.stderr

    # then nothing was cut: the segment still starts with every byte it had, damage included
    assert seg.read_bytes()[:len(damaged)] == damaged
    lost = block_size(key) or 1                       # the events the damaged record held
    if "live" in again:
        # the key ledger is rebuilt from the readable log: only the keys it lacks (the damaged
        # record's, the new ones) are logged again, between two markers
        second = lost + new_keys + 2
    else:
        second = source.client().dbsize() + 2         # every key again, between two markers
    assert count_events(uri) == before - lost + second

    # when apply replays it
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")

    # then exactly the damaged record was dead-lettered, with its real place in the file
    letters = dead_letters(log_dir, "apply")
    assert [(d["segment"], d["byte"]) for d in letters] == [(seg.name, start)], letters
    assert f"at byte {start}" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert f"(a block of {lost} keys" in p.stderr, p.stderr        # what went with it, counted
    # and every key arrived (the damaged keys' states came again with the second capture)
    assert differences(source.client(), target.client()) == []
    # and the log is drained: lag 0
    st = json.loads(cli.run("status", "--log", uri, "--json", check=True).stdout)
    assert st["lag"] == 0, st


def test_reader_reports_the_damage_and_reads_on_to_every_valid_record(redis_factory, tmp_path):
    # given a log whose middle record has a flipped length field, and records after it
    _, _, log_dir, uri = captured_log(redis_factory, tmp_path, n=500)
    seg = segments(log_dir)[0]
    recs = frames(seg)
    start, end, _ = middle_key_record(seg)
    flip(seg, start, b"\x01")
    # when a group reads it
    r = open_reader(uri, "g")
    got = []
    while batch := r.poll(1000, 0.5):
        got += batch
        r.commit(batch)
    # then it got every other record, in order, and says where the damage is
    assert [x.key for x in got] == [k for s, _, k in recs if s != start]
    assert len(r.damaged) == 1 and f"at byte {start}" in r.damaged[0] and seg.name in r.damaged[0]
    (letter,) = dead_letters(log_dir, "g")
    assert (letter["segment"], letter["byte"], letter["length"]) == (seg.name, start, end - start)
    assert r.status().lag == 0
    r.close()


def test_apply_exits_non_zero_after_dead_lettering_damage(redis_factory, tmp_path):
    _, target, log_dir, uri = captured_log(redis_factory, tmp_path, n=300)
    seg = segments(log_dir)[0]
    _, end, _ = middle_key_record(seg)
    flip(seg, end - 1, b"\x55")
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")
    assert p.returncode != 0 and "dead" in p.stdout + p.stderr


def test_torn_tail_is_still_cut_by_the_next_capture(redis_factory, tmp_path):
    # given a log whose last record was torn halfway by a crash
    source, target, log_dir, uri = captured_log(redis_factory, tmp_path, n=1000)
    seg = segments(log_dir)[0]
    before = count_events(uri)
    start, end, _ = frames(seg)[-1]
    os.truncate(seg, start + (end - start) // 2)
    # when capture runs again
    load(source.client(), "new", 50)
    cli.run("capture", source.url, "--log", uri, "--fresh", check=True)
    # then the torn half is gone, every whole record kept, the new ones follow
    recs = frames(seg)
    assert any(s == start for s, _, _ in recs)        # the next record starts where the torn one did
    assert count_events(uri) == before - 1 + source.client().dbsize() + 2
    # and apply has nothing to dead-letter
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert dead_letters(log_dir, "apply") == []
    assert differences(source.client(), target.client()) == []


# -- one reader per group --------------------------------------------------------------------------------
def test_a_second_apply_of_a_group_is_refused_other_groups_are_fine(redis_factory, tmp_path):
    source, target, log_dir, uri = captured_log(redis_factory, tmp_path, n=500)
    other = redis_factory()
    first = cli.start("apply", target.url, "--log", uri)          # runs until stopped
    try:
        deadline = time.monotonic() + 30
        while not group_locked(log_dir, "apply") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_locked(log_dir, "apply"), first.stderr
        # when a second apply of the same group starts, it is refused in one line
        p = cli.run("apply", other.url, "--log", uri, "--idle-timeout", "1")
        line = cli.assert_one_line_error(p, 1)
        assert "'apply'" in line and str(log_dir) in line and "one reader per group" in line, line
        assert other.client().dbsize() == 0
        # and an apply of another group runs beside the first one
        p = cli.run("apply", other.url, "--log", uri, "--group", "other", "--idle-timeout", "1")
        assert p.returncode == 0, p.stdout + p.stderr
        assert differences(source.client(), other.client()) == []
    finally:
        terminate(first, 10)
    assert differences(source.client(), target.client()) == []


# -- retention -------------------------------------------------------------------------------------------
def age(paths: list[Path], seconds: float) -> None:
    then = time.time() - seconds
    for p in paths:
        os.utime(p, (then, then))


def test_retention_deletes_only_old_segments_every_group_is_past(redis_factory, tmp_path):
    """cleanup=delete: whole segments go (the default, cleanup=compact, is test_compaction.py)."""
    # given a log of many small segments, group a past all of them, group b half way
    opts = ("--log-opt", "segment_bytes=4000", "--scan-count", "20")
    _, target, log_dir, uri = captured_log(redis_factory, tmp_path, n=800, opts=opts)
    cli.run("apply", target.url, "--log", uri, "--group", "a", "--idle-timeout", "1", check=True)
    segs = segments(log_dir)
    assert len(segs) > 10
    b = open_reader(uri, "b", {"retention": "1h", "cleanup": "delete"})
    half = int(segs[len(segs) // 2].stem)
    got = []
    while not got or got[-1].offset < half + 1:
        got += b.poll(10, 1)
    b.commit(got)
    b.close()
    r = open_reader(uri, "a", {"retention": "1h", "cleanup": "delete"})     # young segments are kept whatever the groups
    assert r.replayable() == (True, "")
    r.close()
    assert segments(log_dir) == segs
    # when the segments are older than the retention and a reader of the log opens
    age(segs, 5)
    r = open_reader(uri, "a", {"retention": "1s", "cleanup": "delete"})
    # then exactly the segments before group b's position are gone
    assert segments(log_dir) == [s for s in segs if int(s.stem) >= half]
    ok, why = r.replayable()
    assert not ok and "retention" in why
    r.close()
    # and group b still reads on from where it was
    b = open_reader(uri, "b")
    assert b.poll(10, 1)[0].offset == got[-1].offset + 1
    b.close()


def test_default_retention_lets_apply_from_earliest_rebuild_a_wiped_target(redis_factory, tmp_path):
    opts = ("--log-opt", "segment_bytes=4000", "--scan-count", "20")
    source, target, log_dir, uri = captured_log(redis_factory, tmp_path, n=400, opts=opts)
    segs = segments(log_dir)
    cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1", check=True)
    age(segs, 3000)                # younger than the retention of either cleanup (1h compact, 7d delete)
    target.client().flushall()
    cli.run("apply", target.url, "--log", uri, "--from", "earliest", "--idle-timeout", "1", check=True)
    assert segments(log_dir) == segs
    assert differences(source.client(), target.client()) == []


# -- status, identity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exists", [True, False])
def test_status_of_an_empty_or_missing_directory_creates_nothing(tmp_path, exists):
    log_dir = tmp_path / "empty"
    if exists:
        log_dir.mkdir()
    p = cli.run("status", "--log", f"file:{log_dir}")
    assert "no log at" in cli.assert_one_line_error(p, 1)
    assert (os.listdir(log_dir) == []) if exists else not log_dir.exists()
    assert os.listdir(tmp_path) == (["empty"] if exists else [])


def test_a_log_removed_and_recreated_is_a_lost_log(tmp_path):
    uri = f"file:{tmp_path / 'log'}"
    w = open_writer(uri)
    w.append(b"0:a", b"1")
    w.flush()
    r = open_reader(uri, "g")
    assert r.log_id and r.log_id == w.log_id == (tmp_path / "log" / "log-id").read_text().strip()
    for p in sorted((tmp_path / "log").rglob("*"), reverse=True):   # rm -rf under running processes
        p.rmdir() if p.is_dir() else p.unlink()
    w.append(b"0:b", b"2")
    with pytest.raises(LogLost, match="the log lost records"):
        w.flush()
    with pytest.raises(LogLost):
        r.check_identity()
    w.adopt_new_log()                                 # a new log: the buffered record goes there
    w.flush()
    r.adopt_new_log()
    assert r.log_id == w.log_id
    assert [(x.key, x.value) for x in r.poll(10, 2)] == [(b"0:b", b"2")]
    assert r.warnings == [] and r.owned([]) == []
    r.close()
    w.close()


# -- the log layer's own guarantees ---------------------------------------------------------------------
ITEMS = [(b"0:key%d" % i, b"value %d " % i + bytes(range(256))) for i in range(60)]


def test_a_reader_waiting_at_a_torn_tail_reads_on_once_a_writer_repaired_it(tmp_path):
    # given a reader that read every record and waits at a torn tail
    uri = f"file:{tmp_path / 'log'}"
    w = open_writer(uri)
    w.append_many(ITEMS[:10])
    w.close()
    with open(segments(tmp_path / "log")[0], "ab") as f:
        f.write(b"\x50\x00\x00\x00 a record torn by a crash")
    r = open_reader(uri, "g")
    assert [x.key for x in r.poll(100, 0.5)] == [k for k, _ in ITEMS[:10]]
    assert r.poll(100, 0.3) == []
    # when the next writer cuts the torn bytes and appends where they were
    w = open_writer(uri)
    w.append_many(ITEMS[10:20])
    w.close()
    # then the reader reads the new records, none of them taken for damage
    got = r.poll(100, 2)
    assert [x.key for x in got] == [k for k, _ in ITEMS[10:20]]
    assert r.damaged == []
    r.commit(got)
    assert r.status().lag == 0
    r.close()


def test_damage_at_the_end_of_a_sealed_segment_is_skipped_and_lag_reaches_zero(tmp_path):
    # given small segments, the last record of the first one damaged
    uri, log_dir = f"file:{tmp_path / 'log'}", tmp_path / "log"
    w = open_writer(uri, {"segment_bytes": "2000"})
    for item in ITEMS:
        w.append(*item)
        w.flush()
    w.close()
    first = segments(log_dir)[0]
    start, end, key = frames(first)[-1]
    flip(first, end - 1, b"\x01")
    # when a group reads everything, committing as it goes
    r = open_reader(uri, "g")
    got = []
    while batch := r.poll(7, 0.5):
        got += batch
        r.commit(batch)
    # then it has every other record, one damage report, and nothing left to read
    assert [x.key for x in got] == [k for k, _ in ITEMS if k != key]
    assert len(r.damaged) == 1 and first.name in r.damaged[0] and f"at byte {start}" in r.damaged[0]
    assert r.status().lag == 0
    r.close()
    # and a reader of the group that starts again has nothing more to read, and reports nothing
    r = open_reader(uri, "g")
    assert r.poll(10, 0.3) == [] and r.damaged == []
    r.close()
