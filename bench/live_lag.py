"""Live replication lag benchmark (not a test): source write -> visible on the target, p50/p99,
at several write rates through each log, with capture and apply as separate processes.

A probe thread writes ``probe:<n>`` = write time every 20 ms next to a mixed workload at the given
rate; a watcher polls the target for the probes. A rate "holds" when p99 stays under 2 s and the
lag of the last third of the probes is not growing (p50 within 2x of the first third's).

    python3 bench/live_lag.py [--rates 1000,4000,8000,16000] [--seconds 10] [--backends file,redis,kafka]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conveyor.workload import Workload  # noqa: E402
from bench.common import Logs  # noqa: E402
from tests.servers import start_server, terminate  # noqa: E402

PROBE_EVERY_S = 0.02
BOUND_P99_S = 2.0


def conveyor(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "conveyor.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measure(src, dst, log_uri: str, rate: int, seconds: float) -> dict:
    dst.client().flushall()
    cap = conveyor("capture", src.url, "--log", log_uri, "--mode", "liveonly", "--idle-timeout", "4")
    app = conveyor("apply", dst.url, "--log", log_uri, "--idle-timeout", "6", "--batch", "5000")
    s = src.client()
    while s.pubsub_numpat() < 1:
        time.sleep(0.05)
    # Steady state only: wait until a write goes all the way through (a Kafka consumer group's
    # first join alone takes group.initial.rebalance.delay.ms, 3 s by default).
    t, deadline = dst.client(), time.monotonic() + 60
    while t.get(b"ready") is None:
        s.set(b"ready", b"1")
        time.sleep(0.1)
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing reached the target through {log_uri} within 60 s")
    sent: dict[bytes, float] = {}
    lags: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe():
        n = 0
        while not stop.is_set():
            k = f"probe:{rate}:{n}".encode()
            sent[k] = time.monotonic()
            s.set(k, "1")
            n += 1
            time.sleep(PROBE_EVERY_S)

    def watch():
        t = dst.client()
        while not stop.is_set() or sent:
            keys = list(sent)
            if keys:
                for k, v in zip(keys, t.mget(keys)):
                    if v is not None:
                        lags.append((sent[k], time.monotonic() - sent.pop(k)))
            time.sleep(0.005)
            if stop.is_set() and time.monotonic() - stopped_at[0] > 30:
                break

    stopped_at = [0.0]
    threads = [threading.Thread(target=probe), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    load = Workload(src.client(), rate=rate, keyspace=20_000, seed=rate).run(seconds)
    stop.set()
    stopped_at[0] = time.monotonic()
    for t in threads:
        t.join()
    for p in (cap, app):
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            terminate(p, 5)
    lost = len(sent)
    values = [lag for _, lag in sorted(lags)]
    third = max(len(values) // 3, 1)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    p99 = statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)
    return {"rate": load.rate, "p50": statistics.median(values), "p99": p99, "probes": len(values),
            "lost": lost, "holds": p99 < BOUND_P99_S and last < 2 * max(first, 0.01) and not lost}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1000,4000,8000,16000")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--backends", default="file,redis,kafka")
    a = ap.parse_args()
    src = start_server(extra=("--notify-keyspace-events", "KEA"))
    dst = start_server()
    try:
        with Logs() as logs:
            for backend in a.backends.split(","):
                best = None
                for rate in (int(r) for r in a.rates.split(",")):
                    r = measure(src, dst, logs.uri(backend, f"lag{rate}"), rate, a.seconds)
                    print(f"{backend:<6} {r['rate']:>8,.0f} writes/s   lag p50 {r['p50'] * 1000:7.1f} ms"
                          f"   p99 {r['p99'] * 1000:7.1f} ms   ({r['probes']} probes, {r['lost']} unseen)"
                          f"   {'bounded' if r['holds'] else 'NOT bounded'}", flush=True)
                    if r["holds"]:
                        best = r["rate"]
                print(f"{backend:<6} highest rate with bounded lag: "
                      f"{f'{best:,.0f} writes/s' if best else 'none of those tried'}", flush=True)
    finally:
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
