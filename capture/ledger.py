"""The key ledger: what one capture has put on the log, per key, kept on disk (SQLite).

Per key: a digest of the state last logged, the epoch of the last scan that saw the key (or in
which it was logged), the generation of the log it was last logged in, and its hash slot (cluster
sources). Nothing per key lives in memory, whatever the number of keys.

Why. A gap (notifications lost, a restart, a source that failed over or restarted) is healed by
scanning the source again. With the ledger the scan logs only the keys whose digest differs from
the one logged (new or changed keys), and the keys a complete scan did not see are the deletes
of the gap: they are read again (gone, so logged as deletes). Unchanged values are neither logged
nor applied again.

Digest. For a DUMP payload: its last 8 bytes (the CRC-64 Redis appends to every payload, so no
hashing here) and the absolute expiry. A state without such a digest (typed values, keys read in
parts) is stored as UNKNOWN, which never equals anything: such a key is logged again by every
scan (harmless: the log holds whole states).

Cost. What capture logs reaches the ledger as one journal row per batch (the keys joined, their
lengths as JSON, the digests joined): a few C-speed joins per batch on the hot path. The journal
is folded into the ``keys`` table by SQLite itself (one INSERT ... SELECT, sorted by key) when a
scan needs to compare or to list unseen keys, and when the journal grows past FOLD_KEYS.

Durability. Changes are made in an open transaction and committed only by ``commit()``, which
the capture calls after the log flushed the events they describe: the ledger never claims more
than the log holds. It may claim less (a crash between the flush and the commit): a key is then
logged once more, which is harmless. The meta table keeps the log id, and the capture id and
sequence number of the last commit; a ledger of another log, or behind the capture's checkpoint
(commits lost in a power failure), is not trusted: it is emptied and rebuilt from the log.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from conveyor.errors import CodecError, ConfigError
from conveyor.events import Codec, Kind
from conveyor.log.base import History

log = logging.getLogger("conveyor.capture")

UNKNOWN_CRC = bytes(8)            # the digest of a state that has none (never equal: see _SEEN)
PAGE = 1000                       # keys per query when listing keys a scan did not see
CACHE_KIB = 32 * 1024             # SQLite's page cache: the ledger's memory, whatever its size
FOLD_KEYS = 2_000_000             # journal entries folded into the keys table at the latest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    k BLOB PRIMARY KEY,           -- the key's name
    d BLOB,                       -- digest of the state last logged (CRC + expiry); NULL: deleted
    e INTEGER NOT NULL,           -- epoch: the last scan that saw it, or in which it was logged
    g INTEGER NOT NULL,           -- generation of the log holding its latest event
    s INTEGER                     -- hash slot (cluster sources), else NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    kb BLOB NOT NULL,             -- the keys of a batch, joined
    spans TEXT NOT NULL,          -- JSON: offset << 32 | length of each key in kb
    crcs BLOB,                    -- 8 bytes a key (NULL: a batch of deletes)
    exps BLOB,                    -- 8 bytes a key: absolute expiry in ms, -1 for none
    slots TEXT,                   -- JSON: each key's slot, or NULL
    e INTEGER NOT NULL,
    g INTEGER NOT NULL,
    n INTEGER NOT NULL            -- keys in the batch
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The keys of one batch as rows (?1 joined keys, ?2 spans JSON, ?3 crcs, ?4 expiries). SQLite's
# || makes text of blobs: the digest is cast back, or a compare with a blob would never match.
_BATCH = """
SELECT substr(?1, (j.value >> 32) + 1, j.value & 4294967295) AS k,
       CAST(substr(?3, j.key * 8 + 1, 8) || substr(?4, j.key * 8 + 1, 8) AS BLOB) AS d
FROM json_each(?2) AS j
"""
# Every journal row as key rows, in the order they were logged.
_JOURNAL = """
SELECT substr(r.kb, (j.value >> 32) + 1, j.value & 4294967295) AS k,
       CASE WHEN r.crcs IS NULL THEN NULL
            ELSE CAST(substr(r.crcs, j.key * 8 + 1, 8) || substr(r.exps, j.key * 8 + 1, 8)
                      AS BLOB) END AS d,
       r.e AS e, r.g AS g,
       CASE WHEN r.slots IS NULL THEN NULL ELSE json_extract(r.slots, '$[' || j.key || ']') END AS s,
       r.id AS rid, j.key AS i
