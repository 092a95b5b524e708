"""Typed values: reading them from a source, and writing them to a target with plain commands.

A value travels in the event schema's shape (``schemas/event.v2.avsc``, record ``Value``)::

    {"type": "HASH", "items": [f1, v1, f2, v2, ...], "scores": [], "stream": None}

``items`` holds a string's bytes (one item, or one part of it), list elements in order, set
members, hash fields and values interleaved, or sorted-set members with their exact scores in
``scores``. A stream has ``items == []`` and its entries, ids, metadata and consumer groups in
``stream``. The same shape serves ``--type struct`` capture, the chunks of a big key, and the
conversion of a DUMP payload an older target refuses (see :mod:`conveyor.rdb`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from conveyor.rdb import StreamValue, TypedValue

TYPES = {"string": "STRING", "list": "LIST", "set": "SET", "zset": "ZSET", "hash": "HASH",
         "stream": "STREAM"}
# Arguments per command when a value is written: big enough to amortize, small enough that no
# single command holds a target's event loop for long.
ARGS_PER_COMMAND = 1000


def value(type_: str, items=(), scores=(), stream=None) -> dict:
    return {"type": type_, "items": list(items), "scores": list(scores), "stream": stream}


def stream_doc(entries, last_id=None, entries_added=None, max_deleted_id=None, groups=()) -> dict:
    return {"entries": [{"id": i, "fields": f} for i, f in entries], "last_id": last_id,
            "entries_added": entries_added, "max_deleted_id": max_deleted_id, "groups": list(groups)}


def group_doc(name: bytes, last_delivered_id: bytes, entries_read=None, consumers=(),
              pending: int = 0, pel=()) -> dict:
    """``pel``: (id, consumer, delivery time ms, delivery count) of each pending entry."""
    return {"name": name, "last_delivered_id": last_delivered_id, "entries_read": entries_read,
            "consumers": list(consumers), "pending": pending,
            "pel": [{"id": i, "consumer": c, "delivery_time": t, "delivery_count": n}
                    for i, c, t, n in pel]}


def as_bytes(v) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, int):
        return b"%d" % v
    return str(v).encode()


def from_rdb(tv: TypedValue) -> dict:
    """The schema shape of a value decoded from a DUMP payload."""
    t = tv.type
    if t == "string":
        return value("STRING", [as_bytes(tv.value)])
    if t == "list":
        return value("LIST", [as_bytes(e) for e in tv.value])
    if t == "set":
        return value("SET", [as_bytes(e) for e in tv.value])
    if t == "hash":
        items = []
        for f, v in tv.value.items():
            items += (as_bytes(f), as_bytes(v))
        return value("HASH", items)
    if t == "zset":
        return value("ZSET", [as_bytes(m) for m in tv.value], list(tv.value.values()))
    if t == "stream":
        s: StreamValue = tv.value
        entries = []
        for eid, fields in s.entries:
            row = []
            for f, v in fields:
                row += (as_bytes(f), as_bytes(v))
            entries.append((eid, row))
        groups = [group_doc(g["name"], g["last_delivered_id"], g["entries_read"],
                            [c["name"] for c in g["consumers"]], len(g["pending"]),
                            [(p["id"], p["consumer"], p["delivery_time"], p["delivery_count"])
                             for p in g["pending"] if p["consumer"] is not None])
                  for g in s.groups]
        return value("STREAM", stream=stream_doc(entries, s.last_id, s.entries_added,
                                                 s.max_deleted_id, groups))
    raise ValueError(f"no typed form for a {t} value")


def elements(v: dict) -> int:
    """How many elements a value (or a part of one) carries: bytes for a string."""
    t = v["type"]
    if t == "STRING":
        return sum(len(i) for i in v["items"])
    if t == "HASH":
        return len(v["items"]) // 2
    if t == "STREAM":
        return len(v["stream"]["entries"]) if v["stream"] else 0
    return len(v["items"])


def score_arg(s: float) -> bytes:
    """A score as ZADD reads it back to the same double: repr is the shortest exact form."""
    if math.isinf(s):
        return b"+inf" if s > 0 else b"-inf"
    return repr(s).encode()


# -- reading from a source ------------------------------------------------------------------------
def queue_read(pipe, key: bytes, type_: str) -> int:
    """Queue the commands that read the whole ``type_`` value of ``key``; returns how many."""
    if type_ == "string":
        pipe.execute_command("GET", key)
        return 1
    if type_ == "list":
        pipe.execute_command("LRANGE", key, 0, -1)
        return 1
    if type_ == "set":
        pipe.execute_command("SMEMBERS", key)
        return 1
    if type_ == "zset":
        pipe.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")
        return 1
    if type_ == "hash":
        pipe.execute_command("HGETALL", key)
        return 1
    if type_ == "stream":
        pipe.execute_command("XRANGE", key, "-", "+")
        pipe.execute_command("XINFO", "STREAM", key)
        pipe.execute_command("XINFO", "GROUPS", key)
        return 3
    raise ValueError(type_)


def parse_read(type_: str, replies: list, *, consumers=None) -> dict | None:
    """The value from what :func:`queue_read` queued, or None when the key was gone (or changed
    type) between the commands: the caller reads it again."""
    first = replies[0]
    if first is None or isinstance(first, Exception):
        return None
    if type_ == "string":
        return value("STRING", [first])
    if type_ == "list":
        return value("LIST", first) if first else None
    if type_ == "set":
        return value("SET", first) if first else None
    if type_ == "hash":
        return value("HASH", flat(first)) if first else None
    if type_ == "zset":
        if not first:
            return None
        members, scores = zset_pairs(first)
        return value("ZSET", members, scores)
    if type_ == "stream":
        info, groups = replies[1], replies[2]
        if isinstance(info, Exception) or isinstance(groups, Exception):
            return None
        return value("STREAM", stream=stream_value(first, pairs_of(info), groups, consumers or {}))
    raise ValueError(type_)


def flat(reply) -> list:
    if isinstance(reply, dict):
        out = []
        for k, v in reply.items():
            out += (k, v)
        return out
    return list(reply)


def pairs_of(reply) -> dict:
    if isinstance(reply, dict):
        return {as_bytes(k).decode(): v for k, v in reply.items()}
    return {as_bytes(reply[i]).decode(): reply[i + 1] for i in range(0, len(reply), 2)}


def zset_pairs(reply) -> tuple[list, list]:
    if reply and isinstance(reply[0], (list, tuple)):
        return [m for m, _ in reply], [float(s) for _, s in reply]
    return list(reply[0::2]), [float(s) for s in reply[1::2]]


def stream_value(entries, info: dict, groups, consumers: dict) -> dict:
    rows = [(eid, flat(fields) if fields is not None else []) for eid, fields in entries]
    docs = []
    for g in groups:
        g = pairs_of(g)
        name = as_bytes(g["name"])
        docs.append(group_doc(name, as_bytes(g["last-delivered-id"]), g.get("entries-read"),
                              consumers.get(name, ()), int(g.get("pending") or 0)))
    max_del = info.get("max-deleted-entry-id")
    return stream_doc(rows, as_bytes(info["last-generated-id"]), info.get("entries-added"),
                      as_bytes(max_del) if max_del is not None else None, docs)


# -- writing to a target --------------------------------------------------------------------------
@dataclass
class Writes:
    """Commands that write one value, with the error replies that are not failures."""

    commands: list[tuple]
    # Index of a command whose error reply is expected (XADD of an id the target already has,
    # when merging): such replies are counted, not failures.
    tolerated: set[int]


def write_commands(key: bytes, v: dict, *, into: bytes | None, expire_at_ms: int | None,
                   stream_ids: str = "keep", v7: bool = True) -> Writes:
    """Commands that make ``key`` hold ``v``.

    With ``into`` (a temporary key in the same slot), the value is built there and renamed over
    ``key`` at the end, so no reader ever sees a partial key (policy overwrite). Without it, the
    value is merged into whatever ``key`` holds (policy merge)."""
    dest = into if into is not None else key
    cmds: list[tuple] = []
    tolerated: set[int] = set()
    if into is not None:
        cmds.append(("DEL", into))
    add_value(cmds, tolerated, dest, v, stream_ids=stream_ids, merge=into is None, v7=v7)
    if into is not None:
        cmds.append(("RENAME", into, key))
    # After the rename: an expiry that passes while the batch is on its way deletes the key
    # (as on the source) instead of failing the rename.
    if expire_at_ms is not None:
        cmds.append(("PEXPIREAT", key, expire_at_ms))
    elif into is None and v["type"] != "STRING":
        cmds.append(("PERSIST", key))
    return Writes(cmds, tolerated)


def add_value(cmds: list, tolerated: set, dest: bytes, v: dict, *, stream_ids: str = "keep",
              merge: bool = False, first: bool = True, v7: bool = True) -> None:
    """Append to ``cmds`` the commands that add ``v``'s elements to ``dest``. ``first`` is False
    for the later parts of a value written in parts (a string part is appended). ``v7``: the
    target knows Redis 7.0's stream metadata (XSETID ENTRIESADDED, XGROUP CREATE ENTRIESREAD)."""
    t, items = v["type"], v["items"]
    if t == "STRING":
        data = b"".join(items)
        cmds.append(("SET", dest, data) if first else ("APPEND", dest, data))
        return
    cmd, step = {"LIST": ("RPUSH", 1), "SET": ("SADD", 1), "HASH": ("HSET", 2),
                 "ZSET": ("ZADD", 1), "STREAM": (None, 0)}[t]
    if t == "ZSET":
        scores = v["scores"]
        for i in range(0, len(items), ARGS_PER_COMMAND):
            args = []
            for m, s in zip(items[i:i + ARGS_PER_COMMAND], scores[i:i + ARGS_PER_COMMAND]):
                args += (score_arg(s), m)
            cmds.append(("ZADD", dest, *args))
        return
    if t == "STREAM":
        _add_stream(cmds, tolerated, dest, v["stream"], stream_ids=stream_ids, merge=merge, v7=v7)
        return
    per = ARGS_PER_COMMAND - ARGS_PER_COMMAND % step
    for i in range(0, len(items), per):
        cmds.append((cmd, dest, *items[i:i + per]))


