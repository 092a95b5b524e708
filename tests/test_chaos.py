"""Chaos: faults of the pipeline's own parts, injected for real into running processes.

Each scenario runs capture and apply as separate processes (as users deploy them), breaks one
part (a server stopped and restarted on the same port, a process SIGKILLed), and ends with an
independent compare (tests/compare.py: plain redis-py reads) and the exit codes stated.
"""
from __future__ import annotations

import time

from conveyor.capture.ledger import DELETES_KEPT_S, Ledger
from conveyor.log import open_meta
from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_identical, wait_until
from tests.datasets import load_mixed
from tests.test_live import notifying_source, wait_for_subscriber


def _entries(buffer) -> int:
    """Entries the Redis Streams log on ``buffer`` holds."""
    r = buffer.client()
    return sum(r.xlen(k) for k in r.scan_iter(match="conveyor:[0-9]*", _type="stream"))


def _snapshot_under_way(redis_factory, buffer):
    """A 60,000-key source, and capture and apply over ``buffer`` both mid-run (the log holds
    300 entries: blocks of at most 100 keys, so about a tenth of the keys): (source, target,
    capture process, apply process)."""
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 60_000)
    log = f"{buffer.url}/0"
    cap = cli.start("capture", source.url, "--log", log, "--scan-count", "100")
    app = cli.start("apply", target.url, "--log", log, "--idle-timeout", "6")
    wait_until(lambda: _entries(buffer) >= 300, 60, "300 entries on the log")
    assert cap.poll() is None, "capture ended before the fault: the test proves nothing"
    return source, target, cap, app


def test_stream_buffer_restarted_with_aof_is_waited_out_by_capture_and_apply(redis_factory):
    # given capture and apply mid-run over a buffer with AOF
    buffer = redis_factory(extra=("--appendonly", "yes", "--appendfsync", "always"))
    source, target, cap, app = _snapshot_under_way(redis_factory, buffer)
    # when the buffer Redis stops for 4 s and comes back with its AOF
    buffer.stop()
    time.sleep(4)
    buffer.start()
    # then both waited for it and finished, and the target is the source
    cout, cerr = cap.communicate(timeout=240)
    aout, aerr = app.communicate(timeout=240)
    assert cap.returncode == 0, cout + cerr
    assert app.returncode == 0, aout + aerr
    assert "waiting for the log" in cerr + aerr
    assert "Traceback" not in cerr + aerr
    assert differences(source.client(), target.client()) == []


def test_stream_buffer_restarted_empty_in_a_live_run_is_a_healed_log_loss(redis_factory):
    # given a live capture and apply over a buffer without persistence, under writes
    source, target, buffer = notifying_source(redis_factory), redis_factory(), redis_factory()
    Workload(source.client(), rate=2000, keyspace=400, seed=11).run(1.0)
    log = f"{buffer.url}/0"
    cap = cli.start("capture", source.url, "--log", log, "--mode", "live", "--idle-timeout", "4")
    app = cli.start("apply", target.url, "--log", log, "--idle-timeout", "10")
    wait_for_subscriber(source)
    load = Workload(source.client(), rate=800, keyspace=400, seed=12).start(8)
    # when the buffer restarts empty mid-run (the load's changes reach the target by then)
    t = target.client()
    wait_until(lambda: load.stats.commands > 1000 and t.dbsize() > 0, timeout=60,
               what="the load under way and applied")
    buffer.restart()
    load.join()
    # then capture says the log lost records and resyncs, apply replays the new log, both converge
    cout, cerr = cap.communicate(timeout=180)
    aout, aerr = app.communicate(timeout=180)
    assert "the log lost records" in cout + cerr, cout + cerr
    assert cap.returncode == 0 and "converged" in cout, cout + cerr
    assert app.returncode == 0, aout + aerr
    assert "the log lost records" in aout + aerr
    assert wait_identical(source.client(), target.client(), timeout=10) == []


