"""Live replication: notifications first, then the scan; every gap detected, reported and healed."""
from __future__ import annotations

import re
import threading
import time

import pytest
from redis.crc import key_slot

from conveyor.workload import Workload
from tests import cli
from tests.compare import wait_until


def notifying_source(redis_factory, **kw):
    return redis_factory(extra=("--notify-keyspace-events", "KEA", *kw.pop("extra", ())), **kw)


def kill_subscriber(server, times: int, every: float) -> threading.Thread:
    """CLIENT KILL the capture's pub/sub connection ``times`` times, ``every`` seconds apart."""
    def killer():
        c = server.client()
        done = 0
        while done < times:
            time.sleep(every)
            if c.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1:
                done += 1
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t


def wait_for_subscriber(server, timeout=30.0) -> None:
    c = server.client()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if c.pubsub_numpat() >= 1:
            return
        time.sleep(0.05)
    raise AssertionError("capture never subscribed to keyspace notifications")


def test_live_replicate_heals_two_killed_subscribers_and_converges(redis_factory, tmp_path):
    # given a source under a steady mixed write load
    source, target = notifying_source(redis_factory), redis_factory()
    Workload(source.client(), rate=2000, keyspace=500, seed=1).run(1.0)     # existing data
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "3",
                     "--state-dir", str(tmp_path), "--recheck-delay", "2")
    wait_for_subscriber(source)
    load = Workload(source.client(), rate=1500, keyspace=500, seed=2).start(8)
    # when the subscriber is killed twice mid-run
    killer = kill_subscriber(source, times=2, every=2.5)
    load.join()
    killer.join()
    out, err = proc.communicate(timeout=180)
    # then the run reports both gaps and the resyncs that healed them, and verify finds nothing
    assert proc.returncode == 0, out + err
    assert "2 gaps, 2 resyncs (2 finished)" in out, out
    assert "converged" in out and "CANNOT" not in out
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out


def test_separate_live_capture_and_apply_converge_over_each_log(redis_factory, log_uri):
    source, target = notifying_source(redis_factory), redis_factory()
    Workload(source.client(), rate=2000, keyspace=300, seed=3).run(0.5)
    cap = cli.start("capture", source.url, "--log", log_uri, "--mode", "live", "--idle-timeout", "3")
    app = cli.start("apply", target.url, "--log", log_uri, "--idle-timeout", "8")
    wait_for_subscriber(source)
    load = Workload(source.client(), rate=1000, keyspace=300, seed=4).start(6)
    killer = kill_subscriber(source, times=2, every=2.0)
    load.join()
    killer.join()
    cout, cerr = cap.communicate(timeout=120)
    aout, aerr = app.communicate(timeout=120)
    assert cap.returncode == 0, cout + cerr
    assert app.returncode == 0, aout + aerr
    assert "2 gaps" in cout and "converged" in cout
    ver = cli.run("verify", source.url, target.url, "--recheck-delay", "2", "--show-diffs")
    assert ver.returncode == 0, ver.stdout


