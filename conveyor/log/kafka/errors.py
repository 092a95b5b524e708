"""Which Kafka errors waiting cures, and the LogError or LogUnavailable a driver error becomes."""
from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException

from conveyor.errors import LogError, LogUnavailable

log = logging.getLogger("conveyor.kafka")


# Errors that a broker coming back (or a group settling) cures: the call is made again.
TRANSIENT = {getattr(KafkaError, n) for n in (
    "_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_TIMED_OUT_QUEUE", "_WAIT_COORD",
    "_MSG_TIMED_OUT", "_RESOLVE", "_WAIT_CACHE", "_UNKNOWN_PARTITION", "_MAX_POLL_EXCEEDED",
    "_STATE", "_ASSIGNMENT_LOST", "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR",
    "COORDINATOR_LOAD_IN_PROGRESS", "REQUEST_TIMED_OUT", "NETWORK_EXCEPTION",
    "LEADER_NOT_AVAILABLE", "NOT_LEADER_FOR_PARTITION", "REBALANCE_IN_PROGRESS",
    "UNKNOWN_MEMBER_ID", "ILLEGAL_GENERATION", "NOT_ENOUGH_REPLICAS", "KAFKA_STORAGE_ERROR",
    # a partition's leadership just moved or the topic was just created: the broker's metadata
    # catches up within moments (librdkafka does not flag these retriable in admin results)
    "FENCED_LEADER_EPOCH", "UNKNOWN_LEADER_EPOCH", "OFFSET_NOT_AVAILABLE")}
UNKNOWN_TOPIC = {KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART,
                 KafkaError.UNKNOWN_TOPIC_ID}


def transient(err) -> bool:
    return isinstance(err, KafkaError) and not err.fatal() and (
        err.retriable() or err.code() in TRANSIENT)


def failure(e: KafkaException, what: str) -> LogError:
    """LogUnavailable for a transient failure (call again), LogError otherwise."""
    err = e.args[0] if e.args else e
    text = err.str() if isinstance(err, KafkaError) else str(err)
    if transient(err):
        return LogUnavailable(f"{what}: {text} (Kafka unreachable or restarting)")
    return LogError(f"{what}: {text}")


def data(msgs, topic: str, on_trouble=None):
    """The data messages of a consume() batch. A transient error (a broker down or restarting:
    librdkafka reconnects by itself) is logged and passed to ``on_trouble``; end-of-partition is
    no error; anything else is LogError."""
    for m in msgs:
        err = m.error()
        if err is None:
            yield m
        elif err.code() == KafkaError._PARTITION_EOF:
            continue
        elif transient(err) or err.code() in UNKNOWN_TOPIC:
            log.info("kafka consumer: %s", err)
            if on_trouble is not None:
                on_trouble(err)
        else:
            raise LogError(f"Kafka consume from {topic!r} failed: {err}")