def _add_stream(cmds: list, tolerated: set, dest: bytes, s: dict, *, stream_ids: str,
                merge: bool, v7: bool) -> None:
    entries, groups = s["entries"], s["groups"]
    keep = stream_ids == "keep"
    if keep:
        for e in entries:
            if merge:
                tolerated.add(len(cmds))   # an id the target already has: already merged
            cmds.append(("XADD", dest, e["id"], *e["fields"]))
        if s["last_id"] is not None and not merge:
            if not entries and not groups:
                return
            if not entries:                 # an emptied stream: create it, keep its ids
                cmds.append(("XGROUP", "CREATE", dest, b"\x00conveyor", b"0", "MKSTREAM"))
                cmds.append(("XGROUP", "DESTROY", dest, b"\x00conveyor"))
            setid = ["XSETID", dest, s["last_id"]]
            if v7 and s["entries_added"] is not None:
                setid += ["ENTRIESADDED", s["entries_added"],
                          "MAXDELETEDID", s["max_deleted_id"] or b"0-0"]
            cmds.append(tuple(setid))
        for g in groups:
            create = ["XGROUP", "CREATE", dest, g["name"], g["last_delivered_id"]]
            if v7 and g["entries_read"] is not None and g["entries_read"] >= 0:
                create += ["ENTRIESREAD", g["entries_read"]]
            cmds.append(tuple(create))
            if merge:
                tolerated.add(len(cmds) - 1)   # BUSYGROUP: the target has it already
            for c in g["consumers"]:
                cmds.append(("XGROUP", "CREATECONSUMER", dest, g["name"], c))
            for p in g.get("pel", ()):
                # FORCE creates the pending entry; TIME/RETRYCOUNT keep its delivery history.
                cmds.append(("XCLAIM", dest, g["name"], p["consumer"], 0, p["id"], "TIME",
                             p["delivery_time"], "RETRYCOUNT", p["delivery_count"], "FORCE",
                             "JUSTID"))
        return
    # New ids: a group is created at "$" right after the entries it had read were added, so it
    # points at the same entry as on the source.
    ids = [e["id"] for e in entries]
    order = sorted(groups, key=lambda g: _id_tuple(g["last_delivered_id"]))
    gi = 0
    if not entries:
        cmds.append(("XGROUP", "CREATE", dest, b"\x00conveyor", b"0", "MKSTREAM"))
        cmds.append(("XGROUP", "DESTROY", dest, b"\x00conveyor"))
    for n, e in enumerate(entries):
        while gi < len(order) and _id_tuple(order[gi]["last_delivered_id"]) < _id_tuple(ids[n]):
            _create_group(cmds, tolerated, dest, order[gi], "$" if n else "0", merge)
            gi += 1
        cmds.append(("XADD", dest, "*", *e["fields"]))
    for g in order[gi:]:
        _create_group(cmds, tolerated, dest, g, "$", merge)


