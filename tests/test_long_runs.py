"""Long live runs: a gap or a restart costs what changed, not the whole dataset.

A live capture keeps a key ledger (capture/ledger.py); a rescan after a dropped notification
connection or a restart reads digests, and only keys that changed, appeared or vanished are logged
and written again. Measured here as the issue states it, at a size CI can run: the log's bytes
against a snapshot's, and the target's write commands (INFO commandstats) against the keys plus
the writes made on the source; the outcome checked with an independent compare.
"""
from __future__ import annotations

import signal
import threading
import urllib.request
from pathlib import Path

from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_until
from tests.servers import free_port

KEYS = 50_000
RATE = 500                      # source writes per second while the run lasts
# Target commands that write (what apply may send); reads and admin commands are not counted.
WRITES = ("restore", "del", "unlink", "set", "pexpireat", "expire", "pexpire", "persist", "hset",
          "rpush", "sadd", "zadd", "xadd", "eval", "evalsha", "fcall", "mset")


def source_of(redis_factory, n: int = KEYS):
    server = redis_factory(extra=("--notify-keyspace-events", "KEA",
                                  "--enable-debug-command", "yes"))
    server.client().execute_command("DEBUG", "POPULATE", n, "key", 20)
    return server


def log_bytes(log_dir: Path) -> int:
    return sum(p.stat().st_size for p in log_dir.rglob("*.log"))


def target_writes(target) -> int:
    stats = target.client().info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") in WRITES)


class Load:
    """A steady write workload on the source in a thread, for as long as the block lasts."""

    def __init__(self, server, rate: float = RATE) -> None:
        self.workload = Workload(server.client(), rate=rate, keyspace=2000, seed=5)
        self.thread = threading.Thread(target=self.workload.run, args=(3600,), daemon=True)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.workload.stop()
        self.thread.join(10)

    @property
    def commands(self) -> int:
        return self.workload.stats.commands


def finish(proc, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err, err
    return out


def test_dropped_notification_connections_cost_what_changed(redis_factory, tmp_path):
    # given a live replicate of 50k keys that copied them once (the snapshot's log size)
    source, target = source_of(redis_factory), redis_factory()
    log_dir = tmp_path / "log"
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "3",
                     "--log", f"file:{log_dir}", "--state-dir", str(tmp_path), "--no-verify",
                     "--no-progress")
    t = target.client()
    wait_until(lambda: t.dbsize() >= KEYS, 120, "the initial copy")
    snapshot = log_bytes(log_dir)
    # when the source takes 500 writes/s and the notification connection is dropped 5 times
    admin = source.client()
    with Load(source) as load:
        for _ in range(5):
            wait_until(lambda: admin.pubsub_numpat() >= 1, 30, "the capture's subscription")
            wait_until(lambda: admin.client_kill_filter(_type="pubsub") >= 1, 10, "a kill")
            load.thread.join(3)                   # the run goes on: 3 s of writes and a resync
    out = finish(proc)
    # then each gap was healed by a rescan that logged only what changed
    assert "5 gaps" in out and "converged" in out, out
    assert differences(source.client(), target.client()) == []
    assert log_bytes(log_dir) <= 2 * snapshot, (log_bytes(log_dir), snapshot, out)
    assert target_writes(target) <= 1.6 * KEYS + load.commands, (target_writes(target),
                                                                  load.commands, out)


def test_a_restarted_capture_costs_what_changed(redis_factory, tmp_path):
    # given a live capture of 50k keys on a file log, with writes going on
    source, target = source_of(redis_factory), redis_factory()
    log_dir = tmp_path / "log"
    uri = f"file:{log_dir}"
    port = free_port()
    live = ("capture", source.url, "--log", uri, "--mode", "live", "--state-dir", str(tmp_path),
            "--no-progress", "--metrics-port", str(port))
    with Load(source) as load:
        proc = cli.start(*live)
        wait_until(lambda: ready(port), 120, "the first scan")
        load.thread.join(3)
        snapshot = log_bytes(log_dir)
        # when it is stopped and started again twice while the source changes
        for last in (False, True):
            proc.send_signal(signal.SIGTERM)
            out = finish(proc)
            load.thread.join(2)                   # changes while no capture runs
            proc = cli.start(*live, *(("--idle-timeout", "3") if last else ()))
            wait_until(lambda: ready(port), 120, "the catch-up scan")
            load.thread.join(3)
    out = finish(proc)
    # then each restart read digests and logged only the keys that changed meanwhile
    assert "converged" in out and "read again" in out, out
    apply = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "2", "--no-progress")
    assert apply.returncode == 0, apply.stdout + apply.stderr
    assert differences(source.client(), target.client()) == []
    assert log_bytes(log_dir) <= 2 * snapshot, (log_bytes(log_dir), snapshot, out)
    assert target_writes(target) <= 1.6 * KEYS + load.commands, (target_writes(target),
                                                                  load.commands, out)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
