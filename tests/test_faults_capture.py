"""Faults on the capture side: the source restarted, flushed or swapped, the subscriber killed, the
log unavailable or lost. Real servers and real processes; every outcome checked with an
independent compare (plain redis-py reads of both sides), never only conveyor's own verify."""
from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conveyor.capture import Capture, checkpoint_name
from conveyor.capture.supervise import Interrupted, Supervisor
from conveyor.endpoints import server_info
from conveyor.errors import ConveyorError, LogLost, LogUnavailable, SourceError
from conveyor.events import Codec, Kind
from conveyor.keys import KeyFilter
from conveyor.log import open_meta
from conveyor.log.file import FileLogWriter
from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_identical, wait_until
from tests.test_live import log_events, notifying_source, wait_for_subscriber

# -- helpers ---------------------------------------------------------------------------------------
class Writer:
    """A steady mixed workload that outlives the source going away (it waits and goes on)."""

    def __init__(self, server, seed: int, rate: int = 800) -> None:
        self.load = Workload(server.client(socket_timeout=2, socket_connect_timeout=1),
                             rate=rate, keyspace=300, seed=seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.failures = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.load.step(max(1, int(self.load.rate / 20)))
            except (redis.ConnectionError, redis.TimeoutError):
                self.failures += 1
            self._stop.wait(0.05)

    def start(self) -> "Writer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Heartbeat:
    """Keeps a live run busy (one write every 0.3 s) so that --idle-timeout ends it only after
    the test stopped this."""

    def __init__(self, server, key: str = "heartbeat") -> None:
        self.client, self.key = server.client(socket_timeout=2, socket_connect_timeout=1), key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.client.incr(self.key)
            except (redis.ConnectionError, redis.TimeoutError):
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def outage_under_load(server, *, down_s: float, load_on, seed: int) -> Writer:
    """``server`` stopped for ``down_s`` and started again on its port, while ``load_on`` takes
    writes (from 2 s before until 2 s after)."""
    writer = Writer(load_on, seed=seed).start()
    time.sleep(2)
    server.stop()
    time.sleep(down_s)
    server.start()
    time.sleep(2)
    writer.stop()
    return writer


def finish(proc, timeout: float = 90) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except Exception:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"conveyor did not end\nstdout: {out}\nstderr: {err}")
    assert "Traceback" not in err, err
    return out, err


def replicate_live(source, target, tmp_path, *extra: str):
    return cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "3",
                     "--state-dir", str(tmp_path), "--no-verify", *extra)


