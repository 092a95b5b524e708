"""Compaction of the Redis Streams log (``trim=compact``, the default): see compaction.py.

Entries every group has read and acknowledged and older than the retention (default 1h) are
deleted (XDEL) when later entries of the same keys supersede all their events; a block still
needed for one key stays whole (an entry cannot be rewritten in place). Other entries (parts of
big keys, typed values) are judged by their record key, as Kafka compacts, and never decoded. The key index lives in a
temporary SQLite file of the apply process that compacts, built from the streams as it goes (an
entry id ``ms-seq`` is numbered ``ms * 2**22 + seq``, in order within its stream, and every event
of a key is in one stream); one process compacts at a time, under a lease on the buffer Redis.
The entries deleted are counted in ``<stream>:compacted``, so that a stream that lost entries
only to compaction is still known to hold every key's latest event (``apply --from earliest``).
A pass runs once the streams grew by half since the last one: the work follows the appends.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import redis

from conveyor.events import Codec
from conveyor.log.compaction import (BATCH_BYTES, KeyIndex, Schedule, decode_blocks, keyed_keeps,
                                      keyed_rows)
from conveyor.log.streams.base import field_map, next_id
from conveyor.words import text

log = logging.getLogger("conveyor.log")

PAGE = 1000
LEASE_MS = 120_000


def id_number(eid) -> int:
    ms, seq = text(eid).split("-")
    return (int(ms) << 22) | int(seq)


def compacted_key(stream: str) -> str:
    return f"{stream}:compacted"


class StreamCompactor:
    def __init__(self, r: redis.Redis, streams: list[str], retention_ms: int) -> None:
        self.r, self.streams, self.retention_ms = r, streams, retention_ms
        self.codec = Codec()
        self.index = KeyIndex.temporary()
        self.schedule = Schedule()
        self._indexed: dict[str, str] = {}         # stream -> next id to index
        self.deleted = 0
        self.stopping = threading.Event()           # set: a pass under way ends at once

    def close(self) -> None:
        self.index.close()

    def run(self, oldest_needed) -> int:
        """One pass if due, under the lease; the entries it deleted."""
        size = sum(self.r.xlen(s) for s in self.streams)
        if not self.schedule.due(size):
            return 0
        lease, token = f"{self.streams[0]}:compactor", uuid.uuid4().hex
        if not self.r.set(lease, token, nx=True, px=LEASE_MS):
            return 0
        started = time.monotonic()
        try:
            sec, usec = self.r.time()
            age_cut = ((sec * 1000 + usec // 1000 - self.retention_ms) << 22)
            deleted = 0
            for s in self.streams:
                self._catch_up(s)
                needed = oldest_needed(s)
                cut = age_cut if needed is None else min(age_cut, (needed[0] << 22) | needed[1])
                deleted += self._compact(s, cut)
            self.schedule.passed(sum(self.r.xlen(s) for s in self.streams), started)
            self.deleted += deleted
            return deleted
        finally:
            if text(self.r.get(lease) or b"") == token:
                self.r.delete(lease)

    def _pages(self, stream: str, start: str):
        """Decoded entries, a page at a time; pages of big entries (parts of big keys) are asked
        smaller, so that a page holds about BATCH_BYTES."""
        count = PAGE
        while not self.stopping.is_set():
            entries = self.r.execute_command("XRANGE", stream, start, "+", "COUNT", count)
            if not entries:
                return
            fields = [field_map(f) for _, f in entries]
            keys = [f.get(b"k", b"") for f in fields]
            values = [f.get(b"v", b"") for f in fields]
            decoded = decode_blocks(self.codec, keys, values)
            yield [(text(eid), id_number(eid), k, d)
                   for (eid, _), k, d in zip(entries, keys, decoded)]
            if len(entries) < count:
                return
            start = next_id(text(entries[-1][0]))
            per_entry = max(1, sum(map(len, values)) // len(values))
            count = max(1, min(PAGE, BATCH_BYTES // per_entry))

    def _catch_up(self, stream: str) -> None:
        start = self._indexed.get(stream, "-")
        for page in self._pages(stream, start):
            self.index.db.execute("BEGIN")
            self.index.note([r for (_, n, k, d) in page for r in keyed_rows(n, k, d)])
            self.index.db.execute("COMMIT")
            self._indexed[stream] = next_id(page[-1][0])

    def _compact(self, stream: str, cut: int) -> int:
        deleted = 0
        for whole in self._pages(stream, "-"):
            page = [x for x in whole if x[1] < cut]
            if not page:
                break
            latest = self.index.lookup([r[0] for (_, n, k, d) in page
                                        for r in keyed_rows(n, k, d)])
            gone = [eid for eid, n, k, d in page
                    if not keyed_keeps(n, k, d, latest, self.codec)]
            if gone:
                # (no MULTI for the log's user: a crash between the two leaves the stream
                # looking trimmed, which only makes a rebuild warn)
                p = self.r.pipeline(transaction=False)
                p.xdel(stream, *gone)
                p.incrby(compacted_key(stream), len(gone))
                p.execute()
                deleted += len(gone)
            if len(page) < len(whole):
                break
        if deleted:
            log.info("log stream %s: compaction deleted %d superseded entries", stream, deleted)
        return deleted
