"""Capture of several databases of one standalone source (``--db all`` or ``--db 0,3,5``).

One Capture per database, each on a thread of its own, all appending to one log writer. Each
Capture is exactly the single-database one: its own source client (SELECTed to its db), its own
keyspace subscription (``__keyspace@N__:*``), FLUSHDB/SWAPDB/restart watch, checkpoint
(checkpoint_name includes the db) and gaps. Per-key order holds because a key belongs to one
database and so is read and appended by one thread only, in the order its values were read.

Why threads sharing one writer rather than one process per db: a log writer holds an open log
(the file log takes an exclusive lock; a Kafka producer is heavy), and the work is mostly waiting
on the source; why not one Capture reading every db: the Capture's loop, checkpoints and gap
handling are per database already, and reusing them unchanged keeps one tested code path.

The shared writer serialises every call under one lock. The log's identity is shared as well:
when one capture finds the log lost (reset under us) and adopts the new one, every other capture
is told the log was lost at its next identity check, so each resyncs its database into the new
log instead of only the first one to notice.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from conveyor.capture.process import Capture
from conveyor.capture.stats import CaptureStats
from conveyor.capture.reader import ReadCounts
from conveyor.errors import ConveyorError, LogLost
from conveyor.events import record_key
from conveyor.log.base import History, LogWriter, MetaStore
from conveyor.runner import Worker

log = logging.getLogger("conveyor.capture")


class SharedLog:
    """One writer and meta store used by several captures: ``view()`` gives each its own."""

    def __init__(self, writer: LogWriter, meta: MetaStore) -> None:
        self.writer, self.meta = writer, meta
        self.lock = threading.RLock()
        self.generation = 0                  # how many times a lost log was adopted
        self._viewed = False

    def view(self, db: int) -> "WriterView":
        first, self._viewed = not self._viewed, True
        return WriterView(self, db, self.writer.warnings if first else ())

    def locked_meta(self) -> "LockedMeta":
        return LockedMeta(self)


class WriterView(LogWriter):
    """A capture's writer: the shared one, under its lock, with its own view of the log's
    identity (see the module docstring). Closing it leaves the shared writer open."""

    log_id = property(lambda self: self.inner.log_id)     # type: ignore[assignment]

    def __init__(self, shared: SharedLog, db: int, warnings: Iterable[str] = ()) -> None:
        self.shared = shared
        self.prefix = record_key(db, b"")   # the records of this db (a rebuilt ledger's reads)
        self.inner = shared.writer
        self._shaped_like(self.inner)
        self.generation = shared.generation
        self.warnings = list(warnings)       # the log's warnings, told by one capture only

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        with self.shared.lock:
            self.inner.append(key, value, partition_key)

    def flush(self, timeout: float = 60.0) -> None:
        with self.shared.lock:
            self.inner.flush(timeout)

    def history(self) -> History:
        """This db's records of the log, read while no other capture appends (a backend's
        history is not read concurrently with its own appends anywhere else either). Every db
        reads the log once; records of other dbs are skipped by their key (``db:``), undecoded."""
        with self.shared.lock:
            h = self.inner.history()
        prefix = self.prefix

        def records():
            with self.shared.lock:
                try:
                    yield from ((k, v) for k, v in h.records if k.startswith(prefix))
                finally:
                    close = getattr(h.records, "close", None)
                    if close:
                        close()

        return History(h.complete, records(), h.why)

    def check_identity(self) -> None:
        with self.shared.lock:
            if self.generation != self.shared.generation:
                raise LogLost("another database's capture found the log reset and adopted the "
                              "new one")
            self.inner.check_identity()

    def adopt_new_log(self) -> None:
        with self.shared.lock:
            if self.generation == self.shared.generation:
                self.inner.adopt_new_log()
                self.shared.generation += 1
            self.generation = self.shared.generation

    def close(self) -> None:
        pass


class LockedMeta(MetaStore):
    """The shared meta store, one call at a time; closing it leaves the shared one open."""

    def __init__(self, shared: SharedLog) -> None:
        self.shared, self.inner = shared, shared.meta

    def put(self, name: str, doc: dict) -> None:
        with self.shared.lock:
            self.inner.put(name, doc)

    def get(self, name: str) -> dict | None:
        with self.shared.lock:
            return self.inner.get(name)

    def documents(self) -> dict[str, dict]:
        with self.shared.lock:
            return self.inner.documents()

    def close(self) -> None:
        pass


@dataclass
class DatabasesStats(CaptureStats):
    """The captures' stats summed (so the usual final lines read them), plus each db's."""

    per_db: dict[int, CaptureStats] = field(default_factory=dict)


def merged(by_db: dict[int, CaptureStats], mode: str) -> DatabasesStats:
    if not by_db:
        return DatabasesStats(mode=mode)
    stats = list(by_db.values())

    def total(count) -> int:
        return sum(count(st) for st in stats)

    return DatabasesStats(
        mode=mode, per_db=dict(by_db),
        keys=total(lambda st: st.keys), deletes=total(lambda st: st.deletes),
        total_hint=total(lambda st: st.total_hint), resyncs=total(lambda st: st.resyncs),
        resyncs_done=total(lambda st: st.resyncs_done),
        dirty_waiting=total(lambda st: st.dirty_waiting),
        notifications=total(lambda st: st.notifications),
        unseen_reread=total(lambda st: st.unseen_reread),
        digests_read=total(lambda st: st.digests_read),
        history_records=total(lambda st: st.history_records), rescans=total(lambda st: st.rescans),
        source_waits=total(lambda st: st.source_waits), log_waits=total(lambda st: st.log_waits),
        capture_id=",".join(st.capture_id for st in stats if st.capture_id),
        resumed=any(st.resumed for st in stats), complete=all(st.complete for st in stats),
        started=min(st.started for st in stats),
        gaps=[f"db {db}: {g}" for db, st in by_db.items() for g in st.gaps],
        history_gap=next((st.history_gap for st in stats if st.history_gap), ""),
        deletes_forgotten=next((st.deletes_forgotten for st in stats if st.deletes_forgotten), ""),
        incomplete_why="; ".join(f"db {db}: {st.incomplete_why}" for db, st in by_db.items()
                                 if st.incomplete_why),
        waiting=next((f"db {db}: {st.waiting}" for db, st in by_db.items() if st.waiting), ""),
        reads=_reads([st.reads for st in stats]))


def _reads(counts: list[ReadCounts]) -> ReadCounts:
    def total(count) -> int:
        return sum(count(c) for c in counts)

    return ReadCounts(upserts=total(lambda c: c.upserts), deletes=total(lambda c: c.deletes),
                      chunked_keys=total(lambda c: c.chunked_keys),
                      chunks=total(lambda c: c.chunks), over_limit=total(lambda c: c.over_limit),
                      skipped=total(lambda c: c.skipped),
                      over_limit_keys=[k for c in counts for k in c.over_limit_keys][:50])


class Databases:
    """Runs one Capture per database (built by ``make(db, writer_view, meta)``) and looks like
    one Capture to the commands, the replicate child, metrics and signals."""

    def __init__(self, dbs: list[int], shared: SharedLog, mode: str,
                 make: Callable[[int, LogWriter, MetaStore], Capture]) -> None:
        self.dbs, self.mode = dbs, mode
        self.captures = {db: make(db, shared.view(db), shared.locked_meta()) for db in dbs}

    @property
    def stats(self) -> DatabasesStats:
        return merged({db: c.stats for db, c in self.captures.items()}, self.mode)

    @property
    def heartbeat(self) -> float:
        return min(c.heartbeat for c in self.captures.values())

    @property
    def caught_up(self) -> bool:
        return all(c.caught_up for c in self.captures.values())

    @property
    def scanning(self) -> bool:
        return any(c.scanning for c in self.captures.values())

    def stop(self) -> None:
        for c in self.captures.values():
            c.stop()

    def run(self) -> DatabasesStats:
        workers = [Worker(f"capture db {db}", c.run) for db, c in self.captures.items()]
        for w in workers:
            w.start()
        # One failure stops every database: a capture that cannot claim all of them says so.
        failed: ConveyorError | None = None
        while any(w.is_alive() for w in workers):
            failed = failed or self._first_error(workers)
            if failed is not None:
                self.stop()
            time.sleep(0.05)
        for w in workers:
            w.join()
        failed = failed or self._first_error(workers)
        if failed is not None:
            raise failed
        return self.stats

    def _first_error(self, workers: list[Worker]) -> ConveyorError | None:
        """The first capture's error, its line prefixed with its database."""
        for w, db in zip(workers, self.captures):
            if w.error is not None:
                if not str(w.error).startswith("db "):
                    w.error.args = (f"db {db}: {w.error}",)
                    log.warning("capture of db %d failed: stopping the others", db)
                return w.error
        return None
