"""Typed reads for a logical comparison when DUMP bytes differ (encodings differ between servers)."""
from __future__ import annotations

import redis

PAGE = 1000


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_typed(r: redis.Redis, key: bytes, type_: str):
    """A comparable value of ``key``; collections are read page by page, not in one command."""
    if type_ == "string":
        v = r.execute_command("GET", key)
        if v is not None and v[:4] == b"HYLL":
            # Sparse and dense HyperLogLogs of the same set differ in bytes, not in what they count.
            return ("hll", r.execute_command("PFCOUNT", key))
        return v
    if type_ == "hash":
        return dict(_scan_pairs(r, "HSCAN", key))
    if type_ == "set":
        out = set()
        cursor = 0
        while True:
            cursor, items = r.execute_command("SSCAN", key, cursor, "COUNT", PAGE)
            out.update(items)
            if int(cursor) == 0:
                return out
    if type_ == "zset":
        return {m: float(s) for m, s in _scan_pairs(r, "ZSCAN", key)}
    if type_ == "list":
        out, start = [], 0
        while True:
            page = r.execute_command("LRANGE", key, start, start + PAGE - 1)
            out.extend(page)
            if len(page) < PAGE:
                return out
            start += PAGE
    if type_ == "stream":
        return _stream(r, key)
    # Module types (JSON, TimeSeries...): no generic typed read; DUMP inequality stands.
    return ("opaque", r.execute_command("DUMP", key))


def _scan_pairs(r: redis.Redis, cmd: str, key: bytes):
    cursor = 0
    while True:
        cursor, items = r.execute_command(cmd, key, cursor, "COUNT", PAGE)
        for i in range(0, len(items), 2):
            yield items[i], items[i + 1]
        if int(cursor) == 0:
            return


def _stream(r: redis.Redis, key: bytes):
    entries, start = [], b"-"
    while True:
        page = r.execute_command("XRANGE", key, start, b"+", "COUNT", PAGE)
        if start != b"-" and page:
            page = page[1:]
        entries.extend((eid, tuple(fields)) for eid, fields in page)
        if len(page) < PAGE - 1 or not page:
            break
        start = page[-1][0]
    groups = []
    for g in r.execute_command("XINFO", "GROUPS", key):
        g = dict(zip(g[::2], g[1::2])) if isinstance(g, list) else g
        groups.append((_text(g.get(b"name", g.get("name"))),
                       _text(g.get(b"last-delivered-id", g.get("last-delivered-id")))))
    return entries, sorted(groups)
