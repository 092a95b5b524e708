"""Events (the whole state of one key, or a marker) and their Avro codec.

Every record is written in Avro's single-object encoding: ``C3 01`` + the 8-byte CRC-64-AVRO
fingerprint of the writer's schema + the schemaless body. The fingerprint picks the writer schema
on read, so logs written by an older schema stay readable after the schema evolves.

A record is one event (``event.v2``) or a block of events (``block.v1``): consecutive UPSERTs of
whole DUMP payloads and DELETEs of one log partition, kept as columns (keys, payloads, ...), so
that fastavro encodes and decodes a block in one call (about 1.5 µs per event instead of 19).
A log that keeps one record per key (a compacted Kafka topic) takes such an event alone as a
``state.v1`` record: the seven fields it uses, about half the cost of an ``event.v2``. Parts of
big keys, typed values and markers stay ``event.v2`` records.
"""
from __future__ import annotations

import enum
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from conveyor.errors import CodecError

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
CURRENT_SCHEMA = "event.v2.avsc"
SCHEMAS = (CURRENT_SCHEMA, "event.v1.avsc")   # the current one first; older ones stay readable
BLOCK_SCHEMA = "block.v1.avsc"
STATE_SCHEMA = "state.v1.avsc"                 # one whole state per record (compacted Kafka)
DECODE_RUN = 500                               # records decoded by one fastavro call
BLOCK_KEY = b"\x00conveyor-block:"             # record key of a block: db:BLOCK_KEY + event count


class Kind(str, enum.Enum):
    UPSERT = "UPSERT"
    DELETE = "DELETE"
    SNAPSHOT_BEGIN = "SNAPSHOT_BEGIN"
    SNAPSHOT_END = "SNAPSHOT_END"
    RESYNC = "RESYNC"


MARKERS = frozenset({Kind.SNAPSHOT_BEGIN, Kind.SNAPSHOT_END, Kind.RESYNC})
_KINDS = {k.value: k for k in Kind}


@dataclass(slots=True)
class Event:
    kind: Kind
    db: int
    key: bytes = b""
    payload: bytes | None = None
    expire_at_ms: int | None = None
    read_time_ms: int = 0
    capture_id: str = ""
    seq: int = 0
    count: int | None = None
    info: dict[str, str] = field(default_factory=dict)
    # A typed value in the schema's shape: {"type": "HASH", "items": [...], "scores": [...],
    # "stream": None | {...}} (see conveyor.values), instead of or next to a DUMP payload.
    value: dict | None = None
    # Part of a key read in parts: {"id": str, "index": int, "offset": int, "last": bool}.
    chunk: dict | None = None

    @property
    def is_marker(self) -> bool:
        return self.kind in MARKERS

    def record_key(self) -> bytes:
        """The log record key: db + Redis key, so every event of a key lands in one partition."""
        if self.is_marker:
            return b"%d:\x00conveyor-marker:%s" % (self.db, self.capture_id.encode())
        if self.chunk is not None:
            # Each part keeps its own record key, so a compacted topic keeps every part of the
            # latest read of a big key (a newer read's parts replace them index by index).
            return record_key(self.db, self.key) + b"\x00part:%d" % self.chunk["index"]
        return record_key(self.db, self.key)

    def partition_key(self) -> bytes:
        """What picks the partition: the key's, for parts too, so per-key order holds."""
        if self.is_marker:
            return self.record_key()
        return record_key(self.db, self.key)

    def expired(self, now_ms: int | None = None) -> bool:
        if self.expire_at_ms is None:
            return False
        return self.expire_at_ms <= (now_ms if now_ms is not None else now_millis())


def record_key(db: int, key: bytes) -> bytes:
    return b"%d:%s" % (db, key)


def block_record_key(db: int, n: int) -> bytes:
    """A block's record key names its event count, so that a damaged block can say how many
    keys it held even when its value cannot be decoded, and ends in a random token: on a
    compacted Kafka topic no block ever replaces another (blocks are never compacted away)."""
    return b"%d:%s%d:%s" % (db, BLOCK_KEY, n, os.urandom(8).hex().encode())


def block_size(record_key_: bytes) -> int | None:
    """The event count a block's record key names; None for a record that is not a block."""
    at = record_key_.find(BLOCK_KEY)
    if at < 0:
        return None
    count = re.match(rb"\d+", record_key_[at + len(BLOCK_KEY):])
    return int(count.group()) if count else None


