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
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import time
import uuid
import weakref
import zlib
from collections import deque
from datetime import datetime

from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException,
                             Producer, TopicPartition)
from confluent_kafka import TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec

from conveyor import retry
from conveyor.errors import ConfigError, LogError, LogLost, LogUnavailable
from conveyor.log.compaction import Background
from conveyor.log.kafka_compact import DEFAULT_AFTER, KafkaCompactor
from conveyor.log.stream_base import duration_ms
from conveyor.log.base import (History, LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus, Record,
                               StartAt)

DRY_RUN_PREFIX = "conveyor-dry-run."    # consumer groups of dry runs (deleted at their close)
log = logging.getLogger("conveyor.kafka")

OURS = ("partitions", "replication.factor", "consumer")
COMPACT_EVERY_S = 5.0         # how often apply's compaction thread asks whether a pass is due
DEFAULT_PARTITIONS = 6        # see the module docstring: per-key order, members, never lowered
MAX_REPLICATION = 3           # the default replication factor is min(this, brokers)
METADATA_TIMEOUT_S = 10.0
METADATA_STEP_S = 1.0         # a metadata lookup is retried this often until METADATA_TIMEOUT_S
APPEND_WAIT_S = 30.0          # a full producer queue (broker down) this long: LogUnavailable
KEEPALIVE_POLLS = 100         # events served per keepalive() at most
IDENTITY_RECHECK_S = 2.0      # a reader checks the topic id this long after its last transport error
# A commit refused because the group moved to a new generation (a member joined or left) is made
# again after taking part in the rebalance (retry.KAFKA_REJOIN_ATTEMPTS, _PAUSE_S).
REJOIN = {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
          KafkaError.UNKNOWN_MEMBER_ID}
# librdkafka's own lines (syslog levels up to this one) are passed to our logger at INFO.
RDKAFKA_LOG_LEVEL = 6
PRODUCER_DEFAULTS = {"enable.idempotence": True, "acks": "all", "linger.ms": 10,
                     # 0 = never time a record out: during a broker outage librdkafka keeps
                     # retrying (in order, without duplicates: idempotence) and flush() says
                     # LogUnavailable until the broker acknowledged.
                     "message.timeout.ms": 0,
                     # No compression by default: a consumer holds a fetched batch and its
                     # decompressed copy (apply's peak RSS 81 MiB with lz4, 65 without, for the
                     # same keys/s). Over a slow link, pass compression.type=lz4.
                     "batch.size": 1_000_000, "compression.type": "none",
                     "queue.buffering.max.messages": 500_000,
                     # bounded memory: at most this much waits in the producer's queue
                     "queue.buffering.max.kbytes": 4096,
                     # only failures need a report (a Python callback per record costs ~1 µs)
                     "delivery.report.only.error": True}


def parse(uri: str, opts: dict[str, str]) -> tuple[str, str, dict, dict, dict]:
    """(bootstrap servers, topic, librdkafka properties, topic configs, creation settings)."""
    rest = uri.split("://", 1)[1]
    hosts, _, topic = rest.partition("/")
    topic = topic.strip("/")
    if not hosts or not topic:
        raise LogError(f"Kafka log URI {uri!r}: expected kafka://host:port[,host:port]/topic")
    secrets = tuple(v for k, v in opts.items() if k in SECRET_OPTS and v)
    props: dict = {"bootstrap.servers": hosts, "log_level": RDKAFKA_LOG_LEVEL, "logger": _RDKAFKA_LOG,
                   "error_cb": _SecurityWatch(secrets)}
    topic_cfg: dict = {"cleanup.policy": "compact"}
    create: dict = {}           # explicit creation settings only; ensure_topic fills the defaults
    for k, v in opts.items():
        if k in ("consumer", "compact_after"):
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
        watch = conf.get("error_cb")
        if isinstance(watch, _SecurityWatch):
            text = watch.masked(text)
        raise ConfigError(f"Kafka log settings refused: {_unreadable_file(text, conf) or text}") from e


