"""Big-key benchmark (not a test): a hash of N fields and a list of N elements through each log,
capture and apply as separate processes; prints wall time, peak RSS of each process, and the
source's memory for the two keys next to it (what holding one whole key would cost).

    python3 bench/big_keys.py [--fields 2000000] [--backends file,redis,kafka]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Logs  # noqa: E402
from tests.servers import start_server  # noqa: E402


def load_big(r, n: int, page: int = 5000) -> None:
    """``big:hash`` with n fields and ``big:list`` with n elements, written page by page."""
    for i in range(0, n, page):
        p = r.pipeline(transaction=False)
        p.hset("big:hash", mapping={b"field:%d" % j: b"value:%d" % j for j in range(i, min(n, i + page))})
        p.rpush("big:list", *[b"element:%d" % j for j in range(i, min(n, i + page))])
        p.execute()


def measured(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS MiB, output) of one conveyor process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"conveyor {args[0]} failed: {out}")
    return time.perf_counter() - t0, usage.ru_maxrss // 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=2_000_000)
    ap.add_argument("--backends", default="file,redis,kafka")
    a = ap.parse_args()
    src, dst = start_server(), start_server()
    try:
        r = src.client()
        load_big(r, a.fields)
        mib = {k: r.memory_usage(k, samples=0) / 2**20 for k in ("big:hash", "big:list")}
        print(f"source: big:hash {a.fields:,} fields ({mib['big:hash']:.0f} MiB in Redis), "
              f"big:list {a.fields:,} elements ({mib['big:list']:.0f} MiB in Redis)", flush=True)
        with Logs() as logs:
            for backend in a.backends.split(","):
                dst.client().flushall()
                uri = logs.uri(backend, "bigkeys")
                cw, crss, _ = measured(["capture", src.url, "--log", uri])
                aw, arss, _ = measured(["apply", dst.url, "--log", uri, "--idle-timeout", "1"])
                t = dst.client()
                ok = t.hlen("big:hash") == a.fields and t.llen("big:list") == a.fields
                print(f"{backend:<6} capture {cw:6.1f} s, peak {crss:4d} MiB   apply {aw - 1:6.1f} s, "
                      f"peak {arss:4d} MiB   {'complete' if ok else 'INCOMPLETE'}", flush=True)
    finally:
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
