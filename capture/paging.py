"""Big keys read page by page (HSCAN, SSCAN, ZSCAN, LRANGE ranges, XRANGE pages, GETRANGE
ranges) into part events, so no whole big key is held in memory."""
from __future__ import annotations

import logging

import redis

from conveyor import values
from conveyor.capture.emitting import Emitter, expiry_command
from conveyor.capture.splitting import Splitter
from conveyor.capture.stream_meta import StreamMetaReader
from conveyor.endpoints import ServerInfo
from conveyor.events import now_millis

log = logging.getLogger("conveyor.capture")


class BigKeyPager:
    """Big keys in parts: ``page`` elements asked per command, strings ``part_bytes`` at a time."""

    def __init__(self, *, source: redis.Redis, info: ServerInfo, emitter: Emitter,
                 splitter: Splitter, stream_meta: StreamMetaReader, page: int,
                 part_bytes: int) -> None:
        self.source, self.emitter = source, emitter
        self.splitter, self.stream_meta = splitter, stream_meta
        self.page, self.part_bytes = page, part_bytes
        self.expiry = expiry_command(info)

    def read(self, key: bytes, type_: str) -> bool:
        """Read ``key`` page by page into chunk events; False when it changed type meanwhile."""
        emitter = self.emitter
        read_ms = now_millis()
        chunk_id = emitter.chunk_id()
        held: dict | None = None          # one page of lookahead: the last part is marked last
        index = offset = 0
        try:
            for page in self._pages(key, type_):
                for part in self.splitter.split(page):
                    if held is not None:
                        emitter.chunk(key, chunk_id, index, offset, held, False, read_ms, None)
                        index += 1
                        offset += values.elements(held)
                    held = part
            if held is None:
                emitter.delete(key, read_ms)
                return True
            if type_ == "stream":
                held = self.stream_meta.with_meta(key, held)
            ttl = self.source.execute_command(self.expiry, key)
        except redis.ResponseError as e:
            if "WRONGTYPE" in str(e):
                if held is not None or index:
                    # Parts already on the log stay orphans; the key's next read replaces them.
                    log.warning("big key %r changed type while read in parts; reading it again",
                                key)
                return False
            raise
        emitter.chunk(key, chunk_id, index, offset, held, True, read_ms,
                      emitter.expire(ttl, read_ms))
        if ttl == -2:                     # deleted while read: the delete follows the parts
            emitter.delete(key, now_millis())
        return True

    def _pages(self, key: bytes, type_: str):
        r, n = self.source, self.page
        if type_ in ("hash", "set", "zset"):
            cmd = {"hash": "HSCAN", "set": "SSCAN", "zset": "ZSCAN"}[type_]
            cursor = b"0"
            while True:
                cursor, items = r.execute_command(cmd, key, cursor, "COUNT", n)
                if type_ == "hash":
                    yield values.value("HASH", values.flat(items))
                elif type_ == "set":
                    yield values.value("SET", items)
                else:
                    members, scores = values.zset_pairs(items)
                    yield values.value("ZSET", members, scores)
                if int(cursor) == 0:
                    return
        elif type_ == "list":
            start = 0
            while True:
                items = r.execute_command("LRANGE", key, start, start + n - 1)
                if items:
                    yield values.value("LIST", items)
                if len(items) < n:
                    return
                start += n
        elif type_ == "string":
            start, size = 0, self.part_bytes
            while True:
                data = r.execute_command("GETRANGE", key, start, start + size - 1)
                if data:
                    yield values.value("STRING", [data])
                if len(data) < size:
                    return
                start += size
        elif type_ == "stream":
            start = b"-"
            while True:
                entries = r.execute_command("XRANGE", key, start, "+", "COUNT", n)
                if entries:
                    yield values.value("STREAM", stream=values.stream_doc(
                        [(e[0], values.flat(e[1])) for e in entries]))
                if len(entries) < n:
                    return
                start = b"(" + entries[-1][0]
