"""The log interface: a writer and a reader, plus a small metadata store.

Backends (the packages ``file``, ``streams``, ``kafka``) implement these; nothing outside
``conveyor/log`` imports a backend's driver. Positions are opaque to callers: a reader hands out
``Record`` objects and takes them back in ``commit``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Iterator, Union

from conveyor.words import text

# Where a reader starts: committed position of its group, the oldest record, the end, or a time.
StartAt = Union[str, datetime]  # "committed" | "earliest" | "latest" | datetime (tz-aware)


@dataclass(slots=True)
class Record:
    partition: str          # partition / stream / segment id, as text
    offset: Any             # backend position (int offset, stream id "ms-seq", ...)
    key: bytes
    value: bytes
    timestamp_ms: int       # append time


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A Redis Streams entry id "ms-seq" (the positions of that backend) as a comparable pair."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True)
class PartitionStatus:
    partition: str
    committed: Any          # committed position of the group, None if nothing committed
    end: Any                # position after the last record
    lag: int                # records appended and not yet committed by the group

    def reached(self, end) -> bool:
        """The group has committed every record before ``end``, an end this partition had
        earlier. Offsets (file, Kafka) are positions after a record; a Redis Streams position is
        an entry id: the first entry still pending, or the last one delivered."""
        if self.lag == 0 or end is None or end in (0, "0-0"):
            return True
        if self.committed is None:
            return False
        if isinstance(end, str):
            return parse_id(self.committed) > parse_id(end)
        return self.committed >= end


@dataclass(slots=True)
class LogStatus:
    uri: str                # masked
    group: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    # What the log holds now, as its backend can tell: bytes on disk (file), bytes of memory
    # (Redis Streams), records between the partitions' low and high watermarks (Kafka).
    size: str = ""

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def empty(self) -> bool:
        """Nothing was ever appended (an end of 0, or a stream's last-generated-id 0-0)."""
        return all(not p.end or p.end in ("0-0", "0") for p in self.partitions)


class _Closing:
    """``with`` support for anything with ``close()``."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Identity:
    """Every log has an identity: an id written when the log is created, kept where its records
    are (a key on the buffer Redis, a record of the Kafka meta topic plus the topic id, a file in
    the log directory), so that it disappears with them.

    ``log_id`` is the id found (or created) when the writer/reader was opened. ``check_identity()``
    raises LogLost when the log now has another id or none (reset, emptied, deleted and
    recreated), LogUnavailable when it cannot be asked right now; backends also call it themselves
    after recovering from a connection failure. ``adopt_new_log()`` takes the log as it is now as
    ours (creating its id if it has none) after a LogLost was handled.
    ``warnings`` are one-line things the user should be told at start (e.g. a buffer Redis without
    persistence); the processes print them.
    """

    log_id: str = ""
    warnings: "list[str] | tuple" = ()      # backends assign a list of their own

    def check_identity(self) -> None:
        """Raise LogLost if the log is no longer the one opened. Backends override."""

    def adopt_new_log(self) -> None:
        """After LogLost: accept the log as it is now. Backends override."""


class MetaStore(_Closing, abc.ABC):
    """Small durable key -> JSON document store next to the log (checkpoints, apply status)."""

    @abc.abstractmethod
    def put(self, name: str, doc: dict) -> None: ...

    @abc.abstractmethod
    def get(self, name: str) -> dict | None: ...

    @abc.abstractmethod
    def documents(self) -> dict[str, dict]:
        """Every document by name (``status`` lists the capture and apply processes from them)."""


@dataclass
class History:
    """What a log still holds, read without a consumer group (capture rebuilds from it the names
    of the keys the log says exist). ``records`` yields (key, value) in append order within each
    partition; ``complete`` is False when records were removed (trimmed, expired), ``why`` says how."""
    complete: bool
    records: Iterator[tuple[bytes, bytes]]
    why: str = ""


class LogWriter(Identity, _Closing, abc.ABC):
    """Appends records; ``flush`` returns only when every appended record is durable.

    ``flush`` raises LogError if any record since the last flush failed to be stored. Records
    with the same ``partition_key`` (default: the record key) land in the same partition, in
    append order. ``max_record_bytes`` is the largest record the backend takes: bigger values are
    split by capture into parts.
    """

    max_record_bytes: int = 64 * 1024 * 1024
    # Whether capture may append blocks of events (conveyor.events).
    takes_blocks: bool = False
    # A log that keeps only the latest record of each record key (a compacted Kafka topic). A
    # block is never replaced there (its record key is unique), so capture appends blocks only
    # for what a scan read: one copy of the keyspace per pass, while live changes stay records
    # of their own that compaction replaces key by key.
    compacted: bool = False

    def partition_of(self, partition_key: bytes) -> int:
        """The partition records with this partition key land in (a block holds events of one)."""
        return 0

    def _shaped_like(self, inner: "LogWriter") -> None:
        """For a writer that appends through ``inner``: the same record size, blocks, compaction
        and partitions, so capture splits and batches as ``inner`` needs."""
        self.max_record_bytes = inner.max_record_bytes
        self.takes_blocks, self.compacted = inner.takes_blocks, inner.compacted
        self.partition_of = inner.partition_of            # type: ignore[method-assign]
        self.partitions = getattr(inner, "partitions", 1)

    @abc.abstractmethod
    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None: ...

    def append_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            self.append(k, v)

    @abc.abstractmethod
    def flush(self, timeout: float = 60.0) -> None: ...

    @abc.abstractmethod
    def history(self) -> History:
        """Every record the log holds now (see History). Raises LogError if it cannot be read."""

    @abc.abstractmethod
    def close(self) -> None: ...


class LogReader(Identity, _Closing, abc.ABC):
    """Reads records for a consumer group; records not committed are delivered again
    after a restart (at-least-once).

    Several readers (processes) may share a group: each key is only ever delivered to one of them
    at a time (Kafka: partitions; Redis Streams: whole partition streams under a lease; the file
    log refuses a second reader of a group). ``status().lag`` is always the whole group's lag.
    ``consumer`` names this member (unique per process unless the user named it).

    Errors: LogUnavailable for transient failures (call again), LogLost when the log was reset.
    """

    group: str
    consumer: str = ""
    # Corrupt stretches of the log the reader skipped: each was dead-lettered by the reader itself
    # (with its real position) and its reason appended here; apply counts them as dead letters.
    damaged: "list[str] | tuple" = ()       # backends assign a list of their own

    def keepalive(self) -> None:
        """Called often (about once a second) while apply holds a batch it cannot write yet (the
        target is down): keep this member's place in the group (Kafka: pause and poll; Redis
        Streams: renew leases) without delivering new records."""

    def replayable(self) -> tuple[bool, str]:
        """Whether the log still holds every key's latest state, so that replaying it from its
        earliest record rebuilds a wiped target; when not, why (trimmed after acknowledgement,
        segments or records removed by retention). Backends override."""
        return False, "this log cannot tell whether it still holds every record"

    def held(self) -> list[str] | None:
        """The partitions this member reads now (``status`` shows each member's share of the lag
        from them); None when it reads every partition (the file log's one reader)."""
        return None

    def owned(self, records: list[Record]) -> list[Record]:
        """Those of ``records`` whose partition this member still holds. After a rebalance during
        a long wait, the others belong to another member, which replays them from the committed
        position: apply drops them unwritten so that a late write never overtakes a newer one."""
        return records

    @abc.abstractmethod
    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` s for the first one."""

    @abc.abstractmethod
    def commit(self, records: list[Record]) -> None:
        """Durably record that ``records`` (and everything before them in their partitions)
        have been processed. Raises LogError on failure."""

    @abc.abstractmethod
    def seek(self, where: StartAt) -> None:
        """Move the group's position; the next ``poll`` reads from there."""

    @abc.abstractmethod
    def status(self) -> LogStatus: ...

    @abc.abstractmethod
    def dead_letter(self, record: Record, reason: str) -> None:
        """Keep a record that cannot be processed somewhere durable, apart from the log."""

    @abc.abstractmethod
    def close(self) -> None: ...
