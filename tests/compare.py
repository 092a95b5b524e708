"""An independent compare of two Redis databases with plain redis-py reads, and a bounded wait.

Written apart from conveyor's own verify on purpose: a verify that shares a bug with the copy
agrees with it. Types, values and expiries of every key on both sides; nothing of conveyor is
imported.
"""
from __future__ import annotations

import time

import redis
from redis.cluster import RedisCluster

TTL_TOLERANCE_MS = 3000
Client = redis.Redis | RedisCluster


def _value(r: redis.Redis, key: bytes, kind: bytes):
    if kind == b"string":
        return r.get(key)
    if kind == b"hash":
        return sorted(r.hgetall(key).items())
    if kind == b"list":
        return r.lrange(key, 0, -1)
    if kind == b"set":
        return sorted(r.smembers(key))
    if kind == b"zset":
        return r.zrange(key, 0, -1, withscores=True)
    if kind == b"stream":
        return r.xrange(key)
    return r.dump(key)


def _state(r: redis.Redis, key: bytes):
    kind = r.type(key)
    if kind == b"none":
        return None
    return kind, _value(r, key, kind), r.pttl(key)


def _differs(a, b) -> bool:
    if a is None or b is None:
        return a is not b
    if a[:2] != b[:2]:
        return True
    return (a[2] < 0) != (b[2] < 0) or abs(a[2] - b[2]) > TTL_TOLERANCE_MS


def _keys(r: Client) -> set[bytes]:
    """Every key; on a cluster client, of every current primary (SCAN goes to the primaries the
    client knows, so its slot table is refreshed first: a primary added since it was made would
    be left out)."""
    if isinstance(r, RedisCluster):
        r.nodes_manager.initialize()
    return set(r.scan_iter(count=1000))


def differences(source: Client, target: Client, recheck_s: float = 1.0,
                ignore: frozenset[bytes] = frozenset()) -> list[str]:
    """Every key of either side whose type, value or expiry differs (or that one side lacks);
    an empty list means the databases hold the same data. A key that differs is read again
    after ``recheck_s`` (it may have been expiring while read). Either side may be a RedisCluster
    client: keys are then read wherever their slot lives."""
    keys = (_keys(source) | _keys(target)) - ignore
    suspects = [k for k in keys if _differs(_state(source, k), _state(target, k))]
    if suspects and recheck_s:
        time.sleep(recheck_s)
    out = []
    for k in sorted(suspects):
        a, b = _state(source, k), _state(target, k)
        if _differs(a, b):
            out.append(f"{k!r}: source {a!r:.80} target {b!r:.80}")
    return out


def wait_identical(source: Client, target: Client, timeout: float = 30.0,
                   ignore: frozenset[bytes] = frozenset()) -> list[str]:
    """Compare until identical or ``timeout``; the last differences (empty when identical)."""
    deadline = time.monotonic() + timeout
    while True:
        diffs = differences(source, target, recheck_s=0.2, ignore=ignore)
        if not diffs or time.monotonic() >= deadline:
            return diffs
        time.sleep(0.3)


def wait_until(cond, timeout: float = 30.0, what: str = "the condition", every: float = 0.1):
    """``cond()`` until it is truthy (returned) or ``timeout`` s passed (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
