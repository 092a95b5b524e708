"""What a DUMP payload decodes to: one typed value per key, plus the decoder's one exception."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from conveyor.errors import CodecError


class RdbDecodeError(CodecError):
    """A DUMP payload cannot be turned into a typed value: bad checksum, truncated or corrupt
    data, or a type/encoding (module values, newer-than-known types) that has no typed form here."""


class PendingEntry(TypedDict):
    """One entry of a consumer group's pending entries list (what XPENDING reports)."""

    id: bytes                  # b"ms-seq"
    consumer: bytes | None     # owner; None only for a PEL entry no consumer claims (corrupt source)
    delivery_time: int         # unix ms of the last delivery
    delivery_count: int


class StreamConsumer(TypedDict):
    name: bytes
    seen_time: int             # unix ms of the last interaction (XINFO CONSUMERS "idle" = now - this)
    active_time: int | None    # unix ms of the last successful read, -1 never; None before RDB type 21
    pending: list[bytes]       # ids this consumer owns, ascending


class StreamGroup(TypedDict):
    name: bytes
    last_delivered_id: bytes
    entries_read: int | None   # None: unknown (older RDB type, or the server itself does not know)
    pending: list[PendingEntry]
    consumers: list[StreamConsumer]


@dataclass
class StreamValue:
    """A whole stream: entries in id order with their fields in order (a field may repeat, so
    they are pairs, not a dict), plus the metadata XSETID / XGROUP CREATE need to rebuild it."""

    entries: list[tuple[bytes, list[tuple[bytes, bytes]]]]
    last_id: bytes
    entries_added: int | None = None      # None for RDB type 15 (Redis < 7.0), which lacks it
    max_deleted_id: bytes | None = None   # None for RDB type 15
    groups: list[StreamGroup] = field(default_factory=list)


@dataclass
class TypedValue:
    """``value`` by ``type``: string -> bytes, list -> list[bytes], set -> set[bytes],
    zset -> dict[bytes, float] (ascending by score), hash -> dict[bytes, bytes],
    stream -> StreamValue. ``rdb_type`` is the payload's RDB object type byte, for reports."""

    type: str
    value: object
    rdb_type: int = -1
