"""Payload splitting: values and DUMP payloads above the log's record limit become parts."""
from __future__ import annotations

from conveyor import values
from conveyor.capture.emitting import Emitter


class Splitter:
    """Values in parts of at most ``part_bytes``, handed to the emitter as chunk events."""

    def __init__(self, emitter: Emitter, part_bytes: int) -> None:
        self.emitter, self.part_bytes = emitter, part_bytes

    def split(self, v: dict) -> list[dict]:
        """``v`` in parts of at most ``part_bytes`` (an element bigger than that is one part)."""
        t = v["type"]
        if t == "STRING":
            data = b"".join(v["items"])
            step = self.part_bytes
            return [values.value("STRING", [data[i:i + step]])
                    for i in range(0, max(len(data), 1), step)]
        if t == "STREAM":
            entries = v["stream"]["entries"]
            sizes = [len(e["id"]) + sum(len(f) for f in e["fields"]) for e in entries]
            cuts = cuts_of(sizes, self.part_bytes)
            if len(cuts) == 1:
                return [v]
            parts = [values.value("STREAM", stream={**v["stream"], "entries": entries[a:b],
                                                    "last_id": None, "groups": []})
                     for a, b in cuts]
            parts[-1]["stream"] = {**v["stream"], "entries": entries[cuts[-1][0]:]}
            return parts
        items, step = v["items"], 2 if t == "HASH" else 1
        sizes = [sum(len(x) for x in items[i:i + step]) + 8 for i in range(0, len(items), step)]
        cuts = cuts_of(sizes, self.part_bytes)
        if len(cuts) == 1:
            return [v]
        return [values.value(t, items[a * step:b * step], v["scores"][a:b] if t == "ZSET" else ())
                for a, b in cuts]

    def emit_payload(self, key: bytes, payload: bytes, read_ms: int, expire) -> None:
        """A DUMP payload above the log's record limit, in parts reassembled by apply."""
        emitter = self.emitter
        chunk_id = emitter.chunk_id()
        step = self.part_bytes
        starts = range(0, len(payload), step)
        for index, start in enumerate(starts):
            emitter.chunk(key, chunk_id, index, start, None, index == len(starts) - 1, read_ms,
                          expire, payload=payload[start:start + step])

    def emit_value(self, key: bytes, v: dict, read_ms: int, expire) -> None:
        """A typed value whole, or in parts when it is above the log's record limit."""
        emitter = self.emitter
        parts = self.split(v)
        if len(parts) == 1:
            emitter.upsert(key, read_ms, expire, value=v)
            return
        chunk_id = emitter.chunk_id()
        offset = 0
        for index, part in enumerate(parts):
            emitter.chunk(key, chunk_id, index, offset, part, index == len(parts) - 1, read_ms,
                          expire)
            offset += values.elements(part)


def cuts_of(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Ranges [a, b) of ``sizes`` whose sums stay under ``limit`` (at least one element each)."""
    cuts, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        if acc and acc + s > limit:
            cuts.append((start, i))
            start, acc = i, 0
        acc += s
    cuts.append((start, len(sizes)))
    return cuts
