"""An independent compare of two Redis databases with plain redis-py reads.

Written apart from conveyor's own verify on purpose: a verify that shares a bug with the copy
agrees with it. Types, values and expiries of every key on both sides; nothing of conveyor is
imported.
"""
from __future__ import annotations

import time

import redis

TTL_TOLERANCE_MS = 2000


def _value(r: redis.Redis, key: bytes, kind: bytes):
    if kind == b"string":
        return r.get(key)
    if kind == b"hash":
        return r.hgetall(key)
    if kind == b"list":
        return r.lrange(key, 0, -1)
    if kind == b"set":
        return r.smembers(key)
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


def differences(source: redis.Redis, target: redis.Redis, limit: int = 20) -> list[str]:
    """Every key whose type, value or expiry differs (or that one side lacks), at most ``limit``
    described; an empty list means the databases hold the same data."""
    out: list[str] = []
    src_keys = set(source.scan_iter(count=1000))
    dst_keys = set(target.scan_iter(count=1000))
    for key in sorted(src_keys | dst_keys):
        a, b = _state(source, key), _state(target, key)
        if a is None and b is None:
            continue                      # expired between the scan and the read
        if a is None or b is None:
            out.append(f"{key!r}: {'missing on target' if b is None else 'only on target'}")
        elif a[0] != b[0] or a[1] != b[1]:
            out.append(f"{key!r}: {a[0]!r}/{b[0]!r} values differ")
        elif (a[2] < 0) != (b[2] < 0) or abs(a[2] - b[2]) > TTL_TOLERANCE_MS:
            out.append(f"{key!r}: ttl {a[2]} vs {b[2]}")
        if len(out) >= limit:
            break
    return out


def wait_identical(source: redis.Redis, target: redis.Redis, timeout: float = 60.0) -> list[str]:
    """Compare until identical or ``timeout``; the last differences (empty when identical)."""
    deadline = time.monotonic() + timeout
    while True:
        diffs = differences(source, target)
        if not diffs or time.monotonic() >= deadline:
            return diffs
        time.sleep(0.5)
