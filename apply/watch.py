"""Noticing a target that lost data, and sweeping temporary keys nobody will finish.

A target that restarts without persistence (or fails over to a replica that missed writes, or is
flushed) loses writes apply already committed on the log. Two signs: the server's run_id changed,
or DBSIZE fell by more than the deletes apply sent, the keys the target expired and the keys it
evicted explain. They are read at the end of every batch's own pipeline (no extra round trip, and
no write between two readings goes uncounted), and about once a second while apply is idle.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from conveyor.retry import TARGET_NOT_NOW
from conveyor import packed
from conveyor.exchange import info_fields
from conveyor.cluster import primary_clients

log = logging.getLogger("conveyor.apply")

TEMP_PATTERN = b"*conveyor-tmp:*"
# A temporary key apply did not write in this run is left alone until it has not been touched
# this long: another apply (another group, another member) may still be building it.
TEMP_IDLE_S = 60
SCAN_COUNT = 1000
# Keys DBSIZE may lose that apply cannot count: temporary keys a crashed apply left behind,
# deleted by the next write of their key.
DBSIZE_SLACK = 10


@dataclass(frozen=True, slots=True)
class Reading:
    run_id: str
    dbsize: int
    expired: int
    evicted: int
    nodes: tuple[tuple[str, str], ...] = ()    # a cluster's primaries: (host:port, run_id)


class TargetWatch:
    """One target database: its run_id and DBSIZE at the last reading."""

    def __init__(self, client) -> None:
        self.client = client
        self.base: Reading | None = None
        self.carry = 0             # keys apply removed after the last reading (conversions)
        self.disabled = ""         # why the target cannot be watched (e.g. INFO not permitted)
        self.unreadable = ""       # why the last check could not read the target

    def queue(self, pipe) -> bool:
        """Queue a reading at the end of ``pipe`` (a batch's pipeline); False when not watching."""
        if self.base is None:
            return False
        pipe.execute_command("INFO", "server")
        pipe.execute_command("INFO", "stats")
        pipe.execute_command("DBSIZE")
        return True

    @staticmethod
    def parse(replies: list) -> Reading:
        server, stats, dbsize = (info_fields(r) if isinstance(r, bytes) else r for r in replies)
        return Reading(str(server.get("run_id", "")), int(dbsize),
                       int(stats.get("expired_keys", 0)), int(stats.get("evicted_keys", 0)))

    def read(self) -> Reading:
        pipe = self.client.pipeline(transaction=False)
        pipe.info("server")
        pipe.info("stats")
        pipe.dbsize()
        return self.parse(pipe.execute())

    def start(self) -> None:
        """The baseline, read before apply's first write (errors: the caller's to handle)."""
        if self.base is None and not self.disabled:
            try:
                self.base = self.read()
            except redis.ResponseError as e:      # NOPERM on INFO or DBSIZE
                self.disabled = str(e)
                log.warning("cannot watch the target for lost data (%s): a target that "
                            "restarts empty would not be noticed", e)
            self.carry = 0

    def observe(self, replies: list, removals: int, late_removals: int) -> Finding | None:
        """The reading a batch queued: ``removals`` keys the batch may have removed before it,
        ``late_removals`` after it."""
        found = self._compare(self.parse(replies), removals + self.carry)
        self.carry = late_removals
        return found

    def observe_later(self, removals: int, late_removals: int) -> Finding | None:
        """A batch that carried no reading: its removals count at the next one."""
        self.carry += removals + late_removals
        return None

    def check(self) -> Finding | None:
        """A reading of its own (apply is idle). A target that cannot be read right now is
        checked next time: nothing is concluded from an outage."""
        if self.base is None:
            return None
        try:
            now = self.read()
        except (*TARGET_NOT_NOW, redis.ResponseError) as e:
            log.debug("target not readable for the data-loss check: %s", e)
            self.unreadable = f"{type(e).__name__}: {e}"
            return None
        self.unreadable = ""
        found = self._compare(now, self.carry)
        self.carry = 0
        return found

    def _compare(self, now: Reading, removals: int) -> Finding | None:
        found = lost(self.base, now, removals) if self.base is not None else None
        if found and not found.certain:
            found = self.judge_restart(found)
        self.base = now
        return found

    def since_last_run(self, before: dict, group: str) -> Finding | None:
        """The target's run_id differs from what the previous apply of ``group`` last read
        (``before``): it restarted since; what it kept is judged as for a restart seen while
        running."""
        return self.judge_restart(Finding(
            f"the target restarted since the last apply of group {group!r} (run_id "
            f"{str(before.get('run_id'))[:8]} -> {self.base.run_id[:8]}; "
            f"{before.get('dbsize')} keys then, {self.base.dbsize} now)", False))

    def judge_restart(self, found: Finding) -> Finding | None:
        """A restart whose DBSIZE did not fall: what the target's persistence says it kept."""
        persistence = self._persistence()
        if persistence == "always":
            log.warning("%s; it writes every change to its AOF before answering "
                        "(appendfsync always): nothing was lost", found.why)
            return None
        if persistence == "none":
            return Finding(f"{found.why.split(' and kept')[0]} without persistence: it restarted "
                           "empty", True)
        return found

    def _persistence(self) -> str:
        return persistence_of(self.client)


def persistence_of(client: redis.Redis) -> str:
    """always (AOF, fsync before every reply), none (no AOF, no RDB saves), some, unknown."""
    try:
        pipe = client.pipeline(transaction=False)
        pipe.info("persistence")
        pipe.config_get("appendfsync")
        pipe.config_get("save")
        persistence, fsync, save = pipe.execute()
    except redis.RedisError:          # CONFIG not permitted, or the target went away again
        return "unknown"
    if persistence.get("aof_enabled"):
        return "always" if fsync.get("appendfsync") == "always" else "some"
    return "some" if (save.get("save") or "").strip() else "none"


@dataclass(frozen=True, slots=True)
class Finding:
    why: str
    certain: bool       # keys are known to be missing (else: recent writes may be)


def fell_by(before: Reading, now: Reading, removals: int) -> tuple[bool, int]:
    """Whether DBSIZE fell by more than ``removals`` and the target's expiries and evictions
    explain, and how many keys that allowed."""
    # Counters reset (CONFIG RESETSTAT, a restart): take the new value as the delta.
    expired = now.expired - before.expired if now.expired >= before.expired else now.expired
    evicted = now.evicted - before.evicted if now.evicted >= before.evicted else now.evicted
    allowed = removals + expired + evicted + DBSIZE_SLACK
    return now.dbsize < before.dbsize - allowed, allowed


def lost(before: Reading, now: Reading, removals: int) -> Finding | None:
    fell, allowed = fell_by(before, now, removals)
    if now.run_id != before.run_id:
        restarted = f"the target restarted (run_id {before.run_id[:8]} -> {now.run_id[:8]})"
        if fell:
            return Finding(f"{restarted} and holds {now.dbsize} keys, {before.dbsize} before", True)
        return Finding(f"{restarted} and kept {now.dbsize} keys ({before.dbsize} before, "
                       f"{allowed} removals allowed), but writes acknowledged just "
                       "before it stopped may be missing (no appendfsync always)", False)
    if fell:
        return Finding(f"DBSIZE fell from {before.dbsize} to {now.dbsize}, more than the "
                       f"{allowed} keys apply's deletes and the target's expiries and evictions "
                       "explain (flushed, or failed over to a replica that missed writes)", True)
    return None


def sweep_temp_keys(client, ours: set[bytes]) -> int:
    """Delete temporary keys of part sequences that can no longer complete: ``ours`` (sequences
    this run started and never finished, on a drained log), and any other temporary key nobody
    touched for TEMP_IDLE_S. Returns how many were deleted. A cluster's every primary is
    scanned (a temporary key lives in its key's slot, on that slot's primary)."""
    return sum(_sweep(node, ours) for node in primary_clients(client))


def _sweep(client: redis.Redis, ours: set[bytes]) -> int:
    stale: list[bytes] = []
    for key in client.scan_iter(match=TEMP_PATTERN, count=SCAN_COUNT):
        if key in ours or _idle(client, key) >= TEMP_IDLE_S:
            stale.append(key)
    # One DEL per key: on a cluster node the keys are of many slots (a DEL of several is refused).
    return sum(r for r in packed.run(client, [("DEL", k) for k in stale]) if isinstance(r, int))


def _idle(client: redis.Redis, key: bytes) -> int:
    try:
        return int(client.object("idletime", key) or 0)
    except redis.ResponseError:        # an LFU maxmemory-policy has no idle time: keep the key
        return -1
