"""``--max-rate`` held: how fast capture and verify read the source, unlimited and paced.

The rate is measured on the source, not by conveyor: a thread samples INFO commandstats (DUMP
calls, one per key read; the keys' bytes from the log for the byte rate) every 0.2 s, and the rate
is the slope between the first and the last change of that count. The baseline is the same
command without a limit, in the same run. Each limited run prints the rate asked, the rate held
and whether it is within 10%.

    PYTHONPATH=$PWD python3 bench/rate.py --keys 200000 --rate 20000 --bytes-rate 4MiB

recent figures: see the note of issue 17 (keys/s held within 1-2%).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conveyor.cli import ByteSize  # noqa: E402
from tests.servers import start_server  # noqa: E402

CONVEYOR = [sys.executable, "-m", "conveyor.cli"]


class Sampler:
    """DUMP calls (keys read) or bytes sent (INFO stats total_net_output_bytes) over time."""

    def __init__(self, server, nbytes: bool = False) -> None:
        self.client, self.points, self.nbytes = server.client(), [], nbytes
        self._stop = threading.Event()
        self.client.config_resetstat()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _calls(self) -> int:
        if self.nbytes:
            return int(self.client.info("stats")["total_net_output_bytes"])
        return int(self.client.info("commandstats").get("cmdstat_dump", {}).get("calls", 0))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.points.append((time.monotonic(), self._calls()))

    def rate(self) -> tuple[float, int]:
        """keys/s between the first and the last change of the count; the count."""
        self._stop.set()
        self.thread.join()
        pts = self.points
        moving = [i for i in range(1, len(pts)) if pts[i][1] != pts[i - 1][1]]
        if len(moving) < 2:
            return float("nan"), pts[-1][1] if pts else 0
        a, b = pts[moving[0]], pts[moving[-1]]
        return (b[1] - a[1]) / (b[0] - a[0]), b[1]


def run(server, args: list[str], nbytes: bool = False) -> tuple[float, int, float]:
    sampler = Sampler(server, nbytes)
    t0 = time.monotonic()
    p = subprocess.run([*CONVEYOR, *args], capture_output=True, text=True)
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"conveyor {' '.join(args)} exited {p.returncode}\n{p.stderr[-2000:]}")
    rate, keys = sampler.rate()
    return rate, keys, took


def fill(server, keys: int, size: int) -> None:
    pipe = server.client().pipeline(transaction=False)
    for i in range(keys):
        pipe.set(f"big:{i}", os.urandom(size))
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def line(what: str, asked: float | None, rate: float, keys: int, took: float, unit="keys/s",
         base: float | None = None) -> None:
    held = ""
    if asked is not None:
        off = rate / asked - 1
        held = f"; asked {asked:,.0f} {unit}: {off:+.1%} ({'within' if abs(off) <= 0.10 else 'OUTSIDE'} 10%)"
    vs = f" = {rate / base:.2f}x the unlimited run" if base else ""
    print(f"{what}: {rate:,.0f} {unit}{vs} ({keys:,} keys in {took:.1f}s){held}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=20_000, help="--max-rate to hold (keys/s)")
    ap.add_argument("--bytes-rate", default="4MiB", help="--max-bytes-rate to hold")
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--big-keys", type=int, default=4000, help="keys of the byte-rate run")
    ap.add_argument("--big-bytes", type=int, default=10_000, help="their value size")
    a = ap.parse_args()
    bytes_rate = ByteSize().convert(a.bytes_rate, None, None)
    src = start_server(extra=("--enable-debug-command", "yes", "--save", ""))
    dst = start_server(extra=("--save", ""))
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-rate-"))
    try:
        src.client().execute_command("DEBUG", "POPULATE", a.keys, "key", a.value_bytes)
        snap = lambda n, *o: ["capture", src.url, "--log", f"file:{tmp / n}", "--no-progress", *o]
        base, keys, took = run(src, snap("base"))
        line("capture, unlimited", None, base, keys, took)
        r, keys, took = run(src, snap("paced", "--max-rate", str(a.rate)))
        line("capture --max-rate", a.rate, r, keys, took, base=base)
        # bytes: what the source sent (its own counter), of values big enough that they,
        # not the key names and replies' framing, are what a byte limit is for
        big = start_server(extra=("--enable-debug-command", "yes", "--save", ""))
        try:
            fill(big, a.big_keys, a.big_bytes)    # random bytes: DUMP cannot compress them
            big_snap = ["capture", big.url, "--log", f"file:{tmp / 'big'}", "--no-progress"]
            r, sent, took = run(big, big_snap, nbytes=True)
            line(f"capture of {a.big_keys:,} values of {a.big_bytes:,} bytes, unlimited", None, r,
                 a.big_keys, took, "bytes/s")
            r, sent, took = run(big, [*big_snap[:3], f"file:{tmp / 'big2'}", "--no-progress",
                                      "--max-bytes-rate", a.bytes_rate], nbytes=True)
            line("capture --max-bytes-rate", bytes_rate, r, a.big_keys, took, "bytes/s")
        finally:
            big.cleanup()
        subprocess.run([*CONVEYOR, "apply", dst.url, "--log", f"file:{tmp / 'base'}",
                        "--idle-timeout", "1", "--no-progress"], check=True, capture_output=True)
        vbase, keys, took = run(src, ["verify", src.url, dst.url, "--no-progress"])
        line("verify, unlimited", None, vbase, keys, took)
        r, keys, took = run(src, ["verify", src.url, dst.url, "--no-progress",
                                  "--max-rate", str(a.rate)])
        line("verify --max-rate", a.rate, r, keys, took, base=vbase)
        print("(verify paces its scan of each side: the source's keys, then the target's for "
              "extra keys)")
    finally:
        src.cleanup()
        dst.cleanup()


if __name__ == "__main__":
    main()
