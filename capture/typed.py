"""Typed reads (--type struct, and the pipelined fallback): per key its typed read (or DUMP)
plus its expiry in one pipeline."""
from __future__ import annotations

from conveyor import values
from conveyor.events import now_millis

class TypedReads:
    """Small keys read whole, typed or as DUMP (part of StateReader)."""

    def _read_small(self, items: list[tuple[bytes, str]]) -> list[bytes]:
        read_ms = now_millis()
        pipe = self.source.pipeline(transaction=False)
        spans = []
        for key, type_ in items:
            if self.struct and type_ in values.TYPES:
                n = values.queue_read(pipe, key, type_)
            else:
                pipe.execute_command("DUMP", key)
                n = 1
            self._queue_expiry(pipe, key)
            spans.append(n)
        replies = pipe.execute(raise_on_error=False)
        again, pos = [], 0
        for (key, type_), n in zip(items, spans):
            got, ttl = replies[pos:pos + n], replies[pos + n]
            pos += n + 1
            if isinstance(ttl, Exception):
                raise ttl
            if self.struct and type_ in values.TYPES:
                if any(isinstance(r, Exception) for r in got):
                    if any("WRONGTYPE" not in str(r) for r in got if isinstance(r, Exception)):
                        raise next(r for r in got if isinstance(r, Exception))
                    again.append(key)            # changed type between TYPE and the read
                    continue
                v = values.parse_read(type_, got)
                if v is None or ttl == -2:
                    self._delete(key, read_ms)
                else:
                    self._add_consumers(key, v)
                    self._emit_value(key, v, read_ms, self._expire(ttl, read_ms))
            else:
                payload = got[0]
                if isinstance(payload, Exception):
                    raise payload
                if payload is None or ttl == -2:
                    self._delete(key, read_ms)
                elif len(payload) > self.part_bytes:
                    self._split_payload(key, payload, read_ms, self._expire(ttl, read_ms))
                else:
                    self._upsert(key, read_ms, self._expire(ttl, read_ms), payload=payload)
        return again
