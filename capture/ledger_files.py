"""The key ledger's files: columns of keys and digests (``Chunk``), framed records (type, count,
body, CRC-32) that stop at a torn tail, and per-bucket append files written through buffers."""
from __future__ import annotations

import struct
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

UNKNOWN_CRC = bytes(8)
UNKNOWN, DELETED, NO_EXPIRY = -3, -2, -1      # expiry values with a meaning of their own
# A delete's entry (a tombstone: expiry DELETED) holds when it was logged, in its digest's place.
DELETED_AT = struct.Struct(">q")
BUFFER_BYTES = 64 * 1024          # per-bucket write buffer while distributing or spilling
_HEAD = struct.Struct("<cII")     # record type, key count (or body length), body length
_CRC = struct.Struct("<I")


def framed(kind: bytes, n: int, body: bytes) -> bytes:
    """One record: its head, ``body`` and the body's CRC-32."""
    return _HEAD.pack(kind, n, len(body)) + body + _CRC.pack(zlib.crc32(body))


def crcs_of(payloads: list[bytes]) -> bytes:
    """The CRC-64 that ends every DUMP payload, joined (8 bytes a key)."""
    return b"".join([p[-8:] for p in payloads])


def expiries(expires: list[int | None]) -> bytes:
    """Absolute expiries in ms (None: none), 8 bytes a key."""
    return array("q", [NO_EXPIRY if x is None else x for x in expires]).tobytes()


@dataclass(slots=True)
class Chunk:
    """Keys with their digests (crc, expiry) and generations, as columns."""
    keys: list[bytes]
    crcs: bytes
    exps: array
    gens: array

    def encode(self, kind: bytes = b"B") -> bytes:
        lens = array("I", map(len, self.keys)).tobytes()
        body = b"".join((lens, *self.keys, self.crcs, self.exps.tobytes(), self.gens.tobytes()))
        return framed(kind, len(self.keys), body)

    @classmethod
    def decode(cls, n: int, body: bytes) -> "Chunk":
        lens = array("I")
        lens.frombytes(body[:4 * n])
        at, keys = 4 * n, []
        for size in lens:
            keys.append(body[at:at + size])
            at += size
        exps, gens = array("q"), array("I")
        exps.frombytes(body[at + 8 * n:at + 16 * n])
        gens.frombytes(body[at + 16 * n:at + 20 * n])
        return cls(keys, body[at:at + 8 * n], exps, gens)

    def crc_list(self) -> list[bytes]:
        crcs = self.crcs
        return [crcs[i:i + 8] for i in range(0, len(crcs), 8)]

    def apply_to(self, state: dict[bytes, tuple[bytes, int, int]]) -> None:
        """Upserts and deletes (tombstones) of this chunk, in order, onto ``state``."""
        state.update(zip(self.keys, zip(self.crc_list(), self.exps, self.gens)))


def records(f: BinaryIO) -> Iterator[tuple[int, bytes, int, bytes]]:
    """(offset, type, count, body) of each whole record; stops at a torn or damaged tail."""
    while True:
        at = f.tell()
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        kind, n, size = _HEAD.unpack(head)
        body = f.read(size)
        tail = f.read(_CRC.size)
        if len(body) < size or len(tail) < _CRC.size or _CRC.unpack(tail)[0] != zlib.crc32(body):
            f.seek(at)
            return
        yield at, kind, n, body


def chunks(path: Path) -> Iterator[Chunk]:
    try:
        with open(path, "rb") as f:
            for _, kind, n, body in records(f):
                if kind == b"B":
                    yield Chunk.decode(n, body)
    except FileNotFoundError:
        return


class Buckets:
    """Per-bucket append files (delta, spill) written through small buffers."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count
        folder.mkdir(parents=True, exist_ok=True)
        self._buf: dict[int, tuple[list, list, list, list]] = {}

    def add(self, chunk: Chunk, mask: Callable[[bytes, bytes, int], tuple] | None = None) -> None:
        """Every entry of ``chunk`` into its bucket's buffer (``mask`` may change its digest)."""
        crcs, exps, gens = chunk.crcs, chunk.exps, chunk.gens
        count = self.count
        for i, key in enumerate(chunk.keys):
            b = zlib.crc32(key) % count
            buf = self._buf.get(b)
            if buf is None:
                buf = self._buf[b] = ([], [], [], [])
            crc, exp = crcs[8 * i:8 * i + 8], exps[i]
            if mask is not None:
                crc, exp = mask(key, crc, exp)
            buf[0].append(key)
            buf[1].append(crc)
            buf[2].append(exp)
            buf[3].append(gens[i])
            if len(buf[0]) >= 4096:
                self._write(b)

    def _write(self, bucket: int) -> None:
        buf = self._buf.pop(bucket, None)
        if not buf:
            return
        keys, crcs, exps, gens = buf
        chunk = Chunk(keys, b"".join(crcs), array("q", exps), array("I", gens))
        with open(self.folder / f"{bucket:04d}", "ab") as f:
            f.write(chunk.encode())

    def close(self) -> None:
        for bucket in list(self._buf):
            self._write(bucket)


def digests_of(payloads: Iterable[bytes | None]) -> bytes:
    """CRCs of payloads that may be missing (UNKNOWN_CRC where none)."""
    return b"".join([p[-8:] if p is not None else UNKNOWN_CRC for p in payloads])
