"""A Kafka log's documents (KafkaMetaStore), and the one-record sender they and dead letters use."""
from __future__ import annotations

import json
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from conveyor.errors import LogError, LogUnavailable
from conveyor.log.base import MetaStore
from conveyor.log.kafka.admin import ensure_topic
from conveyor.log.kafka.config import METADATA_TIMEOUT_S, PRODUCER_DEFAULTS, made, parse
from conveyor.log.kafka.errors import failure


class OneRecord:
    """Stores one record at a time and waits for it. A call repeated after LogUnavailable (the
    broker did not acknowledge in time; the record stays queued) waits for the record already
    queued instead of queueing it twice."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer, self.topic = producer, topic
        self._pending: tuple | None = None
        self._errors: list = []

    def send(self, ident: tuple, key: bytes, value: bytes, what: str, headers=None) -> None:
        if self._pending != ident:
            self._errors = errors = []
            self.producer.produce(self.topic, value, key, headers=headers,
                                  on_delivery=lambda err, msg: errors.append(err) if err else None)
            self._pending = ident
        left = self.producer.flush(METADATA_TIMEOUT_S)
        if self._errors:
            self._pending = None
            raise LogError(f"cannot store {what} in {self.topic!r}: {self._errors[0]}")
        if left:
            raise LogUnavailable(f"cannot store {what} in {self.topic!r} now: Kafka did not "
                                 f"acknowledge it within {METADATA_TIMEOUT_S:.0f}s")
        self._pending = None


class KafkaMetaStore(MetaStore):
    """Documents in a compacted side topic ``<topic>.meta``, one key per name."""

    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        _, topic, self.props, _, create = parse(uri, opts)
        self.topic = f"{topic}.meta"
        # Every process refreshes its document every few seconds and documents() reads the
        # topic from its start: segments roll every 10 minutes so compaction (which leaves the
        # active segment alone) keeps what is read to about one record per name.
        ensure_topic(self.props, self.topic, {"cleanup.policy": "compact", "segment.ms": "600000"},
                     {**create, "partitions": 1})
        self.producer = made(Producer, {**PRODUCER_DEFAULTS, **self.props, "linger.ms": 0})
        self._out = OneRecord(self.producer, self.topic)

    def put(self, name: str, doc: dict) -> None:
        text = json.dumps(doc, sort_keys=True)
        self._out.send((name, text), name.encode(), text.encode(), repr(name))

    def get(self, name: str) -> dict | None:
        return self.documents().get(name)

    def documents(self) -> dict[str, dict]:
        """Every name's latest document: the meta topic read from its start to its end."""
        c = made(Consumer, {**self.props, "group.id": "conveyor-meta-reader",
                             "enable.auto.commit": False})
        try:
            tp = TopicPartition(self.topic, 0)
            low, high = c.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            if high <= low:
                return {}
            c.assign([TopicPartition(self.topic, 0, low)])
            latest: dict[bytes, bytes] = {}
            deadline = time.monotonic() + METADATA_TIMEOUT_S
            while time.monotonic() < deadline:
                m = c.poll(1.0)
                if m is None or m.error():
                    continue
                latest[m.key() or b""] = m.value()
                if m.offset() >= high - 1:
                    return {k.decode(): json.loads(v) for k, v in latest.items() if v is not None}
            raise LogUnavailable(f"timed out reading {self.topic!r}")
        except KafkaException as e:
            raise failure(e, f"cannot read {self.topic!r}") from e
        finally:
            c.close()

    def close(self) -> None:
        self.producer.flush(METADATA_TIMEOUT_S)
