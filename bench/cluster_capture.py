"""Capture benchmark (not a test): ``conveyor capture`` (snapshot, file log) of the same keys from a
standalone Redis (the baseline, measured in the same run) and from a 3-primary Redis Cluster, with
the default read path and with --big-key-bytes 0 (no MEMORY USAGE). Prints keys/s of each.

    python3 bench/cluster_capture.py --keys 200000
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import start_cluster  # noqa: E402
from tests.servers import start_server  # noqa: E402


def load(client, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"k:{i}", "v" * 100)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def capture(url: str, *args: str) -> float:
    """Seconds one snapshot capture takes, start of the process to its exit."""
    log = f"file:{tempfile.mkdtemp(prefix='bench-ccap-')}/log"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conveyor.cli", "capture", url, "--log", log, *args],
                   check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=200_000)
    n = ap.parse_args().keys
    single, cluster = start_server(), start_cluster(3)
    try:
        load(single.client(), n)
        load(cluster.client(), n)
        base = None
        for name, url, args in (("standalone", single.url, ()),
                                ("cluster, 3 primaries", cluster.url, ()),
                                ("standalone --big-key-bytes 0", single.url, ("--big-key-bytes", "0")),
                                ("cluster --big-key-bytes 0", cluster.url, ("--big-key-bytes", "0"))):
            rate = n / capture(url, *args)
            base = base or rate
            print(f"{name:32s} {rate:10,.0f} keys/s  ({rate / base:.2f} x standalone default)")
    finally:
        cluster.cleanup()
        single.cleanup()


if __name__ == "__main__":
    main()
