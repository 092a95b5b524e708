"""What a gap and a restart cost on a long live run: log bytes and target writes.

Scenario ``gaps``: ``replicate --mode live`` of N keys (DEBUG POPULATE) on a file log, the source
taking --rate writes/s, the notification connection dropped --kills times (CLIENT KILL TYPE pubsub).
Scenario ``restarts``: a live ``capture`` stopped (SIGTERM) and started again --restarts times while
the source changes, then ``apply``. Each prints, against the baseline of the same run (the log's
size after the first copy, the number of keys): log bytes, target write commands (INFO
commandstats), the writes made, the peak RSS of the conveyor processes (/usr/bin/time -v), how long
each restart took to be live again, and whether source and target are equal (DEBUG DIGEST).

    PYTHONPATH=$PWD python3 bench/gaps.py --keys 1000000 --rate 500 --kills 5 --restarts 2
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from conveyor.workload import Workload  # noqa: E402
from tests.servers import free_port, start_server  # noqa: E402
from tests.test_long_runs import log_bytes, target_writes  # noqa: E402

CONVEYOR = ["/usr/bin/time", "-v", sys.executable, "-m", "conveyor.cli"]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CONVEYOR, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 3600) -> tuple[str, float]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"conveyor exited {proc.returncode}\n{out}\n{err[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return out, int(rss.group(1)) / 1024 if rss else float("nan")


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM to conveyor itself: /usr/bin/time does not pass signals on to the command it runs."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children or [str(proc.pid)]:
        subprocess.run(["kill", "-TERM", pid], check=False)


def wait(cond, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def servers(keys: int):
    src = start_server(extra=("--notify-keyspace-events", "KEA", "--enable-debug-command", "yes",
                              "--save", ""))
    dst = start_server(extra=("--enable-debug-command", "yes", "--save", ""))
    redis.Redis.from_url(src.url, socket_timeout=3600).execute_command(   # 10M keys: seconds
        "DEBUG", "POPULATE", keys, "key", 20)
    return src, dst


def same(src, dst) -> bool:
    def digest(server):
        return redis.Redis.from_url(server.url, socket_timeout=3600).execute_command(
            "DEBUG", "DIGEST")
    return digest(src) == digest(dst)


class Load:
    def __init__(self, server, rate: float) -> None:
        self.workload = Workload(server.client(), rate=rate, keyspace=20_000, seed=9)
        self.thread = threading.Thread(target=self.workload.run, args=(24 * 3600,), daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self.workload.stop()
        self.thread.join(10)
        return self.workload.stats.commands


class Log:
    """The log of a run: a file log, a Redis Streams buffer or a Kafka topic, and its size (bytes
    on disk; the buffer's used_memory; the broker's data directory)."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self._stop = kind, lambda: None
        if kind == "file":
            self.uri = f"file:{tmp / 'log'}"
            self.size = lambda: log_bytes(tmp / "log")
        elif kind == "redis":
            buf = start_server(extra=("--save", ""))
            base = buf.client().info("memory")["used_memory"]
            self.uri = f"{buf.url}/0"
            self.size = lambda: buf.client().info("memory")["used_memory"] - base
            self._stop = buf.cleanup
        else:
            from tests.kafka_broker import KafkaBroker, kafka_log_uri
            broker = KafkaBroker().start()
            self.uri = kafka_log_uri(broker)
            self.size = lambda: sum(p.stat().st_size for p in broker.dir.rglob("*.log"))
            self._stop = broker.stop

    def stop(self) -> None:
        self._stop()


def report(name: str, keys: int, snapshot: int, log: "Log", dst, writes: int, rss: dict,
           equal: bool, extra: str = "") -> None:
    total, tw = log.size(), target_writes(dst)
    print(f"{name} ({log.kind} log): {keys:,} keys, {writes:,} source writes; log {total / 2**20:,.1f} MiB = "
          f"{total / snapshot:.2f}x the first copy's {snapshot / 2**20:,.1f} MiB (bound 2x); "
          f"target writes {tw:,} = {tw / (keys + writes):.2f}x keys + writes (bound 1.6x); "
          f"peak RSS " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in rss.items())
          + f"; source == target: {equal}" + (f"; {extra}" if extra else ""))


def gaps(keys: int, rate: float, kills: int, every: float, kind: str = "file") -> None:
    src, dst = servers(keys)
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-gaps-"))
    log = Log(kind, tmp)
    try:
        proc = start("replicate", src.url, dst.url, "--mode", "live", "--idle-timeout", "5",
                     "--log", log.uri, "--state-dir", str(tmp), "--no-verify",
                     "--no-progress")
        copy_s = wait(lambda: dst.client().dbsize() >= keys, 3600, "the first copy")
        snapshot = log.size()
        load = Load(src, rate)
        admin = src.client()
        for _ in range(kills):
            wait(lambda: admin.pubsub_numpat() >= 1, 120, "the subscription")
            admin.client_kill_filter(_type="pubsub")
            time.sleep(every)
        writes = load.stop()
        out, rss = finish(proc)
        report("gaps", keys, snapshot, log, dst, writes, {"replicate": rss},
               same(src, dst), f"first copy {copy_s:.0f}s; "
               + next((ln.strip() for ln in out.splitlines() if "rescans compared" in ln), ""))
    finally:
        src.cleanup()
        dst.cleanup()
        log.stop()


def restarts(keys: int, rate: float, times: int, every: float, kind: str = "file") -> None:
    src, dst = servers(keys)
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-restarts-"))
    log = Log(kind, tmp)
    uri = log.uri
    port = free_port()
    live = ("capture", src.url, "--log", uri, "--mode", "live", "--state-dir", str(tmp),
            "--no-progress", "--metrics-port", str(port))
    try:
        proc = start(*live)
        first_s = wait(lambda: ready(port), 3600, "the first scan")
        snapshot = log.size()
        load = Load(src, rate)
        rss, back = {}, []
        for n in range(times):
            time.sleep(every)
            terminate(proc)
            _, rss[f"capture {n + 1}"] = finish(proc)
            time.sleep(every / 2)
            proc = start(*live, *(("--idle-timeout", "5") if n == times - 1 else ()))
            back.append(wait(lambda: ready(port), 3600, "the catch-up scan"))
        time.sleep(every)
        writes = load.stop()
        out, rss[f"capture {times + 1}"] = finish(proc)
        app = start("apply", dst.url, "--log", uri, "--idle-timeout", "3", "--no-progress")
        _, rss["apply"] = finish(app)
        report("restarts", keys, snapshot, log, dst, writes, rss, same(src, dst),
               f"first scan {first_s:.0f}s, live again after each restart in "
               + ", ".join(f"{b:.0f}s" for b in back))
    finally:
        src.cleanup()
        dst.cleanup()
        log.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--every", type=float, default=10, help="seconds between two faults")
    ap.add_argument("--only", choices=("gaps", "restarts"))
    ap.add_argument("--log", default="file", choices=("file", "redis", "kafka"))
    a = ap.parse_args()
    if a.only != "restarts":
        gaps(a.keys, a.rate, a.kills, a.every, a.log)
    if a.only != "gaps":
        restarts(a.keys, a.rate, a.restarts, a.every, a.log)


if __name__ == "__main__":
    main()
