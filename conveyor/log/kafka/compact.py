"""Blocks of a compacted Kafka topic that later records supersede (see compaction.py).

The broker compacts records by record key: a key's older events go once a newer record of the key
is written. A block (many keys, a record key of its own) is never replaced that way, so a topic
would keep every full copy's blocks forever. This compactor, run by apply on the partitions it is
assigned, finds the blocks every event of which a later record of the same key supersedes, and
writes an empty block under the same record key: the broker then drops the old block at its next
cleaning, and what is left is a record of a few dozen bytes. A block still needed for one of its
keys stays whole; ``apply --from earliest`` finds every key's latest event either way.

Only blocks older than ``compact_after`` (default 1h) are replaced. The key index is a temporary
SQLite file (offsets number the records of a partition, and every event of a key is in one
partition). A pass runs once the partitions grew by half since the last one, or grew at all and
the last pass is a while ago (at least ten times as long ago as that pass took).
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from conveyor.events import Codec, Columns, block_size
from conveyor.log.compaction import (KeyIndex, Schedule, bounded, decide, decode_blocks,
                                      keyed_rows, rows_of)

log = logging.getLogger("conveyor.kafka")

DEFAULT_AFTER = "1h"
READ_TIMEOUT_S = 10.0


class KafkaCompactor:
    def __init__(self, props: dict, producer_conf: dict, topic: str, after_s: float) -> None:
        self.props, self.topic, self.after_ms = props, topic, int(after_s * 1000)
        self.producer_conf = producer_conf
        self.codec = Codec()
        self.index = KeyIndex.temporary()
        self.schedule = Schedule()
        self._indexed: dict[int, int] = {}           # partition -> next offset to index
        self._producer: Producer | None = None
        self.replaced = 0
        self.stopping = threading.Event()           # set: a pass under way ends at once

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(READ_TIMEOUT_S)
        self.index.close()

    def _consumer(self) -> Consumer:
        return Consumer({**self.props, "group.id": f"{self.topic}-compactor",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "queued.max.messages.kbytes": 1024, "fetch.max.bytes": 1024 * 1024,
                         "fetch.queue.backoff.ms": 5, "enable.partition.eof": True})

    def run(self, partitions: list[int]) -> int:
        """One pass over ``partitions`` if due; the blocks it replaced."""
        if not partitions:
            return 0
        c = self._consumer()
        try:
            marks = {p: c.get_watermark_offsets(TopicPartition(self.topic, p),
                                                timeout=READ_TIMEOUT_S) for p in partitions}
            size = sum(hi for lo, hi in marks.values())
            if not self.schedule.due(size):
                return 0
            started = time.monotonic()
            for p in partitions:
                self._catch_up(c, p, self._indexed.get(p, marks[p][0]), marks[p][1])
            replaced = sum(self._compact(c, p, marks[p][0], marks[p][1]) for p in partitions)
            self.schedule.passed(size, started)
        finally:
            c.close()
        if replaced:
            self._producer.flush(READ_TIMEOUT_S)
            log.info("kafka: %d blocks of %r superseded by later records replaced by empty "
                     "ones (the broker drops the old ones as it cleans)", replaced, self.topic)
        self.replaced += replaced
        return replaced

    def _read(self, c: Consumer, p: int, start: int, end: int):
        """(offset, timestamp ms, key, value) of partition ``p`` in [start, end)."""
        if start >= end:
            return
        c.assign([TopicPartition(self.topic, p, start)])
        idle = time.monotonic()
        while not self.stopping.is_set():
            msgs = c.consume(100, 1.0)
            for m in msgs:
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        return
                    raise KafkaException(m.error())
                if m.offset() >= end:
                    return
                key = m.key() or b""
                # only a block's value is read (and decoded); any other record is judged by its
                # key (parts of big keys are large: their bytes are never copied out)
                yield (m.offset(), m.timestamp()[1], key,
                       m.value() if block_size(key) is not None else b"")
                if m.offset() == end - 1:
                    return
            if msgs:
                idle = time.monotonic()
            elif time.monotonic() - idle > READ_TIMEOUT_S:
                return

    def _batches(self, c, p, start, end):
        items = (item for item in self._read(c, p, start, end) if item[3] is not None)   # tombstones
        for batch in bounded(items, lambda item: len(item[3])):
            yield batch, decode_blocks(self.codec, [b[2] for b in batch], [b[3] for b in batch])

    @staticmethod
    def _k(p: int, key: bytes) -> bytes:
        return b"%d/" % p + key

    def _catch_up(self, c, p: int, start: int, end: int) -> None:
        for batch, decoded in self._batches(c, p, start, end):
            rows = [(self._k(p, k), n, part) for (num, _, key, _), d in zip(batch, decoded)
                    for k, n, part in keyed_rows(num, key, d)]
            self.index.db.execute("BEGIN")
            self.index.note(rows)
            self.index.db.execute("COMMIT")
        if not self.stopping.is_set():
            self._indexed[p] = end

    def _compact(self, c, p: int, start: int, end: int) -> int:
        """Blocks only: the broker compacts every other record by its key."""
        cut = time.time_ns() // 1_000_000 - self.after_ms
        replaced = 0
        for batch, decoded in self._batches(c, p, start, end):
            blocks = [(item, d) for item, d in zip(batch, decoded)
                      if isinstance(d, list) and d and item[1] <= cut]
            if not blocks:
                continue
            keys = [self._k(p, k) for (_, d) in blocks for k, _, _ in rows_of(0, d)]
            latest = {k[len(b"%d/" % p):]: v for k, v in self.index.lookup(keys).items()}
            for (offset, _, key, _), d in blocks:
                if not decide(offset, d, latest, self.codec, rewrite=False).keep:
                    self._replace(p, key, d[0].db, d[0].capture_id)
                    replaced += 1
        return replaced

    def _replace(self, p: int, key: bytes, db: int, capture_id: str) -> None:
        if self._producer is None:
            self._producer = Producer(self.producer_conf)
        value = self.codec.encode_block(db, capture_id, 0, Columns())
        self._producer.produce(self.topic, value, key, partition=p)
        self._producer.poll(0)
