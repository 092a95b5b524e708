"""Verify of several source databases: each compared with the target database it maps to.

Where several source databases map into one target database (``--target-db``), a target key is
"extra" only when none of them holds it: each pair is compared without its own extra check, and
one pass over the merged target database looks for keys absent from every source database.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import redis

from conveyor import packed
from conveyor.keys import KeyFilter, KeyRewriter
from conveyor.verify.compare import Verifier
from conveyor.verify.report import Diff, VerifyReport

BATCH = 500


@dataclass
class Pair:
    db: int                       # source database
    target_db: int
    source: redis.Redis
    target: redis.Redis


@dataclass
class DatabasesReport(VerifyReport):
    per_db: dict[int, VerifyReport] = field(default_factory=dict)


def verify_pairs(pairs: list[Pair], make: Callable[..., Verifier],
                 key_filter: KeyFilter, rewriter: KeyRewriter) -> DatabasesReport:
    """``make(source=, target=, check_extra=)`` builds the Verifier of one pair."""
    into: dict[int, list[Pair]] = {}
    for p in pairs:
        into.setdefault(p.target_db, []).append(p)
    out = DatabasesReport(complete=True)
    for p in pairs:
        merged = len(into[p.target_db]) > 1
        rep = make(source=p.source, target=p.target, check_extra=not merged).run()
        for d in rep.diffs:
            d.detail = f"db {p.db}" + (f": {d.detail}" if d.detail else "")
        out.per_db[p.db] = rep
        out.checked += rep.checked
        out.kept += rep.kept
        out.evicted += rep.evicted           # one window per pair: server-wide counts add up
        out.diffs += rep.diffs
        out.complete &= rep.complete
        if rep.sampled_of is not None:       # --sample: N keys of each database
            out.sampled_of = (out.sampled_of or 0) + rep.sampled_of
    for target_db, group in into.items():
        if out.sampled_of is not None:
            break                            # a sample looks for no extra keys
        # (with a rewrite or a type filter, target names are not simply source names: left out)
        if len(group) > 1 and rewriter.identity and not key_filter.type and out.complete:
            out.diffs += extra_in_merged(group, key_filter)
    return out


def extra_in_merged(group: list[Pair], key_filter: KeyFilter) -> list[Diff]:
    """Keys of the merged target database that no source database of ``group`` holds."""
    target = group[0].target
    found: list[Diff] = []
    for names in _scan(target):
        names = [n for n in names if key_filter.accepts_name(n, check_glob=True)]
        absent = names
        for p in group:
            if not absent:
                break
            exists = packed.run(p.source, [("EXISTS", n) for n in absent])
            absent = [n for n, e in zip(absent, exists) if not e]
        found += [Diff("extra", n, n, f"db {group[0].target_db}: only in the target (in none of "
                                      f"source dbs {', '.join(str(p.db) for p in group)})")
                  for n in absent]
    return found


def _scan(client) -> Iterator[list[bytes]]:
    """Key names in batches; scan_iter walks every primary of a RedisCluster as well."""
    batch: list[bytes] = []
    for name in client.scan_iter(count=BATCH):
        batch.append(name)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
