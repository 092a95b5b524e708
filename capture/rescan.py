"""A rescan against the key ledger: the digests the scan read, then the keys to read again."""
from __future__ import annotations

import shutil
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterator

from conveyor.capture.ledger import PAGE, Ledger  # noqa: F401 - the type of Rescan.ledger
from conveyor.capture.ledger_files import DELETED, UNKNOWN, UNKNOWN_CRC, Buckets, Chunk, chunks


@dataclass
class Rescan:
    """A rescan against the ledger: digests first (``saw``), then what to read (``to_read``)."""
    ledger: Ledger
    seen: int = 0
    _spill: Buckets | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shutil.rmtree(self.ledger.root / "spill", ignore_errors=True)
        self._spill = Buckets(self.ledger.root / "spill", self.ledger.buckets)

    def saw(self, keys: list[bytes], crcs: bytes, exps: bytes) -> None:
        """The rescan read these digests (UNKNOWN_CRC: a key without one, e.g. a big key)."""
        e = array("q")
        e.frombytes(exps)
        self._spill.add(Chunk(keys, crcs, e, array("I", bytes(4 * len(keys)))))
        self.seen += len(keys)

    def to_read(self, in_scope: Callable[[bytes], bool] | None = None,
                expiry_slack_ms: int = 0) -> Iterator[list[bytes]]:
        """Pages of keys to read again and log: new, changed, or in the ledger and not seen (only
        those ``in_scope`` accepts: a rescan of some slots). Call once the scan is complete.
        ``expiry_slack_ms``: expiries this close are the same (a source without PEXPIRETIME
        gives them as read time + PTTL, a few ms apart from one read to the next)."""
        self._spill.close()
        page: list[bytes] = []
        ledger = self.ledger
        ledger.iterating = True                # no distribute between two pages (see commit)
        try:
            for b, state in ledger.buckets_merged():
                seen: dict[bytes, tuple[bytes, int, int]] = {}
                for chunk in chunks(self._spill.folder / f"{b:04d}"):
                    chunk.apply_to(seen)
                for key, (crc, exp, _) in seen.items():
                    had = state.get(key)
                    if had is None or had[1] in (DELETED, UNKNOWN) or had[0] != crc \
                            or crc == UNKNOWN_CRC or exp == UNKNOWN \
                            or not _same_expiry(had[1], exp, expiry_slack_ms):
                        page.append(key)
                page.extend(k for k, v in state.items()       # a tombstone: logged as gone
                            if v[1] != DELETED and k not in seen
                            and (in_scope is None or in_scope(k)))
                while len(page) >= PAGE:
                    yield page[:PAGE]
                    del page[:PAGE]
            if page:
                yield page
        finally:
            ledger.iterating = False
            shutil.rmtree(self._spill.folder, ignore_errors=True)


def _same_expiry(a: int, b: int, slack: int) -> bool:
    if a == b:
        return True
    return slack > 0 and a >= 0 and b >= 0 and abs(a - b) <= slack


class CatchUp:
    """A rescan under way in a live capture: its SCAN reads digests (``saw``); once it ended,
    the ledger is compared with them (``compare``) and the keys that differ are read again,
    page by page (``next_page``)."""

    def __init__(self) -> None:
        self.rescan: Rescan | None = None
        self.rereads: Iterator[list[bytes]] | None = None
        self.began: tuple[float, int, int] | None = None   # when, digests and re-reads then

    def start(self, ledger: Ledger, began: tuple[float, int, int]) -> None:
        self.close()
        self.rescan, self.began = Rescan(ledger), began

    def close(self) -> None:
        """A comparison still under way is dropped (a new scan covers it)."""
        if self.rereads is not None:
            close = getattr(self.rereads, "close", None)
            if close:
                close()
        self.rescan = self.rereads = None

    def compare(self, in_scope: Callable[[bytes], bool] | None, slack_ms: int) -> None:
        self.rereads = self.rescan.to_read(in_scope, slack_ms)
        self.rescan = None

    def next_page(self) -> list[bytes] | None:
        """The next keys to read again; None once there are no more (the rescan is over)."""
        page = next(self.rereads, None)
        if page is None:
            self.rereads = None
        return page