def wait_for_keys(client: redis.Redis, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.dbsize() < n:
        assert time.monotonic() < deadline, f"only {client.dbsize()} of {n} keys arrived"
        time.sleep(0.1)


def checkpoint_doc(log_dir: Path) -> dict:
    docs = list((log_dir / "meta").glob("capture-*.json"))
    return json.loads(docs[0].read_text()) if docs else {}


# -- the source goes away and comes back -----------------------------------------------------------
def test_live_run_waits_out_the_source_down_15s_and_converges(redis_factory, tmp_path):
    # given a live replicate of a source with AOF under a steady mixed write load
    source = notifying_source(redis_factory, extra=("--appendonly", "yes"))
    target = redis_factory()
    Workload(source.client(), rate=2000, keyspace=300, seed=11).run(0.5)
    proc = replicate_live(source, target, tmp_path)
    wait_for_subscriber(source)
    # when the source is stopped for 15 s and started again on the same port
    writer = outage_under_load(source, down_s=15, load_on=source, seed=12)
    # then the run waited, healed the gap, and ends converged with a target equal to the source
    out, err = finish(proc)
    assert proc.returncode == 0, out + err
    assert "waiting for source" in err, err
    assert "source restarted" in out and "converged" in out and "CANNOT" not in out, out
    assert writer.load.stats.commands > 500       # the load did run around the outage
    assert differences(source.client(), target.client()) == []


def test_source_restarted_empty_leaves_the_target_empty_of_the_old_keys(redis_factory, tmp_path):
    # given a live run that copied 300 keys, then 50 written while it ran
    source, target = notifying_source(redis_factory), redis_factory()
    s = source.client()
    for i in range(300):
        s.set(f"old:{i}", i)
    proc = replicate_live(source, target, tmp_path)
    wait_for_subscriber(source)
    wait_for_keys(target.client(), 300)
    for i in range(50):                         # known from notifications, not from the scan
        s.set(f"during:{i}", i)
    wait_for_keys(target.client(), 350)
    # when the source restarts without persistence (empty) and gets one new key
    source.restart()
    source.client().set("new", "after the restart")
    # then the old keys become deletes on the target, which holds exactly the new key
    out, err = finish(proc)
    assert proc.returncode == 0, out + err
    assert "source restarted (run_id" in out and "converged" in out, out
    # the 350 keys the ledger has and the rescan no longer saw, and the new one, were read again
    assert "read again 351 keys" in out and "350 deletes" in out, out
    assert target.client().keys("*") == [b"new"]
    assert differences(source.client(), target.client()) == []


def test_killed_subscriber_while_the_source_is_down_is_waited_out(redis_factory, tmp_path):
    # given a live run under load
    source = notifying_source(redis_factory, extra=("--appendonly", "yes"))
    target = redis_factory()
    proc = replicate_live(source, target, tmp_path)
    wait_for_subscriber(source)
    writer = Writer(source, seed=21).start()
    time.sleep(1)
    # when the subscriber is killed and the source goes down right after, for 3 s
    assert source.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    source.stop()
    time.sleep(3)
    source.start()
    wait_for_subscriber(source)
    time.sleep(1)
    writer.stop()
    # then no traceback, the gaps are reported, and the run converged to an equal target
    out, err = finish(proc)
    assert proc.returncode == 0, out + err
    assert "subscriber connection lost" in out and "converged" in out, out
    assert differences(source.client(), target.client()) == []


def test_snapshot_waits_out_the_source_restarting_mid_scan(redis_factory, tmp_path):
    # given a snapshot of 5,000 keys (AOF) read 100 at a time
    source = redis_factory(extra=("--appendonly", "yes", "--appendfsync", "always"))
    source.client().mset({f"k{i}": i for i in range(5000)})
    restarted = threading.Event()

    def restart_after_first_batch(st) -> None:
        # when the source goes down right after the first batch, for 3 s
        if st.keys and not restarted.is_set():
            restarted.set()
            source.stop()
            threading.Timer(3, source.start).start()

    writer = FileLogWriter(f"file:{tmp_path / 'log'}", {})
    try:
        st = make_capture(source, tmp_path / "log", writer, scan_count=100,
                          on_progress=restart_after_first_batch).run()
    finally:
        writer.close()
    # then the scan waited, went on, and the log holds every key
    assert restarted.is_set() and st.complete and st.source_waits >= 1, st
    assert st.rescans == 1, st                   # its cursor meant nothing after the restart
    keys = {ev.key for ev in log_events(f"file:{tmp_path / 'log'}") if ev.kind == Kind.UPSERT}
    assert keys == {f"k{i}".encode() for i in range(5000)}


# -- commands that send no notification ------------------------------------------------------------
def test_flushdb_swapdb_and_flushall_on_the_source_are_gaps_healed_on_the_target(
        redis_factory, tmp_path):
    # given db 0 and db 1 with different data, and a live run of db 0
    source, target = notifying_source(redis_factory), redis_factory()
    s0, s1, t = source.client(0), source.client(1), target.client()
    s0.mset({f"zero:{i}": i for i in range(200)})
    s1.mset({f"one:{i}": i for i in range(150)})
    s1.hset("one:hash", mapping={"a": 1, "b": 2})
    proc = replicate_live(source, target, tmp_path)
    wait_for_subscriber(source)
    busy = frozenset({b"heartbeat"})         # changes all the time: compared once it stopped
    with Heartbeat(source):
        assert wait_identical(s0, t, ignore=busy) == []
        # when db 0 is flushed and written again
        s0.flushdb()
        s0.set("after-flushdb", 1)
        assert wait_identical(s0, t, ignore=busy) == []
        # ... then swapped with db 1 (no notification for either)
        s0.execute_command("SWAPDB", 0, 1)
        assert wait_identical(s0, t, ignore=busy) == []
        assert t.exists("one:hash") and not t.exists("zero:1")
        # ... and everything is flushed, then one key written
        s0.flushall()
        s0.set("after-flushall", 1)
        assert wait_identical(s0, t, ignore=busy) == []
    # then each was a gap, reported and healed, and the run converged
    out, err = finish(proc)
    assert proc.returncode == 0, out + err
    for gap in ("FLUSHDB on the source", "SWAPDB on the source", "FLUSHALL on the source"):
        assert f"gap: {gap}" in out, out
    assert "converged" in out and "CANNOT" not in out, out
    assert differences(s0, t) == []


# -- refusals are not waited for -------------------------------------------------------------------
def test_a_refused_read_is_one_line_naming_it_not_a_wait(redis_factory, tmp_path):
    source = redis_factory()
    source.client().set("k", 1)
    source.client().execute_command("ACL", "SETUSER", "noscan", "on", ">pw", "~*", "+@all", "-scan")
    url = f"redis://noscan:pw@127.0.0.1:{source.port}"
    p = cli.run("capture", url, "--log", f"file:{tmp_path / 'log'}", timeout=30)
    line = cli.assert_one_line_error(p, 1)
    assert "refused SCAN for user 'noscan' (NOPERM)" in line and "+scan" in line, line
    assert "pw@" not in line


def test_a_subscriber_refused_after_a_reconnect_ends_the_run_in_one_line(redis_factory, tmp_path):
    # given a live capture whose user then loses the right to PSUBSCRIBE
    source = notifying_source(redis_factory)
    proc = cli.start("capture", source.url, "--log", f"file:{tmp_path / 'log'}", "--mode", "live")
    wait_for_subscriber(source)
    admin = source.client()
    admin.execute_command("ACL", "SETUSER", "default", "-psubscribe")
    # when its subscriber connection is killed and it subscribes again
    admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    # then the refusal is not waited for: exit 1, the last line names it, no traceback
    out, err = finish(proc, timeout=30)
    assert proc.returncode == 1, out + err
    last = err.strip().splitlines()[-1]
    assert "refused PSUBSCRIBE" in last and "ACL SETUSER default +psubscribe" in last, err


def test_stop_interrupts_a_wait_for_the_source_and_says_the_state(redis_factory, tmp_path):
    # given a live capture whose source went away
    source = notifying_source(redis_factory)
    source.client().set("k", 1)
    log_dir = tmp_path / "log"
    proc = cli.start("capture", source.url, "--log", f"file:{log_dir}", "--mode", "live")
    wait_for_subscriber(source)
    source.stop()
    # when it waits (the checkpoint says so) and is sent SIGTERM
    deadline = time.monotonic() + 20
    while not checkpoint_doc(log_dir).get("state", "").startswith("waiting for source"):
        assert time.monotonic() < deadline, checkpoint_doc(log_dir)
        time.sleep(0.2)
    # and `conveyor status` shows the wait
    shown = cli.run("status", "--log", f"file:{log_dir}", check=True).stdout
    assert re.search(r"capture capture-\w+: waiting for source: ", shown), shown
    proc.send_signal(signal.SIGTERM)
    # then it stops at once, saying why it cannot claim convergence, without a traceback
    out, err = finish(proc, timeout=20)
    assert proc.returncode == 1, out + err
    assert "CANNOT claim convergence" in out, out


# -- the log: unavailable for a while, or lost -----------------------------------------------------
class FlakyFileWriter(FileLogWriter):
    """The real file log, whose flush is unavailable ``times`` times (as a buffer Redis restarting
    would be); the records stay buffered and the next flush writes them."""

    def __init__(self, uri: str, times: int) -> None:
        super().__init__(uri, {})
        self.times = times

    def flush(self, timeout: float = 60.0) -> None:
        if self.times > 0:
            self.times -= 1
            raise LogUnavailable("log buffer is loading (test)")
        super().flush(timeout)


class LosingFileWriter(FileLogWriter):
    """The real file log that reports itself lost once, after ``after`` identity checks."""

    def __init__(self, uri: str, after: int) -> None:
        super().__init__(uri, {})
        self.after, self.adopted = after, 0

    def check_identity(self) -> None:
        self.after -= 1
        if self.after == 0:
            raise LogLost("log id changed (test)")

    def adopt_new_log(self) -> None:
        self.adopted += 1


def make_capture(source, log_dir: Path, writer, mode: str = "snapshot", **kw) -> Capture:
    # redis-py's own few retries would hide a short outage: the capture's supervision is tested
    client = source.client(retry=Retry(NoBackoff(), 0))
    info = server_info(client)
    flt = KeyFilter()
    return Capture(source=client, source_info=info, writer=writer,
                   meta=open_meta(f"file:{log_dir}"), codec=Codec(), key_filter=flt, mode=mode, connect=source.client,
                   checkpoint=checkpoint_name(source.url, info.db, flt), **kw)


def test_an_unavailable_log_is_waited_out_and_nothing_is_lost(redis_factory, tmp_path):
    source = redis_factory()
    source.client().mset({f"k{i}": i for i in range(500)})
    writer = FlakyFileWriter(f"file:{tmp_path / 'log'}", times=3)
    try:
        st = make_capture(source, tmp_path / "log", writer, scan_count=100).run()
    finally:
        writer.close()
    assert st.complete and st.log_waits >= 3 and writer.times == 0
    keys = {ev.key for ev in log_events(f"file:{tmp_path / 'log'}") if ev.kind == Kind.UPSERT}
    assert len(keys) == 500


def test_a_lost_log_in_live_mode_is_resynced_whole_into_the_new_one(redis_factory, tmp_path,
                                                                    monkeypatch):
    import conveyor.capture.live as live
    monkeypatch.setattr(live, "IDENTITY_INTERVAL_S", 0.2)
    source = notifying_source(redis_factory)
    source.client().mset({f"k{i}": i for i in range(100)})
    writer = LosingFileWriter(f"file:{tmp_path / 'log'}", after=3)
    cap = make_capture(source, tmp_path / "log", writer, mode="live", idle_timeout=1.5)
    try:
        st = cap.run()
    finally:
        writer.close()
    assert st.complete and writer.adopted == 1, st
    assert any(g.startswith("the log lost records (log id changed") for g in st.gaps), st.gaps
    begins = [ev for ev in log_events(f"file:{tmp_path / 'log'}") if ev.kind == Kind.SNAPSHOT_BEGIN]
    assert len(begins) == 2 and "the log lost records" in begins[1].info.get("reason", "")
    assert st.keys == 200                        # every key written again into the "new" log


def test_a_lost_log_ends_a_snapshot_with_exit_1(redis_factory, tmp_path):
    class LostOnFlush(FileLogWriter):
        def flush(self, timeout: float = 60.0) -> None:
            raise LogLost("the log directory was replaced (test)")

    source = redis_factory()
    source.client().set("k", 1)
    writer = LostOnFlush(f"file:{tmp_path / 'log'}", {})
    with pytest.raises(LogLost, match="^the log lost records: "):
        make_capture(source, tmp_path / "log", writer).run()
    assert LogLost.exit_code == 1


def test_log_directory_recreated_under_a_live_capture_is_resynced(redis_factory, tmp_path):
    # given a live capture to a file log, with every key on it
    source, target = notifying_source(redis_factory), redis_factory()
    s = source.client()
    s.mset({f"k{i}": i for i in range(200)})
    log_dir = tmp_path / "log"
    proc = cli.start("capture", source.url, "--log", f"file:{log_dir}", "--mode", "live",
                     "--idle-timeout", "12")
    wait_for_subscriber(source)
    # once its scan is over (its checkpoint, saved every few seconds, says live)
    wait_until(lambda: checkpoint_doc(log_dir).get("state") == "live", 60,
               "the capture's scan to be over")
    # when the log directory is deleted and created again, and the source changes meanwhile
    shutil.rmtree(log_dir)
    log_dir.mkdir()
    s.delete("k1")
    s.set("new", 1)
    # then capture says the log lost records, resyncs the whole source into the new log, and
    # an apply of the new log alone rebuilds the source
    out, err = finish(proc)
    assert proc.returncode == 0, out + err
    assert "the log lost records" in out and "converged" in out, out
    cli.run("apply", target.url, "--log", f"file:{log_dir}", "--idle-timeout", "1", check=True)
    assert differences(s, target.client()) == []


def test_live_capture_waits_out_a_restarting_stream_buffer(redis_factory):
    # given a live capture to a Redis Stream buffer with AOF, under load
    source, target = notifying_source(redis_factory), redis_factory()
    buffer = redis_factory(extra=("--appendonly", "yes", "--appendfsync", "always"))
    log_uri = f"{buffer.url}/0"
    proc = cli.start("capture", source.url, "--log", log_uri, "--mode", "live",
                     "--idle-timeout", "3")
    wait_for_subscriber(source)
    # when the buffer is stopped for 5 s and started again on the same port
    outage_under_load(buffer, down_s=5, load_on=source, seed=31)
    # then capture waited for the log and converged; the log rebuilds the source on a target
    out, err = finish(proc)
    assert proc.returncode == 0, out + err
    assert "waiting for the log" in err and "converged" in out, out + err
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "2", check=True)
    assert differences(source.client(), target.client()) == []


