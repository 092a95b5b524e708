"""What remembering deletes costs the key ledger: a rescan and the ledger's size on disk.

A ledger logs --keys keys and then deletes --deleted of them (tombstones, kept DELETES_KEPT_S so a
lost log's unapplied deletes are made again). A rescan then compares the keys left. The baseline,
in the same run, is a ledger that logged only the keys left (no delete ever): the figures are the
cost of the tombstones, which follows the deletes made, not the keys held.

    PYTHONPATH=$PWD python3 bench/ledger_deletes.py --keys 1000000 --deleted 500000
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conveyor.capture.ledger import Ledger  # noqa: E402
from conveyor.capture.ledger_files import crcs_of, expiries  # noqa: E402
from conveyor.capture.rescan import Rescan  # noqa: E402

BATCH = 10_000


def payload(i: int) -> bytes:
    """A DUMP-like payload: the ledger keeps its last 8 bytes (the CRC-64)."""
    return b"\x00value-%08d\x0b\x00" % i + i.to_bytes(8, "big")


def run(root: Path, keys: int, deleted: set[int], log_deleted: bool) -> dict:
    ledger = Ledger(root)
    ledger.reset("bench")
    seq = 0
    logged = [i for i in range(keys) if log_deleted or i not in deleted]
    for at in range(0, len(logged), BATCH):
        part = logged[at:at + BATCH]
        ledger.logged([b"key:%d" % i for i in part], crcs_of([payload(i) for i in part]),
                      expiries([None] * len(part)))
        seq += 1
        ledger.commit("bench", seq)
    if log_deleted:
        gone = sorted(deleted)
        for at in range(0, len(gone), BATCH):
            ledger.deleted([b"key:%d" % i for i in gone[at:at + BATCH]])
            seq += 1
            ledger.commit("bench", seq)
    left = [i for i in range(keys) if i not in deleted]
    began = time.perf_counter()
    rescan = Rescan(ledger)
    for at in range(0, len(left), BATCH):
        part = left[at:at + BATCH]
        rescan.saw([b"key:%d" % i for i in part], crcs_of([payload(i) for i in part]),
                   expiries([None] * len(part)))
    reread = sum(len(page) for page in rescan.to_read())
    took = time.perf_counter() - began
    ledger.close()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"rescan_s": took, "reread": reread, "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--deleted", type=int, default=500_000)
    args = ap.parse_args()
    deleted = set(range(0, args.keys, max(1, args.keys // max(1, args.deleted))))
    work = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    try:
        base = run(work / "without-deletes", args.keys, deleted, log_deleted=False)
        with_ = run(work / "with-deletes", args.keys, deleted, log_deleted=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    left = args.keys - len(deleted)
    print(f"ledger: {args.keys:,} keys logged, {len(deleted):,} deleted, rescan of the {left:,} left")
    print(f"  baseline (the {left:,} keys, no delete ever): rescan {base['rescan_s']:.2f}s, "
          f"{base['bytes'] / 2**20:.1f} MiB on disk, {base['reread']} read again")
    print(f"  with {len(deleted):,} tombstones: rescan {with_['rescan_s']:.2f}s "
          f"({with_['rescan_s'] / base['rescan_s']:.2f}x), {with_['bytes'] / 2**20:.1f} MiB on disk "
          f"({with_['bytes'] / base['bytes']:.2f}x), {with_['reread']} read again")
    print(f"  peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if with_["reread"] or base["reread"]:
        sys.exit("a rescan of unchanged keys read some again")


if __name__ == "__main__":
    main()
