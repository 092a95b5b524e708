"""Redis Streams log on a *buffer* Redis (neither the source nor the target).

Options (``--log-opt`` or URI query): ``stream`` name prefix (default ``conveyor``), ``partitions``
(default 6, see base.DEFAULT_PARTITIONS: records are spread over streams
``{stream}:0..N-1`` by a hash of their key, so each key's events stay in order in one stream; the
count is stored in ``{stream}:partitions`` when the log is created and cannot change later),
``consumer`` (this apply process's member name; default
unique per process: host-pid-random), ``lease_ms`` (default 10000: how long a partition stream
stays leased to a member that stopped renewing, e.g. was killed), ``trim`` (``compact``, the
default: delete entries every group has acknowledged, older than ``retention`` (default ``1h``) and
superseded by later entries of the same keys, see ``compact``; ``retention``: drop entries older
than ``retention`` (default ``7d``; units s, m, h, d) that no group still needs, so ``apply --from
earliest`` can rebuild a wiped target; ``acked``: drop entries every group has acknowledged;
``none``: keep everything).

Records are stream entries with fields ``k`` (key) and ``v`` (value); a record's position is its
entry id. Reading uses a consumer group; ``commit`` is XACK. Entries delivered but not acknowledged
(a crash) are read again. Several apply processes may share a group: each partition stream is
leased to one of them at a time (see ``leases``).

Faults: a buffer Redis that is restarting, loading or unreachable raises LogUnavailable, and every
call can be made again (the writer keeps its records until a flush stored them all; XACK repeats
harmlessly). The log's identity is a random id in ``{stream}:id``; when it is gone or another (a
restart without persistence, FLUSHALL, deleted streams), or a stream ends before records we stored,
or our group vanished, the log lost records: LogLost.

Modules: ``base`` (the client, error conversion, entry ids, the partition streams and the log's
identity, shared by writer and reader), ``writer``, ``reader`` (with dry runs, trimming, status
and dead letters), ``lag`` (a group's backlog on a stream, counted), ``leases`` (partition streams
shared among the members of a group), ``compact`` (``trim=compact``) and ``meta``.
"""
from __future__ import annotations

from conveyor.log.streams.base import check_uri, log_exists
from conveyor.log.streams.meta import StreamMetaStore
from conveyor.log.streams.reader import StreamLogReader
from conveyor.log.streams.writer import StreamLogWriter

__all__ = ["StreamLogWriter", "StreamLogReader", "StreamMetaStore", "log_exists", "check_uri",
           "Writer", "Reader", "Meta"]

# What conveyor.log's registry opens.
Writer, Reader, Meta = StreamLogWriter, StreamLogReader, StreamMetaStore
