"""Open a log by URI: ``file:PATH``, ``redis://host:port/db`` / ``rediss://``, ``kafka://hosts/topic``.

``options`` are backend settings passed through unchanged (``--log-opt KEY=VALUE``): librdkafka
properties for Kafka, ``stream=``/``partitions=`` for Redis Streams, ``segment_bytes=`` for files.
Query parameters of the URI are merged into them.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from conveyor.endpoints import mask_uri
from conveyor.errors import ConfigError
from conveyor.errors import LogLost, LogUnavailable  # noqa: F401 - re-exported
from conveyor.log.base import (LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus,
                               Record, StartAt)

__all__ = ["LogReader", "LogWriter", "MetaStore", "LogStatus", "PartitionStatus", "Record",
           "StartAt", "open_writer", "open_reader", "open_meta", "split_uri", "log_exists"]


# Options each backend reads; anything else is an error, never silently ignored. Kafka passes every
# other option to librdkafka, which refuses properties it does not know.
KNOWN_OPTIONS: dict[str, set[str] | None] = {
    "file": {"segment_bytes", "retention", "cleanup", "consumer"},
    "redis": {"stream", "partitions", "consumer", "claim_idle_ms", "block_ms", "trim", "retention",
              "lease_ms", "cacert", "cert", "key", "insecure"},
    "kafka": None,
}


def split_uri(uri: str, options: dict[str, str] | None = None) -> tuple[str, str, dict[str, str]]:
    """(scheme, URI without our query, options merged from the query and ``options``)."""
    if not uri or ":" not in uri:
        raise ConfigError(f"log URI {uri!r} must be file:PATH, redis://host:port/db or kafka://host:port/topic")
    scheme = uri.split(":", 1)[0].lower()
    opts: dict[str, str] = {}
    base = uri
    if scheme in ("kafka", "redis", "rediss") and "?" in uri:
        base, query = uri.split("?", 1)
        opts.update(parse_qsl(query, keep_blank_values=True))
    opts.update(options or {})
    if scheme not in ("file", "redis", "rediss", "kafka"):
        raise ConfigError(f"log URI {mask_uri(uri)!r}: unknown scheme {scheme!r} "
                          "(use file:PATH, redis://host:port/db or kafka://host:port/topic)")
    known = KNOWN_OPTIONS.get("redis" if scheme == "rediss" else scheme)
    unknown = sorted(set(opts) - known) if known is not None else []
    if unknown:
        raise ConfigError(f"log option {unknown[0]!r} means nothing to the {scheme} log "
                          f"(it knows: {', '.join(sorted(known)) or 'no options'})")
    if scheme == "kafka":
        _check_kafka(uri, base)
    elif scheme != "file":
        try:
            urlsplit(base).port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise ConfigError(f"log URI {mask_uri(uri)!r} is malformed: {e}") from e
    return scheme, base, opts


def _check_kafka(uri: str, base: str) -> None:
    """kafka://host:port[,host:port...]/topic, every port a number."""
    rest = base.split("://", 1)[1] if "://" in base else ""
    hosts, _, topic = rest.partition("/")
    ok = bool(hosts) and bool(topic.strip("/"))
    for hp in hosts.split(","):
        host, _, port = hp.rpartition(":")
        ok &= bool(host) and port.isdigit() and 0 < int(port) < 65536
    if not ok:
        raise ConfigError(f"log URI {mask_uri(uri)!r} is malformed: "
                          "expected kafka://host:port[,host:port...]/topic")


def open_writer(uri: str, options: dict[str, str] | None = None) -> LogWriter:
    scheme, base, opts = split_uri(uri, options)
    if scheme == "file":
        from conveyor.log.file import FileLogWriter
        return FileLogWriter(base, opts)
    if scheme == "kafka":
        from conveyor.log.kafka import KafkaLogWriter
        return KafkaLogWriter(base, opts)
    from conveyor.log.redis_stream import StreamLogWriter
    return StreamLogWriter(base, opts)


def open_reader(uri: str, group: str, options: dict[str, str] | None = None,
                start: StartAt = "committed", *, observe: bool = False,
                peek: bool = False) -> LogReader:
    """A reader for consumer ``group``, positioned at ``start`` (the group's committed position by
    default; where the group has none yet, the earliest record).

    ``observe``: the reader only answers ``status()`` and must not create or move the group (a
    Redis Stream group created by a mistyped ``status --group`` would hold back trimming for good).
    A Kafka consumer joins no group until it subscribes, which ``status()`` never does.

    ``peek`` (apply --dry-run): the group's saved position is never moved, whatever ``start``
    says: the reader starts from it (or from ``start``) on a position of its own (a file log's
    copy, a Redis Streams or Kafka group of its own made from the real one, gone at close)."""
    scheme, base, opts = split_uri(uri, options)
    if scheme == "file":
        from conveyor.log.file import FileLogReader
        return FileLogReader(base, group, opts, start, observe=observe, peek=peek)
    if scheme == "kafka":
        from conveyor.log.kafka import KafkaLogReader
        return KafkaLogReader(base, group, opts, start, peek=peek)
    from conveyor.log.redis_stream import StreamLogReader
    return StreamLogReader(base, group, opts, start, observe=observe, peek=peek)


def open_meta(uri: str, options: dict[str, str] | None = None) -> MetaStore:
    scheme, base, opts = split_uri(uri, options)
    if scheme == "file":
        from conveyor.log.file import FileMetaStore
        return FileMetaStore(base, opts)
    if scheme == "kafka":
        from conveyor.log.kafka import KafkaMetaStore
        return KafkaMetaStore(base, opts)
    from conveyor.log.redis_stream import StreamMetaStore
    return StreamMetaStore(base, opts)


def log_exists(uri: str, options: dict[str, str] | None = None) -> bool:
    """Whether anything (capture, apply) has created this log yet; creates nothing itself."""
    scheme, base, opts = split_uri(uri, options)
    if scheme == "file":
        from conveyor.log.file import log_exists as exists
    elif scheme == "kafka":
        from conveyor.log.kafka import log_exists as exists
    else:
        from conveyor.log.redis_stream import log_exists as exists
    return exists(base, opts)