FROM journal AS r, json_each(r.spans) AS j
"""
_FOLD = f"""
INSERT OR REPLACE INTO keys (k, d, e, g, s)
SELECT k, d, e, g, s FROM ({_JOURNAL}) ORDER BY k, rid, i
"""
_SEEN = f"""
UPDATE keys SET e = ?5 FROM ({_BATCH}) AS b
WHERE keys.k = b.k AND keys.d = b.d AND substr(b.d, 1, 8) != ?6
RETURNING keys.k
"""


def expiries(expires: list[int | None]) -> bytes:
    """Absolute expiries (None: none) in the ledger's form."""
    return array("q", [-1 if x is None else x for x in expires]).tobytes()


def crcs_of(payloads: list[bytes]) -> bytes:
    """The CRC-64 that ends every DUMP payload, joined."""
    return b"".join([p[-8:] for p in payloads])


def _spans(keys: list[bytes]) -> str:
    lengths = list(map(len, keys))
    return json.dumps([(o << 32) | n for o, n in
                       zip(itertools.accumulate(lengths, initial=0), lengths)])


@dataclass
class Trust:
    """Whether the ledger on disk describes the log as the capture's checkpoint left it."""
    trusted: bool
    why: str = ""                 # why not, for the output


class Ledger:
    """One capture's ledger (see the module docstring). Used by one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = self._connect()
        self._meta = dict(self._db.execute("SELECT name, value FROM meta"))
        self.epoch = int(self._meta.get("epoch", 0))        # the current scan epoch
        self.generation = int(self._meta.get("generation", 0))
        self._journaled = self._db.execute("SELECT coalesce(sum(n), 0) FROM journal").fetchone()[0]
        self._db.execute("BEGIN")

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")     # a process crash loses nothing committed
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.execute("PRAGMA temp_store=FILE")        # sorts of a fold spill to disk, not RAM
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot use the key ledger {self.path}: {e}") from e
        return db

    # -- identity --------------------------------------------------------------------------------
    def check(self, log_id: str, capture_id: str | None, seq: int | None) -> Trust:
        """Whether this ledger can be used as it is: kept for the log ``log_id``, and at least as
        far as the checkpoint the capture saved last (``capture_id``, ``seq``; None: none)."""
        meta = self._meta
        if not meta.get("log_id"):
            return Trust(False, "no ledger yet")
        if meta["log_id"] != log_id:
            return Trust(False, "the ledger was kept for another log")
        if capture_id is None:
            return Trust(False, "the capture left no checkpoint")
        if meta.get("capture_id") != capture_id or int(meta.get("seq", -1)) < (seq or 0):
            return Trust(False, "the ledger is behind the capture's last checkpoint")
        return Trust(True)

    def reset(self, log_id: str) -> None:
        """Empty the ledger and keep it for ``log_id`` (a new log, or one it cannot trust)."""
        self._db.execute("DELETE FROM keys")
        self._db.execute("DELETE FROM journal")
        self._db.execute("DELETE FROM meta")
        self._journaled = 0
        self.epoch = self.generation = 0
        self._meta = {}
        self._put_meta(log_id=log_id, epoch=0, generation=0)

    @property
    def log_id(self) -> str:
        return self._meta.get("log_id", "")

    # -- what was logged (the hot path) ----------------------------------------------------------
    def logged(self, keys: list[bytes], crcs: bytes | None = None, exps: bytes | None = None,
               slots: list[int] | None = None) -> None:
        """``keys`` were appended to the log as upserts: ``crcs`` and ``exps`` (8 bytes a key,
        see crcs_of/expiries) give their digests; without them the states are unknown."""
        if keys:
            n = len(keys)
            self._journal(keys, crcs if crcs is not None else UNKNOWN_CRC * n,
                          exps if exps is not None else bytes(8 * n), slots)

    def deleted(self, keys: list[bytes], slots: list[int] | None = None) -> None:
        """``keys`` were appended to the log as deletes."""
        if keys:
            self._journal(keys, None, None, slots)

    def _journal(self, keys, crcs, exps, slots) -> None:
        self._db.execute("INSERT INTO journal (kb, spans, crcs, exps, slots, e, g, n) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (b"".join(keys), _spans(keys), crcs, exps,
                          json.dumps(slots) if slots is not None else None, self.epoch,
                          self.generation, len(keys)))
        self._journaled += len(keys)

    def fold(self) -> None:
        """The journal into the keys table (SQLite does it, sorted by key)."""
        if not self._journaled:
            return
        self._db.execute(_FOLD)
        self._db.execute("DELETE FROM keys WHERE d IS NULL")
        self._db.execute("DELETE FROM journal")
        self._journaled = 0

    # -- scans -----------------------------------------------------------------------------------
    def new_epoch(self) -> int:
        """A scan (first, resync, catch-up) begins: keys it sees are marked with a new epoch."""
        self.fold()
        self.epoch += 1
        self._put_meta(epoch=self.epoch)
        return self.epoch

    def unchanged(self, keys: list[bytes], crcs: bytes, exps: bytes) -> set[bytes]:
        """Those of ``keys`` (read by a scan) whose digest equals the one logged: they need not be
        logged again. Every one of them is marked seen by the current epoch."""
        if not keys:
            return set()
        rows = self._db.execute(_SEEN, (b"".join(keys), _spans(keys), crcs, exps, self.epoch,
                                        UNKNOWN_CRC))
        return {r[0] for r in rows}

    def unseen(self, epoch: int, slots: Iterable[int] | None = None) -> Iterator[list[bytes]]:
        """Pages of keys the scan of ``epoch`` did not see (in ``slots`` only, when given): gone
        from the source unless changed meanwhile, so the capture reads them again."""
        self.fold()
        where = "e < ?2" + (" AND s IN (SELECT value FROM json_each(?3))" if slots is not None
                            else "")
        sql = f"SELECT k FROM keys WHERE k > ?1 AND {where} ORDER BY k LIMIT {PAGE}"
        args = (json.dumps(sorted(slots)),) if slots is not None else ()
        after = b""
        while True:
            page = [r[0] for r in self._db.execute(sql, (after, epoch, *args))]
            if not page:
                return
            yield page
            after = page[-1]

    def __len__(self) -> int:
        self.fold()
        return self._db.execute("SELECT count(*) FROM keys").fetchone()[0]

    # -- durability ------------------------------------------------------------------------------
    def commit(self, capture_id: str, seq: int) -> None:
        """Everything logged so far is durable on the log: make the ledger say so."""
        if self._journaled >= FOLD_KEYS:
            self.fold()
        self._put_meta(capture_id=capture_id, seq=seq)
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def _put_meta(self, **values) -> None:
        for name, value in values.items():
            self._meta[name] = str(value)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, str(value)))

    def close(self) -> None:
        """Close without committing what the log may not hold (an open transaction is dropped)."""
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._db.close()

    def size_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if os.path.exists(p))


@dataclass
class Rebuilt:
    records: int = 0              # records of the log read
    keys: int = 0                 # keys the ledger holds afterwards
    gap: str = ""                 # why the log no longer holds everything appended ("" if it does)


def rebuild(ledger: Ledger, history: History, codec: Codec, db: int, accepts,
            slot_of=None, digests: bool = True) -> Rebuilt:
    """Fill an empty ledger from what the log holds (the ledger was lost, or kept for another
    log): every key of ``db`` that ``accepts(key)`` takes, at its latest state on the log, marked
    as seen by no scan (epoch 0), so that the next complete scan finds the deleted ones. Without
    ``digests`` every state is UNKNOWN (``--fresh``: everything is logged again)."""
    found = Rebuilt(gap="" if history.complete else history.why)
    batch: list = []
    try:
        for _key, value in history.records:
            found.records += 1
            try:
                events = codec.decode_all(value)
            except CodecError:
                continue                          # apply dead-letters it; it wrote nothing
            for ev in events:
                if ev.is_marker or ev.db != db or not accepts(ev.key):
                    continue
                if ev.kind == Kind.DELETE:
                    _rebuild_flush(ledger, batch, slot_of)
                    ledger.deleted([ev.key], [slot_of(ev.key)] if slot_of else None)
                    continue
                whole = digests and ev.payload is not None and ev.chunk is None and ev.value is None
                batch.append((ev.key, ev.payload if whole else None, ev.expire_at_ms))
                if len(batch) >= PAGE:
                    _rebuild_flush(ledger, batch, slot_of)
            if found.records % 1_000_000 == 0:
                log.info("read %d records of the log's history", found.records)
    finally:
        close = getattr(history.records, "close", None)
        if close:
            close()
    _rebuild_flush(ledger, batch, slot_of)
    if not history.complete:                      # a backend may learn of damage while reading
        found.gap = history.why
    ledger.fold()
    found.keys = len(ledger)
    return found


def _rebuild_flush(ledger: Ledger, batch: list, slot_of) -> None:
    if not batch:
        return
    keys = [k for k, _, _ in batch]
    crcs = b"".join(p[-8:] if p is not None else UNKNOWN_CRC for _, p, _ in batch)
    ledger.logged(keys, crcs, expiries([x for _, _, x in batch]),
                  [slot_of(k) for k in keys] if slot_of else None)
    batch.clear()