@dataclass(slots=True)
class Columns:
    """Events of one partition gathered as a block's columns, until encoded as one record."""
    keys: list[bytes] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)
    expiring: list[int] = field(default_factory=list)
    expire_at_ms: list[int] = field(default_factory=list)
    read_time_ms: int = 0           # the earliest read time of the events
    size: int = 0                   # key and payload bytes

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: bytes, payload: bytes | None, expire_at_ms: int | None,
            read_ms: int) -> None:
        """An UPSERT of ``payload``, or a DELETE when it is None."""
        if not self.keys or read_ms < self.read_time_ms:
            self.read_time_ms = read_ms
        if payload is None:
            self.deletes.append(len(self.keys))
            payload = b""
        elif expire_at_ms is not None:
            self.expiring.append(len(self.keys))
            self.expire_at_ms.append(expire_at_ms)
        self.keys.append(key)
        self.payloads.append(payload)
        self.size += len(key) + len(payload)

    def extend(self, keys: list[bytes], payloads: list[bytes], expires: list[int | None],
               read_ms: int, size: int) -> None:
        """UPSERTs of ``payloads`` (``size``: their key and payload bytes)."""
        if not self.keys or read_ms < self.read_time_ms:
            self.read_time_ms = read_ms
        base = len(self.keys)
        for i, x in enumerate(expires):
            if x is not None:
                self.expiring.append(base + i)
                self.expire_at_ms.append(x)
        self.keys += keys
        self.payloads += payloads
        self.size += size


def now_millis() -> int:
    return time.time_ns() // 1_000_000


def _schema_dir() -> Path:
    # A source tree's own schemas first: an editable install may map the package to another tree.
    here = Path(__file__).resolve().parent.parent / "schemas"
    if (here / CURRENT_SCHEMA).is_file():
        return here
    return Path(str(resources.files("conveyor.schemas")))


def load_schema(name: str) -> dict:
    try:
        return json.loads((_schema_dir() / name).read_text())
    except OSError as e:
        raise CodecError(f"schema {name} not found in {_schema_dir()}: {e}") from e


class Codec:
    """Encodes events with the current schema; decodes any known schema by fingerprint."""

    def __init__(self, schema_names: tuple[str, ...] = SCHEMAS) -> None:
        self._by_fp: dict[bytes, dict] = {}
        for name in schema_names:
            parsed = fastavro.parse_schema(load_schema(name))
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            self._by_fp[fp] = parsed
        self._schema = fastavro.parse_schema(load_schema(schema_names[0]))
        self._reader_schema = self._schema
        self._header = MAGIC + bytes.fromhex(
            fingerprint(to_parsing_canonical_form(self._schema), "CRC-64-AVRO"))
        self._current = self._by_fp[self._header[len(MAGIC):]]
        # Records of the current schema are decoded many at a time, as the items of one Avro
        # array (a block count, the bodies back to back, an end block): one fastavro call.
        self._array = fastavro.parse_schema({"type": "array", "items": load_schema(schema_names[0])})
        self._buf = io.BytesIO()
        self._block = fastavro.parse_schema(load_schema(BLOCK_SCHEMA))
        self._block_header = _header(self._block)
        self._state = fastavro.parse_schema(load_schema(STATE_SCHEMA))
        self._state_header = _header(self._state)
        self._states = fastavro.parse_schema({"type": "array", "items": load_schema(STATE_SCHEMA)})

    @property
    def fingerprint(self) -> bytes:
        return self._header[len(MAGIC):]

    def encode(self, ev: Event) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self._schema, {
            "kind": ev.kind.value, "db": ev.db, "key": ev.key, "payload": ev.payload,
            "expire_at_ms": ev.expire_at_ms, "read_time_ms": ev.read_time_ms,
            "capture_id": ev.capture_id, "seq": ev.seq, "count": ev.count, "info": ev.info,
            "value": ev.value, "chunk": ev.chunk,
        })
        return buf.getvalue()

    def encode_block(self, db: int, capture_id: str, first_seq: int, cols: Columns) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        buf.write(self._block_header)
        fastavro.schemaless_writer(buf, self._block, {
            "db": db, "capture_id": capture_id, "first_seq": first_seq,
            "read_time_ms": cols.read_time_ms, "keys": cols.keys, "payloads": cols.payloads,
            "deletes": cols.deletes, "expiring": cols.expiring,
            "expire_at_ms": cols.expire_at_ms})
        return buf.getvalue()

    def encode_state(self, db: int, key: bytes, payload: bytes | None, expire_at_ms: int | None,
                     read_ms: int, capture_id: str, seq: int) -> bytes:
        """An UPSERT of a whole DUMP payload (a DELETE when ``payload`` is None) as one record."""
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        buf.write(self._state_header)
        fastavro.schemaless_writer(buf, self._state, {
            "db": db, "key": key, "payload": payload or b"",
            "expire_at_ms": -1 if expire_at_ms is None else expire_at_ms,
            "read_time_ms": read_ms, "capture_id": capture_id, "seq": seq})
        return buf.getvalue()

    def is_block(self, data: bytes) -> bool:
        return data is not None and data[:HEADER_LEN] == self._block_header

    def decode_all(self, data: bytes) -> list[Event]:
        """The events of one record: a block's, in order, or the one event."""
        if self.is_block(data):
            return self._decode_block(data)
        return [self.decode(data)]

    def _decode_state(self, data: bytes) -> Event:
        try:
            return _state_event(fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]),
                                                           self._state))
        except Exception as e:  # fastavro raises a mix of EOFError, ValueError, KeyError...
            raise CodecError(f"corrupt event record: {type(e).__name__}: {e}") from e

    def _decode_block(self, data: bytes) -> list[Event]:
        try:
            d = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), self._block)
            return _block_events(d)
        except Exception as e:  # fastavro raises a mix; a bad index is an IndexError
            raise CodecError(f"corrupt event block: {type(e).__name__}: {e}") from e

    def decode_many(self, datas: list[bytes]) -> list[Event | list[Event] | CodecError]:
        """``decode`` of each record (a block gives the list of its events); an undecodable one
        gives its CodecError in its place."""
        out: list = [None] * len(datas)
        runs = {self._header: ([], [], self._array, _event),
                self._state_header: ([], [], self._states, _state_event)}
        block = self._block_header
        for i, d in enumerate(datas):
            if d is None:
                continue
            h = d[:HEADER_LEN]
            run = runs.get(h)
            if run is not None:
                run[0].append(d[HEADER_LEN:])
                run[1].append(i)
            elif h == block:
                try:
                    out[i] = self._decode_block(d)
                except CodecError as e:
                    out[i] = e
        for bodies, where, schema, make in runs.values():
            for at in range(0, len(bodies), DECODE_RUN):    # bounded: one run's copy at a time
                dicts = self._read_array(bodies[at:at + DECODE_RUN], schema)
                if dicts is not None:
                    for i, d in zip(where[at:at + DECODE_RUN], dicts):
                        out[i] = make(d)
        for i, d in enumerate(datas):
            if out[i] is None:              # another schema, or a batch with a bad record in it
                try:
                    out[i] = self.decode(d)
                except CodecError as e:
                    out[i] = e
        return out

    def _read_array(self, bodies: list[bytes], schema) -> list[dict] | None:
        """The bodies as one array; None unless every body decodes and the bytes end exactly
        where the array does (then each record is decoded alone, to find the bad one)."""
        data = _zigzag(len(bodies)) + b"".join(bodies) + b"\x00"
        fo = io.BytesIO(data)
        try:
            dicts = fastavro.schemaless_reader(fo, schema)
        except Exception:  # noqa: BLE001 - fastavro raises a mix; the records are tried alone
            return None
        return dicts if len(dicts) == len(bodies) and fo.tell() == len(data) else None

    def decode(self, data: bytes) -> Event:
        if data is None or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise CodecError("record is not an Avro single-object encoded conveyor event")
        if data[:HEADER_LEN] == self._state_header:
            return self._decode_state(data)
        writer = self._by_fp.get(bytes(data[2:HEADER_LEN]))
        if writer is None:
            raise CodecError(f"record written with unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        # No schema resolution when the record was written with the current schema (the hot path).
        try:
            if writer is self._current:
                d = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer)
            else:
                d = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer,
                                               self._reader_schema)
            return _event(d)
        except Exception as e:  # fastavro raises a mix of EOFError, ValueError, KeyError...
            raise CodecError(f"corrupt event record: {type(e).__name__}: {e}") from e


