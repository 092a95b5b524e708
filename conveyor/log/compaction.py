"""Compaction: reclaim what later records of the same keys supersede, never what a rebuild needs.

Every event holds the whole state of its key (a DUMP payload or typed value, and its absolute
expiry), so once a later record holds a key, its earlier events are needed by nobody, not even
``apply --from earliest`` rebuilding an empty target. Compaction rewrites the oldest part of a log
(what every group has read, older than the retention) keeping, per key, only the latest event:

- a record all of whose events are superseded is dropped; a block some of whose events are is
  rewritten with the others (so the compacted part holds at most one event of a key);
- the parts of a big key read in parts are kept while they belong to the key's latest read;
- a DELETE that is its key's latest event is dropped as well: nothing older of the key is left;
- markers (snapshot begin/end, resync) and records that cannot be decoded are kept as they are.

Which record is a key's latest is known from an index on disk (SQLite, ``KeyIndex``), so memory does
not grow with the number of keys; it is built from the log and rebuilt from it when lost or left
in doubt by a crash. An index behind the log (newer records not indexed yet) only keeps more.
"""
from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.errors import CodecError
from conveyor.events import Codec, Columns, Event, Kind, block_record_key, block_size, record_key


log = logging.getLogger("conveyor.log")


class Background:
    """Calls ``work()`` every ``every_s`` seconds in a thread of its own, so that apply keeps
    reading while a pass runs; a failed pass is logged and tried again at the next turn."""

    def __init__(self, work, every_s: float, what: str,
                 stop: threading.Event | None = None) -> None:
        """``stop``: an event the work watches too, so that a long pass ends at stop()."""
        self.work, self.every_s, self.what = work, every_s, what
        self._stop = stop or threading.Event()
        self._thread = threading.Thread(target=self._run, name=what, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.work()
                failing = False
            except Exception as e:              # noqa: BLE001 - the next turn tries again
                (log.info if failing else log.warning)(
                    "%s failed (tried again every %.0fs): %s", self.what, self.every_s, e)
                failing = True
            self._stop.wait(self.every_s)

    def stop(self) -> bool:
        """True once the thread ended (its work may then be closed)."""
        self._stop.set()
        self._thread.join(60)
        return not self._thread.is_alive()


@dataclass
class Outcome:
    """What compaction does with one record: keep it as is, drop it, or write ``value`` instead."""
    keep: bool
    key: bytes = b""                 # the new record key and value of a rewritten block
    value: bytes | None = None
    latest: list[bytes] = field(default_factory=list)    # index keys this record is the latest of
    forget: list[bytes] = field(default_factory=list)    # index keys whose latest event is dropped


def index_key(ev: Event) -> bytes:
    return record_key(ev.db, ev.key)


def _chunk_id(ev: Event) -> str | None:
    return ev.chunk["id"] if ev.chunk else None


BATCH_RECORDS = 1000               # records decoded at a time by a compactor ...
BATCH_BYTES = 1024 * 1024          # ... and at most this many bytes of them (parts of big keys)


def bounded(items, size_of):
    """Lists of ``items`` of at most BATCH_RECORDS items and BATCH_BYTES bytes (or one item)."""
    batch, size = [], 0
    for item in items:
        if batch and (len(batch) >= BATCH_RECORDS or size + size_of(item) > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += size_of(item)
    if batch:
        yield batch


MIN_GROWTH = 100                   # records (a block holds hundreds of keys)
GROWTH = 0.5                       # a pass once the log grew by this share since the last ...
PASS_INTERVAL_S = 30.0             # ... or it grew at all and the last pass is this old
DUTY = 10                          # (and at least this many times as long as the last one took)


class Schedule:
    """When a compactor that reads the whole compactable part of a log runs a pass: its work
    follows the appends (a pass per half of growth), and a quiet log is compacted too."""

    def __init__(self) -> None:
        self._size_at_pass = 0
        self._last_pass = self._pass_s = 0.0

    def due(self, size: int) -> bool:
        grown = size - self._size_at_pass
        return grown >= max(MIN_GROWTH, GROWTH * self._size_at_pass) or (
            grown > 0 and time.monotonic() - self._last_pass >= max(PASS_INTERVAL_S,
                                                                    DUTY * self._pass_s))

    def passed(self, size: int, started: float) -> None:
        self._size_at_pass = size
        self._pass_s, self._last_pass = time.monotonic() - started, time.monotonic()


class KeyIndex:
    """Per key, the number of its latest record and the id of its latest read in parts."""

    @classmethod
    def temporary(cls) -> "KeyIndex":
        """An index in a folder of its own, removed by close()."""
        folder = Path(tempfile.mkdtemp(prefix="conveyor-compaction-"))
        index = cls(folder / "index.db")
        index._folder = folder
        return index

    def __init__(self, path: Path) -> None:
        self.path = path
        self._folder: Path | None = None
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA cache_size=-2048")            # 2 MiB of pages in memory
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS latest (k BLOB PRIMARY KEY, rec INTEGER, "
                        "part TEXT) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value)")

    def close(self) -> None:
        self.db.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def get_meta(self, name: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    def set_meta(self, name: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def clear(self) -> None:
        self.db.execute("DELETE FROM latest")
        self.db.execute("DELETE FROM meta")

    def note(self, rows: list[tuple[bytes, int, str | None]]) -> None:
        """(index key, record number, read id) of records in log order: the later ones win."""
        self.db.executemany("INSERT OR REPLACE INTO latest VALUES (?, ?, ?)", rows)

    def lookup(self, keys: list[bytes]) -> dict[bytes, tuple[int, str | None]]:
        out: dict[bytes, tuple[int, str | None]] = {}
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            q = "SELECT k, rec, part FROM latest WHERE k IN (%s)" % ",".join("?" * len(part))
            for k, rec, chunk in self.db.execute(q, part):
                out[k] = (rec, chunk)
        return out

    def renumber(self, moves: list[tuple[int, bytes]]) -> None:
        self.db.executemany("UPDATE latest SET rec = ? WHERE k = ?", moves)

    def forget(self, keys: list[bytes]) -> None:
        self.db.executemany("DELETE FROM latest WHERE k = ?", [(k,) for k in keys])


NOT_DECODED = object()             # a record whose value a compactor did not decode


def decode_blocks(codec: Codec, keys: list[bytes], values: list[bytes]) -> list:
    """Decoded blocks, NOT_DECODED for any other record: logs whose records cannot be
    rewritten (Kafka, Redis Streams) judge those by their record key alone, as Kafka's own
    compaction does, and never decode the parts of big keys (memory)."""
    out: list = [NOT_DECODED] * len(keys)
    at = [i for i, k in enumerate(keys) if block_size(k) is not None]
    for i, d in zip(at, codec.decode_many([values[i] for i in at])):
        out[i] = d
    return out


def keyed_rows(rec: int, key: bytes, decoded) -> list[tuple[bytes, int, str | None]]:
    """Index rows of a record judged by record key (see decode_blocks)."""
    if decoded is NOT_DECODED:
        return [(key, rec, None)]
    return rows_of(rec, decoded)


def keyed_keeps(rec: int, key: bytes, decoded, latest: dict, codec: Codec) -> bool:
    """Whether a record judged by record key is still needed: a block while one of its events
    is (decide, without rewriting), any other record while no later record has its key.
    Markers are always kept."""
    if decoded is NOT_DECODED:
        if b"\x00conveyor-marker:" in key:
            return True
        got = latest.get(key)
        return got is None or got[0] <= rec
    return decide(rec, decoded, latest, codec, rewrite=False).keep


def rows_of(rec: int, decoded) -> list[tuple[bytes, int, str | None]]:
    """What a decoded record tells the index (nothing for markers and undecodable records)."""
    if isinstance(decoded, CodecError):
        return []
    evs = decoded if isinstance(decoded, list) else [decoded]
    return [(index_key(e), rec, _chunk_id(e)) for e in evs if not e.is_marker]


def decide(rec: int, decoded, latest: dict[bytes, tuple[int, str | None]],
           codec: Codec, rewrite: bool = True) -> Outcome:
    """Keep, drop or rewrite record number ``rec`` (``decoded``: its event(s) or CodecError).
    Without ``rewrite`` (a log whose records cannot be replaced, Redis Streams) a record is kept
    whole while any of its events is needed, and a latest DELETE is kept: an older record kept
    for other keys may still hold its key."""
    if isinstance(decoded, CodecError):
        return Outcome(True)
    evs = decoded if isinstance(decoded, list) else [decoded]
    if any(e.is_marker for e in evs):
        return Outcome(True)
    kept: list[Event] = []
    out = Outcome(True)
    for e in evs:
        k = index_key(e)
        got = latest.get(k)
        if got is None or got[0] < rec:
            kept.append(e)                    # not indexed that far (a newer record): kept
        elif got[0] == rec:
            if e.kind == Kind.DELETE and e.chunk is None and rewrite:
                out.forget.append(k)          # the latest word is a delete: nothing to rebuild
            else:
                kept.append(e)
                out.latest.append(k)
        elif e.chunk is not None and got[1] == e.chunk["id"]:
            kept.append(e)                    # a part of the key's latest read in parts
        # else: a later record of the key supersedes this event
    if len(kept) == len(evs) or (kept and not rewrite):
        return out
    if not kept:
        out.keep = False
        return out
    if not isinstance(decoded, list):          # one event, kept: never reached (kept == evs)
        return out
    cols = Columns()
    first = kept[0]
    for e in kept:
        cols.add(e.key, e.payload, e.expire_at_ms, e.read_time_ms)
    out.key = block_record_key(first.db, len(kept))
    out.value = codec.encode_block(first.db, first.capture_id, first.seq, cols)
    return out
