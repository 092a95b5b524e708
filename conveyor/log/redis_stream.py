"""Redis Streams log on a *buffer* Redis (neither the source nor the target).

Options (``--log-opt`` or URI query): ``stream`` name prefix (default ``conveyor``), ``partitions``
(default 1: records are spread over streams ``{stream}:0..N-1`` by a hash of their key, so each
key's events stay in order in one stream), ``consumer`` (default ``apply``), ``claim_idle_ms``
(default 30000: pending entries of another consumer idle this long are claimed at start), ``trim``
(``acked``, the default: drop entries every group has acknowledged, so the buffer Redis does not
grow without end; ``none``: keep everything, so a wiped target can be rebuilt with ``--from
earliest``).

Records are stream entries with fields ``k`` (key) and ``v`` (value); a record's position is its
entry id. Reading uses a consumer group; ``commit`` is XACK. Entries delivered but not acknowledged
(a crash) are read again at the next start. Streams are trimmed (XTRIM MINID) only below the oldest
entry that some group of that stream still needs.
"""
from __future__ import annotations

import json
import time
import zlib
from contextlib import contextmanager
from datetime import datetime

import redis

from conveyor.endpoints import connect, mask_uri
from conveyor.errors import ConveyorError, LogError
from conveyor.log.base import (History, LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus, Record,
                               StartAt)

PIPELINE_CHUNK = 1000
FLUSH_BUFFER_BYTES = 8 * 1024 * 1024    # appended bytes held before a flush
TRIM_INTERVAL_S = 5.0
MAX_SEQ = 18446744073709551615


@contextmanager
def _converted(what: str):
    try:
        yield
    except ConveyorError:
        raise
    except redis.RedisError as e:
        raise LogError(f"Redis Streams log: {what} failed: {e}") from e


def _client(uri: str) -> redis.Redis:
    try:
        return connect(uri, "log", error_cls=LogError)
    except ConveyorError as e:
        if isinstance(e, LogError):
            raise
        raise LogError(str(e)) from e


def _streams(opts: dict[str, str]) -> list[str]:
    prefix = opts.get("stream", "conveyor")
    try:
        n = int(opts.get("partitions", "1"))
    except ValueError:
        raise LogError(f"partitions={opts['partitions']!r} is not a number") from None
    if n < 1:
        raise LogError("partitions must be at least 1")
    return [f"{prefix}:{i}" for i in range(n)]


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    r = _client(uri)
    try:
        with _converted("looking for the log's streams"):
            return bool(r.exists(*_streams(opts)))
    finally:
        r.close()


def _id_ms(entry_id: bytes | str) -> int:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-")[0])


def _next_id(entry_id: str) -> str:
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq + 1}" if seq < MAX_SEQ else f"{ms + 1}-0"


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class StreamLogWriter(LogWriter):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.r = _client(uri)
        self.streams = _streams(opts)
        self._buf: list[tuple[bytes, bytes, bytes]] = []
        self._buf_bytes = 0

    def _stream_of(self, key: bytes) -> str:
        n = len(self.streams)
        return self.streams[zlib.crc32(key) % n] if n > 1 else self.streams[0]

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        self._buf.append((key, value, partition_key or key))
        self._buf_bytes += len(key) + len(value)
        if len(self._buf) >= 10 * PIPELINE_CHUNK or self._buf_bytes >= FLUSH_BUFFER_BYTES:
            self.flush()

    def flush(self, timeout: float = 60.0) -> None:
        buf, self._buf, self._buf_bytes = self._buf, [], 0
        with _converted("XADD"):
            for i in range(0, len(buf), PIPELINE_CHUNK):
                p = self.r.pipeline(transaction=False)
                for key, value, pkey in buf[i:i + PIPELINE_CHUNK]:
                    p.execute_command("XADD", self._stream_of(pkey), "*", "k", key, "v", value)
                p.execute()

    def history(self) -> History:
        self.flush()
        why = []
        with _converted("XINFO STREAM"):
            for s in self.streams:
                if not self.r.exists(s):
                    continue
                info = _info(self.r.execute_command("XINFO", "STREAM", s))
                added, length = info.get("entries-added"), int(info.get("length", 0))
                if added is None and _s(info.get("last-generated-id", b"0-0")) == "0-0":
                    continue                       # nothing was ever added to it
                if added is None:
                    why.append(f"{s}: the buffer Redis is older than 7.0 and cannot tell whether "
                               "entries were trimmed")
                elif int(added) != length:
                    why.append(f"{s}: {int(added) - length} entries trimmed after apply acknowledged "
                               "them (trim=acked)")
        return History(not why, self._history(), "; ".join(why))

    def _history(self):
        for s in self.streams:
            start = "-"
            while True:
                with _converted("XRANGE"):
                    entries = self.r.execute_command("XRANGE", s, start, "+", "COUNT", PIPELINE_CHUNK)
                for entry_id, fields in entries:
                    f = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2]))
                    yield f[b"k"], f[b"v"]
                if len(entries) < PIPELINE_CHUNK:
                    break
                start = "(" + _s(entries[-1][0])

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.r.close()