def test_deletes_apply_had_not_applied_when_the_log_was_lost_are_made_again(redis_factory):
    # given a live capture over a buffer without persistence, and the target holding every key
    source, target, buffer = notifying_source(redis_factory), redis_factory(), redis_factory()
    src = source.client()
    src.mset({f"k:{i}": f"v{i}" for i in range(50)})
    log = f"{buffer.url}/0"
    # (its idle timeout outlasts the checkpoint heartbeat that shows the deletes, and the restart)
    cap = cli.start("capture", source.url, "--log", log, "--mode", "live", "--idle-timeout", "20")
    wait_for_subscriber(source)
    first = cli.start("apply", target.url, "--log", log)
    t = target.client()
    wait_until(lambda: t.dbsize() == 50, timeout=60, what="the target holding every key")
    first.terminate()
    assert first.wait(timeout=60) == 0
    # and five keys deleted on the source, their deletes on the log but not applied (apply stopped)
    src.delete(*[f"k:{i}" for i in range(5)])
    meta = open_meta(log)
    wait_until(lambda: any(d.get("deletes", 0) >= 5 for d in meta.documents().values()),
               timeout=60, what="the deletes saved on the log")
    meta.close()
    # when the buffer restarts empty (the log and those deletes are lost) and apply starts again
    buffer.restart()
    app = cli.start("apply", target.url, "--log", log, "--idle-timeout", "15")
    cout, cerr = cap.communicate(timeout=180)
    aout, aerr = app.communicate(timeout=180)
    # then the resync into the new log deletes them again: the target is the source
    assert "the log lost records" in cout + cerr, cout + cerr
    assert cap.returncode == 0 and "converged" in cout, cout + cerr
    assert app.returncode == 0, aout + aerr
    assert sorted(t.keys()) == sorted(src.keys()) and t.dbsize() == 45
    assert differences(src, t) == []


def test_a_lost_log_after_deletes_were_forgotten_is_said_and_not_converged(redis_factory,
                                                                             tmp_path):
    # given a live capture that logged a delete, whose key ledger has forgotten an older one
    source, buffer = notifying_source(redis_factory), redis_factory()
    src = source.client()
    src.mset({"a": "1", "b": "2"})
    log, state = f"{buffer.url}/0", tmp_path / "state"
    args = ("capture", source.url, "--log", log, "--mode", "live", "--state-dir", str(state))
    first = cli.start(*args, "--idle-timeout", "3")
    wait_for_subscriber(source)
    src.delete("b")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    root = next(state.glob("ledgers/*"))
    ledger = Ledger(root)
    ledger.deleted([b"old"], at_ms=int(time.time() * 1000) - DELETES_KEPT_S * 1000 - 60_000)
    ledger.commit(ledger.meta["capture_id"], ledger.meta["seq"])
    ledger.close()
    # when it runs again (its catch-up merges the ledger) and the log is then lost
    again = cli.start(*args, "--idle-timeout", "12")
    wait_until(lambda: any(d.get("state") == "live" for d in _documents(log)), timeout=60,
               what="the second run live")
    buffer.restart()
    out, err = again.communicate(timeout=180)
    # then it resyncs, says what it cannot delete again, and does not claim convergence
    assert "the log lost records" in out + err, out + err
    assert "no longer remembers deletes logged before" in out + err, out + err
    assert "CANNOT claim convergence" in out and again.returncode != 0, out + err
    assert "Traceback" not in err


def _documents(log: str) -> list[dict]:
    meta = open_meta(log)
    try:
        return list(meta.documents().values())
    finally:
        meta.close()


def test_stream_buffer_restarted_empty_in_a_snapshot_stops_both_with_the_sentence(redis_factory):
    # given a snapshot capture and an apply mid-run over a buffer without persistence
    buffer = redis_factory()
    _, _, cap, app = _snapshot_under_way(redis_factory, buffer)
    # when the buffer restarts empty
    buffer.restart()
    # then neither claims success: both say the log lost records and exit 1
    cout, cerr = cap.communicate(timeout=180)
    aout, aerr = app.communicate(timeout=180)
    assert cap.returncode == 1 and "the log lost records" in cout + cerr, cout + cerr
    assert app.returncode == 1 and "the log lost records" in aout + aerr, aout + aerr
    assert "Traceback" not in cerr + aerr


def test_file_log_group_keeps_one_apply_and_a_sigkilled_one_is_taken_over(redis_factory, tmp_path):
    # given a captured file log big enough that apply is mid-run when it is killed
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 60_000)
    log = f"file:{tmp_path / 'log'}"
    cli.run("capture", source.url, "--log", log, check=True)
    first = cli.start("apply", target.url, "--log", log, "--batch", "200")
    t = target.client()
    deadline = time.monotonic() + 60
    while t.dbsize() < 2_000:
        assert time.monotonic() < deadline and first.poll() is None, "apply never got going"
        time.sleep(0.05)
    # (the target holds writes from now on: the first apply stays mid-run however fast it is)
    t.client_pause(60_000, all=False)
    # when a second and a third apply of the group start while the first one runs
    for _ in range(2):
        p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1")
        assert "one reader per group" in cli.assert_one_line_error(p, 1)
    # and the first one is SIGKILLed mid-run
    first.kill()
    first.wait()
    assert t.dbsize() < 60_000                      # really mid-run
    t.client_unpause()
    # then the next apply of the group takes over from the committed position and finishes
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert differences(source.client(), target.client()) == []