def _event(d: dict) -> Event:
    return Event(_KINDS[d["kind"]], d["db"], d["key"], d["payload"], d["expire_at_ms"],
                 d["read_time_ms"], d["capture_id"], d["seq"], d["count"], d["info"],
                 d["value"], d["chunk"])


def _header(schema: dict) -> bytes:
    return MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def _state_event(d: dict) -> Event:
    if d["payload"]:
        x = d["expire_at_ms"]
        return Event(Kind.UPSERT, d["db"], d["key"], d["payload"], None if x < 0 else x,
                     d["read_time_ms"], d["capture_id"], d["seq"], None, _NO_INFO)
    return Event(Kind.DELETE, d["db"], d["key"], None, None, d["read_time_ms"], d["capture_id"],
                 d["seq"], None, _NO_INFO)


_NO_INFO: dict[str, str] = {}     # shared by the events of blocks (only markers have info)


def _block_events(d: dict) -> list[Event]:
    keys, payloads, n = d["keys"], d["payloads"], len(d["keys"])
    if len(payloads) != n or len(d["expiring"]) != len(d["expire_at_ms"]):
        raise ValueError(f"columns of unequal length ({n} keys, {len(payloads)} payloads)")
    expires: list = [None] * n
    for i, at in zip(d["expiring"], d["expire_at_ms"]):
        expires[i] = at
    db, cid, rt, seq, up = d["db"], d["capture_id"], d["read_time_ms"], d["first_seq"], Kind.UPSERT
    evs = [Event(up, db, k, p, x, rt, cid, seq + i, None, _NO_INFO)
           for i, (k, p, x) in enumerate(zip(keys, payloads, expires))]
    for i in d["deletes"]:
        ev = evs[i]
        ev.kind, ev.payload, ev.expire_at_ms = Kind.DELETE, None, None
    return evs


def _zigzag(n: int) -> bytes:
    """An Avro long (zig-zag varint), for the block count of an array of n >= 0 items."""
    n <<= 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
