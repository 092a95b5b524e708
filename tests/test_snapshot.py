"""Snapshot migration end to end: capture and apply as separate `conveyor` processes over every log
backend, against real servers; verify proves the target identical."""
from __future__ import annotations

import json
import signal
import time


from conveyor.log import open_meta, open_writer
from tests import cli
from tests.compare import wait_until
from tests.datasets import load_mixed


def copy_through_log(source, target, log_uri, *extra_apply):
    cap = cli.run("capture", source.url + "/0", "--log", log_uri, check=True)
    assert "snapshot complete" in cap.stdout
    app = cli.run("apply", target.url + "/0", "--log", log_uri, "--idle-timeout", "2",
                  *extra_apply, check=True)
    return cap, app


def test_mixed_dataset_arrives_identical_through_each_log(redis_factory, log_uri):
    # given a source with every type, binary and non-ASCII names, and TTLs
    source, target = redis_factory(), redis_factory()
    n = load_mixed(source.client(), 400)
    # when capture and apply run as separate processes over the log
    cap, app = copy_through_log(source, target, log_uri)
    # then verify finds no difference and the counts add up
    assert f"capture: {n} keys" in cap.stdout
    assert "0 dead letters" in app.stdout
    ver = cli.run("verify", source.url, target.url, "--show-diffs")
    assert ver.returncode == 0, ver.stdout + ver.stderr
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in ver.stdout
    assert target.client().dbsize() == n


def test_expiry_stays_absolute_and_passed_expiry_becomes_a_delete(redis_factory, log_uri):
    source, target = redis_factory(), redis_factory()
    s = source.client()
    s.set("short", "x", px=5000)
    s.set("long", "y", px=600_000)
    expected = s.pexpiretime("long")
    cli.run("capture", source.url, "--log", log_uri, check=True)
    assert s.exists("short")                      # captured while it lived (a loaded machine?)
    target.client().set("short", "stale")        # an old copy that must not survive
    wait_until(lambda: not s.exists("short"), timeout=10)   # it expires while its event waits
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    t = target.client()
    assert t.exists("short") == 0
    assert t.get("long") == b"y"
    assert t.pexpiretime("long") == expected      # same instant, not "10 minutes from apply"


def test_killed_apply_and_stopped_target_lose_nothing(redis_factory, log_uri):
    # given a captured source and a target that persists its data (AOF) across a restart
    source = redis_factory()
    target = redis_factory(extra=("--appendonly", "yes", "--appendfsync", "always"))
    n = load_mixed(source.client(), 6000)
    # and enough keys (without expiries: none may expire during the test) that a restarted apply
    # is still busy when the target stops: a batch of a block log is a block of up to 1000 keys
    fill = source.client().pipeline(transaction=False)
    for i in range(54_000):
        fill.set(f"plain:{i}", i)
    fill.execute()
    n += 54_000
    cli.run("capture", source.url, "--log", log_uri, check=True)
    # when apply is SIGKILLed mid-run
    proc = cli.start("apply", target.url, "--log", log_uri, "--batch", "50")
    deadline = time.time() + 60
    while target.client().dbsize() < 500 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < target.client().dbsize() < n
    # and the target goes down while the restarted apply is running, then comes back
    applied = target.client().dbsize()
    proc = cli.start("apply", target.url, "--log", log_uri, "--idle-timeout", "3", "--batch", "50")
    while target.client().dbsize() < applied + 500 and time.time() < deadline:
        time.sleep(0.02)
    target.stop()

    def waiting() -> str | None:
        out = cli.run("status", "--log", log_uri, check=True).stdout
        return out if "waiting for target" in out else None
    # apply notices and waits (status shows it), then the target comes back
    status_down = wait_until(waiting, timeout=60, what="apply waiting for the target")
    target.start()
    out, err = proc.communicate(timeout=120)
    # then apply waited and said so, and nothing is missing
    assert proc.returncode == 0, out + err
    assert "target unavailable" in err
    assert "waiting for target" in status_down
    ver = cli.run("verify", source.url, target.url)
    assert ver.returncode == 0, ver.stdout
    assert target.client().dbsize() == n


def test_wiped_target_is_rebuilt_from_the_log_alone(redis_factory, log_uri):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 300)
    # a Redis Stream log trims what every group acknowledged unless told to keep it
    keep = ("--log-opt", "trim=none") if log_uri.startswith("redis") else ()
    copy_through_log(source, target, log_uri, *keep)
    target.client().flushall()
    # the same group has committed everything; --from earliest replays the whole log
    cli.run("apply", target.url, "--log", log_uri, "--from", "earliest", "--idle-timeout", "2",
            *keep, check=True)
    assert cli.run("verify", source.url, target.url).returncode == 0


def test_undecodable_record_is_dead_lettered_counted_and_fails_the_run(redis_factory, log_uri):
    source, target = redis_factory(), redis_factory()
    source.client().set("good", "1")
    cli.run("capture", source.url, "--log", log_uri, check=True)
    w = open_writer(log_uri)
    w.append(b"0:bad", b"\xc3\x01garbage-that-is-not-avro")
    w.flush()
    w.close()
    app = cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1")
    assert app.returncode == 1
    assert "1 dead letter" in app.stdout
    assert target.client().get("good") == b"1"     # the rest still applied


def test_interrupted_capture_resumes_from_its_saved_cursor(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 60000)
    log_uri = f"file:{tmp_path / 'log'}"
    proc = cli.start("capture", source.url, "--log", log_uri, "--scan-count", "10")
    meta = open_meta(log_uri)
    deadline = time.time() + 60
    while time.time() < deadline:     # a cursor past the start has been saved
        docs = [json.loads(p.read_text()) for p in (tmp_path / "log" / "meta").glob("capture-*.json")]
        if docs and docs[0]["keys"] > 1000:
            break
        time.sleep(0.05)
    meta.close()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted" in out, out
    again = cli.run("capture", source.url, "--log", log_uri, check=True)
    assert "[resumed]" in again.stdout and "snapshot complete" in again.stdout
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    assert cli.run("verify", source.url, target.url).returncode == 0


def test_target_out_of_memory_is_waited_for_not_skipped(redis_factory, tmp_path):
    source = redis_factory()
    target = redis_factory(extra=("--maxmemory", "1mb", "--maxmemory-policy", "noeviction"))
    load_mixed(source.client(), 3000)
    log_uri = f"file:{tmp_path / 'log'}"
    cli.run("capture", source.url, "--log", log_uri, check=True)
    proc = cli.start("apply", target.url, "--log", log_uri, "--idle-timeout", "2")
    # apply hits the limit and waits (its status says so); then memory is freed up
    wait_until(lambda: "waiting for target" in cli.run("status", "--log", log_uri).stdout,
               timeout=60, what="apply waiting for the full target")
    target.client().config_set("maxmemory", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "target unavailable" in err and "OOM" in err or "maxmemory" in err
    assert cli.run("verify", source.url, target.url).returncode == 0