class SubscriberBug(KeyFilter):
    """A filter that fails only on the subscriber's thread: a bug there, nowhere else."""

    def accepts_name(self, key: bytes, check_glob: bool = False) -> bool:
        if threading.current_thread().name == "notifications":
            raise RuntimeError("boom")
        return super().accepts_name(key, check_glob=check_glob)


def test_a_bug_in_the_subscriber_thread_ends_the_run_with_it_never_a_hang(redis_factory,
                                                                           tmp_path):
    source = notifying_source(redis_factory)
    client = source.client()
    info = server_info(client)
    writer = FileLogWriter(f"file:{tmp_path / 'log'}", {})
    cap = Capture(source=client, source_info=info, writer=writer,
                  meta=open_meta(f"file:{tmp_path / 'log'}"), codec=Codec(),
                  key_filter=SubscriberBug(), mode="liveonly", connect=source.client,
                  checkpoint="bug", idle_timeout=30)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            cap.run()
        except Exception as e:  # noqa: BLE001 - what the test looks at
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    wait_for_subscriber(source)
    client.set("k", 1)                          # the notification reaches the buggy filter
    worker.join(15)
    writer.close()
    assert not worker.is_alive(), "the run hung after its subscriber thread failed"
    assert len(errors) == 1 and isinstance(errors[0], ConveyorError), errors
    assert str(errors[0]) == ("subscribing to keyspace notifications failed: RuntimeError: boom")


