"""Stream metadata: XINFO STREAM / GROUPS, the consumers of each group and their pending
entries (XPENDING's extended form), so apply can recreate groups as they were."""
from __future__ import annotations

import redis

from conveyor import values
from conveyor.events import now_millis


class StreamMetaReader:
    """A stream's groups, consumers and pending entries (``page``: entries asked per XPENDING)."""

    def __init__(self, source: redis.Redis, page: int) -> None:
        self.source, self.page = source, page

    def with_meta(self, key: bytes, part: dict) -> dict:
        """The last part of a big stream, with the stream's metadata and groups."""
        pipe = self.source.pipeline(transaction=False)
        pipe.execute_command("XINFO", "STREAM", key)
        pipe.execute_command("XINFO", "GROUPS", key)
        info, groups = pipe.execute()
        meta = values.stream_value([], values.pairs_of(info), groups, {})
        meta["entries"] = part["stream"]["entries"]
        v = values.value("STREAM", stream=meta)
        self.add_consumers(key, v)
        return v

    def add_consumers(self, key: bytes, v: dict) -> None:
        """The consumer names and pending entries of a stream's groups (XGROUP CREATECONSUMER
        and XCLAIM ... FORCE recreate them)."""
        groups = v["stream"]["groups"] if v["type"] == "STREAM" and v["stream"] else []
        if not groups:
            return
        pipe = self.source.pipeline(transaction=False)
        for g in groups:
            pipe.execute_command("XINFO", "CONSUMERS", key, g["name"])
        for g, reply in zip(groups, pipe.execute(raise_on_error=False)):
            if not isinstance(reply, Exception):     # a group deleted meanwhile: none to add
                g["consumers"] = [values.as_bytes(values.pairs_of(c)["name"]) for c in reply]
        for g in groups:
            if g["pending"]:
                g["pel"] = self._pending(key, g["name"])

    def _pending(self, key: bytes, group: bytes) -> list[dict]:
        """XPENDING's extended form, page by page: id, owner, delivery time, delivery count."""
        out, start = [], b"-"
        while True:
            now = now_millis()
            try:
                page = self.source.execute_command("XPENDING", key, group, start, "+", self.page)
            except redis.ResponseError:
                return out                       # the group went away meanwhile
            for p in page:
                p = p.values() if isinstance(p, dict) else p
                eid, consumer, idle, count = list(p)[:4]
                out.append({"id": eid, "consumer": consumer, "delivery_time": now - int(idle),
                            "delivery_count": int(count)})
            if len(page) < self.page:
                return out
            start = b"(" + out[-1]["id"]
