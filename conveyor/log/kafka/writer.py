"""The writer of a Kafka log (an idempotent producer), and the check for records deleted
under it (Removals)."""
from __future__ import annotations

import logging
import time
import zlib
from collections import deque

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from tenacity import stop_after_delay

from conveyor import retry
from conveyor.errors import LogError, LogLost, LogUnavailable
from conveyor.log.base import History, LogWriter
from conveyor.log.kafka.admin import (check_same_log, ensure_topic, offsets, removal_window,
                                      topic_id, topic_settings)
from conveyor.log.kafka.config import (APPEND_WAIT_S, DEFAULT_PARTITIONS, METADATA_TIMEOUT_S,
                                       PRODUCER_DEFAULTS, client_props, made, parse, weak)
from conveyor.log.kafka.errors import data, failure
from conveyor.log.kafka.security import error_cb

log = logging.getLogger("conveyor.kafka")


class Removals:
    """Notices records deleted from a topic (kafka-delete-records, a topic's data lost) that its
    cleanup could not have removed: a partition's start past an end it had less than ``window``
    seconds ago (records appended after that moment are younger than the window)."""

    OBSERVE_EVERY_S = 60.0
    KEPT = 10_080                      # observations (a week of minutes); the oldest go first

    def __init__(self, window: float | None) -> None:
        self.window = window
        self._seen: deque[tuple[float, dict[int, int]]] = deque(maxlen=self.KEPT)

    def observe(self, ends: dict[int, int]) -> None:
        now = time.monotonic()
        if not self._seen or now - self._seen[-1][0] >= self.OBSERVE_EVERY_S:
            self._seen.append((now, dict(ends)))

    def forget(self) -> None:
        self._seen.clear()

    def check(self, starts: dict[int, int]) -> str:
        now = time.monotonic()
        while self._seen and now - self._seen[0][0] > self.window:
            self._seen.popleft()
        if not self._seen:
            return ""
        at, ends = self._seen[0]
        for p, start in sorted(starts.items()):
            if start > ends.get(p, start):
                return (f"partition {p} starts at offset {start}, past its end {ends[p]} of "
                        f"{now - at:.0f}s ago: records were deleted that its cleanup could not "
                        "have removed yet (kafka-delete-records?)")
        return ""


