"""Faults of the Redis Streams log's buffer Redis, on real servers and real processes: restarts
(with and without AOF), a flushed buffer, persistence warnings, lag after an AOF reload, default
retention and a rebuild from the earliest record, several apply processes in one group."""
from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import redis

from conveyor.errors import LogLost, LogUnavailable
from conveyor.log import open_reader, open_writer
from conveyor.sample import load_mixed
from tests import cli
from tests.compare import differences, wait_until
from tests.test_log import drain

AOF = ("--appendonly", "yes", "--appendfsync", "always")


def items(n: int, version: str = "a", keys: int = 7) -> list[tuple[bytes, bytes]]:
    return [(b"0:key%d" % (i % keys), b"%s%d" % (version.encode(), i)) for i in range(n)]


def assert_per_key_order(got: list[tuple[bytes, bytes]], sent: list[tuple[bytes, bytes]]) -> None:
    """Every record arrived, each key's records in the order sent (a re-sent chunk may repeat
    a stretch: the first occurrence of each value must follow the sent order)."""
    for key in {k for k, _ in sent}:
        want = [v for k, v in sent if k == key]
        seen: list[bytes] = []
        for k, v in got:
            if k == key and v not in seen:
                seen.append(v)
        assert seen == want, key


def take(reader, n: int, timeout: float = 30.0):
    """Exactly ``n`` records (polls ask for no more than are still wanted)."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += reader.poll(n - len(out), 0.5)
    assert len(out) == n, len(out)
    return out


# -- a buffer restart is waited out ------------------------------------------------------------
def test_flush_while_the_buffer_is_down_raises_unavailable_then_stores_everything_in_order(
        redis_factory):
    buf = redis_factory(extra=AOF)
    uri = f"{buf.url}/0"
    sent = items(600)
    w = open_writer(uri, {"partitions": "3"})
    for k, v in sent[:300]:
        w.append(k, v)
    w.flush()
    for k, v in sent[300:]:
        w.append(k, v)
    buf.stop()
    for _ in range(2):                             # can be called again while it is down
        with pytest.raises(LogUnavailable):
            w.flush()
    buf.start()
    w.flush()
    w.check_identity()                              # the same log came back
    w.close()
    r = open_reader(uri, "g", {"partitions": "3"})
    got = drain(r, 600)
    assert_per_key_order([(x.key, x.value) for x in got], sent)
    r.close()


def test_commit_while_the_buffer_is_down_can_be_repeated_after_it_returns(redis_factory):
    buf = redis_factory(extra=AOF)
    uri = f"{buf.url}/0"
    w = open_writer(uri)
    w.append_many(items(40))
    w.close()
    r = open_reader(uri, "g")
    got = drain(r, 40)
    buf.restart()                                   # the first command after it: reconnects
    buf.stop()
    with pytest.raises(LogUnavailable):
        r.commit(got)
    with pytest.raises(LogUnavailable):
        r.poll(10, 0.1)
    buf.start()
    r.commit(got)
    assert r.status().lag == 0
    assert r.poll(10, 0.2) == []
    r.close()


WAITS: list[str] = []


def again(call, *args, until: float = 60.0):
    """What capture and apply do with LogUnavailable: wait, then make the same call again."""
    deadline = time.monotonic() + until
    while True:
        try:
            return call(*args)
        except LogUnavailable as e:
            WAITS.append(str(e))
            assert time.monotonic() < deadline, "the log never came back"
            time.sleep(0.1)


def test_records_flow_through_buffer_restarts_in_the_middle_of_writing_and_reading(redis_factory):
    # given a writer and a reader working while the buffer (AOF) restarts twice under them
    buf = redis_factory(extra=AOF)
    uri, opts = f"{buf.url}/0", {"partitions": "3"}
    sent = items(30_000, keys=50)
    WAITS.clear()
    w, r = open_writer(uri, opts), open_reader(uri, "g", opts)
    got: list[tuple[bytes, bytes]] = []
    done = threading.Event()

    def read() -> None:
        while not (done.is_set() and again(lambda: r.status().lag) == 0):
            batch = again(r.poll, 500, 0.2)
            got.extend((x.key, x.value) for x in batch)
            again(r.commit, batch)

    written = [0]

    def restart_twice() -> None:          # from outside: calls are cut off in the middle
        for at in (8_000, 20_000):
            wait_until(lambda: written[0] >= at, 60, f"{at} records written")
            buf.stop()
            time.sleep(1)                   # longer than redis-py's own reconnect attempt
            buf.start()

    threads = [threading.Thread(target=f, daemon=True) for f in (read, restart_twice)]
    for t in threads:
        t.start()
    for i, (k, v) in enumerate(sent):
        again(w.append, k, v)
        if i % 500 == 499:
            again(w.flush)
        written[0] = i + 1
    again(w.flush)
    threads[1].join(60)
    done.set()
    threads[0].join(30)
    # then every record arrived, each key's in order, and the log is the same log
    assert not any(t.is_alive() for t in threads)
    assert_per_key_order(got, sent)
    assert any("XADD" in x for x in WAITS)         # the restarts did interrupt both
    assert any("XREADGROUP" in x or "XACK" in x for x in WAITS)
    w.check_identity()
    r.check_identity()
    w.close()
    r.close()


# -- identity --------------------------------------------------------------------------------------
def test_a_buffer_restarted_empty_is_a_lost_log_for_writer_and_reader_until_adopted(redis_factory):
    buf = redis_factory()                           # no persistence
    uri = f"{buf.url}/0"
    w = open_writer(uri)
    w.append_many(items(20))
    w.flush()
    r = open_reader(uri, "g")
    assert len(drain(r, 20)) == 20
    old_id = w.log_id
    assert old_id and r.log_id == old_id
    buf.restart()
    w.append(b"0:after", b"x")
    with pytest.raises(LogLost, match="^the log lost records: "):
        w.flush()
    with pytest.raises(LogLost, match="^the log lost records: "):
        w.check_identity()                          # and stays lost until adopted
    with pytest.raises(LogLost, match="^the log lost records: "):
        r.poll(10, 0.2)
    with pytest.raises(LogLost):
        r.check_identity()
    w.adopt_new_log()
    r.adopt_new_log()
    assert w.log_id and w.log_id != old_id and r.log_id == w.log_id
    w.flush()                                       # the buffered record goes to the new log
    assert [x.key for x in drain(r, 1)] == [b"0:after"]     # read from the new log's beginning
    r.close()
    w.close()


def test_flushall_and_deleted_streams_are_lost_logs_even_without_a_restart(redis_factory):
    buf = redis_factory()
    uri = f"{buf.url}/0?partitions=1"      # one stream: records in append order
    w = open_writer(uri)
    w.append_many(items(5))
    w.flush()
    buf.client().flushall()
    w.append(b"0:x", b"1")
    with pytest.raises(LogLost):
        w.flush()
    w.adopt_new_log()
    w.flush()
    buf.client().delete("conveyor:0")               # the id is still there, the stream is not
    w.append(b"0:y", b"2")
    with pytest.raises(LogLost, match="conveyor:0"):
        w.flush()
    w.adopt_new_log()
    w.flush()
    w.close()
    r = open_reader(uri, "g")
    buf.client().delete("conveyor:0")               # a reader whose group vanished
    with pytest.raises(LogLost):
        r.poll(10, 0.2)
    r.close()


def test_a_buffer_restarted_from_an_older_snapshot_is_a_lost_log(redis_factory):
    # given a buffer that saves RDB snapshots, killed after records written since the last one
    buf = redis_factory(extra=("--save", "3600 1"))
    uri = f"{buf.url}/0"
    w = open_writer(uri)
    r = open_reader(uri, "g")
    w.append_many(items(10))
    w.flush()
    buf.client().save()
    w.append_many(items(10, "b"))
    w.flush()
    assert len(take(r, 20)) == 20
    buf.proc.kill()                                 # SIGKILL: no save at shutdown
    buf.proc.wait()
    buf.start()                                     # back with the first 10 records only
    # then both notice, though redis-py reconnected by itself and the id is the same
    w.append(b"0:after", b"x")
    with pytest.raises(LogLost, match="restarted from older data"):
        w.flush()
    with pytest.raises(LogLost, match="restarted from older data"):
        r.poll(10, 0.2)
    with pytest.raises(LogLost):
        w.close()                                   # closing does not hide it either
    r.close()


# -- persistence warning ---------------------------------------------------------------------------
def test_a_buffer_without_persistence_is_warned_about_at_open(redis_factory):
    bare, aof, rdb = redis_factory(), redis_factory(extra=AOF), redis_factory(extra=("--save", "60 1"))
    for buf, warned in ((bare, True), (aof, False), (rdb, False)):
        w, r = open_writer(f"{buf.url}/0"), open_reader(f"{buf.url}/0", "g")
        assert bool(w.warnings) == warned and bool(r.warnings) == warned, buf.extra
        if warned:
            assert "no persistence" in w.warnings[0]
        w.close()
        r.close()
    # CONFIG refused (renamed away): no crash, still a warning since AOF is off
    hidden = redis_factory(extra=("--rename-command", "CONFIG", ""))
    w = open_writer(f"{hidden.url}/0")
    assert w.warnings and "CONFIG refused" in w.warnings[0]
    w.close()


# -- lag after an AOF reload -----------------------------------------------------------------------
def rewrite_aof(buf) -> None:
    """BGREWRITEAOF and wait for it: the group's entries-read goes into the new base file, and
    the reads after it are logged as XCLAIM ... LASTID, which do not advance it on reload."""
    c = buf.client()
    c.bgrewriteaof()
    wait_until(lambda: not any(int(c.info("persistence")[f]) for f in
                               ("aof_rewrite_in_progress", "aof_rewrite_scheduled")), 30, "the rewrite")


def test_lag_is_right_after_an_aof_reload(redis_factory):
    buf = redis_factory(extra=AOF)
    uri = f"{buf.url}/0?partitions=1"      # one stream: records in append order
    w = open_writer(uri)
    w.append_many(items(300))
    w.close()
    r = open_reader(uri, "g", {"trim": "none"})    # no trim: Redis trusts its entries-read
    r.commit(take(r, 100))
    rewrite_aof(buf)
    r.commit(take(r, 200))
    buf.restart()                                   # Redis's own lag now says 200 for good
    assert r.status().lag == 0
    w = open_writer(uri)
    w.append_many(items(50, "b"))
    w.close()
    assert r.status().lag == 50
    got = take(r, 50)
    r.commit(got[:20])
    r.trim()
    assert r.status().lag == 30
    r.commit(got)
    assert r.status().lag == 0
    r.close()


def test_apply_idle_timeout_ends_after_the_buffer_reloaded_its_aof(redis_factory):
    source, target, buf = redis_factory(), redis_factory(), redis_factory(extra=AOF)
    log_uri, opt = f"{buf.url}/0", ("--log-opt", "partitions=2")
    load_mixed(source.client(), 300)
    cli.run("capture", source.url, "--log", log_uri, *opt, check=True)
    cli.run("apply", target.url, "--log", log_uri, *opt, "--idle-timeout", "1", check=True)
    rewrite_aof(buf)
    load_mixed(source.client(), 300, seed=8, prefix="more:")
    cli.run("capture", source.url, "--log", log_uri, *opt, "--fresh", check=True)
    cli.run("apply", target.url, "--log", log_uri, *opt, "--idle-timeout", "1", check=True)
    buf.restart()
    p = cli.run("apply", target.url, "--log", log_uri, *opt, "--idle-timeout", "2", timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "log lag 0 records" in p.stdout
    assert differences(source.client(), target.client()) == []


# -- retention -----------------------------------------------------------------------------------------
def test_default_retention_lets_apply_from_earliest_rebuild_a_wiped_target(redis_factory):
    source, target, buf = redis_factory(), redis_factory(), redis_factory(extra=AOF)
    log_uri = f"{buf.url}/0"
    load_mixed(source.client(), 400)
    cli.run("capture", source.url, "--log", log_uri, check=True)
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    r = open_reader(log_uri, "apply")
    assert r.replayable() == (True, "")
    r.close()
    for group in ("apply", "rebuild"):              # the same group, and a new one
        target.client().flushall()
        cli.run("apply", target.url, "--log", log_uri, "--from", "earliest", "--group", group,
                "--idle-timeout", "1", check=True)
        assert differences(source.client(), target.client()) == [], group


def test_retention_trims_only_old_entries_no_group_still_needs(redis_factory):
    buf = redis_factory()
    uri = f"{buf.url}/0?partitions=1"      # one stream: records in append order
    w = open_writer(uri)
    w.append_many(items(30))
    w.close()
    fast, slow = open_reader(uri, "fast", {"retention": "1s"}), open_reader(uri, "slow")
    fast.commit(drain(fast, 30))
    fast.trim("retention")
    assert buf.client().xlen("conveyor:0") == 30     # younger than 1 s
    time.sleep(1.2)
    fast.trim("retention")
    assert buf.client().xlen("conveyor:0") == 30     # old, but slow still needs them
    got = drain(slow, 30)
    slow.commit(got[:10])
    fast.trim("retention")
    assert buf.client().xlen("conveyor:0") == 20
    ok, why = fast.replayable()
    assert not ok and "10 entries were trimmed" in why
    none = open_reader(uri, "fast", {"trim": "none"})
    assert none.trim_mode == "none"
    for r in (fast, slow, none):
        r.close()


# -- several apply processes in one group ------------------------------------------------------------
def applied(out: str) -> int:
    m = re.search(r"apply: applied (\d+) records", out)
    assert m, out
    return int(m.group(1))


def test_keepalive_holds_the_streams_and_a_lapsed_lease_is_taken_over_with_its_pending_entries(
        redis_factory):
    buf = redis_factory()
    uri, opts = f"{buf.url}/0", {"partitions": "2", "lease_ms": "1500"}
    w = open_writer(uri, opts)
    w.append_many(items(40))
    w.close()
    a, b = open_reader(uri, "g", opts), open_reader(uri, "g", opts)
    assert a.consumer != b.consumer                # unique per reader by default
    held = take(a, 40)                              # a alone: it leases both streams
    # while a waits (for a down target, say) and keeps alive, b gets nothing
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        a.keepalive()
        assert b.poll(10, 0.2) == []
    assert a.owned(held) == held
    assert b.status().lag == 40                     # the whole group's, not b's share
    # when a stops renewing, b takes both streams over with the entries a never acknowledged
    got = take(b, 40, timeout=10)
    assert sorted(x.offset for x in got) == sorted(x.offset for x in held)
    assert a.owned(held) == []                      # a drops its batch unwritten
    b.commit(got)
    assert b.status().lag == 0
    a.close()
    b.close()


def test_a_named_consumer_restarted_after_a_crash_reads_its_own_pending_entries_at_once(
        redis_factory):
    buf = redis_factory()
    uri = f"{buf.url}/0"
    w = open_writer(uri)
    w.append_many(items(10))
    w.close()
    crashed = open_reader(uri, "g", {"consumer": "apply-1"})
    assert len(take(crashed, 10)) == 10
    crashed.r.close()                               # gone without releasing its lease
    again = open_reader(uri, "g", {"consumer": "apply-1"})
    t0 = time.monotonic()
    assert len(take(again, 10)) == 10
    assert time.monotonic() - t0 < 5                # its own lease: no wait for it to lapse
    again.close()


class PendingWatch(threading.Thread):
    """Samples each partition stream's pending entries while apply runs: entries delivered to two
    live consumers of one stream at once would mean a key applied by two of them."""

    def __init__(self, buf, streams: list[str], group: str = "apply") -> None:
        super().__init__(daemon=True)
        self.r, self.streams, self.group = buf.client(), streams, group
        self.shared: list[tuple[str, list[bytes]]] = []
        self.dead: bytes | None = None    # the killed member's name part: its entries are claimed
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            for s in self.streams:
                try:
                    owners = [c["name"] for c in self.r.xpending(s, self.group)["consumers"]
                              if int(c["pending"]) and (self.dead is None or self.dead not in c["name"])]
                except redis.RedisError:
                    continue
                if len(owners) > 1:
                    self.shared.append((s, owners))
            self.samples += 1


@pytest.mark.parametrize("members", [2, 3])
def test_apply_processes_share_a_group_and_survive_one_killed(redis_factory, members):
    # given a log holding two versions of every key (a second snapshot after all values changed)
    source, target, buf = redis_factory(), redis_factory(), redis_factory(extra=AOF)
    log_uri, opt = f"{buf.url}/0", ("--log-opt", "partitions=4", "--log-opt", "lease_ms=3000")
    n = 20_000                                   # enough that every member gets a share
    small = ("--scan-count", "20")               # ... of records: blocks of a few keys each
    s = source.client()
    s.mset({f"k{i}": f"old{i}" for i in range(n)})
    cli.run("capture", source.url, "--log", log_uri, *opt, *small, check=True)
    s.mset({f"k{i}": f"new{i}" * 20 for i in range(n)})
    cli.run("capture", source.url, "--log", log_uri, *opt, *small, "--fresh", check=True)
    # when several apply processes read the group and one is SIGKILLed mid-run
    watch = PendingWatch(buf, [f"conveyor:{i}" for i in range(4)])
    watch.start()
    procs = [cli.start("apply", target.url, "--log", log_uri, *opt, "--batch", "20",
                       "--idle-timeout", "2") for _ in range(members)]
    t = target.client()
    wait_until(lambda: t.dbsize() >= 500, 60, "apply to start writing")
    watch.dead = f"-{procs[0].pid}-".encode()
    procs[0].send_signal(signal.SIGKILL)
    outs = [p.communicate(timeout=120) for p in procs[1:]]
    watch.halt.set()
    watch.join()
    # then the survivors finish, each applied records, and the target matches the source
    for p, (out, err) in zip(procs[1:], outs):
        assert p.returncode == 0, out + err
        assert applied(out) > 0, out
    procs[0].wait()
    assert differences(source.client(), target.client()) == []        # the newer value of every key won
    # and no stream was ever read by two live consumers at once
    assert watch.samples > 10 and watch.shared == []
