"""Typed reads for a logical comparison when DUMP bytes differ (encodings differ between servers)."""
from __future__ import annotations

import bisect

import redis

from conveyor import packed

PAGE = 1000


def read_typed(r: redis.Redis, key: bytes, type_: str, *, stream_ids: str = "keep"):
    """A comparable value of ``key``; collections are read page by page, not in one command.
    ``stream_ids="drop"``: stream entries compare without their ids (the target assigned new
    ones), and a group by how many entries it had read."""
    if type_ == "string":
        v = r.get(key)
        if v is not None and v[:4] == b"HYLL":
            # Sparse and dense HyperLogLogs of the same set differ in bytes, not in what they count.
            return ("hll", r.pfcount(key))
        return v
    if type_ == "hash":
        return dict(r.hscan_iter(key, count=PAGE))
    if type_ == "set":
        return set(r.sscan_iter(key, count=PAGE))
    if type_ == "zset":
        return dict(r.zscan_iter(key, count=PAGE))
    if type_ == "list":
        out, start = [], 0
        while True:
            page = r.lrange(key, start, start + PAGE - 1)
            out.extend(page)
            if len(page) < PAGE:
                return out
            start += PAGE
    if type_ == "stream":
        return _stream(r, key, stream_ids == "drop")
    # Module types (JSON, TimeSeries...): no generic typed read; DUMP inequality stands.
    return ("opaque", r.dump(key))


def _stream(r: redis.Redis, key: bytes, drop_ids: bool = False):
    entries, start = [], b"-"
    while True:
        # Raw reply: an entry may repeat a field name, which a dict would hide.
        page = [(e[0], list(e[1])) for e in _xrange(r, key, start)]
        entries.extend(page)
        if len(page) < PAGE:
            break
        start = b"(" + page[-1][0]
    groups = sorted((g["name"], g["last-delivered-id"]) for g in r.xinfo_groups(key))
    if drop_ids:
        ids = [_id(e[0]) for e in entries]
        return ([e[1] for e in entries],
                sorted((name, bisect.bisect_right(ids, _id(last))) for name, last in groups))
    return entries, groups


def _xrange(r, key: bytes, start: bytes) -> list:
    """One page of raw XRANGE (routed by its key on a cluster)."""
    reply = packed.run(r, [("XRANGE", key, start, b"+", "COUNT", PAGE)])[0]
    if isinstance(reply, Exception):
        raise reply
    return reply


def _id(i: bytes) -> tuple[int, int]:
    ms, _, seq = i.partition(b"-")
    return int(ms), int(seq or 0)
