"""Snapshot benchmark (not a test): a mixed dataset copied through each log backend with capture and
apply as separate `conveyor` processes, next to a raw in-process DUMP -> RESTORE copy measured in
the same run. Prints keys/s and the peak RSS of every process.

    python3 bench/snapshot.py --keys 1000000 [--backends file,redis,kafka]
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

RAW_COPY = r"""
import resource, sys, time, redis
src, dst = redis.Redis(port=int(sys.argv[1])), redis.Redis(port=int(sys.argv[2]))
t0, n, cursor = time.perf_counter(), 0, 0
while True:
    cursor, keys = src.scan(cursor, count=1000)
    if keys:
        p = src.pipeline(transaction=False)
        for k in keys:
            p.execute_command("DUMP", k); p.execute_command("PEXPIRETIME", k)
        r = p.execute()
        w = dst.pipeline(transaction=False)
        for i, k in enumerate(keys):
            if r[2 * i] is not None:
                w.execute_command("RESTORE", k, max(r[2 * i + 1], 0), r[2 * i], "REPLACE", "ABSTTL")
        w.execute()
        n += len(keys)
    if cursor == 0:
        break
print(n, time.perf_counter() - t0)
"""


def load(r, n: int) -> None:
    """Mixed small keys: strings (text/int/binary), hashes, lists, sets, zsets, streams, HLLs, TTLs."""
    p = r.pipeline(transaction=False)
    for i in range(n):
        k, kind = f"k:{i}", i % 10
        if kind < 3:
            p.set(k, os.urandom(8) * (1 + i % 8) if kind == 2 else (i if kind == 1 else f"v{i}" * 4))
        elif kind == 3:
            p.hset(k, mapping={"a": i, "b": "x" * 20, "c": "y"})
        elif kind == 4:
            p.rpush(k, 1, 2, "three", "four")
        elif kind == 5:
            p.sadd(k, 1, 2, 3, i)
        elif kind == 6:
            p.zadd(k, {"a": 1.5, "b": 2, "c": i})
        elif kind == 7:
            p.xadd(k, {"f": i})
        elif kind == 8:
            p.pfadd(k, "a", "b", str(i))
        else:
            p.set(k, "t", ex=3600 + i % 100)
        if i % 10_000 == 9_999:
            p.execute()
    p.execute()


def run_measured(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed ({proc.returncode}): {out}\n{err}")
    return time.perf_counter() - t0, usage.ru_maxrss // 1024, out


def conveyor(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor.cli", *args]


def through(backend: str, log_uri: str, src, dst, n: int) -> dict:
    dst.client().flushall()
    t0 = time.perf_counter()
    apply_proc = subprocess.Popen(conveyor("apply", dst.url, "--log", log_uri, "--idle-timeout", "3",
                                           "--batch", "5000"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    c_wall, c_rss, _ = run_measured(conveyor("capture", src.url, "--log", log_uri))
    out = apply_proc.stdout.read()
    apply_proc.stderr.read()
    _, status, usage = os.wait4(apply_proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"apply over {backend} failed: {out}")
    total = time.perf_counter() - t0 - 3.0          # minus apply's idle timeout
    assert dst.client().dbsize() == n, (backend, dst.client().dbsize(), n)
    return {"backend": backend, "keys_s": n / total, "capture_keys_s": n / c_wall,
            "capture_mib": c_rss, "apply_mib": usage.ru_maxrss // 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--backends", default="file,redis,kafka")
    a = ap.parse_args()
    src, dst = start_server(), start_server()
    try:
        with Logs() as logs:
            load(src.client(), a.keys)
            print(f"source: {src.client().dbsize()} keys, "
                  f"{src.client().info('memory')['used_memory_human']}")
            wall, rss, out = run_measured([sys.executable, "-c", RAW_COPY, str(src.port),
                                           str(dst.port)])
            n, secs = out.split()
            raw = int(n) / float(secs)
            print(f"{'raw DUMP->RESTORE (in-process)':<34} {raw:>10,.0f} keys/s   peak {rss} MiB")
            for backend in a.backends.split(","):
                r = through(backend, logs.uri(backend, "bench"), src, dst, a.keys)
                print(f"{'through ' + backend + ' log':<34} {r['keys_s']:>10,.0f} keys/s "
                      f"({r['keys_s'] / raw:.0%} of raw)   capture alone {r['capture_keys_s']:,.0f} "
                      f"keys/s, peak {r['capture_mib']} MiB; apply peak {r['apply_mib']} MiB")
    finally:
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
