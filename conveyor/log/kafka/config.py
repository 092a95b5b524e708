"""A Kafka log's URI and options, the properties its librdkafka clients get, and its tunables."""
from __future__ import annotations

import logging
import weakref

from confluent_kafka import KafkaError, KafkaException

from conveyor.endpoints import mask_uri
from conveyor.errors import ConfigError
from conveyor.log.kafka.security import SECRET_OPTS, SecurityWatch, unreadable_file

DRY_RUN_PREFIX = "conveyor-dry-run."    # consumer groups of dry runs (deleted at their close)
log = logging.getLogger("conveyor.kafka")

OURS = ("partitions", "replication.factor", "consumer")
COMPACT_EVERY_S = 5.0         # how often apply's compaction thread asks whether a pass is due
DEFAULT_PARTITIONS = 6        # see the package docstring: per-key order, members, never lowered
MAX_REPLICATION = 3           # the default replication factor is min(this, brokers)
METADATA_TIMEOUT_S = 10.0
METADATA_STEP_S = 1.0         # a metadata lookup is retried this often until METADATA_TIMEOUT_S
APPEND_WAIT_S = 30.0          # a full producer queue (broker down) this long: LogUnavailable
KEEPALIVE_POLLS = 100         # events served per keepalive() at most
IDENTITY_RECHECK_S = 2.0      # a reader checks the topic id this long after its last transport error
# A commit refused because the group moved to a new generation (a member joined or left), or
# because the broker removed the group (empty after this member was dropped, nothing committed),
# is made again after taking part in the rebalance (retry.KAFKA_REJOIN_ATTEMPTS, _PAUSE_S).
REJOIN = {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
          KafkaError.UNKNOWN_MEMBER_ID, KafkaError.GROUP_ID_NOT_FOUND}
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


def check_uri(uri: str) -> tuple[str, str]:
    """(hosts, topic) of kafka://host:port[,host:port...]/topic, every port a number; else one
    ConfigError."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    hosts, _, topic = rest.partition("/")
    topic = topic.strip("/")
    ok = bool(hosts) and bool(topic)
    for hp in hosts.split(","):
        host, _, port = hp.rpartition(":")
        ok &= bool(host) and port.isdigit() and 0 < int(port) < 65536
    if not ok:
        raise ConfigError(f"log URI {mask_uri(uri)!r} is malformed: "
                          "expected kafka://host:port[,host:port...]/topic")
    return hosts, topic


def parse(uri: str, opts: dict[str, str]) -> tuple[str, str, dict, dict, dict]:
    """(bootstrap servers, topic, librdkafka properties, topic configs, creation settings)."""
    hosts, topic = check_uri(uri)
    secrets = tuple(v for k, v in opts.items() if k in SECRET_OPTS and v)
    props: dict = {"bootstrap.servers": hosts, "log_level": RDKAFKA_LOG_LEVEL, "logger": _RDKAFKA_LOG,
                   "error_cb": SecurityWatch(secrets)}
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


def made(cls, conf: dict):
    """A librdkafka client; a property it refuses is a usage error (one line, exit 2)."""
    try:
        return cls(conf)
    except (KafkaException, ValueError, TypeError) as e:
        err = e.args[0] if e.args else e
        text = err.str() if isinstance(err, KafkaError) else str(err)
        watch = conf.get("error_cb")
        if isinstance(watch, SecurityWatch):
            text = watch.masked(text)
        raise ConfigError(f"Kafka log settings refused: {unreadable_file(text, conf) or text}") from e


class _RdkafkaLog:
    """librdkafka's logger: its lines (even its ERRORs about a broker that is restarting, which it
    recovers from by itself) are details, shown with -v; what matters reaches the user as our own
    errors (LogUnavailable, LogError)."""

    def log(self, level: int, msg: str, *args) -> None:
        log.log(logging.DEBUG if level <= logging.DEBUG else logging.INFO, msg, *args)


_RDKAFKA_LOG = _RdkafkaLog()


def weak(method):
    """A librdkafka callback that does not keep its object alive. A bound method would make a
    cycle (object -> client -> callback -> object): an object dropped without close() would then
    be freed by the cyclic GC at a random moment, and a consumer closed from there can hang."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        m = ref()
        return m(*args) if m is not None else None
    return call


def client_props(props: dict) -> dict:
    return {k: v for k, v in props.items()}