# -- the supervisor itself -------------------------------------------------------------------------
def test_supervisor_gives_up_only_on_stop_and_never_on_a_refusal():
    stop = threading.Event()
    sup = Supervisor(stop)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Connection refused")
        return "ok"

    assert sup.source(flaky, "a read") == "ok" and sup.source_waits == 2

    def refused():
        raise redis.ResponseError("NOPERM this user has no permissions to run the 'scan' command")

    with pytest.raises(SourceError, match=r"source refused SCAN for user 'default' \(NOPERM\)"):
        sup.source(refused, "SCAN-ish")

    def loading():
        raise redis.BusyLoadingError("Redis is loading the dataset in memory")

    stop.set()
    with pytest.raises(Interrupted, match="stopped while waiting for the source"):
        sup.source(loading, "a read")


def test_source_watch_names_each_change_and_a_reset_of_the_counters():
    from conveyor.capture.watch import SourceFacts, SourceWatch

    calls = {"flushdb": 2, "flushall": 0, "swapdb": 1}
    watch = SourceWatch(SourceFacts("a" * 40, calls))
    assert watch.changes(SourceFacts("a" * 40, calls)) == []
    assert watch.changes(SourceFacts("a" * 40, {**calls, "swapdb": 3})) == [
        "SWAPDB on the source (2 calls)"]
    assert "CONFIG RESETSTAT" in watch.changes(SourceFacts("a" * 40, {"flushdb": 0}))[0]
    assert watch.changes(SourceFacts("b" * 40, {}))[0].startswith("source restarted (run_id aaaa")
