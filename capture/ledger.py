"""The key ledger: what one capture has put on the log, per key, kept on disk.

Per key: a digest of the state last logged and the generation of the log it was logged in. Nothing
per key lives in memory for the run, whatever the number of keys.

Why. A gap (notifications lost, a restart, a source that failed over or restarted) is healed by a
rescan of the source. With the ledger, the rescan first reads only digests (``rescan.Rescan.saw``); then,
bucket by bucket, it compares them with the ledger (``Rescan.to_read``): the keys whose digest
differs (new or changed) and the keys the ledger has but the rescan did not see (deleted during the
gap, or created since) are read again and logged; unchanged values are neither logged nor applied
again.

Digest. For a key that fits a DUMP payload: the payload's last 8 bytes (the CRC-64 Redis appends to
every payload) and its absolute expiry. A state without one (a typed value, a key read in parts) is
UNKNOWN and never equal: such a key is logged again by every rescan (harmless: states are whole).

Layout (``root``)::

    meta.json      the log it describes, bucket count, generations, the last commit, clean close
    journal        what was logged since the journal was last distributed (append-only)
    delta/NNN      journal entries of bucket NNN, in order, not merged into its base yet
    base/NNN       bucket NNN: the latest entry of each of its keys
    spill/NNN      digests a rescan read, by bucket (gone once the rescan is compared)

Order and durability. Every journal entry is written to the file (an OS write, not fsynced) before
the log append of its event (``LedgerWriter`` makes sure), so the ledger never lacks a key the log
holds: a key deleted during a later gap is always found. Its digest counts only once a commit record
follows it, written after the log flushed (``commit``): entries after the last commit are taken as
UNKNOWN (read again). Entries survive a killed process (the OS has them); after a machine restart
with no clean close, or for another log, or behind the capture's checkpoint, the ledger is not
trusted and is rebuilt from the log (``rebuild``).

Deletes. A deleted key stays in its bucket as a tombstone (expiry DELETED, the time it was logged
in its digest's place) for DELETES_KEPT_S. Should the log be lost, apply may not have applied the
delete yet: the resync into the new log reads the key again and logs it as deleted again.

Cost. The hot path joins a batch's keys and digests into one journal record (C-speed joins, one
write). Distributing, merging and comparing are per-bucket passes with one bucket in memory.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from array import array
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from conveyor.capture.ledger_files import (DELETED, DELETED_AT, UNKNOWN, UNKNOWN_CRC, Buckets,
                                           Chunk, chunks, framed, records)
from conveyor.errors import ConfigError
from conveyor.events import now_millis

log = logging.getLogger("conveyor.capture")

BUCKETS = 512                     # buckets of a new ledger (one is in memory at a time)
DISTRIBUTE_BYTES = 256 * 1024 * 1024          # journal size that is distributed at a commit
PAGE = 1000                       # keys handed back at a time
# A delete is remembered (a tombstone) this long: should the log be lost, apply may not have
# applied it, and the resync into the new log deletes the key again. Older ones are dropped at a
# merge, and the time of the newest dropped one is kept (``deletes_forgotten_ms``).
DELETES_KEPT_S = 7 * 86400
VERSION = 1


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Trust:
    """Whether the ledger on disk describes the log as the capture's checkpoint left it."""
    trusted: bool
    why: str = ""