class KafkaLogWriter(LogWriter):
    # Blocks: every event of a block is in the block's partition (partition_of), in order with
    # the records around it. A compacted topic gets them for scans only (LogWriter.compacted).
    takes_blocks = True

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        _, self.topic, props, cfg, create = parse(uri, opts)
        self._props, self._cfg, self._create = props, cfg, create
        self.partitions = ensure_topic(props, self.topic, cfg, create)
        self._admin = made(AdminClient, client_props(props))
        self.log_id = topic_id(self._admin, self.topic)
        self.warnings = []
        # As the broker has it (a topic that existed keeps its own policy).
        try:
            settings = topic_settings(self._admin, self.topic)
        except LogUnavailable:
            raise
        except LogError as e:              # allowed to write, not to read the topic's settings
            settings = {}
            self.warnings.append(f"{e}: taking the topic as compacted (blocks for scans only, "
                                 "one record per live change)")
        self.compacted = "compact" in settings.get("cleanup.policy", "compact")
        self._removed = Removals(removal_window(settings))
        self._observe_ends()
        if self.partitions < DEFAULT_PARTITIONS and "partitions" not in create:
            self.warnings.append(
                f"Kafka topic {self.topic!r} existed with {self.partitions} partition(s): at most "
                f"{self.partitions} apply process(es) of a group share its work (a topic's "
                "partitions cannot be lowered, and raising them breaks per-key order: use a new "
                "topic to spread wider)")
        conf = {**PRODUCER_DEFAULTS, **props, "error_cb": weak(self._client_error)}
        self.producer = made(Producer, conf)
        # Room for the record's key and Kafka's per-record and batch overhead.
        self.max_record_bytes = int(conf.get("message.max.bytes", 1_000_000)) * 9 // 10
        self._errors: list[str] = []
        self._unflushed = 0
        # partition -> an end offset the topic had (read from the broker every check): an end
        # below it later means the broker lost records (delivery reports come for errors only)
        self._ends: dict[int, int] = {}
        self._troubled = False              # a transport failure since the last identity check
        self._on_delivery = weak(self._delivered)

    def _client_error(self, err: KafkaError) -> None:
        error_cb(err)
        self._troubled = True

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self._errors.append(str(err))


    def partition_of(self, partition_key: bytes) -> int:
        # CRC-32 of the partition key, as librdkafka's consistent partitioner does.
        return zlib.crc32(partition_key) % self.partitions

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        # With several partitions the partition is chosen here, so parts of a key stored under
        # their own record keys, and blocks, still share the key's partition and order.
        kw = {}
        if self.partitions > 1:
            kw["partition"] = zlib.crc32(partition_key or key) % self.partitions
        deadline = time.monotonic() + APPEND_WAIT_S
        while True:
            try:
                self.producer.produce(self.topic, value, key, on_delivery=self._on_delivery, **kw)
                break
            except BufferError:                    # local queue full: let deliveries drain
                if time.monotonic() > deadline:    # not queued: append() is called again
                    raise LogUnavailable(f"Kafka has acknowledged nothing for {APPEND_WAIT_S:.0f}s "
                                         f"(topic {self.topic!r}): broker down?") from None
                self.producer.poll(0.05)
            except KafkaException as e:
                raise failure(e, f"Kafka produce to {self.topic!r} failed") from e
        self._unflushed += 1
        if self._unflushed % 10_000 == 0:
            self.producer.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        left = self.producer.flush(timeout)
        if self._errors:
            # With message.timeout.ms=0 only a permanent error (a record too big, no rights, a
            # fatal idempotence error) ends a record's delivery.
            first, n = self._errors[0], len(self._errors)
            self._errors.clear()
            try:                                   # a deleted topic is LogLost, not a bad record
                self.check_identity()
            except LogUnavailable:                 # these records are lost all the same
                pass
            raise LogError(f"{n} records were not stored by Kafka (topic {self.topic!r}): {first}")
        if left:
            self._troubled = True
            raise LogUnavailable(f"{left} records not acknowledged by Kafka within {timeout:.0f}s "
                                 f"(topic {self.topic!r}); they stay queued in order")
        self._unflushed = 0
        if self._troubled:                         # back after an outage: still the same log?
            self.check_identity()
            self._troubled = False

    def _observe_ends(self) -> None:
        """The partitions' ends now, for Removals. A topic just created may have no leader yet
        (NOT_LEADER_FOR_PARTITION): asked again for a while, else left to the first check."""
        ask = retry.policy(on=LogUnavailable, max_wait_s=1.0, reraise=True,
                           stop=stop_after_delay(METADATA_TIMEOUT_S))
        try:
            self._removed.observe(ask(offsets, self._admin, self.topic, range(self.partitions)))
        except LogUnavailable as e:
            log.info("kafka: the ends of %r are not known yet (%s): read at the next check",
                     self.topic, e)

    def check_identity(self) -> None:
        """LogLost when the topic was recreated, ends below an end it had, or starts past
        records too young for its cleanup to have removed them: records are missing."""
        parts = range(self.partitions)
        ends = check_same_log(self._admin, self.topic, self.log_id, self._ends, parts)
        for p, end in ends.items():
            self._ends[p] = max(self._ends.get(p, 0), end)
        if self._removed.window is not None:
            why = self._removed.check(offsets(self._admin, self.topic, parts, earliest=True))
            if why:
                raise LogLost(f"Kafka topic {self.topic!r} {why}")
            self._removed.observe(ends)

    def adopt_new_log(self) -> None:
        self.partitions = ensure_topic(self._props, self.topic, self._cfg, self._create)
        self.log_id = topic_id(self._admin, self.topic)
        self._ends.clear()
        self._removed.forget()
        self._observe_ends()
        self._troubled = False

    def history(self) -> History:
        self.flush()
        consumer = made(Consumer, {**self._props, "group.id": f"{self.topic}-history",
                                    "enable.auto.commit": False, "enable.auto.offset.store": False,
                                    "queued.max.messages.kbytes": 4096,
                                    "fetch.max.bytes": 4 * 1024 * 1024,
                                    "fetch.queue.backoff.ms": 5})
        ends, starts, removed = {}, [], 0
        try:
            for p in range(self.partitions):
                lo, hi = consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                        timeout=METADATA_TIMEOUT_S)
                removed += lo
                if hi > lo:
                    ends[p] = hi
                    starts.append(TopicPartition(self.topic, p, lo))
        except KafkaException as e:
            consumer.close()
            raise failure(e, f"cannot read the offsets of Kafka topic {self.topic!r}") from e
        why = (f"{removed} records removed from the start of {self.topic!r} by retention"
               if removed else "")
        return History(not removed, self._history(consumer, starts, ends), why)

    def _history(self, consumer, starts: list, ends: dict):
        """Reads each partition up to the end it had when asked, without joining a group."""
        try:
            consumer.assign(starts)
            idle_since = time.monotonic()
            while ends:
                try:
                    msgs = consumer.consume(1000, 1.0)
                except KafkaException as e:
                    raise failure(e, f"Kafka consume from {self.topic!r} failed") from e
                for m in data(msgs, self.topic):
                    if m.partition() in ends:
                        yield m.key() or b"", m.value() or b""
                if msgs:
                    idle_since = time.monotonic()
                # Done with a partition once its position reached the end (compaction may have
                # removed the records just before it).
                for tp in consumer.position([TopicPartition(self.topic, p) for p in ends]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
                if ends and time.monotonic() - idle_since > 10 * METADATA_TIMEOUT_S:
                    raise LogError(f"reading Kafka topic {self.topic!r} from the start stalled "
                                   f"(partitions {sorted(ends)} not read to their end)")
        finally:
            consumer.close()

    def close(self) -> None:
        self.flush()
