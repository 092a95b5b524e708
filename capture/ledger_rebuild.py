"""Rebuilding the key ledger from what the log holds (a ledger not trusted, or ``--fresh``)."""
from __future__ import annotations

import logging
import time
from array import array
from dataclasses import dataclass
from typing import Callable

from conveyor.capture.ledger import PAGE, Ledger
from conveyor.capture.ledger_files import NO_EXPIRY, UNKNOWN, UNKNOWN_CRC
from conveyor.errors import CodecError
from conveyor.events import Codec, Kind
from conveyor.log.base import History
from conveyor.progress import echo
from conveyor.words import counted

log = logging.getLogger("conveyor.capture")


@dataclass
class Rebuilt:
    records: int = 0              # records of the log read
    keys: int = 0                 # keys the ledger holds afterwards
    gap: str = ""                 # why the log no longer holds everything appended ("" if it does)


def rebuild(ledger: Ledger, history: History, codec: Codec, db: int,
            accepts: Callable[[bytes], bool], digests: bool = True) -> Rebuilt:
    """Fill an emptied ledger from what the log holds: every key of ``db`` that ``accepts``
    takes, at its latest state on the log (generation 0). Without ``digests`` every state is
    UNKNOWN (``--fresh``: everything is logged again). Returns what was read."""
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
                    _rebuilt(ledger, batch)
                    ledger.deleted([ev.key])
                    continue
                whole = digests and ev.payload is not None and ev.chunk is None and ev.value is None
                batch.append((ev.key, ev.payload[-8:] if whole else None, ev.expire_at_ms))
                if len(batch) >= PAGE:
                    _rebuilt(ledger, batch)
            if found.records % 1_000_000 == 0:
                log.info("read %d records of the log's history", found.records)
    finally:
        close = getattr(history.records, "close", None)
        if close:
            close()
    _rebuilt(ledger, batch)
    if not history.complete:                      # a backend may learn of damage while reading
        found.gap = history.why
    ledger.distribute()
    found.keys = len(ledger)
    return found


def _rebuilt(ledger: Ledger, batch: list) -> None:
    """Entries of keys as the log holds them: their digests count (the log has them)."""
    if not batch:
        return
    keys = [k for k, _, _ in batch]
    crcs = b"".join(c if c is not None else UNKNOWN_CRC for _, c, _ in batch)
    exps = array("q", [UNKNOWN if c is None else NO_EXPIRY if x is None else x
                       for _, c, x in batch]).tobytes()
    ledger.logged_from_log(keys, crcs, exps)
    batch.clear()


def prepare(ledger: Ledger, log_id: str, previous: dict | None, fresh: bool, db: int,
            from_log: Callable[[Ledger], Rebuilt]) -> Rebuilt | None:
    """The key ledger as the previous run (checkpoint ``previous``) left it, when it can be
    trusted; otherwise emptied and rebuilt by ``from_log`` from what the log holds (``fresh``:
    names only, every value logged again). Returns what was read of the log, if anything."""
    trust = ledger.check(log_id, previous.get("capture_id") if previous else None,
                         previous.get("seq") if previous else None)
    if trust.trusted and not fresh:
        echo(f"capture: key ledger {ledger.root} is as the previous run left it: nothing is read "
             "from the log; a rescan compares the source's digests with it")
        return None
    if trust.trusted:
        ledger.forget_digests(log_id)
        return None
    ledger.reset(log_id)
    began = time.monotonic()
    found = from_log(ledger)
    if found.records:
        echo(f"capture: key ledger {ledger.root} rebuilt from the log ({trust.why}): "
             f"{counted(found.records, 'record')} read in "
             f"{time.monotonic() - began:.0f}s, {counted(found.keys, 'key')} of db {db}")
    return found
