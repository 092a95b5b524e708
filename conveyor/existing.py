"""--on-existing: what a group's first apply does with a target that already holds keys."""
from __future__ import annotations

import logging

import redis

from conveyor.errors import ConveyorError, LogError, TargetError
from conveyor.kept import KeptKeys
from conveyor.options import ApplyOptions
from conveyor.progress import echo
from conveyor.runner import Endpoint
from conveyor.words import counted

logger = logging.getLogger("conveyor")


def check_existing(dst: Endpoint, target, proc, opts: ApplyOptions) -> None:
    """--on-existing: a group's first apply into a target that already holds keys warns
    (overwrite), refuses (fail) or stores their names and leaves them alone from then on
    (skip: ``proc.kept``). A group that committed before wrote the target's keys itself."""
    skip = opts.on_existing == "skip"
    if opts.dry_run and not skip:
        return
    try:
        parts = proc.reader.status().partitions
        kept = KeptKeys.load(proc.meta.documents(), opts.group) if skip else None
    except LogError as e:              # the log is away: apply waits for it; no check then
        if skip:
            raise ConveyorError(f"--on-existing skip: cannot read which keys to leave alone from "
                                f"the log's metadata: {e}") from e
        logger.info("--on-existing not checked: %s", e)
        return
    if kept is not None:
        proc.kept = kept
        if kept:
            echo(f"apply: leaving alone {counted(len(kept), 'key')} the target held before this "
                 "group's first apply (--on-existing skip)")
        return
    if any(p.committed not in NOTHING_COMMITTED for p in parts):
        if skip:
            echo("apply: warning: --on-existing skip: this group applied before without it, so "
                 "which target keys were there before is unknown: every key is written")
        return
    per_db = target_key_counts(target)
    total = sum(per_db.values())
    where = ", ".join(f"db {db}: {n:,}" for db, n in sorted(per_db.items()))
    if skip:
        proc.kept = _kept_of(dst, target, per_db) if total else KeptKeys()
        if not opts.dry_run:
            proc.kept.save(proc.meta, opts.group)
        if total:
            echo(f"apply: the target already holds {total:,} keys ({where}): they are left alone "
                 "(--on-existing skip; their names are kept in the log's metadata)")
        return
    if not total:
        return
    if opts.on_existing == "fail":
        raise ConveyorError(f"the target already holds {total:,} keys ({where}) and "
                            "--on-existing is fail: nothing was written (empty it, or use "
                            "--on-existing overwrite or skip)")
    echo(f"apply: warning: the target already holds {total:,} keys ({where}): those with a "
         "source key's name will be overwritten (--on-existing skip leaves them alone, fail "
         "refuses a non-empty target)")


def _kept_of(dst: Endpoint, target, per_db: dict[int, int]) -> KeptKeys:
    """The names the target holds now: a SCAN of each database holding keys (of every primary
    of a cluster). A target that refuses it is one line."""
    from conveyor.cluster import is_cluster, primary_clients
    cluster = is_cluster(target)
    # (a cluster's node clients are the cluster client's own: they stay open)
    nodes = ({0: primary_clients(target)} if cluster
             else {db: [dst.connect_node(db=db)] for db in per_db})
    try:
        return KeptKeys.of_target(nodes)
    except redis.RedisError as e:
        raise TargetError(f"--on-existing skip: cannot read the target's key names (SCAN): "
                          f"{type(e).__name__}: {e}") from e
    finally:
        if not cluster:
            for (c,) in nodes.values():
                c.close()


NOTHING_COMMITTED = (None, 0, "0-0", "0", -1001)   # a group at the very start


def target_key_counts(client) -> dict[int, int]:
    """Keys per database of the target (a cluster's primaries summed as db 0)."""
    from conveyor.cluster import is_cluster, primary_clients
    if is_cluster(client):
        return {0: sum(c.dbsize() for c in primary_clients(client))}
    return {int(name[2:]): int(v["keys"]) for name, v in client.info("keyspace").items()
            if name.startswith("db") and int(v["keys"])}