class StreamLogReader(LogReader):
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed",
                 *, observe: bool = False) -> None:
        self.r = _client(uri)
        self.uri = mask_uri(uri)
        self.group = group
        self.streams = _streams(opts)
        self.consumer = opts.get("consumer", "apply")
        self.claim_idle_ms = int(opts.get("claim_idle_ms", "30000"))
        self.block_ms = int(opts.get("block_ms", "500"))
        self.prefix = opts.get("stream", "conveyor")
        self.trim_mode = opts.get("trim", "acked")
        if self.trim_mode not in ("acked", "none"):
            raise LogError(f"trim={self.trim_mode!r}: use acked or none")
        self._last_trim = 0.0
        with _converted("creating the consumer group"):
            for s in self.streams if not observe else ():
                try:
                    self.r.execute_command("XGROUP", "CREATE", s, group, "0", "MKSTREAM")
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
        # Pending entries (delivered before a crash, never acknowledged) come first.
        self._pending_from: dict[str, str] = {s: "0" for s in self.streams}
        if observe:
            return
        if start != "committed":
            self.seek(start)
        else:
            self._claim_idle()

    def _claim_idle(self) -> None:
        """Take over entries another consumer of the group received but never acknowledged."""
        with _converted("XAUTOCLAIM"):
            for s in self.streams:
                # Claimed entries are no longer idle, so asking again from the start returns the
                # rest (redis-py's JUSTID reply drops the cursor).
                while self.r.xautoclaim(s, self.group, self.consumer, self.claim_idle_ms,
                                        start_id="0-0", count=1000, justid=True):
                    pass

    def seek(self, where: StartAt) -> None:
        if where == "committed":
            return
        if where == "earliest":
            target = "0"
        elif where == "latest":
            target = "$"
        elif isinstance(where, datetime):
            ms = int(where.timestamp() * 1000)
            target = f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0"
        else:
            raise LogError(f"cannot seek to {where!r}")
        with _converted("seek"):
            for s in self.streams:
                # Recreating the group drops its pending entries too: the position is what was asked.
                self.r.execute_command("XGROUP", "DESTROY", s, self.group)
                self.r.execute_command("XGROUP", "CREATE", s, self.group, target, "MKSTREAM")
        self._pending_from = {}

    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        with _converted("XREADGROUP"):
            if self._pending_from:
                out = self._read_pending(max_records)
                if out:
                    return out
            reply = self.r.execute_command(
                "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", max_records,
                "BLOCK", max(1, int(timeout * 1000)), "STREAMS", *self.streams,
                *([">"] * len(self.streams)))
        return self._records(reply)

    def _read_pending(self, max_records: int) -> list[Record]:
        for s, start in list(self._pending_from.items()):
            reply = self.r.execute_command("XREADGROUP", "GROUP", self.group, self.consumer,
                                           "COUNT", max_records, "STREAMS", s, start)
            records = self._records(reply)
            if records:
                self._pending_from[s] = records[-1].offset
                return records
            del self._pending_from[s]
        return []

    @staticmethod
    def _records(reply) -> list[Record]:
        out: list[Record] = []
        if not reply:
            return out
        items = reply.items() if isinstance(reply, dict) else reply
        for stream, entries in items:
            stream = _s(stream)
            for entry_id, fields in entries:
                if fields is None:                 # entry trimmed while pending
                    continue
                f = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2]))
                eid = _s(entry_id)
                out.append(Record(stream, eid, f[b"k"], f[b"v"], _id_ms(eid)))
        return out

    def commit(self, records: list[Record]) -> None:
        by_stream: dict[str, list[str]] = {}
        for rec in records:
            by_stream.setdefault(rec.partition, []).append(rec.offset)
        with _converted("XACK"):
            p = self.r.pipeline(transaction=False)
            for s, ids in by_stream.items():
                for i in range(0, len(ids), PIPELINE_CHUNK):
                    p.execute_command("XACK", s, self.group, *ids[i:i + PIPELINE_CHUNK])
            p.execute()
        if self.trim_mode == "acked" and time.monotonic() - self._last_trim >= TRIM_INTERVAL_S:
            self.trim()

    def trim(self) -> None:
        """XTRIM MINID each stream to the oldest entry any group still needs."""
        self._last_trim = time.monotonic()
        with _converted("XTRIM"):
            for s in self.streams:
                needed = self._oldest_needed(s)
                if needed is not None:
                    self.r.execute_command("XTRIM", s, "MINID", needed)

    def _oldest_needed(self, stream: str) -> str | None:
        groups = self.r.execute_command("XINFO", "GROUPS", stream)
        if not groups:
            return None                            # nobody reads this stream yet: keep everything
        oldest: tuple[int, int] | None = None
        for g in groups:
            g = _info(g)
            if int(g["pending"]):
                first = _s(self.r.xpending(stream, g["name"])["min"])
            else:
                first = _next_id(_s(g["last-delivered-id"]))
            ms, seq = (int(x) for x in first.split("-"))
            oldest = (ms, seq) if oldest is None else min(oldest, (ms, seq))
        return f"{oldest[0]}-{oldest[1]}"

    def status(self) -> LogStatus:
        parts = []
        with _converted("XINFO"):
            for s in self.streams:
                info = _info(self.r.execute_command("XINFO", "STREAM", s))
                end = _s(info["last-generated-id"])
                g = next((_info(x) for x in self.r.execute_command("XINFO", "GROUPS", s)
                          if _s(_info(x)["name"]) == self.group), None)
                if g is None:
                    parts.append(PartitionStatus(s, None, end, int(info["length"])))
                    continue
                pending = int(g["pending"])
                delivered = _s(g["last-delivered-id"])
                committed = _s(self.r.xpending(s, self.group)["min"]) if pending else delivered
                parts.append(PartitionStatus(s, committed, end, self._undelivered(s, g, delivered)
                                             + pending))
        return LogStatus(self.uri, self.group, parts)

    def _undelivered(self, stream: str, g: dict, delivered: str) -> int:
        lag = g.get("lag")
        if lag is not None:
            return int(lag)
        # Redis < 7.0 (or a lag Redis cannot compute): count the entries after the position.
        start = "-" if delivered in ("0-0", "0") else f"({delivered}"
        if start != "-" and self.r.info("server")["redis_version"] < "6.2":
            start = _next_id(delivered)
        return len(self.r.execute_command("XRANGE", stream, start, "+"))

    def dead_letter(self, record: Record, reason: str) -> None:
        with _converted("XADD to the dead-letter stream"):
            self.r.execute_command("XADD", f"{self.prefix}:dead-letter", "*", "k", record.key,
                                   "v", record.value, "reason", reason, "group", self.group,
                                   "from", f"{record.partition}/{record.offset}")

    def close(self) -> None:
        self.r.close()


def _info(reply) -> dict:
    if isinstance(reply, dict):
        return {_s(k): v for k, v in reply.items()}
    return {_s(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


class StreamMetaStore(MetaStore):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.r = _client(uri)
        self.key = f"{opts.get('stream', 'conveyor')}:meta"

    def put(self, name: str, doc: dict) -> None:
        with _converted("HSET meta"):
            self.r.hset(self.key, name, json.dumps(doc))

    def get(self, name: str) -> dict | None:
        with _converted("HGET meta"):
            v = self.r.hget(self.key, name)
        return json.loads(v) if v is not None else None

    def close(self) -> None:
        self.r.close()