def _create_group(cmds, tolerated, dest, g, at, merge) -> None:
    if merge:
        tolerated.add(len(cmds))
    cmds.append(("XGROUP", "CREATE", dest, g["name"], at, "MKSTREAM"))
    for c in g["consumers"]:
        cmds.append(("XGROUP", "CREATECONSUMER", dest, g["name"], c))


def _id_tuple(i: bytes) -> tuple[int, int]:
    ms, _, seq = bytes(i).partition(b"-")
    return int(ms), int(seq or 0)


def pending_dropped(v: dict, stream_ids: str = "keep", whole: bool = True) -> int:
    """Pending entries of the stream's groups that are not recreated: all of them when the ids
    change, else those with no owner or pointing at an entry no longer in the stream (a whole
    value only: the entries of a value in parts are not all at hand)."""
    if v["type"] != "STREAM" or not v["stream"]:
        return 0
    groups = v["stream"]["groups"]
    if stream_ids != "keep":
        return sum(g["pending"] for g in groups)
    dropped = sum(g["pending"] - len(g.get("pel", ())) for g in groups)
    if whole and any(g.get("pel") for g in groups):
        ids = {e["id"] for e in v["stream"]["entries"]}
        dropped += sum(1 for g in groups for p in g.get("pel", ()) if p["id"] not in ids)
    return dropped
