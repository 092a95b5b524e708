"""Decode DUMP payloads into typed values, for targets whose RESTORE refuses the source's format.

A newer server's DUMP (Valkey 8.1 -> RDB 11, Redis 7.0 -> RDB 10) is refused by an older
server's RESTORE ("DUMP payload version or checksum are wrong"), so apply rewrites such a key as
type-based writes from what this package decodes, without going back to the source.

Payload layout (cluster.c, createDumpPayload)::

    1 byte RDB object type | serialized value | 2 bytes RDB version (LE) | 8 bytes CRC-64 (LE)

The CRC covers everything before it, the version included.
"""
from __future__ import annotations

import struct

from conveyor.rdb.checksum import crc64
from conveyor.rdb.model import (PendingEntry, RdbDecodeError, StreamConsumer, StreamGroup,
                                StreamValue, TypedValue)
from conveyor.rdb.objects import read_object
from conveyor.rdb.reader import Reader

__all__ = ["TypedValue", "StreamValue", "StreamGroup", "StreamConsumer", "PendingEntry",
           "RdbDecodeError", "dump_version", "decode_dump", "check_checksum", "crc64"]

_FOOTER = 10   # version + CRC
_CRC = struct.Struct("<Q")


def dump_version(payload: bytes) -> int:
    """RDB version a DUMP payload was written with: 9 Redis 6.2, 10 Redis 7.0, 11 Redis 7.2 and
    Valkey 7.2-8.x, 12+ Redis 7.4+, 80+ Valkey 9+."""
    if len(payload) < _FOOTER:
        raise RdbDecodeError(f"DUMP payload of {len(payload)} bytes is shorter than its footer")
    return payload[-10] | payload[-9] << 8


def check_checksum(payload: bytes) -> None:
    """Raise RdbDecodeError unless the CRC-64 footer matches.

    A zero CRC gets no exemption: it marks "checksum disabled" only in RDB *files* written with
    ``rdbchecksum no``. DUMP always computes one, and RESTORE on Redis 6.2, 7.0 and Valkey 8.1
    refuses a zeroed one ("DUMP payload version or checksum are wrong"), so we do too.
    """
    if len(payload) < _FOOTER:
        raise RdbDecodeError(f"DUMP payload of {len(payload)} bytes is shorter than its footer")
    (stored,) = _CRC.unpack_from(payload, len(payload) - 8)
    actual = crc64(memoryview(payload)[:-8])
    if actual != stored:
        raise RdbDecodeError(f"DUMP payload checksum mismatch (stored {stored:016x}, "
                             f"computed {actual:016x}): corrupt or truncated")


def decode_dump(payload: bytes, *, verify_checksum: bool = True) -> TypedValue:
    """The typed value of a DUMP payload. Raises RdbDecodeError (a CodecError) for a bad
    checksum, truncated or corrupt data, module values and types this decoder does not know."""
    payload = bytes(payload)
    if verify_checksum:
        check_checksum(payload)
    if len(payload) < _FOOTER + 1:
        raise RdbDecodeError(f"DUMP payload of {len(payload)} bytes has no value")
    r = Reader(payload, 0, len(payload) - _FOOTER)
    try:
        value = read_object(r, r.byte("type"))
    except RdbDecodeError:
        raise
    except (IndexError, struct.error, ValueError, OverflowError, MemoryError) as e:
        # The parsers check bounds where it matters; anything else a corrupt blob trips over
        # (an index past a short list, a struct read past a blob) is still just corruption.
        raise RdbDecodeError(f"corrupt DUMP payload: {e}") from e
    if r.remaining():
        raise RdbDecodeError(f"{r.remaining()} unexpected bytes after the value")
    return value

