"""Redis Streams log on a *buffer* Redis (neither the source nor the target).

Options (``--log-opt`` or URI query): ``stream`` name prefix (default ``conveyor``), ``partitions``
(default 6, see stream_base.DEFAULT_PARTITIONS: records are spread over streams
``{stream}:0..N-1`` by a hash of their key, so each key's events stay in order in one stream; the
count is stored in ``{stream}:partitions`` when the log is created and cannot change later),
``consumer`` (this apply process's member name; default
unique per process: host-pid-random), ``lease_ms`` (default 10000: how long a partition stream
stays leased to a member that stopped renewing, e.g. was killed), ``trim`` (``retention``, the
default: drop entries older than ``retention`` (default ``7d``; units s, m, h, d) that no group
still needs, so ``apply --from earliest`` can rebuild a wiped target; ``acked``: drop entries every
group has acknowledged; ``none``: keep everything).

Records are stream entries with fields ``k`` (key) and ``v`` (value); a record's position is its
entry id. Reading uses a consumer group; ``commit`` is XACK. Entries delivered but not acknowledged
(a crash) are read again. Several apply processes may share a group: each partition stream is
leased to one of them at a time (see ``stream_leases``).

Faults: a buffer Redis that is restarting, loading or unreachable raises LogUnavailable, and every
call can be made again (the writer keeps its records until a flush stored them all; XACK repeats
harmlessly). The log's identity is a random id in ``{stream}:id``; when it is gone or another (a
restart without persistence, FLUSHALL, deleted streams), or a stream ends before records we stored,
or our group vanished, the log lost records: LogLost.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
import zlib
from datetime import datetime
from urllib.parse import urlsplit

import redis

from conveyor import packed
from conveyor.acl import user_of
from conveyor.endpoints import mask_uri, server_info
from conveyor.errors import ConfigError, LogError, LogLost, LogUnavailable
from conveyor.log.base import (History, LogReader, LogStatus, LogWriter, MetaStore, PartitionStatus, Record,
                               StartAt)
from conveyor.log.stream_base import (MAX_SEQ, StreamLog, client, converted, duration_ms, field_map, id_ms,
                                      info_map, next_id, parse_id, previous_id, stream_names, trimmed_why)
from conveyor.words import text
from conveyor.log.compaction import Background
from conveyor.log.stream_compact import StreamCompactor
from conveyor.log.stream_leases import LEASE_MS, Leases, default_consumer

log = logging.getLogger("conveyor.log")

PIPELINE_CHUNK = 1000
FLUSH_BUFFER_BYTES = 8 * 1024 * 1024    # appended bytes held before a flush
TRIM_INTERVAL_S = 5.0
DEFAULT_RETENTION = "7d"
COMPACT_RETENTION = "1h"          # trim=compact: superseded entries are kept this long
COUNT_PAGE = 200            # entries per XRANGE page when counting a backlog
COUNT_CAP = 10_000          # a backlog up to this long is counted exactly
DRY_RUN_PREFIX = "conveyor-dry-run:"   # groups of dry runs: never waited for by trimming
TRIM_MODES = ("compact", "retention", "acked", "none")


def log_exists(uri: str, opts: dict[str, str]) -> bool:
    r = client(uri, opts)
    try:
        with converted("looking for the log's streams", user_of(r)):
            return bool(r.exists(*stream_names(opts)))
    finally:
        r.close()


class StreamLogWriter(StreamLog, LogWriter):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self._open(uri, opts)
        self._buf: list[tuple[bytes, bytes, bytes]] = []
        self._buf_bytes = 0
        self._last_added: dict[str, str] = {}
        with converted("opening the log", self.user):
            # XADD NOMKSTREAM (6.2+) to a stream that exists: a deleted stream is noticed, not
            # silently recreated empty.
            self._nomkstream = tuple(server_info(self.r).version) >= (6, 2)
            self._existing = {s for s in self.streams if self.r.exists(s)}
        self._ready = True

    takes_blocks = True             # streams are trimmed by age or acknowledgement, not by key

    @property
    def partitions(self) -> int:
        return len(self.streams)

    def partition_of(self, partition_key: bytes) -> int:
        n = len(self.streams)
        return zlib.crc32(partition_key) % n if n > 1 else 0

    def _stream_of(self, key: bytes) -> str:
        return self.streams[self.partition_of(key)]

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        self._buf.append((key, value, partition_key or key))
        self._buf_bytes += len(key) + len(value)
        if len(self._buf) >= 10 * PIPELINE_CHUNK or self._buf_bytes >= FLUSH_BUFFER_BYTES:
            try:
                self.flush()
            except LogError:
                # Not taken: the caller appends this record again (earlier ones stay buffered).
                self._buf.pop()
                self._buf_bytes -= len(key) + len(value)
                raise

    def flush(self, timeout: float = 60.0) -> None:
        """Store the buffered records, a pipeline chunk at a time; a chunk leaves the buffer only
        once stored, so after LogUnavailable flush() again re-sends the rest in order (a chunk
        stored in part is sent again whole: events are whole states, duplicates are harmless)."""
        with self._op("XADD"):
            while self._buf:
                chunk = self._buf[:PIPELINE_CHUNK]
                cmds: list[tuple] = [("GET", self.id_key)]
                targets = []
                for key, value, pkey in chunk:
                    s = self._stream_of(pkey)
                    targets.append(s)
                    if self._nomkstream and s in self._existing:
                        cmds.append(("XADD", s, "NOMKSTREAM", "*", "k", key, "v", value))
                    else:
                        cmds.append(("XADD", s, "*", "k", key, "v", value))
                replies = packed.run(self.r, cmds)
                for r in replies:
                    if isinstance(r, Exception):
                        raise r
                self._stored(replies, targets)
                del self._buf[:len(chunk)]
                self._buf_bytes -= sum(len(k) + len(v) for k, v, _ in chunk)

    def _stored(self, replies: list, targets: list[str]) -> None:
        if replies[0] is None or text(replies[0]) != self.log_id:
            self.check_identity()                # flushed under us: says how
        for s, entry_id in zip(targets, replies[1:]):
            if entry_id is None:
                raise LogLost(f"stream {s} is gone from the buffer Redis {self.uri} (deleted, or "
                              "the buffer was flushed)")
            self._existing.add(s)
            self._last_added[s] = text(entry_id)

    def _check_streams(self, run) -> None:
        for s, last in self._last_added.items():
            try:
                end = text(info_map(run("XINFO", "STREAM", s))["last-generated-id"])
            except redis.ResponseError:
                raise LogLost(f"stream {s} is gone from the buffer Redis {self.uri}") from None
            if parse_id(end) < parse_id(last):
                raise LogLost(f"stream {s} ends at {end} but {last} was stored: the buffer Redis "
                              "restarted from older data")

    def _adopted(self) -> None:
        self._last_added = {}
        self._existing = {s for s in self.streams if self.r.exists(s)}

    def history(self) -> History:
        self.flush()
        with self._op("XINFO STREAM"):
            why = trimmed_why(self.r, self.streams)
        return History(not why, self._history(), "; ".join(why))

    def _history(self):
        for s in self.streams:
            start = "-"
            while True:
                with self._op("XRANGE"):
                    entries = self.r.execute_command("XRANGE", s, start, "+", "COUNT", PIPELINE_CHUNK)
                for entry_id, fields in entries:
                    f = field_map(fields)
                    yield f[b"k"], f[b"v"]
                if len(entries) < PIPELINE_CHUNK:
                    break
                start = next_id(text(entries[-1][0]))

    def close(self) -> None:
        try:
            if not self.refused:            # refused: flushing would only say it again
                self.flush()
        finally:
            self.r.close()


class StreamLogReader(StreamLog, LogReader):
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed",
                 *, observe: bool = False, peek: bool = False) -> None:
        self._open(uri, opts, create=not observe)
        # the raw reply: redis-py's parser drops XAUTOCLAIM's cursor with JUSTID
        self.r.set_response_callback("XAUTOCLAIM", lambda response, **_: response)
        # A dry run reads through a group of its own, made at the real group's position and
        # destroyed at close: the real group's pending entries, leases and members stay as they are.
        self.peeked = group if peek else None
        self.group = f"{DRY_RUN_PREFIX}{group}:{uuid.uuid4().hex[:12]}" if peek else group
        self.observe = observe
        self.consumer = opts.get("consumer") or default_consumer()
        self.trim_mode = opts.get("trim", "compact")
        if self.trim_mode not in TRIM_MODES:
            raise LogError(f"trim={self.trim_mode!r}: use {', '.join(TRIM_MODES)}")
        self.retention_ms = duration_ms(opts.get(
            "retention", COMPACT_RETENTION if self.trim_mode == "compact" else DEFAULT_RETENTION))
        self._compactor: StreamCompactor | None = None
        if "claim_idle_ms" in opts:
            self.warnings.append("log option claim_idle_ms is no longer used: a stream's pending "
                                 "entries are taken over with its lease (see lease_ms)")
        self.damaged = []
        self._last_trim = 0.0
        self._leases = Leases(self.r, self.prefix, group, self.consumer, self.streams,
                              int(opts.get("lease_ms", LEASE_MS)))
        # Streams whose pending entries (delivered, never acknowledged) are read first.
        self._pending_from: dict[str, str] = {}
        self._first_balance = True
        self._seen: dict[str, tuple[int, int]] = {}     # newest entry read per stream
        self._ready = True
        if observe:
            return
        with converted("creating the consumer group", self.user):
            self._create_groups()
        if start != "committed":
            self.seek(start)

    def _create_groups(self) -> None:
        for s in self.streams:
            try:
                self.r.execute_command("XGROUP", "CREATE", s, self.group, self._start_of(s),
                                       "MKSTREAM")
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _start_of(self, stream: str) -> str:
        """Where a new group starts: the beginning; a dry run's group just before the real
        group's first entry not acknowledged (its oldest pending one, else its last delivered)."""
        if self.peeked is None:
            return "0"
        try:
            groups = self.r.execute_command("XINFO", "GROUPS", stream)
        except redis.ResponseError:              # no stream yet
            return "0"
        g = next((info_map(x) for x in groups if text(info_map(x)["name"]) == self.peeked), None)
        if g is None:
            return "0"
        first = self.r.xpending(stream, self.peeked)["min"] if int(g["pending"]) else None
        return previous_id(text(first)) if first is not None else text(g["last-delivered-id"])

    def _check_streams(self, run) -> None:
        if self.observe:
            return
        for s in self.streams:
            try:
                groups = run("XINFO", "GROUPS", s)
            except redis.ResponseError:
                raise LogLost(f"stream {s} is gone from the buffer Redis {self.uri}") from None
            if not any(text(info_map(g)["name"]) == self.group for g in groups):
                raise LogLost(f"consumer group {self.group!r} is gone from stream {s} on the "
                              f"buffer Redis {self.uri}")
            seen = self._seen.get(s)
            if seen:
                end = text(info_map(run("XINFO", "STREAM", s))["last-generated-id"])
                if parse_id(end) < seen:
                    raise LogLost(f"stream {s} ends at {end} but {seen[0]}-{seen[1]} was read "
                                  "from it: the buffer Redis restarted from older data")

    def _reconnected(self) -> None:
        # Entries an XREADGROUP delivered just before the connection was cut are pending for us
        # with their reply lost: read our pending entries again before anything newer.
        self._pending_from = {s: "0" for s in self._leases.owned}

    def _adopted(self) -> None:
        # The new log is read from its beginning.
        self._create_groups()
        self._pending_from = {}
        self._leases.owned = {}
        self._seen = {}
        self._first_balance = True

    def seek(self, where: StartAt) -> None:
        if where == "committed":
            return
        if where == "earliest":
            target = "0"
        elif where == "latest":
            target = "$"
        elif isinstance(where, datetime):
            ms = int(where.timestamp() * 1000)
            target = f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0"
        else:
            raise LogError(f"cannot seek to {where!r}")
        with self._op("seek"):
            for s in self.streams:
                # Recreating the group drops its pending entries too: the position is what was asked.
                self.r.execute_command("XGROUP", "DESTROY", s, self.group)
                self.r.execute_command("XGROUP", "CREATE", s, self.group, target, "MKSTREAM")
        self._pending_from = {}

    # -- membership ---------------------------------------------------------------------------
    def _balance(self) -> None:
        """Renew this member's leases, give up streams above its share, take free ones (with the
        entries their previous owner received and never acknowledged)."""
        acquired = self._leases.update("balance")
        if self._first_balance:             # a restarted --consumer NAME may hold its own leases
            acquired, self._first_balance = list(self._leases.owned), False
        for s in acquired:
            self._claim(s)
            self._pending_from[s] = "0"
        for s in list(self._pending_from):
            if s not in self._leases.owned:
                del self._pending_from[s]

    def _claim(self, stream: str) -> None:
        """The stream is ours alone now: every pending entry of it moves to us, however recent."""
        cursor = "0-0"
        while True:
            reply = self.r.execute_command("XAUTOCLAIM", stream, self.group, self.consumer, 0,
                                           cursor, "COUNT", PIPELINE_CHUNK, "JUSTID")
            cursor = text(reply[0])
            if cursor == "0-0":
                return

    def keepalive(self) -> None:
        try:
            with self._op("renewing leases"):
                self._leases.update("renew")
        except LogUnavailable:
            pass        # the leases lapse on their own; poll() says what happened once it is back

    def held(self) -> list[str]:
        return sorted(self._leases.current())

    def owned(self, records: list[Record]) -> list[Record]:
        mine = self._leases.current()
        return [r for r in records if r.partition in mine]

    # -- reading ------------------------------------------------------------------------------
    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        with self._op("XREADGROUP"):
            if self._leases.due():
                self._balance()
            owned = sorted(self._leases.current())
            if not owned:                   # every stream is leased to other members
                time.sleep(timeout)
                return []
            out = self._read_pending(max_records)
            if not out:
                # COUNT is per stream: a share each keeps the whole reply within max_records.
                out = self._records(self.r.execute_command(
                    "XREADGROUP", "GROUP", self.group, self.consumer,
                    "COUNT", max(1, max_records // len(owned)),
                    "BLOCK", max(1, int(timeout * 1000)), "STREAMS", *owned, *([">"] * len(owned))))
                if self._pending_from:
                    # Reconnected under this call: entries of a lost reply come before these,
                    # which are pending too now; all are read again in order by the next poll.
                    out = []
        newest = {rec.partition: rec.offset for rec in out}       # in order within a stream
        for stream, offset in newest.items():
            self._seen[stream] = max(self._seen.get(stream, (0, 0)), parse_id(offset))
        if (not out and not self.observe and self.peeked is None and self.trim_mode != "none"
                and time.monotonic() - self._last_trim >= TRIM_INTERVAL_S):
            # a quiet log is compacted too (commit does it otherwise); never by a dry run
            self.trim(self.trim_mode)
        return out

    def _read_pending(self, max_records: int) -> list[Record]:
        for s, start in list(self._pending_from.items()):
            reply = self.r.execute_command("XREADGROUP", "GROUP", self.group, self.consumer,
                                           "COUNT", max_records, "STREAMS", s, start)
            records = self._records(reply)
            if records:
                self._pending_from[s] = records[-1].offset
                return records
            del self._pending_from[s]
        return []

    @staticmethod
    def _records(reply) -> list[Record]:
        out: list[Record] = []
        if not reply:
            return out
        items = reply.items() if isinstance(reply, dict) else reply
        for stream, entries in items:
            stream = text(stream)
            for entry_id, fields in entries:
                if fields is None:                 # entry trimmed while pending
                    continue
                f = field_map(fields)
                eid = text(entry_id)
                out.append(Record(stream, eid, f[b"k"], f[b"v"], id_ms(eid)))
        return out

    def commit(self, records: list[Record]) -> None:
        """XACK: acknowledging again what is already acknowledged is harmless, so after
        LogUnavailable the same call can simply be made again."""
        by_stream: dict[str, list[str]] = {}
        for rec in records:
            by_stream.setdefault(rec.partition, []).append(rec.offset)
        with self._op("XACK"):
            p = self.r.pipeline(transaction=False)
            for s, ids in by_stream.items():
                for i in range(0, len(ids), PIPELINE_CHUNK):
                    p.execute_command("XACK", s, self.group, *ids[i:i + PIPELINE_CHUNK])
            p.execute()
        if self.trim_mode != "none" and time.monotonic() - self._last_trim >= TRIM_INTERVAL_S:
            self.trim(self.trim_mode)

    # -- retention ----------------------------------------------------------------------------
    def trim(self, policy: str = "acked") -> None:
        """XTRIM MINID each stream: ``acked`` to the oldest entry any group still needs;
        ``retention`` to entries older than the retention period, but never past what a group
        still needs."""
        self._last_trim = time.monotonic()
        if policy == "compact":
            if self._compactor is None:        # a thread of its own: apply reads on meanwhile
                self._compactor = StreamCompactor(self.r, self.streams, self.retention_ms)
                self._compaction = Background(lambda: self._compactor.run(self._oldest_needed),
                                              TRIM_INTERVAL_S, "compaction of the log's streams",
                                              self._compactor.stopping)
            return
        with self._op("XTRIM"):
            cut = None
            if policy == "retention":
                sec, usec = self.r.time()        # entry ids are the buffer's clock
                cut = (sec * 1000 + usec // 1000 - self.retention_ms, 0)
            for s in self.streams:
                needed = self._oldest_needed(s)
                minid = min((x for x in (needed, cut) if x is not None), default=None)
                if minid is not None and minid > (0, 0):
                    self.r.execute_command("XTRIM", s, "MINID", f"{minid[0]}-{minid[1]}")

    def _forget_dry_run(self) -> None:
        """A dry run leaves nothing: its group and its leases go (one a SIGKILL left behind is
        never waited for by trimming)."""
        try:
            for s in self.streams:
                self.r.execute_command("XGROUP", "DESTROY", s, self.group)
            self.r.delete(*self._leases.keys)
        except redis.RedisError as e:
            log.warning("could not remove the dry run's consumer group %s: %s", self.group, e)

    def _oldest_needed(self, stream: str) -> tuple[int, int] | None:
        groups = self.r.execute_command("XINFO", "GROUPS", stream)
        oldest: tuple[int, int] | None = None
        for g in groups:
            g = info_map(g)
            if text(g["name"]).startswith(DRY_RUN_PREFIX):
                continue
            # Another member may acknowledge the last pending entries between the two calls:
            # no pending entry left then (min is None), and the group needs what follows.
            pending = self.r.xpending(stream, g["name"])["min"] if int(g["pending"]) else None
            first = parse_id(pending if pending is not None
                             else next_id(text(g["last-delivered-id"])))
            oldest = first if oldest is None else min(oldest, first)
        return oldest

    def replayable(self) -> tuple[bool, str]:
        with self._op("XINFO STREAM"):
            why = trimmed_why(self.r, self.streams)
        return (not why, "; ".join(why))

    # -- status -------------------------------------------------------------------------------
    def status(self) -> LogStatus:
        """The whole group's lag: entries not yet delivered to any member plus entries delivered
        and not acknowledged."""
        parts = []
        with self._op("XINFO"):
            for s in self.streams:
                info = info_map(self.r.execute_command("XINFO", "STREAM", s))
                end = text(info["last-generated-id"])
                g = next((info_map(x) for x in self.r.execute_command("XINFO", "GROUPS", s)
                          if text(info_map(x)["name"]) == self.group), None)
                if g is None:
                    parts.append(PartitionStatus(s, None, end, int(info["length"])))
                    continue
                pending = int(g["pending"])
                delivered = text(g["last-delivered-id"])
                first = self.r.xpending(s, self.group)["min"] if pending else None
                committed = text(first) if first is not None else delivered   # acked meanwhile
                parts.append(PartitionStatus(s, committed, end,
                                             self._undelivered(s, info, g) + pending))
            entries = sum(self.r.xlen(s) for s in self.streams)
            try:
                held = f"{sum(self.r.memory_usage(s) or 0 for s in self.streams) / 2**20:,.1f} MiB " \
                       "of memory, "
            except redis.ResponseError:      # an ACL user without MEMORY: the entries alone
                held = ""
        return LogStatus(self.uri, self.group, parts,
                         f"{held}{entries} entries (trim={self.trim_mode})")

    def _undelivered(self, stream: str, info: dict, g: dict) -> int:
        """Entries after the group's last-delivered-id. Redis's own ``lag`` cannot be trusted
        after an AOF reload (entries-read comes back stale from the rewritten base file and stays
        so: a lag that never falls kept ``apply --idle-timeout`` running forever), so the
        backlog is counted, a page at a time, up to COUNT_CAP; only a longer backlog reports
        Redis's figure (or the stream's length when that is implausible): 0 is always exact."""
        delivered = parse_id(g["last-delivered-id"])
        if delivered >= parse_id(info["last-generated-id"]):
            return 0
        length = int(info["length"])
        first = info.get("first-entry")
        if not length or (first and parse_id(first[0]) > delivered):
            return length                       # everything the stream holds is still to come
        n = self._count_after(stream, next_id(f"{delivered[0]}-{delivered[1]}"), COUNT_CAP)
        if n < COUNT_CAP:
            return n
        lag = g.get("lag")
        return int(lag) if lag is not None and COUNT_CAP <= int(lag) <= length else length

    def _count_after(self, stream: str, start: str, cap: int) -> int:
        """Entries from ``start`` on, counted a page at a time (bounded memory), at most ``cap``."""
        n = 0
        while n < cap:
            page = self.r.execute_command("XRANGE", stream, start, "+", "COUNT", COUNT_PAGE)
            n += len(page)
            if len(page) < COUNT_PAGE:
                break
            start = next_id(text(page[-1][0]))
        return min(n, cap)

    def dead_letter(self, record: Record, reason: str) -> None:
        with self._op("XADD to the dead-letter stream"):
            self.r.execute_command("XADD", f"{self.prefix}:dead-letter", "*", "k", record.key,
                                   "v", record.value, "reason", reason, "group", self.group,
                                   "from", f"{record.partition}/{record.offset}")

    def close(self) -> None:
        try:
            if not self.observe and self._leases.owned:
                with converted("releasing leases", self.user):
                    self._leases.update("leave")   # the other members take them over at once
        except LogError:
            pass                                   # they lapse on their own
        finally:
            if self.peeked is not None:
                self._forget_dry_run()
            if self._compactor is not None and self._compaction.stop():
                self._compactor.close()            # (never under a pass still running)
            self.r.close()


class StreamMetaStore(MetaStore):
    def __init__(self, uri: str, opts: dict[str, str]) -> None:
        self.r = client(uri, opts)
        self.user = user_of(self.r)
        self.key = f"{opts.get('stream', 'conveyor')}:meta"

    def put(self, name: str, doc: dict) -> None:
        with converted("HSET meta", self.user):
            self.r.hset(self.key, name, json.dumps(doc))

    def get(self, name: str) -> dict | None:
        with converted("HGET meta", self.user):
            v = self.r.hget(self.key, name)
        return json.loads(v) if v is not None else None

    def documents(self) -> dict[str, dict]:
        with converted("HGETALL meta"):
            found = self.r.hgetall(self.key)
        return {k.decode(): json.loads(v) for k, v in found.items()}

    def close(self) -> None:
        self.r.close()


def check_uri(uri: str) -> None:
    """redis[s]://host:port/db: a port, when given, is a number."""
    try:
        urlsplit(uri).port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"log URI {mask_uri(uri)!r} is malformed: {e}") from e


# What conveyor.log's registry opens.
Writer, Reader, Meta = StreamLogWriter, StreamLogReader, StreamMetaStore