def _unreadable_file(text: str, conf: dict) -> str | None:
    """librdkafka's "ssl.ca.location failed: <OpenSSL code>" said in words: which option, which
    file, and whether it is missing or just not PEM of the right kind."""
    m = re.search(r"(ssl\.[a-z.]*location) failed", text)
    if not m or m.group(1) not in conf:
        return None
    prop, path = m.group(1), str(conf[m.group(1)])
    why = ("no such file" if not os.path.exists(path) else
           "not readable as a PEM key, or a wrong ssl.key.password" if prop == "ssl.key.location" else
           "not readable as PEM")
    return f"{prop}={path}: {why}"


class _RdkafkaLog:
    """librdkafka's logger: its lines (even its ERRORs about a broker that is restarting, which it
    recovers from by itself) are details, shown with -v; what matters reaches the user as our own
    errors (LogUnavailable, LogError)."""

    def log(self, level: int, msg: str, *args) -> None:
        log.log(logging.DEBUG if level <= logging.DEBUG else logging.INFO, msg, *args)


_RDKAFKA_LOG = _RdkafkaLog()


def _weak(method):
    """A librdkafka callback that does not keep its object alive. A bound method would make a
    cycle (object -> client -> callback -> object): an object dropped without close() would then
    be freed by the cyclic GC at a random moment, and a consumer closed from there can hang."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        m = ref()
        return m(*args) if m is not None else None
    return call


def _error_cb(err: KafkaError) -> None:
    log.info("kafka client: %s", err)


# Log options whose values are secrets: never part of any message.
SECRET_OPTS = ("sasl.password", "ssl.key.password", "ssl.keystore.password",
               "sasl.oauthbearer.client.secret")
UNTRUSTED = ("TLS: the broker's certificate is not trusted: ssl.ca.location must name the CA that "
             "signed it")
# Python's ssl words for what librdkafka's "certificate verify failed" leaves out.
VERIFY_CAUSES = (
    ("certificate has expired", "TLS: the broker's certificate has expired"),
    ("mismatch", "TLS: the broker's certificate is not for this host name or address"),
    ("not yet valid", "TLS: the broker's certificate is not valid yet"),
)
# The broker's TLS alerts when it refuses our client certificate (mutual TLS).
CLIENT_CERT_ALERTS = ("alert bad certificate", "alert certificate required", "alert unknown ca",
                      "alert handshake failure")


def _security_cause(err: KafkaError) -> str | None:
    """What is wrong when ``err`` is a security failure that waiting cannot cure, else None.
    librdkafka retries these for ever and reports them only through error_cb."""
    code, text = err.code(), err.str()
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return ("SASL authentication failed: wrong sasl.username or sasl.password, or "
                "sasl.mechanism not enabled for this user on the broker")
    if "certificate verify failed" in text:
        return UNTRUSTED
    if any(a in text for a in CLIENT_CERT_ALERTS):
        return ("TLS: the broker refused the client certificate (none given, or not signed by a CA "
                "it trusts): set ssl.certificate.location and ssl.key.location")
    if code == KafkaError._SSL:
        return f"TLS failed: {text.split('(after', 1)[0].strip()}"
    return None


class _SecurityWatch:
    """The client's error_cb: passes every error to our logger, and keeps the first security
    failure (wrong password, untrusted certificate) so that opening the log says it in one line
    instead of waiting for a broker that will never let us in."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = secrets
        self.cause: str | None = None

    def __call__(self, err: KafkaError) -> None:
        _error_cb(err)
        if self.cause is None:
            self.cause = _security_cause(err)
            if self.cause == UNTRUSTED:
                m = re.search(r"ssl://([^/\s]+)/", err.str())
                self.broker = m.group(1) if m else None

    broker: str | None = None          # the broker whose certificate was not trusted

    def masked(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


# Errors that a broker coming back (or a group settling) cures: the call is made again.
TRANSIENT = {getattr(KafkaError, n) for n in (
    "_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_TIMED_OUT_QUEUE", "_WAIT_COORD",
    "_MSG_TIMED_OUT", "_RESOLVE", "_WAIT_CACHE", "_UNKNOWN_PARTITION", "_MAX_POLL_EXCEEDED",
    "_STATE", "_ASSIGNMENT_LOST", "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR",
    "COORDINATOR_LOAD_IN_PROGRESS", "REQUEST_TIMED_OUT", "NETWORK_EXCEPTION",
    "LEADER_NOT_AVAILABLE", "NOT_LEADER_FOR_PARTITION", "REBALANCE_IN_PROGRESS",
    "UNKNOWN_MEMBER_ID", "ILLEGAL_GENERATION", "NOT_ENOUGH_REPLICAS", "KAFKA_STORAGE_ERROR")}
UNKNOWN_TOPIC = {KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART,
                 KafkaError.UNKNOWN_TOPIC_ID}


def _transient(err) -> bool:
    return isinstance(err, KafkaError) and not err.fatal() and (
        err.retriable() or err.code() in TRANSIENT)


def _failure(e: KafkaException, what: str) -> LogError:
    """LogUnavailable for a transient failure (call again), LogError otherwise."""
    err = e.args[0] if e.args else e
    text = err.str() if isinstance(err, KafkaError) else str(err)
    if _transient(err):
        return LogUnavailable(f"{what}: {text} (Kafka unreachable or restarting)")
    return LogError(f"{what}: {text}")


def _client_props(props: dict) -> dict:
    return {k: v for k, v in props.items()}


def _cluster(props: dict):
    """(admin client, cluster metadata). Unreachable -> LogUnavailable; refused (authentication,
    TLS) -> LogError. Asked in short steps so a refusal is seen within a second or so."""
    admin = _made(AdminClient, _client_props(props))
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while True:
        try:
            return admin, admin.list_topics(timeout=METADATA_STEP_S)
        except KafkaException as e:
            admin.poll(0)              # serves error_cb, and hands librdkafka's lines to -v
            _refused(props)
            if time.monotonic() >= deadline or not _transient(e.args[0] if e.args else e):
                raise _failure(e, f"cannot reach Kafka at {props['bootstrap.servers']}") from e


def _refused(props: dict) -> None:
    """LogError (no waiting) when the client met a security failure."""
    watch = props.get("error_cb")
    if isinstance(watch, _SecurityWatch) and watch.cause:
        cause = watch.cause
        if cause == UNTRUSTED and watch.broker:
            cause = _untrusted_cause(watch.broker, props)
        raise LogError(watch.masked(f"Kafka at {props['bootstrap.servers']} refused the "
                                    f"connection: {cause}"))


def _untrusted_cause(broker: str, props: dict) -> str:
    """Why the broker's certificate failed verification (expired, another host, unknown CA):
    librdkafka does not say, so one TLS handshake is made with Python's ssl just to ask."""
    host, _, port = broker.rpartition(":")
    try:
        ctx = ssl.create_default_context(cafile=props.get("ssl.ca.location"))
        ctx.check_hostname = props.get("ssl.endpoint.identification.algorithm", "https") != "none"
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=host.strip("[]")):
                return UNTRUSTED
    except ssl.SSLCertVerificationError as e:
        message = e.verify_message or ""
        return next((cause for needle, cause in VERIFY_CAUSES if needle in message), UNTRUSTED)
    except (OSError, ValueError):
        return UNTRUSTED


