"""Where the CPU of capture and apply goes (not a test): each runs in this process over a file log,
under cProfile; the time of every function is charged to a stage by the file it lives in, and
each stage is printed as µs of CPU per key (cProfile inflates the totals; the shares are what
matter; the plain process-time total is printed next to it).

    python3 bench/stages.py --keys 100000
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.snapshot import load  # noqa: E402
from tests.servers import start_server  # noqa: E402

STAGES = (("codec", ("conveyor/events.py", "fastavro")),
          ("log", ("conveyor/log/",)),
          ("redis I/O", ("redis/", "conveyor/packed.py", "conveyor/exchange.py", "hiredis",
                         "socket", "recv_into", "sendall")),
          ("capture logic", ("capture/",)),
          ("apply logic", ("apply/",)),
          ("values/rdb", ("conveyor/values.py", "conveyor/rdb/")))


def stage_of(filename: str, func: str) -> str:
    for name, marks in STAGES:
        if any(m in filename or m in func for m in marks):
            return name
    return "other"


def profiled(fn) -> tuple[float, dict[str, float]]:
    t0 = time.process_time()
    fn()
    plain = time.process_time() - t0
    prof = cProfile.Profile(time.process_time)   # CPU, not the sleeps of an idle poll
    prof.enable()
    fn()
    prof.disable()
    by: dict[str, float] = {}
    for (filename, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        s = stage_of(filename, func)
        by[s] = by.get(s, 0.0) + tottime
    return plain, by


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    a = ap.parse_args()
    from conveyor.options import ApplyOptions, CaptureOptions, LogSpec
    from conveyor.progress import Display
    from conveyor.runner import Endpoint
    from conveyor.wiring import apply_process, capture_process

    src, dst = start_server(), start_server()
    tmp = tempfile.mkdtemp(prefix="conveyor-stages-")
    try:
        load(src.client(), a.keys)
        runs = iter(range(100))

        def capture():
            capture.log = LogSpec(f"file:{tmp}/log{next(runs)}")
            built = capture_process(Endpoint(src.url, "source"), capture.log,
                                    CaptureOptions(fresh=True), Display(False))
            built.proc.run()
            built.close()

        def apply():
            dst.client().flushall()
            opts = ApplyOptions(group=f"g{next(runs)}", start="earliest", idle_timeout=0.5)
            built = apply_process(Endpoint(dst.url, "target"), capture.log, opts, Display(False))
            built.proc.run()
            built.close()

        for name, fn in (("capture", capture), ("apply", apply)):
            plain, by = profiled(fn)
            total = sum(by.values())
            print(f"{name}: {plain / a.keys * 1e6:.1f} µs CPU per key (plain run); under cProfile:")
            for s, t in sorted(by.items(), key=lambda x: -x[1]):
                print(f"  {s:<14} {t / a.keys * 1e6:6.1f} µs/key  {t / total:5.0%}")
    finally:
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
