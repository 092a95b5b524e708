"""Kafka log (confluent-kafka): ``kafka://host:9092[,host2:9092]/topic``.

Options are librdkafka properties passed through unchanged (``security.protocol``, ``sasl.*``,
``ssl.*``...), except these of ours: ``partitions`` and ``replication.factor`` (used when the topic
is created) and ``topic.<name>`` topic configs for creation (``topic.cleanup.policy=delete`` to
opt out of the default ``compact``, ``topic.retention.ms``...).

The producer is idempotent with acks=all, so retries neither duplicate nor reorder records of a
partition. Records are keyed by db + Redis key: all events of a key go to one partition in order,
and a compacted topic keeps the latest state of every key. Consumers commit explicitly, only what
apply has written to the target.
"""
from __future__ import annotations

import json
import logging
import zlib
import time
from datetime import datetime

from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException,
                             Producer, TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

from conveyor.errors import ConfigError, LogError
from conveyor.log.base import (History, LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus, Record,
                               StartAt)

log = logging.getLogger("conveyor.kafka")

OURS = ("partitions", "replication.factor", "consumer")
METADATA_TIMEOUT_S = 10.0
PRODUCER_DEFAULTS = {"enable.idempotence": True, "acks": "all", "linger.ms": 10,
                     "batch.size": 1_000_000, "compression.type": "lz4",
                     "queue.buffering.max.messages": 500_000,
                     # bounded memory: at most this much waits in the producer's queue
                     "queue.buffering.max.kbytes": 16384,
                     # only failures need a report (a Python callback per record costs ~1 µs)
                     "delivery.report.only.error": True}


def parse(uri: str, opts: dict[str, str]) -> tuple[str, str, dict, dict, dict]:
    """(bootstrap servers, topic, librdkafka properties, topic configs, creation settings)."""
    rest = uri.split("://", 1)[1]
    hosts, _, topic = rest.partition("/")
    topic = topic.strip("/")
    if not hosts or not topic:
        raise LogError(f"Kafka log URI {uri!r}: expected kafka://host:port[,host:port]/topic")
    props: dict = {"bootstrap.servers": hosts, "log_level": 3, "logger": log,
                   "error_cb": _error_cb}
    topic_cfg: dict = {"cleanup.policy": "compact"}
    create: dict = {"partitions": 1, "replication.factor": 1}
    for k, v in opts.items():
        if k == "consumer":
            continue
        if k in OURS:
            create[k] = int(v)
        elif k.startswith("topic."):
            topic_cfg[k[len("topic."):]] = v
        else:
            props[k] = v
    return hosts, topic, props, topic_cfg, create


def _made(cls, conf: dict):
    """A librdkafka client; a property it refuses is a usage error (one line, exit 2)."""
    try:
        return cls(conf)
    except (KafkaException, ValueError, TypeError) as e:
        err = e.args[0] if e.args else e
        text = err.str() if isinstance(err, KafkaError) else str(err)
        raise ConfigError(f"Kafka log settings refused: {text}") from e


def _error_cb(err: KafkaError) -> None:
    log.info("kafka client: %s", err)


def _client_props(props: dict) -> dict:
    return {k: v for k, v in props.items()}


def _cluster(props: dict):
    """(admin client, cluster metadata). Unreachable -> LogError."""
    admin = _made(AdminClient, _client_props(props))
    try:
        return admin, admin.list_topics(timeout=METADATA_TIMEOUT_S)
    except KafkaException as e:
        raise LogError(f"cannot reach Kafka at {props['bootstrap.servers']}: {e.args[0]}") from e


def ensure_topic(props: dict, topic: str, cfg: dict, create: dict) -> int:
    """Creates ``topic`` if missing; returns its partition count. Unreachable -> LogError."""
    admin, md = _cluster(props)
    if topic in md.topics and not md.topics[topic].error:
        return len(md.topics[topic].partitions)
    fut = admin.create_topics([NewTopic(topic, create["partitions"], create["replication.factor"],
                                        config=cfg)], operation_timeout=METADATA_TIMEOUT_S)[topic]
    try:
        fut.result(METADATA_TIMEOUT_S)
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise LogError(f"cannot create Kafka topic {topic!r}: {e.args[0]}") from e
    return create["partitions"]


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    _hosts, topic, props, _cfg, _create = parse(uri, opts)
    _admin, md = _cluster(props)
    return topic in md.topics and not md.topics[topic].error


def _data(msgs, topic: str):
    """The data messages of a consume() batch; an error other than end-of-partition is LogError."""
    for m in msgs:
        err = m.error()
        if err is None:
            yield m
        elif err.code() != KafkaError._PARTITION_EOF:
            raise LogError(f"Kafka consume from {topic!r} failed: {err}")