class Ledger:
    """One capture's ledger (see the module docstring), used by one thread at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("base", "delta"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.meta = self._read_meta()
            self._pending: list[bytes] = []          # journal records not written yet
            self._journal = open(self.root / "journal", "a+b")
            self._scan_journal()
            self._opened_clean = self.meta.get("clean", False) and \
                self.meta.get("boot_id") == _boot_id()
            self._restarted = self.meta.get("boot_id") not in (None, _boot_id())
            self.meta.update(boot_id=_boot_id(), clean=False)
            self._write_meta()
        except OSError as e:
            raise ConfigError(f"cannot use the key ledger {self.root}: {e}") from e
        self.buckets = int(self.meta.get("buckets", BUCKETS))
        # A rescan's comparison walks the buckets between reads that append to the journal: the
        # journal is not distributed meanwhile (a bucket being compared would lose its delta).
        self.iterating = False
        self.generation = int(self.meta.get("generation", 0))

    # -- meta -------------------------------------------------------------------------------------
    def _read_meta(self) -> dict:
        try:
            return json.loads((self.root / "meta.json").read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}                                  # torn: the ledger is not trusted

    def _write_meta(self) -> None:
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.root / "meta.json")

    def _scan_journal(self) -> None:
        """Find the last commit in the journal and cut a torn tail (a killed write)."""
        f = self._journal
        f.seek(0)
        self._committed_at = 0
        for at, kind, _, body in records(f):
            if kind == b"C":
                self.meta.update(json.loads(body))
                self._committed_at = f.tell()
        end = f.tell()
        f.truncate(end)
        self._journal_bytes = end

    # -- identity ---------------------------------------------------------------------------------
    def check(self, log_id: str, capture_id: str | None, seq: int | None) -> Trust:
        """Whether the ledger can be used as it is: kept for ``log_id``, as far as the checkpoint
        the capture saved last (``capture_id``/``seq``; None: none), with nothing lost since."""
        m = self.meta
        if not m.get("log_id"):
            return Trust(False, "there is no ledger yet")
        if m["log_id"] != log_id:
            return Trust(False, "the ledger was kept for another log")
        if self._restarted and not self._opened_clean:
            return Trust(False, "the machine restarted since the ledger was last written")
        if capture_id is None:
            return Trust(False, "the capture left no checkpoint")
        if m.get("capture_id") != capture_id or int(m.get("seq", -1)) < (seq or 0):
            return Trust(False, "the ledger is behind the capture's last checkpoint")
        return Trust(True)

    def reset(self, log_id: str) -> None:
        """Empty the ledger and keep it for ``log_id`` (a new log, or one it cannot trust)."""
        self._pending.clear()
        for sub in ("base", "delta", "spill"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for sub in ("base", "delta"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._journal.truncate(0)
        self._journal.seek(0)
        self._journal_bytes = self._committed_at = 0
        self.generation = 0
        self.meta = {"version": VERSION, "log_id": log_id, "buckets": self.buckets,
                     "boot_id": _boot_id(), "clean": False, "generation": 0, "started": {}}
        self._write_meta()

    def forget_digests(self, log_id: str) -> None:
        """The log was replaced by an empty one: every key must be logged again. The keys the
        ledger names, deleted ones too (apply may not have applied their delete before the log
        was lost), are read again: those gone from the source are logged as deletes."""
        self.distribute()
        for b in range(self.buckets):
            state = self._pruned(self._merged(b))
            self._write_base(b, {k: (UNKNOWN_CRC, UNKNOWN, 0) for k in state})
        self.meta["log_id"] = log_id
        self._write_meta()

    @property
    def deletes_forgotten_ms(self) -> int:
        """When the newest delete no longer remembered was logged (0: none was dropped)."""
        return int(self.meta.get("deletes_forgotten_ms", 0))

    def forgotten_deletes(self) -> str:
        """After a lost log: what the resync cannot delete again ("" when nothing)."""
        if not self.deletes_forgotten_ms:
            return ""
        when = datetime.fromtimestamp(self.deletes_forgotten_ms / 1000, timezone.utc)
        return (f"the key ledger no longer remembers deletes logged before "
                f"{when.isoformat(timespec='seconds')} (it keeps them {DELETES_KEPT_S // 86400} "
                "days): keys deleted then that apply had not deleted when the log was lost may "
                "still be on the target")

    def _pruned(self, state: dict[bytes, tuple[bytes, int, int]]) -> dict:
        """``state`` without the tombstones older than DELETES_KEPT_S (their time is kept)."""
        horizon = now_millis() - DELETES_KEPT_S * 1000
        old = [k for k, (at, exp, _) in state.items()
               if exp == DELETED and DELETED_AT.unpack(at)[0] < horizon]
        if old:
            newest = max(DELETED_AT.unpack(state[k][0])[0] for k in old)
            for k in old:
                del state[k]
            if newest > self.deletes_forgotten_ms:
                self.meta["deletes_forgotten_ms"] = newest
                self._write_meta()
        return state

    @property
    def log_id(self) -> str:
        return self.meta.get("log_id", "")

    @property
    def empty(self) -> bool:
        """Nothing was ever logged through this ledger (a first scan logs everything directly)."""
        return not self._journal_bytes and not any((self.root / "base").iterdir()) \
            and not any((self.root / "delta").iterdir())

    # -- what was logged (the hot path) -----------------------------------------------------------
    def logged(self, keys: list[bytes], crcs: bytes | None = None, exps: bytes | None = None) -> None:
        """``keys`` are being appended to the log as upserts, with these digests (none: UNKNOWN)."""
        if keys:
            n = len(keys)
            e = array("q")
            e.frombytes(exps) if crcs is not None and exps is not None else e.extend([UNKNOWN] * n)
            self._add(Chunk(keys, crcs if crcs is not None else UNKNOWN_CRC * n, e,
                            array("I", [self.generation]) * n))

    def deleted(self, keys: list[bytes], at_ms: int | None = None) -> None:
        """``keys`` are being appended to the log as deletes (now, or at ``at_ms``)."""
        if keys:
            n = len(keys)
            at = DELETED_AT.pack(now_millis() if at_ms is None else at_ms)
            self._add(Chunk(keys, at * n, array("q", [DELETED]) * n,
                            array("I", [self.generation]) * n))

    def _add(self, chunk: Chunk) -> None:
        self._pending.append(chunk.encode())

    def write_ahead(self) -> None:
        """Hand the entries of events about to be appended to the OS (LedgerWriter calls it
        before every append)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._journal.seek(0, os.SEEK_END)
            self._journal.write(data)
            self._journal.flush()
            self._journal_bytes += len(data)

    def logged_from_log(self, keys: list[bytes], crcs: bytes, exps: bytes) -> None:
        """Entries read back from the log itself (``rebuild``): their digests count at once."""
        self.logged(keys, crcs, exps)
        self.write_ahead()
        self._committed_at = self._journal_bytes

    def commit(self, capture_id: str, seq: int) -> None:
        """Everything appended so far is durable on the log (called after a flush)."""
        body = json.dumps({"capture_id": capture_id, "seq": seq}).encode()
        self._pending.append(framed(b"C", 0, body))
        self.write_ahead()
        self._committed_at = self._journal_bytes
        self.meta.update(capture_id=capture_id, seq=seq)
        if self._journal_bytes >= DISTRIBUTE_BYTES and not self.iterating:
            self.distribute()

    def new_generation(self, started_ms: int) -> int:
        self.generation += 1
        self.meta["generation"] = self.generation
        self.meta.setdefault("started", {})[str(self.generation)] = started_ms
        return self.generation

    # -- distributing and merging -----------------------------------------------------------------
    def bucket_of(self, key: bytes) -> int:
        return zlib.crc32(key) % self.buckets

    def distribute(self) -> None:
        """Move the journal into the buckets' delta files. Entries after the last commit (a
        killed run's last events, maybe not on the log) keep their names, not their digests."""
        self.write_ahead()
        if not self._journal_bytes:
            return
        deltas = Buckets(self.root / "delta", self.buckets)
        f = self._journal
        f.seek(0)

        def unknown(key: bytes, crc: bytes, exp: int) -> tuple[bytes, int]:
            return (crc, exp) if exp == DELETED else (UNKNOWN_CRC, UNKNOWN)

        for at, kind, n, body in records(f):
            if kind == b"B":
                deltas.add(Chunk.decode(n, body), None if at < self._committed_at else unknown)
        deltas.close()
        self._write_meta()                 # the last commit, now that the journal is cut
        f.truncate(0)
        self._journal_bytes = self._committed_at = 0

    def _merged(self, bucket: int) -> dict[bytes, tuple[bytes, int, int]]:
        """Bucket ``bucket`` as key -> (crc, expiry, generation), base and delta applied."""
        state: dict[bytes, tuple[bytes, int, int]] = {}
        for name in ("base", "delta"):
            for chunk in chunks(self.root / name / f"{bucket:04d}"):
                chunk.apply_to(state)
        return state

    def _write_base(self, bucket: int, state: dict[bytes, tuple[bytes, int, int]]) -> None:
        path = self.root / "base" / f"{bucket:04d}"
        if state:
            keys = list(state)
            vals = list(state.values())
            chunk = Chunk(keys, b"".join(v[0] for v in vals), array("q", (v[1] for v in vals)),
                          array("I", (v[2] for v in vals)))
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(chunk.encode())
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)
        (self.root / "delta" / f"{bucket:04d}").unlink(missing_ok=True)

    def buckets_merged(self) -> Iterator[tuple[int, dict]]:
        """Every bucket, merged (and rewritten as its new base), one at a time. A deleted key
        stays as a tombstone (expiry DELETED) for DELETES_KEPT_S."""
        self.distribute()
        for b in range(self.buckets):
            state = self._merged(b)
            if (self.root / "delta" / f"{b:04d}").exists():
                self._write_base(b, self._pruned(state))
            yield b, state

    def __len__(self) -> int:
        """Keys that exist as far as the log says (tombstones not counted)."""
        return sum(sum(1 for v in s.values() if v[1] != DELETED) for _, s in self.buckets_merged())

    def census(self) -> dict[int, int]:
        """How many keys have their latest event in each generation."""
        counts: dict[int, int] = {}
        for _, state in self.buckets_merged():
            for _, exp, gen in state.values():
                if exp != DELETED:
                    counts[gen] = counts.get(gen, 0) + 1
        return counts

    def keys_of(self, generations: set[int]) -> Iterator[list[bytes]]:
        """Pages of the existing keys whose latest event is in one of ``generations``."""
        for _, state in self.buckets_merged():
            keys = [k for k, v in state.items() if v[2] in generations and v[1] != DELETED]
            for i in range(0, len(keys), PAGE):
                yield keys[i:i + PAGE]

    def close(self, clean: bool = True) -> None:
        """Close; ``clean``: everything is synced, a machine restart after it loses nothing."""
        if self._journal.closed:
            return
        self._journal.flush()
        if clean:
            os.fsync(self._journal.fileno())
            self.meta["clean"] = True
            self._write_meta()
        self._journal.close()
