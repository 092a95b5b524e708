"""Scale-out benchmark (not a test): one capture + one apply (run A) against three captures (one per
source primary) + two applies in one consumer group (run B), over a Kafka topic of 6 partitions on a
real broker, measured in the same run. For each process: keys/s and CPU µs per key (user + system,
from wait4); for each run: keys/s end to end, total CPU per key, and the ratio B/A. The target is
then compared key by key with tests/compare.py (an independent read; --no-compare skips it, e.g.
for 1M keys, where it takes minutes).

    python3 bench/cluster.py --keys 1000000 --cluster       # 3-primary cluster -> 3-primary cluster
    python3 bench/cluster.py --keys 200000                  # standalone -> standalone

With --cluster, each capture takes one primary (``--node HOST:PORT`` when capture has that option,
else ``--key-slots`` with the slots that primary serves). Standalone, the three captures take
thirds of the slot space with ``--key-slots``. On a 2-core machine five processes share two cores:
the gain of B over A is bounded by that.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.snapshot import Run, conveyor, load  # noqa: E402
from tests.servers import start_server  # noqa: E402

IDLE_S = 3.0                 # apply's idle timeout: taken off its wall time
PARTITIONS = 6
THIRDS = ("0-5460", "5461-10922", "10923-16383")


@dataclass
class Side:
    """A source or target: the URI processes get, a client to load/compare, its shares (one
    capture each), and how to stop it."""
    uri: str
    client: object
    shares: list[list[str]]      # the capture options of each share (--node or --key-slots)
    cleanup: object

    def flush(self) -> None:
        self.client.flushall()


def standalone() -> Side:
    s = start_server()
    return Side(s.url, s.client(), [["--key-slots", t] for t in THIRDS], s.cleanup)


def cluster() -> Side:
    """A 3-primary Redis 7.0 cluster (tests/cluster.py); one share per primary."""
    from tests.cluster import start_cluster

    c = start_cluster(3, 0, "redis7.0")
    client = c.client()
    return Side(c.url, client, [_node_share(client, node) for node in client.get_primaries()],
                c.cleanup)


def _node_share(client, node) -> list[str]:
    """``--node`` when capture has it (another helper adds it), else the primary's slot ranges."""
    from conveyor.cluster import slot_ranges, slots_of

    if "--node" in subprocess.run(conveyor("capture", "--help"), capture_output=True,
                                  text=True).stdout:
        return ["--node", f"{node.host}:{node.port}"]
    ranges = slot_ranges(slots_of(client, node))
    return ["--key-slots", ",".join(f"{lo}-{hi}" for lo, hi in ranges)]


def counted(out: str, pattern: str) -> int:
    m = re.search(pattern, out)
    return int(m.group(1)) if m else 0


def run(name: str, src: Side, dst: Side, log: str, shares: list[list[str]], applies: int,
        n: int) -> float:
    """One run: ``applies`` apply processes of one group and one capture per share."""
    dst.flush()
    opts = ["--log-opt", f"partitions={PARTITIONS}"]
    apps = [Run(conveyor("apply", dst.uri, "--log", log, *opts, "--idle-timeout", str(IDLE_S),
                         "--batch", "5000")) for _ in range(applies)]
    time.sleep(1.0)              # the members join before records arrive: a fair share each
    caps = [Run(conveyor("capture", src.uri, "--log", log, *opts, *share)) for share in shares]
    try:
        for r in caps + apps:
            r.wait()
    finally:                     # one failed: the others must not outlive the run
        for r in caps + apps:
            if r.proc.poll() is None:
                r.proc.kill()
    wall = max(r.wall for r in apps) - IDLE_S
    cpu = sum(r.cpu for r in caps + apps)
    print(f"{name}: {n / wall:>9,.0f} keys/s end to end, CPU {cpu / n * 1e6:6.1f} µs/key in all "
          f"({len(caps)} captures, {len(apps)} applies)", flush=True)
    for i, r in enumerate(caps):
        keys = counted(r.out, r"capture: (\d+) keys")
        print(f"  capture {i} ({' '.join(shares[i]) or 'everything'}): {keys:,} keys, {keys / r.wall:,.0f} keys/s, "
              f"{r.cpu / max(keys, 1) * 1e6:.1f} µs/key CPU, {r.mib} MiB", flush=True)
    for i, r in enumerate(apps):
        recs = counted(r.out, r"apply: applied (\d+) records")
        secs = max(r.wall - IDLE_S, 1e-9)
        print(f"  apply {i}: {recs:,} records, {recs / secs:,.0f} records/s, "
              f"{r.cpu / max(recs, 1) * 1e6:.1f} µs/record CPU, {r.mib} MiB", flush=True)
    return n / wall


def compare(src: Side, dst: Side) -> None:
    from tests.compare import differences

    t0 = time.perf_counter()
    diffs = differences(src.client, dst.client)
    state = "identical" if not diffs else f"{len(diffs)} DIFFERENCES, e.g. {diffs[0]}"
    print(f"  target {state} (tests/compare.py, {time.perf_counter() - t0:.0f}s)", flush=True)
    if diffs:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--cluster", action="store_true",
                    help="3-primary cluster to 3-primary cluster (needs cluster capture/apply)")
    ap.add_argument("--no-compare", action="store_true", help="skip the key-by-key compare")
    a = ap.parse_args()
    make = cluster if a.cluster else standalone
    from tests.kafka_broker import KafkaBroker
    src = dst = broker = None
    try:
        src, dst = make(), make()
        broker = KafkaBroker().start()
        load(src.client, a.keys)
        print(f"source: {a.keys:,} keys ({'3-primary cluster' if a.cluster else 'standalone'}); "
              f"Kafka topic of {PARTITIONS} partitions; {os.cpu_count()} cores", flush=True)
        stamp = int(time.time())
        rate_a = run("A: 1 capture + 1 apply", src, dst, f"kafka://{broker.bootstrap}/a-{stamp}",
                     [[]], 1, a.keys)
        if not a.no_compare:
            compare(src, dst)
        rate_b = run("B: 3 captures + 2 applies", src, dst, f"kafka://{broker.bootstrap}/b-{stamp}",
                     src.shares, 2, a.keys)
        if not a.no_compare:
            compare(src, dst)
        print(f"B/A: {rate_b / rate_a:.2f}x keys/s", flush=True)
    finally:
        for x in (src, dst):
            if x is not None:
                x.cleanup()
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
