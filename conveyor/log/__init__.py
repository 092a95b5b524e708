"""Open a log by URI: ``file:PATH``, ``redis://host:port/db`` / ``rediss://``, ``kafka://hosts/topic``.

``options`` are backend settings passed through unchanged (``--log-opt KEY=VALUE``): librdkafka
properties for Kafka, ``stream=``/``partitions=`` for Redis Streams, ``segment_bytes=`` for files.
Query parameters of the URI are merged into them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from urllib.parse import parse_qsl

from conveyor.endpoints import mask_uri
from conveyor.errors import ConfigError, LogLost, LogUnavailable
from conveyor.log.base import (LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus,
                               Record, StartAt)

__all__ = ["LogReader", "LogWriter", "MetaStore", "LogStatus", "PartitionStatus", "Record",
           "StartAt", "LogLost", "LogUnavailable", "open_writer", "open_reader", "open_meta",
           "split_uri", "log_exists"]


@dataclass(frozen=True)
class Backend:
    """A log backend: its package, imported when a URI of its scheme is opened (librdkafka loads
    only for Kafka), which exposes ``Writer``, ``Reader``, ``Meta``, ``log_exists`` and
    ``check_uri``; and the options it reads (None: every other option goes to librdkafka, which
    refuses properties it does not know). Any other option is an error, never silently ignored."""

    module: str
    options: frozenset[str] | None

    def load(self):
        return importlib.import_module(self.module)


_STREAMS = Backend("conveyor.log.streams", frozenset({
    "stream", "partitions", "consumer", "claim_idle_ms", "block_ms", "trim", "retention",
    "lease_ms", "cacert", "cert", "key", "insecure"}))
BACKENDS: dict[str, Backend] = {
    "file": Backend("conveyor.log.file", frozenset({"segment_bytes", "retention", "cleanup",
                                                     "consumer"})),
    "redis": _STREAMS,
    "rediss": _STREAMS,
    "kafka": Backend("conveyor.log.kafka", None),
}
USAGE = "file:PATH, redis://host:port/db or kafka://host:port/topic"


def split_uri(uri: str, options: dict[str, str] | None = None) -> tuple[str, str, dict[str, str]]:
    """(scheme, URI without our query, options merged from the query and ``options``), checked
    once here: the scheme, the options the backend reads, the URI's shape."""
    _backend, scheme, base, opts = _resolve(uri, options)
    return scheme, base, opts


def _resolve(uri: str, options: dict[str, str] | None) -> tuple[Backend, str, str, dict[str, str]]:
    if not uri or ":" not in uri:
        raise ConfigError(f"log URI {uri!r} must be {USAGE}")
    scheme = uri.split(":", 1)[0].lower()
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise ConfigError(f"log URI {mask_uri(uri)!r}: unknown scheme {scheme!r} (use {USAGE})")
    opts: dict[str, str] = {}
    base = uri
    if scheme != "file" and "?" in uri:
        base, query = uri.split("?", 1)
        opts.update(parse_qsl(query, keep_blank_values=True))
    opts.update(options or {})
    known = backend.options
    unknown = sorted(set(opts) - known) if known is not None else []
    if unknown:
        raise ConfigError(f"log option {unknown[0]!r} means nothing to the {scheme} log "
                          f"(it knows: {', '.join(sorted(known)) or 'no options'})")
    backend.load().check_uri(base)
    return backend, scheme, base, opts


def open_writer(uri: str, options: dict[str, str] | None = None) -> LogWriter:
    backend, _scheme, base, opts = _resolve(uri, options)
    return backend.load().Writer(base, opts)


def open_reader(uri: str, group: str, options: dict[str, str] | None = None,
                start: StartAt = "committed", *, observe: bool = False,
                peek: bool = False) -> LogReader:
    """A reader for consumer ``group``, positioned at ``start`` (the group's committed position by
    default; where the group has none yet, the earliest record).

    ``observe``: the reader only answers ``status()`` and must not create or move the group (a
    Redis Stream group created by a mistyped ``status --group`` would hold back trimming for good).

    ``peek`` (apply --dry-run): the group's saved position is never moved, whatever ``start``
    says: the reader starts from it (or from ``start``) on a position of its own (a file log's
    copy, a Redis Streams or Kafka group of its own made from the real one, gone at close)."""
    backend, _scheme, base, opts = _resolve(uri, options)
    return backend.load().Reader(base, group, opts, start, observe=observe, peek=peek)


def open_meta(uri: str, options: dict[str, str] | None = None) -> MetaStore:
    backend, _scheme, base, opts = _resolve(uri, options)
    return backend.load().Meta(base, opts)


def log_exists(uri: str, options: dict[str, str] | None = None) -> bool:
    """Whether anything (capture, apply) has created this log yet; creates nothing itself."""
    backend, _scheme, base, opts = _resolve(uri, options)
    return backend.load().log_exists(base, opts)
