"""What one batch plans and counts: each event's write (``Planned``: its commands, where its
replies start, how it is counted), DUMP payloads to convert, and the batch's tally."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from conveyor.events import Event
from conveyor.log import Record

NONE: frozenset[int] = frozenset()


class How(enum.Enum):
    RESTORE = "restore"      # RESTORE ... REPLACE ABSTTL of a DUMP payload
    WRITE = "write"          # a typed value carried by the event (--type struct)
    CONVERT = "convert"      # a DUMP payload written from its decoded value (merge policy)
    DELETE = "delete"
    EXPIRE = "expire"        # an UPSERT whose expiry passed: applied as a delete
    PART = "part"            # one part of a key written in parts


@dataclass
class Tally:
    """What the writes did, counted once the target acknowledged them."""

    restored: int = 0
    written: int = 0          # typed values written (--type struct events, merge policy)
    converted: int = 0        # DUMP payloads the target refused, written from their decoded value
    deleted: int = 0
    expired: int = 0          # UPSERTs whose expiry had passed: applied as deletes
    chunks: int = 0           # parts of keys that arrived in parts
    chunked_keys: int = 0     # such keys completed on the target
    orphan_chunks: int = 0    # parts whose first part was not read (replay started mid-key)
    duplicate_chunks: int = 0  # parts already applied before a restart
    pending_dropped: int = 0  # stream consumer-group pending entries plain commands cannot rebuild
    lists_replaced: int = 0   # merge policy: lists replaced whole (see REPLACED_ON_MERGE)
    temp_cleaned: int = 0     # temporary keys of part sequences that can no longer complete

    def add(self, o: Tally) -> None:
        self.restored += o.restored
        self.written += o.written
        self.converted += o.converted
        self.deleted += o.deleted
        self.expired += o.expired
        self.chunks += o.chunks
        self.chunked_keys += o.chunked_keys
        self.orphan_chunks += o.orphan_chunks
        self.duplicate_chunks += o.duplicate_chunks
        self.pending_dropped += o.pending_dropped
        self.lists_replaced += o.lists_replaced
        self.temp_cleaned += o.temp_cleaned


@dataclass(slots=True)
class Planned:
    ev: Event
    rec: Record
    key: bytes                      # the key on the target
    how: How
    commands: list[tuple]
    tolerated: "set[int] | frozenset[int]" = NONE   # replies that are not failures (merge)
    value: dict | None = None       # the typed value written
    tmp: bytes | None = None        # a part's temporary key
    start: int = 0                  # index of its first reply in the pipeline
    ok: bool = False

    @property
    def removals(self) -> int:
        """Keys this write may remove from the target, for the data-loss check: the key it
        deletes, a key whose expiry passes on the way, a part's temporary key renamed over the
        key (a whole value's temporary key comes and goes in one pipeline)."""
        if self.how in (How.DELETE, How.EXPIRE):
            return 1
        expiring = 1 if self.ev.expire_at_ms is not None else 0
        if self.how is How.PART:
            return 1 + expiring if self.ev.chunk["last"] else 0
        return expiring


@dataclass(slots=True)
class Conversion:
    planned: Planned
    payload: bytes                  # the DUMP payload the target refused
    tmp: bytes | None               # the part sequence's temporary key, deleted once written


@dataclass
class BatchResult:
    tally: Tally = field(default_factory=Tally)
    failed: list[tuple[Record, str]] = field(default_factory=list)   # for the dead-letter place
    removals: int = 0               # keys the batch may have removed, before its probe
    late_removals: int = 0          # and after it (conversions, leftovers)
    probe: list | None = None       # the replies of the reading queued after the batch
