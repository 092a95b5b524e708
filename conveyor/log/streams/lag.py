"""How far behind a consumer group of a Redis Streams log is on one stream (reader.status)."""
from __future__ import annotations

import redis

from conveyor.log.base import parse_id
from conveyor.log.streams.base import next_id
from conveyor.words import text

COUNT_PAGE = 200            # entries per XRANGE page when counting a backlog
COUNT_CAP = 10_000          # a backlog up to this long is counted exactly


def undelivered(r: redis.Redis, stream: str, info: dict, g: dict) -> int:
    """Entries after the group's last-delivered-id. Redis's own ``lag`` cannot be trusted
    after an AOF reload (entries-read comes back stale from the rewritten base file and stays
    so: a lag that never falls kept ``apply --idle-timeout`` running forever), so the
    backlog is counted, a page at a time, up to COUNT_CAP; only a longer backlog reports
    Redis's figure (or the stream's length when that is implausible): 0 is always exact."""
    delivered = parse_id(g["last-delivered-id"])
    if delivered >= parse_id(info["last-generated-id"]):
        return 0
    length = int(info["length"])
    first = info.get("first-entry")
    if not length or (first and parse_id(first[0]) > delivered):
        return length                       # everything the stream holds is still to come
    n = count_after(r, stream, next_id(f"{delivered[0]}-{delivered[1]}"), COUNT_CAP)
    if n < COUNT_CAP:
        return n
    lag = g.get("lag")
    return int(lag) if lag is not None and COUNT_CAP <= int(lag) <= length else length


def count_after(r: redis.Redis, stream: str, start: str, cap: int) -> int:
    """Entries from ``start`` on, counted a page at a time (bounded memory), at most ``cap``."""
    n = 0
    while n < cap:
        page = r.execute_command("XRANGE", stream, start, "+", "COUNT", COUNT_PAGE)
        n += len(page)
        if len(page) < COUNT_PAGE:
            break
        start = next_id(text(page[-1][0]))
    return min(n, cap)