class KafkaLogWriter(LogWriter):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        _, self.topic, props, cfg, create = parse(uri, opts)
        self._props = props
        self.partitions = ensure_topic(props, self.topic, cfg, create)
        conf = {**PRODUCER_DEFAULTS, **props}
        self.producer = _made(Producer, conf)
        # Room for the record's key and Kafka's per-record and batch overhead.
        self.max_record_bytes = int(conf.get("message.max.bytes", 1_000_000)) * 9 // 10
        self._errors: list[str] = []
        self._unflushed = 0

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self._errors.append(str(err))

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        # With several partitions the partition is chosen here (CRC-32 of the partition key, as
        # librdkafka's consistent partitioner does), so parts of a key stored under their own
        # record keys still share the key's partition and order.
        kw = {}
        if self.partitions > 1:
            kw["partition"] = zlib.crc32(partition_key or key) % self.partitions
        while True:
            try:
                self.producer.produce(self.topic, value, key, on_delivery=self._delivered, **kw)
                break
            except BufferError:                    # local queue full: let deliveries drain
                self.producer.poll(0.05)
            except KafkaException as e:
                raise LogError(f"Kafka produce to {self.topic!r} failed: {e.args[0]}") from e
        self._unflushed += 1
        if self._unflushed % 10_000 == 0:
            self.producer.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        left = self.producer.flush(timeout)
        if self._errors:
            first, n = self._errors[0], len(self._errors)
            self._errors.clear()
            raise LogError(f"{n} records were not stored by Kafka (topic {self.topic!r}): {first}")
        if left:
            raise LogError(f"{left} records not acknowledged by Kafka within {timeout:.0f}s "
                           f"(topic {self.topic!r})")
        self._unflushed = 0

    def history(self) -> History:
        self.flush()
        consumer = _made(Consumer, {**self._props, "group.id": f"{self.topic}-history",
                                    "enable.auto.commit": False, "enable.auto.offset.store": False,
                                    "queued.max.messages.kbytes": 16384,
                                    "fetch.max.bytes": 16 * 1024 * 1024})
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
            raise LogError(f"cannot read the offsets of Kafka topic {self.topic!r}: {e.args[0]}") from e
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
                    raise LogError(f"Kafka consume from {self.topic!r} failed: {e.args[0]}") from e
                for m in _data(msgs, self.topic):
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


