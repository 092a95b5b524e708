"""Streams: RDB types 15, 19 and 21 (rdbSaveObject / rdbLoadObject, OBJ_STREAM).

Layout: the radix tree's nodes as (16-byte master id, listpack) pairs; then length, last id,
[type >= 19: first id, max deleted id, entries added]; then the consumer groups, each with its
last delivered id, [type >= 19: entries read], global PEL with delivery times and counts, and
consumers with seen time, [type 21: active time], and the ids they own.

Each node's listpack (t_stream.c, streamAppendItem) starts with a master entry
``count, deleted, num-fields, field_1 .. field_N, 0`` followed by entries
``flags, ms-delta, seq-delta, [num-fields, field, value ...] | [value ...], lp-count``:
the value-only form when flags has SAMEFIELDS (same fields as the master entry). Entries with
the DELETED flag are XDEL tombstones, still in the listpack but not in the stream.
"""
from __future__ import annotations

from conveyor.rdb.compact import Element, as_bytes, listpack
from conveyor.rdb.model import (PendingEntry, RdbDecodeError, StreamConsumer, StreamGroup,
                                StreamValue)
from conveyor.rdb.reader import Reader

STREAM_LISTPACKS, STREAM_LISTPACKS_2, STREAM_LISTPACKS_3 = 15, 19, 21
_FLAG_DELETED = 1
_FLAG_SAMEFIELDS = 2
# entries_read is a long long saved as an unsigned length: SCG_INVALID_ENTRIES_READ (-1) arrives
# as 2**64 - 1 and means the server does not know it (XINFO GROUPS shows nil).
_INVALID_ENTRIES_READ = (1 << 64) - 1
_U64 = (1 << 64) - 1


def _int(e: Element, what: str) -> int:
    if not isinstance(e, int):
        raise RdbDecodeError(f"stream listpack: {what} is not an integer")
    return e


def _id(ms: int, seq: int) -> bytes:
    return b"%d-%d" % (ms, seq)


def _node_entries(master_ms: int, master_seq: int, items: list[Element],
                  out: list[tuple[bytes, list[tuple[bytes, bytes]]]]) -> None:
    """Append the live entries of one node's listpack to ``out``."""
    count = _int(items[0], "entry count")
    deleted = _int(items[1], "deleted count")
    nfields = _int(items[2], "master field count")
    master_fields = [as_bytes(f) for f in items[3:3 + nfields]]
    i = 3 + nfields
    if len(master_fields) != nfields or _int(items[i], "master terminator") != 0:
        raise RdbDecodeError("stream listpack: bad master entry")
    i += 1
    live = dead = 0
    n = len(items)
    while i < n:
        flags = _int(items[i], "entry flags")
        # Deltas are uint64 differences stored as int64: wrap like the C arithmetic does.
        ms = (master_ms + _int(items[i + 1], "id delta")) & _U64
        seq = (master_seq + _int(items[i + 2], "id delta")) & _U64
        i += 3
        if flags & _FLAG_SAMEFIELDS:
            values = items[i:i + nfields]
            i += nfields
            pairs = list(zip(master_fields, map(as_bytes, values)))
        else:
            k = _int(items[i], "field count")
            flat = items[i + 1:i + 1 + 2 * k]
            i += 1 + 2 * k
            pairs = list(zip(map(as_bytes, flat[0::2]), map(as_bytes, flat[1::2])))
        i += 1                                    # lp-count: only for walking backwards
        if i > n:
            raise RdbDecodeError("stream listpack: entry runs past the end of the node")
        if flags & _FLAG_DELETED:
            dead += 1
        else:
            live += 1
            out.append((_id(ms, seq), pairs))
    if (live, dead) != (count, deleted):
        raise RdbDecodeError(f"stream node claims {count} live/{deleted} deleted entries, "
                             f"holds {live}/{dead}")


def _group(r: Reader, rdb_type: int) -> StreamGroup:
    name = r.string()
    last_id = _id(r.length(), r.length())
    entries_read: int | None = None
    if rdb_type >= STREAM_LISTPACKS_2:
        entries_read = r.length()
        if entries_read == _INVALID_ENTRIES_READ:
            entries_read = None
    pending: dict[bytes, PendingEntry] = {}
    for _ in range(r.length()):
        pid = _id(*r.stream_id())
        pending[pid] = PendingEntry(id=pid, consumer=None, delivery_time=r.millis(),
                                    delivery_count=r.length())
    consumers: list[StreamConsumer] = []
    for _ in range(r.length()):
        cname = r.string()
        seen = r.millis()
        active = r.millis() if rdb_type >= STREAM_LISTPACKS_3 else None
        owned = [_id(*r.stream_id()) for _ in range(r.length())]
        for pid in owned:
            entry = pending.get(pid)
            if entry is None:
                raise RdbDecodeError("stream consumer owns an id missing from its group's PEL")
            entry["consumer"] = cname
        consumers.append(StreamConsumer(name=cname, seen_time=seen, active_time=active,
                                        pending=owned))
    return StreamGroup(name=name, last_delivered_id=last_id, entries_read=entries_read,
                       pending=list(pending.values()), consumers=consumers)


def read_stream(r: Reader, rdb_type: int) -> StreamValue:
    entries: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
    for _ in range(r.length()):
        key = r.string()
        if len(key) != 16:
            raise RdbDecodeError("stream node key is not a 128-bit id")
        items = listpack(r.string())
        if len(items) < 4:
            raise RdbDecodeError("stream node listpack without a master entry")
        _node_entries(int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big"),
                      items, entries)
    length = r.length()
    if length != len(entries):
        raise RdbDecodeError(f"stream says {length} entries, its nodes hold {len(entries)}")
    value = StreamValue(entries=entries, last_id=_id(r.length(), r.length()))
    if rdb_type >= STREAM_LISTPACKS_2:
        r.length(), r.length()                    # first id: implied by the entries
        value.max_deleted_id = _id(r.length(), r.length())
        value.entries_added = r.length()
    value.groups = [_group(r, rdb_type) for _ in range(r.length())]
    return value