def test_liveonly_with_slots_copies_exactly_the_keys_written_during_the_run(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    s = source.client()
    for i in range(200):
        s.set(f"before:{i}", i)                       # existed before the run: not copied
    proc = cli.start("replicate", source.url, target.url, "--mode", "liveonly", "--idle-timeout",
                     "2", "--key-slots", "0-8000", "--state-dir", str(tmp_path), "--no-verify")
    wait_for_subscriber(source)
    written = [f"during:{i}".encode() for i in range(400)]
    for k in written:
        s.set(k, b"v")
    s.delete(b"during:0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    want = {k for k in written if key_slot(k) <= 8000} - {b"during:0"}
    assert set(target.client().keys("*")) == want


def test_deletes_renames_moves_and_expiries_arrive_as_deletes(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    s = source.client()
    for k in ("del", "ren", "mov", "exp"):
        s.set(k, "v")
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "3",
                     "--state-dir", str(tmp_path), "--no-verify")
    wait_for_subscriber(source)
    t = target.client()
    wait_until(lambda: t.exists("del", "ren", "mov", "exp") == 4, 30,
               "the initial scan to copy all four")
    s.delete("del")
    s.rename("ren", "renamed")
    s.move("mov", 1)
    s.pexpire("exp", 10)
    wait_until(lambda: not s.exists("exp"), 10, "the expiry to fire")   # reading it expires it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert set(target.client().keys("*")) == {b"renamed"}


def test_disabled_notifications_stop_with_the_exact_setting(redis_factory, tmp_path):
    source = redis_factory()                          # notify-keyspace-events is "" by default
    p = cli.run("capture", source.url, "--log", f"file:{tmp_path}", "--mode", "live")
    line = cli.assert_one_line_error(p, 1)
    assert "notify-keyspace-events" in line and "CONFIG SET" in line and "redis.conf" in line
    assert "set notify-keyspace-events to 'KA'" in line, line


def test_enable_notifications_sets_them_when_asked(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    p = cli.run("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "1",
                "--enable-notifications", "--state-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    flags = source.client().config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert "K" in flags and ("A" in flags or "g" in flags)


def test_refused_config_is_reported_and_capture_continues(redis_factory, tmp_path):
    source = notifying_source(redis_factory, extra=("--rename-command", "CONFIG", ""))
    target = redis_factory()
    p = cli.run("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "1",
                "--state-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "could not check notify-keyspace-events" in p.stdout


def test_pubsub_output_buffer_overflow_is_a_healed_gap(redis_factory, tmp_path):
    source = notifying_source(redis_factory, extra=("--client-output-buffer-limit", "pubsub 8kb 4kb 1"))
    target = redis_factory()
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "3",
                     "--state-dir", str(tmp_path), "--recheck-delay", "2")
    wait_for_subscriber(source)
    big = source.client()
    for round_ in range(30):                          # bursts far beyond 8 kB of notifications
        p = big.pipeline(transaction=False)
        for i in range(3000):
            p.set(f"burst:{round_}:{i}:{'x' * 40}", i)
        p.execute()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    m = re.search(r"(\d+) gaps?, (\d+) resyncs? \((\d+) finished\)", out)
    assert m and int(m.group(1)) >= 1 and m.group(2) == m.group(3), out
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out


def test_full_dirty_set_falls_back_to_a_counted_resync(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    proc = cli.start("replicate", source.url, target.url, "--mode", "liveonly", "--idle-timeout",
                     "3", "--max-dirty-keys", "10", "--state-dir", str(tmp_path))
    wait_for_subscriber(source)
    p = source.client().pipeline(transaction=False)
    for i in range(5000):
        p.set(f"k{i}", i)
    p.execute()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "dirty-key set full" in out
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out


def test_sigterm_stops_live_capture_with_everything_read_on_the_log(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    log_uri = f"file:{tmp_path / 'log'}"
    cap = cli.start("capture", source.url, "--log", log_uri, "--mode", "live")
    wait_for_subscriber(source)
    for i in range(300):
        source.client().set(f"k{i}", i)
    time.sleep(1)
    cap.terminate()
    out, err = cap.communicate(timeout=60)
    assert cap.returncode == 0, out + err
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    assert target.client().dbsize() == 300


@pytest.mark.parametrize("value_type", ["dump", "struct"])
def test_live_across_versions_converges_with_either_type(redis_factory, tmp_path, value_type):
    """Valkey 8.1 -> Redis 7.0 under load: live events converted (dump) or typed (struct)."""
    source = redis_factory("valkey8.1", extra=("--notify-keyspace-events", "KEA"))
    target = redis_factory("redis7.0")
    Workload(source.client(), rate=2000, keyspace=300, seed=3).run(1.0)
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--type", value_type,
                     "--idle-timeout", "3", "--state-dir", str(tmp_path), "--recheck-delay", "2")
    wait_for_subscriber(source)
    Workload(source.client(), rate=1500, keyspace=300, seed=4).run(4.0)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out, out
    typed = int(re.search(r"(\d+) typed", out).group(1))
    converted = int(re.search(r"(\d+) converted", out).group(1))
    assert (converted if value_type == "dump" else typed) > 300, out


def log_events(log_uri: str) -> list:
    """Every event on a log, in log order (a file log has one partition)."""
    from conveyor.events import Codec
    from conveyor.log import open_reader

    codec, reader, out = Codec(), open_reader(log_uri, "inspect", start="earliest"), []
    try:
        while batch := reader.poll(1000, 1.0):
            out += [ev for r in batch for ev in codec.decode_all(r.value)]
    finally:
        reader.close()
    return out


def test_hot_key_is_read_once_per_wait_and_never_goes_back_in_time(redis_factory, tmp_path):
    # given a source with enough keys that the scan is still running while a key is hammered
    from conveyor.events import Kind
    from conveyor.rdb import decode_dump

    source = notifying_source(redis_factory)
    client = source.client()
    pipe = client.pipeline(transaction=False)
    for i in range(30000):
        pipe.set(f"filler:{i}", i)
    pipe.set("hot", 0)
    pipe.execute()
    log_uri = f"file:{tmp_path / 'log'}"
    cap = cli.start("capture", source.url, "--log", log_uri, "--mode", "live", "--idle-timeout", "2",
                    "--scan-count", "100")
    wait_for_subscriber(source)
    # when it is incremented 20,000 times during the scan and after it
    writes = 20000
    for _ in range(writes // 50):
        pipe = client.pipeline(transaction=False)
        for _ in range(50):
            pipe.incr("hot")
        pipe.execute()
    out, err = cap.communicate(timeout=120)
    assert cap.returncode == 0, out + err
    # then its values on the log only ever go forward, end at the last write, and the
    # notifications of a key already waiting cost no extra read
    hot = [int(decode_dump(ev.payload).value) for ev in log_events(log_uri)
           if ev.kind == Kind.UPSERT and ev.key == b"hot"]
    assert hot == sorted(hot), "a stale value landed after a newer one"
    assert hot[-1] == writes
    assert len(hot) < writes // 2, len(hot)
    notified = int(re.search(r"(\d+) keyspace notifications", out).group(1))
    assert notified >= writes, out


def test_liveonly_restart_is_a_counted_gap_healed_by_a_resync(redis_factory, tmp_path):
    # given a liveonly capture that ran and stopped
    source = notifying_source(redis_factory)
    target = redis_factory()
    log_uri = f"file:{tmp_path / 'log'}"
    first = cli.start("capture", source.url, "--log", log_uri, "--mode", "liveonly",
                      "--idle-timeout", "1")
    wait_for_subscriber(source)
    source.client().set("during-first", 1)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "0 gaps" in out, out + err
    # when keys change while no capture runs
    source.client().set("while-down", 2)
    source.client().delete("during-first")
    # then the next run reports the restart as a gap, resyncs, and the log holds both changes
    p = cli.run("capture", source.url, "--log", log_uri, "--mode", "liveonly", "--idle-timeout", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 gap, 1 resync (1 finished)" in p.stdout and "capture restarted" in p.stdout, p.stdout
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    assert target.client().keys("*") == [b"while-down"]


def test_keys_deleted_before_a_live_run_are_deleted_on_the_target(redis_factory, log_uri):
    # given a snapshot on the log, then deletes on the source while no capture runs
    source, target = notifying_source(redis_factory), redis_factory()
    client = source.client()
    for i in range(200):
        client.set(f"k{i}", i)
    cli.run("capture", source.url, "--log", log_uri, check=True)
    client.delete("k7", "k42")
    client.rename("k99", "renamed")
    # when a live capture starts on the same log
    p = cli.run("capture", source.url, "--log", log_uri, "--mode", "live", "--idle-timeout", "1")
    # then only what changed is logged: the keys the log holds but its scan no longer saw are
    # re-read as deletes, the renamed key is new; the 197 unchanged keys are not logged again
    assert p.returncode == 0, p.stdout + p.stderr
    assert "compared 198 digests" in p.stdout and "read again 4 keys" in p.stdout, p.stdout
    assert "4 events (1 upsert, 3 deletes)" in p.stdout, p.stdout
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    t = target.client()
    assert t.dbsize() == 198 and t.exists("k7", "k42", "k99") == 0 and t.get("renamed") == b"99"


def test_a_trimmed_log_makes_a_restarted_live_capture_say_it_cannot_claim_convergence(
        redis_factory, tmp_path):
    from conveyor.log import open_reader

    source, target, buffer = notifying_source(redis_factory), redis_factory(), redis_factory()
    log_uri = f"{buffer.url}/0"
    source.client().set("a", 1)
    cli.run("capture", source.url, "--log", log_uri, check=True)
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    r = open_reader(log_uri, "apply")
    r.trim()                                      # what apply does every few seconds
    r.close()
    p = cli.run("capture", source.url, "--log", log_uri, "--mode", "liveonly", "--idle-timeout", "1")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "trimmed" in p.stdout and "CANNOT claim convergence" in p.stdout, p.stdout


def test_live_filters_select_changes_and_never_drop_a_delete(redis_factory, tmp_path):
    # given matching and non-matching keys, and a live run with a pattern, a type and an exclude
    source, target = notifying_source(redis_factory), redis_factory()
    s = source.client()
    s.mset({"user:1": "a", "user:2": "b", "user:3": "c", "other:1": "x"})
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "2",
                     "--state-dir", str(tmp_path), "--no-verify", "--scan-match", "user:*",
                     "--scan-type", "string", "--key-exclude", "^user:secret")
    wait_for_subscriber(source)
    wait_until(lambda: target.client().exists("user:1", "user:2", "user:3") == 3,
               what="the initial scan copied user:1-3")
    # when matching keys change, are deleted or change type, and others are written
    s.set("user:new", "n")
    s.delete("user:1")
    s.delete("user:2")
    s.hset("user:2", "f", "v")                        # now a hash: out of --scan-type string
    s.hset("user:hash", "f", "v")
    s.set("user:secret1", "s")
    s.set("other:2", "y")
    out, err = proc.communicate(timeout=60)
    # then exactly the selected keys are on the target, and the deletes arrived
    assert proc.returncode == 0, out + err
    assert set(target.client().keys("*")) == {b"user:3", b"user:new"}


def test_evicted_keys_are_deleted_on_the_target(redis_factory, tmp_path):
    source = notifying_source(redis_factory, extra=("--maxmemory", "3mb",
                                                    "--maxmemory-policy", "allkeys-random"))
    target = redis_factory()
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "3",
                     "--state-dir", str(tmp_path), "--recheck-delay", "1")
    wait_for_subscriber(source)
    s = source.client()
    for i in range(6000):
        s.set(f"k{i}", "v" * 1000)
    # Writing is over: no more evictions. A source kept at its maxmemory would go on evicting
    # keys whenever a client needs buffer memory, also for the final verify's reads after
    # capture stopped: real changes no capture saw (verify names them, test_verify).
    s.config_set("maxmemory", 0)
    out, err = proc.communicate(timeout=120)
    assert int(s.info("stats")["evicted_keys"]) > 1000
    assert proc.returncode == 0, out + err
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out, out
    assert target.client().dbsize() == s.dbsize() < 6000
