"""Kafka log (confluent-kafka): ``kafka://host:9092[,host2:9092]/topic``.

Options are librdkafka properties passed through unchanged (``security.protocol``, ``sasl.*``,
``ssl.*``...), except these of ours: ``partitions`` and ``replication.factor`` (used when the topic
is created) and ``topic.<name>`` topic configs for creation (``topic.cleanup.policy=delete`` to
opt out of the default ``compact``, ``topic.retention.ms``...).

Creation defaults: DEFAULT_PARTITIONS (6) partitions and a replication factor of min(3, brokers in
the cluster's metadata). Why 6: a key's events stay in order within its partition, so the partition
count caps how many apply processes of one group share the work, and it cannot be lowered later
(raising it moves keys to other partitions, breaking per-key order for records already written);
6 divides evenly among 1, 2, 3 or 6 members, and costs a single apply nothing measurable. A topic
that exists is used as it is, whatever its partition count (``status`` shows it).

The producer is idempotent with acks=all, so retries neither duplicate nor reorder records of a
partition. Records are keyed by db + Redis key: all events of a key go to one partition in order,
and a compacted topic keeps the latest state of every key. Blocks (many keys of one partition)
have record keys of their own that nothing replaces; on a compacted topic capture uses them for
what scans read only (LogWriter.compacted). Consumers commit explicitly, only what apply has
written to the target. No compression by default (see PRODUCER_DEFAULTS); the consumer prefetches
at most 2 MiB.

Faults: a broker that is down or restarting is waited out. The producer never gives up on a
record (message.timeout.ms=0: librdkafka retries for ever, idempotence keeps order), a flush that
cannot finish raises LogUnavailable and keeps the records queued; a commit, a status or a metadata
lookup that fails for a transient reason raises LogUnavailable and can be repeated. librdkafka's
own log lines go to the ``conveyor.kafka`` logger at INFO, so they show only with ``-v``.
The log's identity is the topic id: a topic deleted (and recreated) raises LogLost.

Security (``security.protocol=SASL_SSL`` / ``SSL``): a refusal that waiting cannot cure (wrong SASL
credentials, a broker certificate that is expired, for another host or from an unknown CA, a client
certificate the broker refuses, an unreadable certificate or key file) is a LogError at once, one
line naming the cause; librdkafka itself would retry it for ever. Secret options (``sasl.password``,
``ssl.key.password``...) never appear in a message.

Modules: ``config`` (the URI and options, client properties, tunables), ``security`` (SASL and TLS
refusals said in one line), ``errors`` (what waiting cures), ``admin`` (the topic: creation, id,
offsets, settings), ``writer``, ``reader``, ``meta`` (documents, and the one-record sender dead
letters use too) and ``compact`` (blocks that later records supersede).
"""
from __future__ import annotations

from conveyor.log.kafka.admin import creation, log_exists, removal_window
from conveyor.log.kafka.config import DEFAULT_PARTITIONS, check_uri
from conveyor.log.kafka.meta import KafkaMetaStore
from conveyor.log.kafka.reader import KafkaLogReader
from conveyor.log.kafka.writer import KafkaLogWriter, Removals

__all__ = ["KafkaLogWriter", "KafkaLogReader", "KafkaMetaStore", "log_exists", "check_uri",
           "Removals", "removal_window", "creation", "DEFAULT_PARTITIONS",
           "Writer", "Reader", "Meta"]

# What conveyor.log's registry opens.
Writer, Reader, Meta = KafkaLogWriter, KafkaLogReader, KafkaMetaStore
