"""One decoder per RDB object type (rdb.h's RDB_TYPE_*), as rdbLoadObject reads them.

What each server writes in DUMP: Redis 6.2 (RDB 9) types 0, 2, 4, 5, 11, 12, 13, 14, 15;
Redis 7.0 (RDB 10) 0, 2, 4, 5, 11, 16, 17, 18, 19; Valkey 7.2-8.x (RDB 11) adds 20 and
writes 21 for streams. Types 1, 3, 9, 10 come only from old RDB files but cost little.
"""
from __future__ import annotations

from typing import Callable

from conveyor.rdb import compact
from conveyor.rdb.compact import Element, as_bytes
from conveyor.rdb.model import RdbDecodeError, TypedValue
from conveyor.rdb.reader import Reader
from conveyor.rdb.stream import read_stream

STRING, LIST, SET, ZSET, HASH, ZSET_2 = 0, 1, 2, 3, 4, 5
MODULE_PRE_GA, MODULE_2 = 6, 7
HASH_ZIPMAP, LIST_ZIPLIST, SET_INTSET, ZSET_ZIPLIST, HASH_ZIPLIST, LIST_QUICKLIST = 9, 10, 11, 12, 13, 14
STREAM_LISTPACKS, HASH_LISTPACK, ZSET_LISTPACK, LIST_QUICKLIST_2 = 15, 16, 17, 18
STREAM_LISTPACKS_2, SET_LISTPACK, STREAM_LISTPACKS_3 = 19, 20, 21

# Quicklist-2 node containers (quicklist.h): one element stored as is, or a listpack of many.
QUICKLIST_NODE_PLAIN, QUICKLIST_NODE_PACKED = 1, 2

_MODULE_NAME_CHARSET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _score(e: Element) -> float:
    if isinstance(e, int):
        return float(e)
    try:
        return float(e)               # accepts the "inf" / "-inf" that d2string writes
    except ValueError:
        raise RdbDecodeError(f"bad sorted set score {e!r}") from None


def _pairs(elements: list[Element], what: str) -> list[tuple[Element, Element]]:
    if len(elements) % 2:
        raise RdbDecodeError(f"{what} with an odd number of elements")
    return list(zip(elements[0::2], elements[1::2]))


def _hash(elements: list[Element]) -> dict[bytes, bytes]:
    return {as_bytes(f): as_bytes(v) for f, v in _pairs(elements, "hash")}


def _zset(elements: list[Element]) -> dict[bytes, float]:
    return {as_bytes(m): _score(s) for m, s in _pairs(elements, "sorted set")}


def quicklist2_nodes(r: Reader) -> list[tuple[int, bytes]]:
    """(container, blob) of each node of an RDB type 18 list; exposed so tests can see which
    node kinds a payload really has."""
    nodes = []
    for _ in range(r.length()):
        container = r.length()
        if container not in (QUICKLIST_NODE_PLAIN, QUICKLIST_NODE_PACKED):
            raise RdbDecodeError(f"unknown quicklist node container {container}")
        nodes.append((container, r.string()))
    return nodes


def _list_quicklist2(r: Reader) -> list[bytes]:
    out: list[bytes] = []
    for container, blob in quicklist2_nodes(r):
        if container == QUICKLIST_NODE_PLAIN:
            out.append(blob)
        else:
            out.extend(map(as_bytes, compact.listpack(blob)))
    return out


def _list_quicklist(r: Reader) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(r.length()):
        out.extend(map(as_bytes, compact.ziplist(r.string())))
    return out


def _strings(r: Reader) -> list[bytes]:
    return [r.string() for _ in range(r.length())]


def _zset_skiplist(r: Reader, score: Callable[[], float]) -> dict[bytes, float]:
    # Saved from the highest score down (so loading inserts at the head); reverse for ascending.
    pairs = [(r.string(), score()) for _ in range(r.length())]
    pairs.reverse()
    return dict(pairs)


def _hash_table(r: Reader) -> dict[bytes, bytes]:
    out = {}
    for _ in range(r.length()):
        field = r.string()
        out[field] = r.string()
    return out


def _module(r: Reader) -> None:
    module_id = r.length()
    # moduleTypeNameByID: 9 chars of 6 bits above a 10-bit encoding version.
    name = bytes(_MODULE_NAME_CHARSET[(module_id >> (10 + 6 * k)) & 63] for k in range(8, -1, -1))
    raise RdbDecodeError(f"module type {name.decode()} (encoding version {module_id & 1023}) "
                         f"cannot be converted to type-based writes")


def _module_pre_ga(r: Reader) -> None:
    raise RdbDecodeError("module type (pre-release RDB format) cannot be converted")


_DECODERS: dict[int, tuple[str, Callable[[Reader], object]]] = {
    STRING: ("string", Reader.string),
    LIST: ("list", _strings),
    SET: ("set", lambda r: set(_strings(r))),
    ZSET: ("zset", lambda r: _zset_skiplist(r, r.double_text)),
    HASH: ("hash", _hash_table),
    ZSET_2: ("zset", lambda r: _zset_skiplist(r, r.double_binary)),
    MODULE_PRE_GA: ("module", _module_pre_ga),
    MODULE_2: ("module", _module),
    HASH_ZIPMAP: ("hash", lambda r: _hash(list(compact.zipmap(r.string())))),
    LIST_ZIPLIST: ("list", lambda r: [as_bytes(e) for e in compact.ziplist(r.string())]),
    SET_INTSET: ("set", lambda r: {b"%d" % v for v in compact.intset(r.string())}),
    ZSET_ZIPLIST: ("zset", lambda r: _zset(compact.ziplist(r.string()))),
    HASH_ZIPLIST: ("hash", lambda r: _hash(compact.ziplist(r.string()))),
    LIST_QUICKLIST: ("list", _list_quicklist),
    STREAM_LISTPACKS: ("stream", lambda r: read_stream(r, STREAM_LISTPACKS)),
    HASH_LISTPACK: ("hash", lambda r: _hash(compact.listpack(r.string()))),
    ZSET_LISTPACK: ("zset", lambda r: _zset(compact.listpack(r.string()))),
    LIST_QUICKLIST_2: ("list", _list_quicklist2),
    STREAM_LISTPACKS_2: ("stream", lambda r: read_stream(r, STREAM_LISTPACKS_2)),
    SET_LISTPACK: ("set", lambda r: {as_bytes(e) for e in compact.listpack(r.string())}),
    STREAM_LISTPACKS_3: ("stream", lambda r: read_stream(r, STREAM_LISTPACKS_3)),
}

# Types past 21 mean different things per vendor: Redis 7.4+ (RDB 12+) hashes with field
# expiry (22-25), Valkey 9 (RDB 80+) HASH_2 (22). None of the servers we convert from writes them.
_UNSUPPORTED = {22: "hash with field expiry metadata (Redis 7.4+ / Valkey 9+)",
                23: "hash listpack with field expiry (Redis 7.4+) / path hash (Valkey 9.2+)",
                24: "hash with field expiry metadata (Redis 7.4+)",
                25: "hash listpack with field expiry (Redis 7.4+)"}


def read_object(r: Reader, rdb_type: int) -> TypedValue:
    decoder = _DECODERS.get(rdb_type)
    if decoder is None:
        what = _UNSUPPORTED.get(rdb_type, "unknown to this decoder")
        raise RdbDecodeError(f"RDB object type {rdb_type} ({what}) is not supported")
    kind, read = decoder
    return TypedValue(type=kind, value=read(r), rdb_type=rdb_type)