class KafkaLogReader(LogReader):
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed") -> None:
        hosts, self.topic, self.props, cfg, create = parse(uri, opts)
        self.uri = f"kafka://{hosts}/{self.topic}"
        self.group = group
        self._cfg, self._create = cfg, create
        ensure_topic(self.props, self.topic, cfg, create)
        # Static membership: a restarted apply (after a crash) takes its partitions back at once
        # instead of waiting for the dead member's session to time out.
        self.consumer = _made(Consumer, {"group.instance.id":
                                      f"{self.topic}-{group}-{opts.get('consumer', 'apply')}",
                                  "session.timeout.ms": 10_000,
                                  # bounded memory: prefetch at most this much per partition set
                                  "queued.max.messages.kbytes": 16384,
                                  "fetch.max.bytes": 16 * 1024 * 1024,
                                  **self.props, "group.id": group, "enable.auto.commit": False,
                                  "enable.auto.offset.store": False,
                                  "auto.offset.reset": "earliest"})
        self._start = start
        self._subscribed = False
        self._assigned: list[TopicPartition] = []
        self._dlq: Producer | None = None

    # -- positioning ---------------------------------------------------------------------------
    def _on_assign(self, consumer, partitions) -> None:
        if self._start != "committed":
            partitions = self._resolved(self._positions(partitions, self._start))
            self._start = "committed"              # only the first assignment is moved
            consumer.assign(partitions)
            # The group's position is what was asked for, even if nothing is read before a restart.
            consumer.commit(offsets=partitions, asynchronous=False)
        self._assigned = partitions

    def _resolved(self, partitions):
        """Logical offsets (beginning/end) as numbers, so they can be committed."""
        out = []
        for tp in partitions:
            if tp.offset in (OFFSET_BEGINNING, OFFSET_END):
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=METADATA_TIMEOUT_S)
                tp = TopicPartition(tp.topic, tp.partition, low if tp.offset == OFFSET_BEGINNING else high)
            out.append(tp)
        return out

    def _positions(self, partitions, where: StartAt):
        if where == "earliest":
            return [TopicPartition(p.topic, p.partition, OFFSET_BEGINNING) for p in partitions]
        if where == "latest":
            return [TopicPartition(p.topic, p.partition, OFFSET_END) for p in partitions]
        if isinstance(where, datetime):
            ms = int(where.timestamp() * 1000)
            asked = [TopicPartition(p.topic, p.partition, ms) for p in partitions]
            try:
                found = self.consumer.offsets_for_times(asked, timeout=METADATA_TIMEOUT_S)
            except KafkaException as e:
                raise LogError(f"Kafka offsets_for_times failed: {e.args[0]}") from e
            return [TopicPartition(p.topic, p.partition, p.offset if p.offset >= 0 else OFFSET_END)
                    for p in found]
        raise LogError(f"cannot seek to {where!r}")

    def seek(self, where: StartAt) -> None:
        if where == "committed":
            return
        if self._assigned:
            for tp in self._positions(self._assigned, where):
                self.consumer.seek(tp)
        else:
            self._start = where

    # -- reading -------------------------------------------------------------------------------
    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        if not self._subscribed:
            self.consumer.subscribe([self.topic], on_assign=self._on_assign)
            self._subscribed = True
        try:
            first = self.consumer.poll(timeout)
            if first is None:
                return []
            msgs = [first] + (self.consumer.consume(max_records - 1, 0) if max_records > 1 else [])
        except KafkaException as e:
            raise LogError(f"Kafka consume from {self.topic!r} failed: {e.args[0]}") from e
        out = []
        for m in _data(msgs, self.topic):
            out.append(Record(str(m.partition()), m.offset(), m.key() or b"", m.value() or b"",
                              m.timestamp()[1]))
        return out

    def commit(self, records: list[Record]) -> None:
        if not records:
            return
        last: dict[int, int] = {}
        for r in records:
            p = int(r.partition)
            last[p] = max(last.get(p, -1), r.offset)
        offsets = [TopicPartition(self.topic, p, o + 1) for p, o in last.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            raise LogError(f"Kafka commit for group {self.group!r} failed: {e.args[0]}") from e

    # -- status --------------------------------------------------------------------------------
    def status(self) -> LogStatus:
        try:
            md = self.consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
            parts = sorted(md.topics[self.topic].partitions)
            committed = self.consumer.committed([TopicPartition(self.topic, p) for p in parts],
                                                timeout=METADATA_TIMEOUT_S)
            out = []
            for tp in committed:
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, tp.partition), timeout=METADATA_TIMEOUT_S)
                pos = tp.offset if tp.offset >= 0 else None
                out.append(PartitionStatus(str(tp.partition), pos, high,
                                           max(high - (pos if pos is not None else low), 0)))
        except KafkaException as e:
            raise LogError(f"Kafka status of {self.topic!r} failed: {e.args[0]}") from e
        return LogStatus(self.uri, self.group, out)

    def dead_letter(self, record: Record, reason: str) -> None:
        topic = f"{self.topic}.dead-letter"
        if self._dlq is None:
            ensure_topic(self.props, topic, {"cleanup.policy": "delete"}, self._create)
            self._dlq = _made(Producer, {**PRODUCER_DEFAULTS, **self.props})
        errors: list = []
        self._dlq.produce(topic, record.value, record.key,
                          headers=[("reason", reason.encode()), ("group", self.group.encode()),
                                   ("from", f"{record.partition}/{record.offset}".encode())],
                          on_delivery=lambda err, msg: errors.append(err) if err else None)
        if self._dlq.flush(METADATA_TIMEOUT_S) or errors:
            raise LogError(f"cannot store a dead letter in {topic!r}: {errors or 'timeout'}")

    def close(self) -> None:
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError):
            pass
        if self._dlq is not None:
            self._dlq.flush(METADATA_TIMEOUT_S)


class KafkaMetaStore(MetaStore):
    """Documents in a compacted side topic ``<topic>.meta``, one key per name."""

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        _, topic, self.props, _, create = parse(uri, opts)
        self.topic = f"{topic}.meta"
        ensure_topic(self.props, self.topic, {"cleanup.policy": "compact"},
                     {**create, "partitions": 1})
        self.producer = _made(Producer, {**PRODUCER_DEFAULTS, **self.props, "linger.ms": 0})

    def put(self, name: str, doc: dict) -> None:
        errors: list = []
        self.producer.produce(self.topic, json.dumps(doc).encode(), name.encode(),
                              on_delivery=lambda err, msg: errors.append(err) if err else None)
        if self.producer.flush(METADATA_TIMEOUT_S) or errors:
            raise LogError(f"cannot store {name!r} in {self.topic!r}: {errors or 'timeout'}")

    def get(self, name: str) -> dict | None:
        c = _made(Consumer, {**self.props, "group.id": "conveyor-meta-reader",
                      "enable.auto.commit": False})
        try:
            tp = TopicPartition(self.topic, 0)
            low, high = c.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            if high <= low:
                return None
            c.assign([TopicPartition(self.topic, 0, low)])
            latest, deadline = None, time.monotonic() + METADATA_TIMEOUT_S
            key = name.encode()
            while time.monotonic() < deadline:
                m = c.poll(1.0)
                if m is None or m.error():
                    continue
                if m.key() == key:
                    latest = m.value()
                if m.offset() >= high - 1:
                    return json.loads(latest) if latest is not None else None
            raise LogError(f"timed out reading {self.topic!r}")
        except KafkaException as e:
            raise LogError(f"cannot read {self.topic!r}: {e.args[0]}") from e
        finally:
            c.close()

    def close(self) -> None:
        self.producer.flush(METADATA_TIMEOUT_S)
