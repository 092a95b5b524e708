"""Snapshot benchmark (not a test): the issue-11 workload copied by a raw redis-py copy, a raw
hand-packed + hiredis copy (the ceiling for Python), ``conveyor replicate`` with each log, capture +
apply as separate ``conveyor`` processes with each log, and ``conveyor verify`` on the result, all
measured in the same run. For each: keys/s, CPU µs per key of each process (user + system, from
wait4), and peak RSS.

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

BATCH = 500
RAW_COPY = r"""
import sys, time, redis
src, dst = redis.Redis(port=int(sys.argv[1])), redis.Redis(port=int(sys.argv[2]))
t0, n, cursor = time.perf_counter(), 0, 0
while True:
    cursor, keys = src.scan(cursor, count=%d)
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
""" % BATCH

# The same copy with commands packed by hiredis and replies parsed by one hiredis Reader per batch.
PACKED_COPY = r"""
import sys, time, redis
sys.path.insert(0, sys.argv[3])
from conveyor.packed import run
src, dst = redis.Redis(port=int(sys.argv[1])), redis.Redis(port=int(sys.argv[2]))
t0, n, cursor = time.perf_counter(), 0, 0
while True:
    cursor, keys = src.scan(cursor, count=%d)
    if keys:
        r = run(src, [c for k in keys for c in (("DUMP", k), ("PEXPIRETIME", k))])
        run(dst, [("RESTORE", k, max(r[2 * i + 1], 0), r[2 * i], "REPLACE", "ABSTTL")
                  for i, k in enumerate(keys) if r[2 * i] is not None])
        n += len(keys)
    if cursor == 0:
        break
print(n, time.perf_counter() - t0)
""" % BATCH


def load(r, n: int) -> None:
    """The issue's workload: 60% strings of about 100 B (a sixth of them integers), 10% each hashes,
    lists and sets of 10 members, 5% sorted sets of 10, 5% strings with a TTL."""
    p = r.pipeline(transaction=False)
    ten = [f"member-{j:02}" for j in range(10)]
    for i in range(n):
        k, kind = f"k:{i:08}", i % 20
        if kind < 2:
            p.set(k, i * 7919)
        elif kind < 12:
            p.set(k, os.urandom(50).hex())
        elif kind < 14:
            p.hset(k, mapping={f: i for f in ten})
        elif kind < 16:
            p.rpush(k, *ten)
        elif kind < 18:
            p.sadd(k, *ten)
        elif kind < 19:
            p.zadd(k, {f: j + i for j, f in enumerate(ten)})
        else:
            p.set(k, os.urandom(50).hex(), ex=3600 + i % 100)
        if i % 10_000 == 9_999:
            p.execute()
    p.execute()


class Run:
    """One measured child process: wall seconds, CPU seconds (it and the children it waited
    for), peak RSS in MiB, stdout."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def wait(self) -> "Run":
        self.out = self.proc.stdout.read()
        err = self.proc.stderr.read()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.wall = time.perf_counter() - self.t0
        self.cpu = usage.ru_utime + usage.ru_stime
        self.mib = usage.ru_maxrss // 1024
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{' '.join(self.args[:4])} failed ({code}): {self.out}\n{err}")
        return self


def conveyor(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor.cli", *args]


def row(name: str, n: int, secs: float, procs: list[tuple[str, Run]], raw: float | None) -> None:
    rate = n / secs
    vs = f" {rate / raw:4.2f}x raw" if raw else " " * 10
    each = ", ".join(f"{what} {r.cpu / n * 1e6:.1f} µs/key {r.mib} MiB" for what, r in procs)
    total = sum(r.cpu for _, r in procs) / n * 1e6
    print(f"{name:<34} {rate:>9,.0f} keys/s{vs}  CPU {total:5.1f} µs/key ({each})", flush=True)


def raw_copy(script: str, src, dst) -> tuple[float, Run]:
    dst.client().flushall()
    r = Run([sys.executable, "-c", script, str(src.port), str(dst.port), str(ROOT)]).wait()
    n, secs = r.out.split()
    return float(secs), r


def replicate(log_uri: str, src, dst, n: int) -> tuple[float, Run]:
    dst.client().flushall()
    r = Run(conveyor("replicate", src.url, dst.url, "--log", log_uri, "--no-verify")).wait()
    assert dst.client().dbsize() == n, (log_uri, dst.client().dbsize(), n)
    return r.wall, r


def through(log_uri: str, src, dst, n: int) -> tuple[float, Run, Run]:
    """Capture and apply started together; apply ends 3 s (its idle timeout) after the log
    went quiet, which is taken off its time."""
    dst.client().flushall()
    apply = Run(conveyor("apply", dst.url, "--log", log_uri, "--idle-timeout", "3",
                         "--batch", "5000"))
    cap = Run(conveyor("capture", src.url, "--log", log_uri)).wait()
    apply.wait()
    assert dst.client().dbsize() == n, (log_uri, dst.client().dbsize(), n)
    return apply.wall - 3.0, cap, apply


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--backends", default="file,redis,kafka")
    a = ap.parse_args()
    n = a.keys
    src, dst = start_server(), start_server()
    try:
        with Logs() as logs:
            load(src.client(), n)
            print(f"source: {src.client().dbsize()} keys, "
                  f"{src.client().info('memory')['used_memory_human']}; {os.cpu_count()} cores")
            secs, r = raw_copy(RAW_COPY, src, dst)
            raw = n / secs
            row("raw redis-py copy (DUMP/RESTORE)", n, secs, [("copy", r)], None)
            secs, r = raw_copy(PACKED_COPY, src, dst)
            row("raw hand-packed + hiredis copy", n, secs, [("copy", r)], raw)
            for backend in a.backends.split(","):
                secs, r = replicate(logs.uri(backend, "rep"), src, dst, n)
                row(f"replicate, {backend} log", n, secs, [("all", r)], raw)
            for backend in a.backends.split(","):
                secs, cap, app = through(logs.uri(backend, "sep"), src, dst, n)
                row(f"capture + apply, {backend} log", n, secs,
                    [("capture", cap), ("apply", app)], raw)
            v = Run(conveyor("verify", src.url, dst.url)).wait()
            row("verify (identical)", n, v.wall, [("verify", v)], raw)
    finally:
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
