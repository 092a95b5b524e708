"""Several databases benchmark (not a test): the same keys spread over 3 databases, captured by
one ``conveyor capture --db 0,3,7`` (one Capture per db on threads sharing one log writer)
against the baseline measured in the same run: one ``conveyor capture --db N`` per database, one
after the other, into one log. Prints keys/s and CPU µs per key (user + system, from wait4).

    python3 bench/databases.py --keys 300000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import start_server  # noqa: E402

DBS = (0, 3, 7)


def load(server, keys: int) -> None:
    per_db = keys // len(DBS)
    for db in DBS:
        r = server.client(db)
        for start in range(0, per_db, 5000):
            p = r.pipeline(transaction=False)
            for i in range(start, min(start + 5000, per_db)):
                p.set(f"key:{i}", b"v" * 100)
            p.execute()


def capture(url: str, log: str, db_spec: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds of one capture process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "capture", url, "--db", db_spec,
                             "--log", log, "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"capture --db {db_spec} failed: {proc.stderr.read().decode()}")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=300_000)
    args = ap.parse_args()
    server = start_server()
    try:
        load(server, args.keys)
        n = sum(server.client(db).dbsize() for db in DBS)
        with tempfile.TemporaryDirectory() as d:
            wall = cpu = 0.0
            for db in DBS:
                w, c = capture(server.url, f"file:{d}/one-by-one", str(db))
                wall, cpu = wall + w, cpu + c
            together = capture(server.url, f"file:{d}/together", ",".join(map(str, DBS)))
        print(f"{n:,} keys in dbs {DBS}")
        print(f"baseline: one capture per db, in turn: {n / wall:10,.0f} keys/s, "
              f"{cpu / n * 1e6:6.1f} µs CPU/key")
        print(f"--db {','.join(map(str, DBS))}, one process:  {n / together[0]:10,.0f} keys/s, "
              f"{together[1] / n * 1e6:6.1f} µs CPU/key")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