def _topic_id(admin: AdminClient, topic: str) -> str:
    """The topic's id (changes when it is deleted and recreated); LogLost if it is gone."""
    fut = admin.describe_topics(TopicCollection([topic]),
                                request_timeout=METADATA_TIMEOUT_S)[topic]
    try:
        return str(fut.result(METADATA_TIMEOUT_S).topic_id)
    except KafkaException as e:
        err = e.args[0] if e.args else None
        if isinstance(err, KafkaError) and err.code() in UNKNOWN_TOPIC:
            raise LogLost(f"Kafka topic {topic!r} was deleted") from e
        raise _failure(e, f"cannot describe Kafka topic {topic!r}") from e


def _offsets(admin: AdminClient, topic: str, parts, earliest: bool = False) -> dict[int, int]:
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
        raise _failure(e, f"cannot read the offsets of Kafka topic {topic!r}") from e
    return out


def _check_same_log(admin: AdminClient, topic: str, log_id: str, seen: dict[int, int]) -> None:
    """LogLost when the topic has another id now, or holds fewer records than this process saw
    in it (``seen``: partition -> the end it had)."""
    now = _topic_id(admin, topic)
    if log_id and now != log_id:
        raise LogLost(f"Kafka topic {topic!r} was deleted and recreated (id {log_id} is now {now})")
    for p, end in _offsets(admin, topic, seen).items():
        if end < seen[p]:
            raise LogLost(f"Kafka topic {topic!r} partition {p} ends at offset {end}, "
                          f"below the {seen[p]} already seen: records were removed")


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
            raise _failure(e, f"cannot create Kafka topic {topic!r}") from e
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
            raise _failure(e, f"cannot look up Kafka topic {topic!r}") from e
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
        raise _failure(e, f"cannot read the settings of Kafka topic {topic!r}") from e
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


