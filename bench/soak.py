"""Soak: a long live run under steady writes, dropped notification connections and a restart.

``capture`` (live) and ``apply`` run as separate processes on one log while the source takes
--rate writes/s (conveyor.workload); every --kill-every seconds the notification connection is
dropped (CLIENT KILL TYPE pubsub), and once, half-way, the capture is stopped (SIGTERM) and
started again. Every --sample seconds it records the RSS of each process (/proc), the log's bytes
on disk, the apply lag (conveyor_apply_lag_seconds from apply's /metrics) and the target's write
commands (INFO commandstats). At the end, with the writes stopped, it waits until the target
equals the source (DEBUG DIGEST) and prints the series, their first and last values, and a PNG
(bench/out/soak.png) when matplotlib is installed (``pip install .[bench]``).

    PYTHONPATH=$PWD python3 bench/soak.py --minutes 30 --rate 2000 --keys 1000000 --kill-every 120
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gaps import Load, servers, wait  # noqa: E402
from tests.compare import differences  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.test_long_runs import target_writes  # noqa: E402

CONVEYOR = [sys.executable, "-m", "conveyor.cli"]


def rss_mib(proc: subprocess.Popen) -> float:
    try:
        text = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return float("nan")
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return float("nan")
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+|NaN)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def log_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def start(*args: str, log_to: Path) -> subprocess.Popen:
    return subprocess.Popen([*CONVEYOR, *args], stdout=open(log_to, "a"), stderr=subprocess.STDOUT)


def draw(rows: list[dict], out: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no PNG: pip install matplotlib, or .[bench])"
    t = [r["t"] / 60 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    ax[0].plot(t, [r["capture_mib"] for r in rows], label="capture")
    ax[0].plot(t, [r["apply_mib"] for r in rows], label="apply")
    ax[0].set_ylabel("RSS MiB")
    ax[0].legend()
    ax[1].plot(t, [r["log_mib"] for r in rows])
    ax[1].set_ylabel("log MiB")
    ax[2].plot(t, [r["lag_s"] for r in rows])
    ax[2].set_ylabel("apply lag s")
    ax[3].plot(t, [r["target_writes"] / 1e6 for r in rows])
    ax[3].set_ylabel("target writes (M)")
    ax[3].set_xlabel("minutes")
    for x in [r["t"] / 60 for r in rows if r["event"]]:
        for a in ax:
            a.axvline(x, color="grey", lw=0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return f"PNG: {out}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--kill-every", type=float, default=120)
    ap.add_argument("--sample", type=float, default=10)
    ap.add_argument("--log-opt", action="append", default=["retention=5m", "segment_bytes=16777216"],
                    help="KEY=VALUE for the log (compaction: segments due after 5 min, of 16 MiB)")
    ap.add_argument("--png", default=str(ROOT / "bench" / "out" / "soak.png"))
    a = ap.parse_args()
    src, dst = servers(a.keys)
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-soak-"))
    uri = f"file:{tmp / 'log'}"
    cport, aport = free_port(), free_port()
    lopts = [x for o in a.log_opt for x in ("--log-opt", o)]
    live = ("capture", src.url, "--log", uri, "--mode", "live", "--state-dir", str(tmp / "state"),
            "--no-progress", "--metrics-port", str(cport), *lopts)
    cap = start(*live, log_to=tmp / "capture.out")
    app = start("apply", dst.url, "--log", uri, "--no-progress", "--metrics-port", str(aport), *lopts,
                log_to=tmp / "apply.out")
    rows: list[dict] = []
    try:
        copy_s = wait(lambda: dst.client().dbsize() >= a.keys, 3600, "the first copy")
        print(f"first copy of {a.keys:,} keys: {copy_s:.0f}s; soak of {a.minutes:g} min begins",
              flush=True)
        load = Load(src, a.rate)
        admin = src.client()
        t0 = time.monotonic()
        end = t0 + a.minutes * 60
        next_kill, restarted, next_sample = t0 + a.kill_every, False, t0
        print(f"{'min':>6} {'capture MiB':>11} {'apply MiB':>9} {'log MiB':>8} {'lag s':>6} "
              f"{'target writes':>13}  event", flush=True)
        while time.monotonic() < end:
            now = time.monotonic()
            event = ""
            if now >= next_kill:
                admin.client_kill_filter(_type="pubsub")
                event, next_kill = "notification connection dropped", next_kill + a.kill_every
            if not restarted and now - t0 >= a.minutes * 30:
                cap.terminate()
                cap.wait(120)
                cap = start(*live, log_to=tmp / "capture.out")
                event, restarted = "capture restarted", True
            if event or now >= next_sample:
                row = {"t": now - t0, "capture_mib": rss_mib(cap), "apply_mib": rss_mib(app),
                       "log_mib": log_bytes(tmp / "log") / 2**20,
                       "lag_s": metric(aport, "conveyor_apply_lag_seconds"),
                       "target_writes": target_writes(dst), "event": event}
                rows.append(row)
                print(f"{row['t'] / 60:6.1f} {row['capture_mib']:11.0f} {row['apply_mib']:9.0f} "
                      f"{row['log_mib']:8.1f} {row['lag_s']:6.2f} {row['target_writes']:13,}  "
                      f"{event}", flush=True)
                if not event:
                    next_sample = now + a.sample
            time.sleep(0.5)
        writes = load.stop()
        # an independent compare (tests/compare.py: every key's type, value and expiry, a
        # differing key read again a second later), not DEBUG DIGEST: keys given long TTLs at
        # the start keep expiring on both sides, each at its own moment
        converged = wait(lambda: differences(src.client(socket_timeout=600),
                                             dst.client(socket_timeout=600)) == [], 900,
                         "the target to equal the source")
        first, last = rows[0], rows[-1]
        peak = {k: max(r[k] for r in rows) for k in ("capture_mib", "apply_mib", "lag_s")}
        print(f"soak: {a.minutes:g} min at {a.rate:g} writes/s ({writes:,} writes), "
              f"{sum(1 for r in rows if 'dropped' in r['event'])} dropped connections, 1 restart; "
              f"RSS capture {first['capture_mib']:.0f} -> {last['capture_mib']:.0f} MiB "
              f"(peak {peak['capture_mib']:.0f}), apply {first['apply_mib']:.0f} -> "
              f"{last['apply_mib']:.0f} MiB (peak {peak['apply_mib']:.0f}); log "
              f"{first['log_mib']:.0f} -> {last['log_mib']:.0f} MiB; apply lag peak "
              f"{peak['lag_s']:.1f}s; target writes {last['target_writes'] - first['target_writes']:,}"
              f" during the soak = {(last['target_writes'] - first['target_writes']) / writes:.2f}x "
              f"the writes made; source == target {converged:.0f}s after the writes stopped",
              flush=True)
        print(draw(rows, Path(a.png)))
    finally:
        for p in (cap, app):
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
