"""The topic through the admin client: creation, id, offsets, settings, the same-log check."""
from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec

from conveyor.errors import LogLost, LogUnavailable
from conveyor.log.kafka.config import (DEFAULT_PARTITIONS, MAX_REPLICATION, METADATA_STEP_S,
                                       METADATA_TIMEOUT_S, client_props, made, parse)
from conveyor.log.kafka.errors import UNKNOWN_TOPIC, failure, transient
from conveyor.log.kafka.security import refused

log = logging.getLogger("conveyor.kafka")


def _cluster(props: dict):
    """(admin client, cluster metadata). Unreachable -> LogUnavailable; refused (authentication,
    TLS) -> LogError. Asked in short steps so a refusal is seen within a second or so."""
    admin = made(AdminClient, client_props(props))
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while True:
        try:
            return admin, admin.list_topics(timeout=METADATA_STEP_S)
        except KafkaException as e:
            admin.poll(0)              # serves error_cb, and hands librdkafka's lines to -v
            refused(props)
            if time.monotonic() >= deadline or not transient(e.args[0] if e.args else e):
                raise failure(e, f"cannot reach Kafka at {props['bootstrap.servers']}") from e


def topic_id(admin: AdminClient, topic: str) -> str:
    """The topic's id (changes when it is deleted and recreated); LogLost if it is gone."""
    fut = admin.describe_topics(TopicCollection([topic]),
                                request_timeout=METADATA_TIMEOUT_S)[topic]
    try:
        return str(fut.result(METADATA_TIMEOUT_S).topic_id)
    except KafkaException as e:
        err = e.args[0] if e.args else None
        if isinstance(err, KafkaError) and err.code() in UNKNOWN_TOPIC:
            raise LogLost(f"Kafka topic {topic!r} was deleted") from e
        raise failure(e, f"cannot describe Kafka topic {topic!r}") from e


def offsets(admin: AdminClient, topic: str, parts, earliest: bool = False) -> dict[int, int]:
    """Partition -> end offset (start offset with ``earliest``), in one request through the
    admin client: a consumer's own lookups queue behind its fetch in flight (up to
    fetch.wait.max.ms each)."""
    spec = OffsetSpec.earliest() if earliest else OffsetSpec.latest()
    asked = {TopicPartition(topic, p): spec for p in parts}
    if not asked:
        return {}
    out = {}
    try:
        for tp, fut in admin.list_offsets(asked, request_timeout=METADATA_TIMEOUT_S).items():
            out[tp.partition] = fut.result(METADATA_TIMEOUT_S).offset
    except KafkaException as e:
        raise failure(e, f"cannot read the offsets of Kafka topic {topic!r}") from e
    return out


def check_same_log(admin: AdminClient, topic: str, log_id: str, seen: dict[int, int],
                   parts=None) -> dict[int, int]:
    """LogLost when the topic has another id now, or holds fewer records than this process saw
    in it (``seen``: partition -> the end it had). Returns the ends it read: those of ``parts``
    (default: the partitions seen), in the same request."""
    now = topic_id(admin, topic)
    if log_id and now != log_id:
        raise LogLost(f"Kafka topic {topic!r} was deleted and recreated (id {log_id} is now {now})")
    ends = offsets(admin, topic, sorted(set(seen) | set(parts or ())))
    for p, end in ends.items():
        if p in seen and end < seen[p]:
            raise LogLost(f"Kafka topic {topic!r} partition {p} ends at offset {end}, "
                          f"below the {seen[p]} already seen: records were removed")
    return ends


def creation(create: dict, brokers: int) -> tuple[int, int]:
    """(partitions, replication factor) of a new topic: the explicit options, else the defaults."""
    return (create.get("partitions", DEFAULT_PARTITIONS),
            create.get("replication.factor", max(1, min(MAX_REPLICATION, brokers))))


def ensure_topic(props: dict, topic: str, cfg: dict, create: dict) -> int:
    """Creates ``topic`` if missing; returns its partition count. Unreachable -> LogError."""
    admin, md = _cluster(props)
    if topic in md.topics and not md.topics[topic].error:
        return len(md.topics[topic].partitions)
    partitions, replication = creation(create, len(md.brokers))
    fut = admin.create_topics([NewTopic(topic, partitions, replication, config=cfg)],
                              operation_timeout=METADATA_TIMEOUT_S)[topic]
    try:
        fut.result(METADATA_TIMEOUT_S)
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise failure(e, f"cannot create Kafka topic {topic!r}") from e
        return _wait_visible(admin, topic)
    log.info("kafka: created topic %r with %d partitions, replication factor %d", topic,
             partitions, replication)
    return _wait_visible(admin, topic)


def _wait_visible(admin: AdminClient, topic: str) -> int:
    """A topic just created is in the broker's metadata (every partition has a leader) a little
    later; a client asking before that is told "unknown partition". Returns its partition count."""
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            t = admin.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
        except KafkaException as e:
            raise failure(e, f"cannot look up Kafka topic {topic!r}") from e
        if t is not None and not t.error and t.partitions and all(
                p.leader >= 0 for p in t.partitions.values()):
            return len(t.partitions)
        time.sleep(0.1)
    raise LogUnavailable(f"Kafka topic {topic!r} was created but has no leader yet")


def topic_settings(admin: AdminClient, topic: str) -> dict[str, str]:
    """The topic's configuration as the broker applies it."""
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        cfg = admin.describe_configs([res], request_timeout=METADATA_TIMEOUT_S)[res].result(
            METADATA_TIMEOUT_S)
    except KafkaException as e:
        raise failure(e, f"cannot read the settings of Kafka topic {topic!r}") from e
    return {name: entry.value for name, entry in cfg.items()}


def cleanup_policy(admin: AdminClient, topic: str) -> str:
    """The topic's cleanup.policy as the broker applies it ("compact", "delete" or both)."""
    return topic_settings(admin, topic)["cleanup.policy"]


def removal_window(settings: dict[str, str]) -> float | None:
    """Seconds within which no record may leave the topic but by a deletion: a compacted topic
    never removes records from its start (inf), a deleting one only past retention.ms (None, no
    check, where retention.bytes may remove younger ones or the policy is unknown)."""
    policy = settings.get("cleanup.policy", "")
    if policy == "compact":
        return float("inf")
    if "delete" in policy and int(settings.get("retention.bytes") or -1) < 0:
        ms = int(settings.get("retention.ms") or -1)
        return float("inf") if ms < 0 else ms / 1000
    return None


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    _hosts, topic, props, _cfg, _create = parse(uri, opts)
    _admin, md = _cluster(props)
    return topic in md.topics and not md.topics[topic].error