def _data(msgs, topic: str, on_trouble=None):
    """The data messages of a consume() batch. A transient error (a broker down or restarting:
    librdkafka reconnects by itself) is logged and passed to ``on_trouble``; end-of-partition is
    no error; anything else is LogError."""
    for m in msgs:
        err = m.error()
        if err is None:
            yield m
        elif err.code() == KafkaError._PARTITION_EOF:
            continue
        elif _transient(err) or err.code() in UNKNOWN_TOPIC:
            log.info("kafka consumer: %s", err)
            if on_trouble is not None:
                on_trouble(err)
        else:
            raise LogError(f"Kafka consume from {topic!r} failed: {err}")


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
        self._admin = _made(AdminClient, _client_props(props))
        self.log_id = _topic_id(self._admin, self.topic)
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
        self._removed.observe(_offsets(self._admin, self.topic, range(self.partitions)))
        if self.partitions < DEFAULT_PARTITIONS and "partitions" not in create:
            self.warnings.append(
                f"Kafka topic {self.topic!r} existed with {self.partitions} partition(s): at most "
                f"{self.partitions} apply process(es) of a group share its work (a topic's "
                "partitions cannot be lowered, and raising them breaks per-key order: use a new "
                "topic to spread wider)")
        conf = {**PRODUCER_DEFAULTS, **props, "error_cb": _weak(self._client_error)}
        self.producer = _made(Producer, conf)
        # Room for the record's key and Kafka's per-record and batch overhead.
        self.max_record_bytes = int(conf.get("message.max.bytes", 1_000_000)) * 9 // 10
        self._errors: list[str] = []
        self._unflushed = 0
        # partition -> an end offset the topic had (read from the broker every check): an end
        # below it later means the broker lost records (delivery reports come for errors only)
        self._ends: dict[int, int] = {}
        self._troubled = False              # a transport failure since the last identity check
        self._on_delivery = _weak(self._delivered)

    def _client_error(self, err: KafkaError) -> None:
        _error_cb(err)
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
                raise _failure(e, f"Kafka produce to {self.topic!r} failed") from e
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

    def check_identity(self) -> None:
        """LogLost when the topic was recreated, ends below an end it had, or starts past
        records too young for its cleanup to have removed them: records are missing."""
        _check_same_log(self._admin, self.topic, self.log_id, self._ends)
        parts = range(self.partitions)
        ends = _offsets(self._admin, self.topic, parts)
        for p, end in ends.items():
            self._ends[p] = max(self._ends.get(p, 0), end)
        if self._removed.window is not None:
            why = self._removed.check(_offsets(self._admin, self.topic, parts, earliest=True))
            if why:
                raise LogLost(f"Kafka topic {self.topic!r} {why}")
            self._removed.observe(ends)

    def adopt_new_log(self) -> None:
        self.partitions = ensure_topic(self._props, self.topic, self._cfg, self._create)
        self.log_id = _topic_id(self._admin, self.topic)
        self._ends.clear()
        self._removed.forget()
        self._removed.observe(_offsets(self._admin, self.topic, range(self.partitions)))
        self._troubled = False

    def history(self) -> History:
        self.flush()
        consumer = _made(Consumer, {**self._props, "group.id": f"{self.topic}-history",
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
            raise _failure(e, f"cannot read the offsets of Kafka topic {self.topic!r}") from e
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
                    raise _failure(e, f"Kafka consume from {self.topic!r} failed") from e
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
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed",
                 *, peek: bool = False) -> None:
        hosts, self.topic, self.props, cfg, create = parse(uri, opts)
        self.uri = f"kafka://{hosts}/{self.topic}"
        # A dry run reads in a group of its own, seeded with the real group's committed offsets
        # and deleted at close: the real group sees no new member (no rebalance), no commit.
        self.peeked = group if peek else None
        group = f"{DRY_RUN_PREFIX}{group}.{uuid.uuid4().hex[:12]}" if peek else group
        self.group = group
        self._cfg, self._create = cfg, create
        ensure_topic(self.props, self.topic, cfg, create)
        self._admin = _made(AdminClient, _client_props(self.props))
        self.log_id = _topic_id(self._admin, self.topic)
        self.warnings, self.damaged = [], []
        # A member id of its own per process, so that a second apply joins the group instead of
        # fencing the first. Static membership (a restarted apply takes its partitions back at
        # once) only when the user names the consumer, and so promises to run one process per name.
        named = opts.get("consumer")
        self.consumer = named or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        static = {"group.instance.id": f"{self.topic}-{group}-{named}"} if named else {}
        self._c = _made(Consumer, {**static, "client.id": f"conveyor-{self.consumer}",
                                   "session.timeout.ms": 10_000,
                                   # Cooperative: a member gives up only the partitions that move,
                                   # between two polls, so its batch in flight is committed first.
                                   "partition.assignment.strategy": "cooperative-sticky",
                                   # bounded memory: prefetch at most this much, fetch at most
                                   # this much at once (blocks are up to 1 MB records), and fetch
                                   # again as soon as apply took some (the 1 s default backoff
                                   # left apply waiting on an empty queue)
                                   "queued.max.messages.kbytes": 2048,
                                   "fetch.max.bytes": 2 * 1024 * 1024,
                                   "fetch.queue.backoff.ms": 5,
                                   **self.props, "error_cb": _weak(self._client_error),
                                   "group.id": group, "enable.auto.commit": False,
                                   "enable.auto.offset.store": False,
                                   "auto.offset.reset": "earliest"})
        self._start = start
        self._subscribed = False
        self._assigned: set[int] = set()
        self._paused = False                   # keepalive() paused the assigned partitions
        self._swallowed: dict[int, int] = {}   # partition -> first offset polled while paused
        self._committed: dict[int, int] = {}   # partition -> highest offset this process committed
        self._troubled = False                 # a transport failure since the last identity check
        self._last_trouble = 0.0
        self._dlq: _OneRecord | None = None
        if peek:
            self._seed_from(self.peeked)
        self._compaction = None if peek else self._start_compaction(opts)

    def _seed_from(self, group: str) -> None:
        """The dry run's group starts where ``group`` committed (partitions it never committed
        start at the earliest record, as they would for it)."""
        real = _made(Consumer, {**self.props, "group.id": group, "enable.auto.commit": False})
        try:
            md = self._admin.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
            tps = self._tps(sorted(md.topics[self.topic].partitions))
            at = [tp for tp in real.committed(tps, timeout=METADATA_TIMEOUT_S) if tp.offset >= 0]
            if at:
                self._c.commit(offsets=at, asynchronous=False)
        except KafkaException as e:
            raise _failure(e, f"cannot read group {group!r}'s position for the dry run") from e
        finally:
            real.close()

    def _start_compaction(self, opts: dict[str, str]) -> Background | None:
        """On a compacted topic, a thread that replaces superseded blocks (kafka_compact.py)."""
        after = duration_ms(opts.get("compact_after", DEFAULT_AFTER), "compact_after") / 1000
        try:
            if "compact" not in cleanup_policy(self._admin, self.topic):
                return None
        except LogError as e:
            log.info("kafka: no block compaction (%s)", e)
            return None
        self._compactor = KafkaCompactor(self.props, {**PRODUCER_DEFAULTS, **self.props},
                                         self.topic, after)
        return Background(lambda: self._compactor.run(sorted(self._assigned)), COMPACT_EVERY_S,
                          f"compaction of Kafka topic {self.topic!r}", self._compactor.stopping)

    def _client_error(self, err: KafkaError) -> None:
        _error_cb(err)
        if _transient(err):
            self._trouble(err)

    # -- membership ----------------------------------------------------------------------------
    def _on_assign(self, consumer, partitions) -> None:
        """Partitions added to this member (cooperative: only the new ones)."""
        if self._start != "committed" and partitions:
            partitions = self._resolved(self._positions(partitions, self._start))
            self._start = "committed"              # only the first assignment is moved
            consumer.incremental_assign(partitions)
            # The group's position is what was asked for, even if nothing is read before a restart.
            consumer.commit(offsets=partitions, asynchronous=False)
        else:
            consumer.incremental_assign(partitions)
        if self._paused and partitions:            # keepalive(): nothing is delivered for now
            consumer.pause(partitions)
        elif partitions:                           # librdkafka keeps a partition's pause across
            consumer.resume(partitions)            # a loss and a new assignment
        self._assigned |= {tp.partition for tp in partitions}
        log.info("kafka: member %s assigned partitions %s of %r", self.consumer,
                 sorted(tp.partition for tp in partitions), self.topic)

    def _on_revoke(self, consumer, partitions) -> None:
        """Runs inside poll(), i.e. between batches: the batch before was written and committed.
        During keepalive() the batch held is not written yet: owned() drops its records of these
        partitions and their new owner replays them from the committed position."""
        consumer.incremental_unassign(partitions)
        for tp in partitions:
            self._assigned.discard(tp.partition)
            self._swallowed.pop(tp.partition, None)
        log.info("kafka: member %s gave up partitions %s of %r", self.consumer,
                 sorted(tp.partition for tp in partitions), self.topic)

    def held(self) -> list[str]:
        return [str(p) for p in sorted(self._assigned)]

    def owned(self, records: list[Record]) -> list[Record]:
        return [r for r in records if int(r.partition) in self._assigned]

    # -- positioning ---------------------------------------------------------------------------
    def _resolved(self, partitions):
        """Logical offsets (beginning/end) as numbers, so they can be committed."""
        out = []
        for tp in partitions:
            if tp.offset in (OFFSET_BEGINNING, OFFSET_END):
                low, high = self._c.get_watermark_offsets(
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
                found = self._c.offsets_for_times(asked, timeout=METADATA_TIMEOUT_S)
            except KafkaException as e:
                raise _failure(e, "Kafka offsets_for_times failed") from e
            return [TopicPartition(p.topic, p.partition, p.offset if p.offset >= 0 else OFFSET_END)
                    for p in found]
        raise LogError(f"cannot seek to {where!r}")

    def _tps(self, parts) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    def seek(self, where: StartAt) -> None:
        if where == "committed":
            return
        if self._assigned:
            for tp in self._positions(self._tps(self._assigned), where):
                self._c.seek(tp)
        else:
            self._start = where

    # -- reading -------------------------------------------------------------------------------
    def _trouble(self, err) -> None:
        self._troubled = True
        self._last_trouble = time.monotonic()

    def _recheck_identity(self) -> None:
        """After an outage, once the client has been quiet for a while: is it the same log? Still
        unreachable is no error here (the consumer reconnects by itself); LogLost is."""
        if not self._troubled or time.monotonic() - self._last_trouble < IDENTITY_RECHECK_S:
            return
        try:
            self.check_identity()
            self._troubled = False
        except LogUnavailable as e:
            log.info("kafka: identity not checked yet: %s", e)
            self._last_trouble = time.monotonic()

    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        self._recheck_identity()
        if not self._subscribed:
            revoke = _weak(self._on_revoke)
            self._c.subscribe([self.topic], on_assign=_weak(self._on_assign), on_revoke=revoke,
                              on_lost=revoke)
            self._subscribed = True
        self._resume()
        try:
            first = self._c.poll(timeout)
            if first is None:
                return []
            msgs = [first] + (self._c.consume(max_records - 1, 0) if max_records > 1 else [])
        except KafkaException as e:
            raise _failure(e, f"Kafka consume from {self.topic!r} failed") from e
        out = []
        for m in _data(msgs, self.topic, self._trouble):
            out.append(Record(str(m.partition()), m.offset(), m.key() or b"", m.value() or b"",
                              m.timestamp()[1]))
        return out

    def keepalive(self) -> None:
        """Poll with every assigned partition paused: the member stays in the group (heartbeats,
        rebalances, max.poll.interval.ms) and nothing is delivered. Should a record come anyway,
        its partition is sought back to it when reading resumes, so nothing is skipped."""
        if not self._subscribed:
            return
        if not self._paused:
            self._c.pause(self._tps(self._assigned))
            self._paused = True
        try:
            for _ in range(KEEPALIVE_POLLS):
                m = self._c.poll(0)
                if m is None:
                    break
                if m.error() is None and m.partition() in self._assigned:
                    p = m.partition()
                    self._swallowed[p] = min(self._swallowed.get(p, m.offset()), m.offset())
                elif m.error() is not None and m.error().code() != KafkaError._PARTITION_EOF:
                    log.info("kafka consumer (waiting): %s", m.error())
                    self._trouble(m.error())
        except KafkaException as e:
            raise _failure(e, f"Kafka keepalive for group {self.group!r} failed") from e

    def _resume(self) -> None:
        if not self._paused:
            return
        self._c.resume(self._tps(self._assigned))
        self._paused = False
        for p, offset in self._swallowed.items():
            self._c.seek(TopicPartition(self.topic, p, offset))
        self._swallowed.clear()

    def commit(self, records: list[Record]) -> None:
        if not records:
            return
        last: dict[int, int] = {}
        for r in records:
            p = int(r.partition)
            last[p] = max(last.get(p, -1), r.offset)
        for attempt in range(retry.KAFKA_REJOIN_ATTEMPTS):
            try:
                return self._commit(last)
            except KafkaException as e:
                err = e.args[0] if e.args else None
                if (not isinstance(err, KafkaError) or err.code() not in REJOIN
                        or attempt == retry.KAFKA_REJOIN_ATTEMPTS - 1):
                    raise _failure(e, f"Kafka commit for group {self.group!r} failed") from e
                # A rebalance under way: join it (no record is delivered meanwhile), then
                # commit the partitions still ours.
                time.sleep(retry.KAFKA_REJOIN_PAUSE_S)
                self.keepalive()

    def _commit(self, last: dict[int, int]) -> None:
        gone = sorted(set(last) - self._assigned)
        if gone:
            # Another member holds them now and replays from the group's committed position;
            # committing here would move its position under it.
            log.info("kafka: not committing partitions %s: assigned to another member", gone)
        offsets = [TopicPartition(self.topic, p, o + 1) for p, o in last.items() if p not in gone]
        if not offsets:
            return
        self._c.commit(offsets=offsets, asynchronous=False)
        for tp in offsets:
            self._committed[tp.partition] = max(self._committed.get(tp.partition, 0), tp.offset)

    # -- identity ------------------------------------------------------------------------------
    def check_identity(self) -> None:
        _check_same_log(self._admin, self.topic, self.log_id, self._committed)

    def adopt_new_log(self) -> None:
        """Read the new topic from its beginning (its old committed offsets mean nothing)."""
        ensure_topic(self.props, self.topic, self._cfg, self._create)
        self.log_id = _topic_id(self._admin, self.topic)
        self._committed.clear()
        self._troubled = False
        self.seek("earliest")

    def replayable(self) -> tuple[bool, str]:
        """A compacted topic keeps every key's latest record; with cleanup.policy=delete, records
        removed by retention (a low watermark above 0) mean it does not."""
        policy = cleanup_policy(self._admin, self.topic)
        try:
            parts = sorted(self._c.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
                           .topics[self.topic].partitions)
            removed = 0
            for p in parts:
                low, _high = self._c.get_watermark_offsets(TopicPartition(self.topic, p),
                                                           timeout=METADATA_TIMEOUT_S)
                removed += low
        except KafkaException as e:
            raise _failure(e, f"cannot read the settings of Kafka topic {self.topic!r}") from e
        if "delete" in policy and removed:
            return False, (f"Kafka topic {self.topic!r} (cleanup.policy={policy}) no longer holds "
                           f"its first {removed} records: retention removed them")
        return True, ""

    # -- status --------------------------------------------------------------------------------
    def status(self) -> LogStatus:
        """Every partition of the topic, so the lag is the whole group's."""
        try:
            md = self._admin.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
            parts = sorted(md.topics[self.topic].partitions)
            committed = self._c.committed(self._tps(parts), timeout=METADATA_TIMEOUT_S)
        except KafkaException as e:
            raise _failure(e, f"Kafka status of {self.topic!r} failed") from e
        highs = _offsets(self._admin, self.topic, parts)
        lows = _offsets(self._admin, self.topic, parts, earliest=True)
        out = []
        for tp in committed:
            pos, high = (tp.offset if tp.offset >= 0 else None), highs[tp.partition]
            out.append(PartitionStatus(str(tp.partition), pos, high,
                                       max(high - (pos if pos is not None else lows[tp.partition]), 0)))
        held = sum(highs[p] - lows[p] for p in parts)
        return LogStatus(self.uri, self.group, out,
                         f"at most {held} records between the partitions' low and high watermarks "
                         "(compaction removes records inside that range)")

    def dead_letter(self, record: Record, reason: str) -> None:
        topic = f"{self.topic}.dead-letter"
        if self._dlq is None:
            ensure_topic(self.props, topic, {"cleanup.policy": "delete"}, self._create)
            self._dlq = _OneRecord(_made(Producer, {**PRODUCER_DEFAULTS, **self.props}), topic)
        self._dlq.send((record.partition, record.offset, reason), record.key, record.value,
                       "a dead letter",
                       headers=[("reason", reason.encode()), ("group", self.group.encode()),
                                ("from", f"{record.partition}/{record.offset}".encode())])

    def close(self) -> None:
        if self._compaction is not None and self._compaction.stop():
            self._compactor.close()          # (never under a pass still running)
        try:
            self._c.close()
        except (KafkaException, RuntimeError):
            pass
        if self._dlq is not None:
            self._dlq.producer.flush(METADATA_TIMEOUT_S)
        if self.peeked is not None:
            try:
                for f in self._admin.delete_consumer_groups([self.group]).values():
                    f.result(timeout=METADATA_TIMEOUT_S)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:   # never committed: none
                    log.warning("kafka: could not delete the dry run's group %s: %s", self.group, e)


class _OneRecord:
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
        self.producer = _made(Producer, {**PRODUCER_DEFAULTS, **self.props, "linger.ms": 0})
        self._out = _OneRecord(self.producer, self.topic)

    def put(self, name: str, doc: dict) -> None:
        text = json.dumps(doc, sort_keys=True)
        self._out.send((name, text), name.encode(), text.encode(), repr(name))

    def get(self, name: str) -> dict | None:
        return self.documents().get(name)

    def documents(self) -> dict[str, dict]:
        """Every name's latest document: the meta topic read from its start to its end."""
        c = _made(Consumer, {**self.props, "group.id": "conveyor-meta-reader",
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
            raise _failure(e, f"cannot read {self.topic!r}") from e
        finally:
            c.close()

    def close(self) -> None:
        self.producer.flush(METADATA_TIMEOUT_S)
