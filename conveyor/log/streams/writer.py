"""The writer of a Redis Streams log: records buffered and XADDed a pipeline chunk at a time to
the partition stream of their key, and the log's history read back for a rebuild."""
from __future__ import annotations

import zlib

import redis

from conveyor import packed
from conveyor.endpoints import server_info
from conveyor.errors import LogError, LogLost
from conveyor.log.base import History, LogWriter, parse_id
from conveyor.log.streams.base import (PIPELINE_CHUNK, StreamLog, converted, field_map, info_map,
                                       next_id, trimmed_why)
from conveyor.words import text

FLUSH_BUFFER_BYTES = 8 * 1024 * 1024    # appended bytes held before a flush


class StreamLogWriter(StreamLog, LogWriter):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self._open(uri, opts)
        self._buf: list[tuple[bytes, bytes, bytes]] = []
        self._buf_bytes = 0
        self._last_added: dict[str, str] = {}
        with converted("opening the log", self.user):
            # XADD NOMKSTREAM (6.2+) to a stream that exists: a deleted stream is noticed, not
            # silently recreated empty.
            self._nomkstream = tuple(server_info(self.r).version) >= (6, 2)
            self._existing = {s for s in self.streams if self.r.exists(s)}
        self._ready = True

    takes_blocks = True             # streams are trimmed by age or acknowledgement, not by key

    @property
    def partitions(self) -> int:
        return len(self.streams)

    def partition_of(self, partition_key: bytes) -> int:
        n = len(self.streams)
        return zlib.crc32(partition_key) % n if n > 1 else 0

    def _stream_of(self, key: bytes) -> str:
        return self.streams[self.partition_of(key)]

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        self._buf.append((key, value, partition_key or key))
        self._buf_bytes += len(key) + len(value)
        if len(self._buf) >= 10 * PIPELINE_CHUNK or self._buf_bytes >= FLUSH_BUFFER_BYTES:
            try:
                self.flush()
            except LogError:
                # Not taken: the caller appends this record again (earlier ones stay buffered).
                self._buf.pop()
                self._buf_bytes -= len(key) + len(value)
                raise

    def flush(self, timeout: float = 60.0) -> None:
        """Store the buffered records, a pipeline chunk at a time; a chunk leaves the buffer only
        once stored, so after LogUnavailable flush() again re-sends the rest in order (a chunk
        stored in part is sent again whole: events are whole states, duplicates are harmless)."""
        with self._op("XADD"):
            while self._buf:
                chunk = self._buf[:PIPELINE_CHUNK]
                cmds: list[tuple] = [("GET", self.id_key)]
                targets = []
                for key, value, pkey in chunk:
                    s = self._stream_of(pkey)
                    targets.append(s)
                    if self._nomkstream and s in self._existing:
                        cmds.append(("XADD", s, "NOMKSTREAM", "*", "k", key, "v", value))
                    else:
                        cmds.append(("XADD", s, "*", "k", key, "v", value))
                replies = packed.run(self.r, cmds)
                for r in replies:
                    if isinstance(r, Exception):
                        raise r
                self._stored(replies, targets)
                del self._buf[:len(chunk)]
                self._buf_bytes -= sum(len(k) + len(v) for k, v, _ in chunk)

    def _stored(self, replies: list, targets: list[str]) -> None:
        if replies[0] is None or text(replies[0]) != self.log_id:
            self.check_identity()                # flushed under us: says how
        for s, entry_id in zip(targets, replies[1:]):
            if entry_id is None:
                raise LogLost(f"stream {s} is gone from the buffer Redis {self.uri} (deleted, or "
                              "the buffer was flushed)")
            self._existing.add(s)
            self._last_added[s] = text(entry_id)

    def _check_streams(self, run) -> None:
        for s, last in self._last_added.items():
            try:
                end = text(info_map(run("XINFO", "STREAM", s))["last-generated-id"])
            except redis.ResponseError:
                raise LogLost(f"stream {s} is gone from the buffer Redis {self.uri}") from None
            if parse_id(end) < parse_id(last):
                raise LogLost(f"stream {s} ends at {end} but {last} was stored: the buffer Redis "
                              "restarted from older data")

    def _adopted(self) -> None:
        self._last_added = {}
        self._existing = {s for s in self.streams if self.r.exists(s)}

    def history(self) -> History:
        self.flush()
        with self._op("XINFO STREAM"):
            why = trimmed_why(self.r, self.streams)
        return History(not why, self._history(), "; ".join(why))

    def _history(self):
        for s in self.streams:
            start = "-"
            while True:
                with self._op("XRANGE"):
                    entries = self.r.execute_command("XRANGE", s, start, "+", "COUNT", PIPELINE_CHUNK)
                for entry_id, fields in entries:
                    f = field_map(fields)
                    yield f[b"k"], f[b"v"]
                if len(entries) < PIPELINE_CHUNK:
                    break
                start = next_id(text(entries[-1][0]))

    def close(self) -> None:
        try:
            if not self.refused:            # refused: flushing would only say it again
                self.flush()
        finally:
            self.r.close()
