"""Typed reads (--type struct, and the pipelined fallback): per key its typed read (or DUMP)
plus its expiry in one pipeline."""
from __future__ import annotations

import redis

from conveyor import values
from conveyor.capture.emitting import Emitter, expiry_command
from conveyor.capture.splitting import Splitter
from conveyor.capture.stream_meta import StreamMetaReader
from conveyor.endpoints import ServerInfo
from conveyor.events import now_millis


class TypedReader:
    """Small keys read whole: typed with ``struct`` (streams with their groups), else as DUMP."""

    def __init__(self, *, source: redis.Redis, info: ServerInfo, emitter: Emitter,
                 splitter: Splitter, stream_meta: StreamMetaReader, struct: bool,
                 part_bytes: int) -> None:
        self.source, self.emitter = source, emitter
        self.splitter, self.stream_meta = splitter, stream_meta
        self.struct, self.part_bytes = struct, part_bytes
        self.expiry = expiry_command(info)

    def read(self, items: list[tuple[bytes, str]]) -> list[bytes]:
        """Read and emit ``items`` (key, type); returns the keys to read again (changed type
        between TYPE and the read)."""
        read_ms = now_millis()
        emitter, struct, expiry = self.emitter, self.struct, self.expiry
        pipe = self.source.pipeline(transaction=False)
        spans = []
        for key, type_ in items:
            if struct and type_ in values.TYPES:
                n = values.queue_read(pipe, key, type_)
            else:
                pipe.execute_command("DUMP", key)
                n = 1
            pipe.execute_command(expiry, key)
            spans.append(n)
        replies = pipe.execute(raise_on_error=False)
        again, pos = [], 0
        for (key, type_), n in zip(items, spans):
            got, ttl = replies[pos:pos + n], replies[pos + n]
            pos += n + 1
            if isinstance(ttl, Exception):
                raise ttl
            if struct and type_ in values.TYPES:
                if any(isinstance(r, Exception) for r in got):
                    if any("WRONGTYPE" not in str(r) for r in got if isinstance(r, Exception)):
                        raise next(r for r in got if isinstance(r, Exception))
                    again.append(key)            # changed type between TYPE and the read
                    continue
                v = values.parse_read(type_, got)
                if v is None or ttl == -2:
                    emitter.delete(key, read_ms)
                else:
                    self.stream_meta.add_consumers(key, v)
                    self.splitter.emit_value(key, v, read_ms, emitter.expire(ttl, read_ms))
            else:
                payload = got[0]
                if isinstance(payload, Exception):
                    raise payload
                if payload is None or ttl == -2:
                    emitter.delete(key, read_ms)
                elif len(payload) > self.part_bytes:
                    self.splitter.emit_payload(key, payload, read_ms, emitter.expire(ttl, read_ms))
                else:
                    emitter.upsert(key, read_ms, emitter.expire(ttl, read_ms), payload=payload)
        return again
