"""The reader of a Redis Streams log: a member of a consumer group that reads the partition
streams leased to it (leases.py) and acknowledges with XACK, and its dry-run, trimming (or
compaction, compact.py), status and dead-letter sides."""
from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime

import redis

from conveyor.errors import LogError, LogLost, LogUnavailable
from conveyor.log.base import LogReader, LogStatus, PartitionStatus, Record, StartAt, parse_id
from conveyor.log.compaction import Background
from conveyor.log.streams.base import (MAX_SEQ, PIPELINE_CHUNK, StreamLog, converted, duration_ms,
                                       field_map, id_ms, info_map, next_id, previous_id,
                                       trimmed_why)
from conveyor.log.streams.compact import StreamCompactor
from conveyor.log.streams.lag import undelivered
from conveyor.log.streams.leases import LEASE_MS, Leases, default_consumer
from conveyor.words import text

log = logging.getLogger("conveyor.log")

TRIM_INTERVAL_S = 5.0
DEFAULT_RETENTION = "7d"
COMPACT_RETENTION = "1h"          # trim=compact: superseded entries are kept this long
DRY_RUN_PREFIX = "conveyor-dry-run:"   # groups of dry runs: never waited for by trimming
TRIM_MODES = ("compact", "retention", "acked", "none")


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
                                             undelivered(self.r, s, info, g) + pending))
            entries = sum(self.r.xlen(s) for s in self.streams)
            try:
                held = f"{sum(self.r.memory_usage(s) or 0 for s in self.streams) / 2**20:,.1f} MiB " \
                       "of memory, "
            except redis.ResponseError:      # an ACL user without MEMORY: the entries alone
                held = ""
        return LogStatus(self.uri, self.group, parts,
                         f"{held}{entries} entries (trim={self.trim_mode})")

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
