"""The reader of a Kafka log: a consumer group member (cooperative rebalancing) that commits
explicitly, and its dry-run, status, dead-letter and compaction sides."""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import datetime

from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException,
                             Producer, TopicPartition)
from confluent_kafka.admin import AdminClient

from conveyor import retry
from conveyor.errors import LogError, LogUnavailable
from conveyor.log.base import LogReader, LogStatus, PartitionStatus, Record, StartAt
from conveyor.log.compaction import Background
from conveyor.log.kafka.admin import (check_same_log, cleanup_policy, ensure_topic, offsets,
                                      topic_id)
from conveyor.log.kafka.compact import DEFAULT_AFTER, KafkaCompactor
from conveyor.log.kafka.config import (COMPACT_EVERY_S, DRY_RUN_PREFIX, IDENTITY_RECHECK_S,
                                       KEEPALIVE_POLLS, METADATA_TIMEOUT_S, PRODUCER_DEFAULTS,
                                       REJOIN, client_props, made, parse, weak)
from conveyor.log.kafka.errors import data, failure, transient
from conveyor.log.kafka.meta import OneRecord
from conveyor.log.kafka.security import error_cb
from conveyor.log.options import duration_s

log = logging.getLogger("conveyor.kafka")


class KafkaLogReader(LogReader):
    def __init__(self, uri: str, group: str, opts: dict[str, str], start: StartAt = "committed",
                 *, observe: bool = False, peek: bool = False) -> None:
        # ``observe`` needs nothing here: a consumer joins no group until it subscribes, which
        # status() never does.
        hosts, self.topic, self.props, cfg, create = parse(uri, opts)
        self.uri = f"kafka://{hosts}/{self.topic}"
        # A dry run reads in a group of its own, seeded with the real group's committed offsets
        # and deleted at close: the real group sees no new member (no rebalance), no commit.
        self.peeked = group if peek else None
        group = f"{DRY_RUN_PREFIX}{group}.{uuid.uuid4().hex[:12]}" if peek else group
        self.group = group
        self._cfg, self._create = cfg, create
        ensure_topic(self.props, self.topic, cfg, create)
        self._admin = made(AdminClient, client_props(self.props))
        self.log_id = topic_id(self._admin, self.topic)
        self.warnings, self.damaged = [], []
        # A member id of its own per process, so that a second apply joins the group instead of
        # fencing the first. Static membership (a restarted apply takes its partitions back at
        # once) only when the user names the consumer, and so promises to run one process per name.
        named = opts.get("consumer")
        self.consumer = named or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        static = {"group.instance.id": f"{self.topic}-{group}-{named}"} if named else {}
        self._c = made(Consumer, {**static, "client.id": f"conveyor-{self.consumer}",
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
                                   **self.props, "error_cb": weak(self._client_error),
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
        self._dlq: OneRecord | None = None
        if peek:
            self._seed_from(self.peeked)
        self._compaction = None if peek else self._start_compaction(opts)

    def _seed_from(self, group: str) -> None:
        """The dry run's group starts where ``group`` committed (partitions it never committed
        start at the earliest record, as they would for it)."""
        real = made(Consumer, {**self.props, "group.id": group, "enable.auto.commit": False})
        try:
            md = self._admin.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
            tps = self._tps(sorted(md.topics[self.topic].partitions))
            at = [tp for tp in real.committed(tps, timeout=METADATA_TIMEOUT_S) if tp.offset >= 0]
            if at:
                self._c.commit(offsets=at, asynchronous=False)
        except KafkaException as e:
            raise failure(e, f"cannot read group {group!r}'s position for the dry run") from e
        finally:
            real.close()

    def _start_compaction(self, opts: dict[str, str]) -> Background | None:
        """On a compacted topic, a thread that replaces superseded blocks (compact.py)."""
        after = duration_s(opts.get("compact_after", DEFAULT_AFTER), "compact_after")
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
        error_cb(err)
        if transient(err):
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
                raise failure(e, "Kafka offsets_for_times failed") from e
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
            revoke = weak(self._on_revoke)
            self._c.subscribe([self.topic], on_assign=weak(self._on_assign), on_revoke=revoke,
                              on_lost=revoke)
            self._subscribed = True
        self._resume()
        try:
            first = self._c.poll(timeout)
            if first is None:
                return []
            msgs = [first] + (self._c.consume(max_records - 1, 0) if max_records > 1 else [])
        except KafkaException as e:
            raise failure(e, f"Kafka consume from {self.topic!r} failed") from e
        out = []
        for m in data(msgs, self.topic, self._trouble):
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
            raise failure(e, f"Kafka keepalive for group {self.group!r} failed") from e

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
                    raise failure(e, f"Kafka commit for group {self.group!r} failed") from e
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
        check_same_log(self._admin, self.topic, self.log_id, self._committed)

    def adopt_new_log(self) -> None:
        """Read the new topic from its beginning (its old committed offsets mean nothing)."""
        ensure_topic(self.props, self.topic, self._cfg, self._create)
        self.log_id = topic_id(self._admin, self.topic)
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
            raise failure(e, f"cannot read the settings of Kafka topic {self.topic!r}") from e
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
            raise failure(e, f"Kafka status of {self.topic!r} failed") from e
        highs = offsets(self._admin, self.topic, parts)
        lows = offsets(self._admin, self.topic, parts, earliest=True)
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
            self._dlq = OneRecord(made(Producer, {**PRODUCER_DEFAULTS, **self.props}), topic)
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
