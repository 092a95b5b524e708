"""One batch of log records as events: the latest event of each key, the markers in log order,
the keys --on-existing skip leaves alone, and what a dry run would write."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from conveyor.apply.stats import ApplyStats
from conveyor.errors import CodecError
from conveyor.events import Codec, Event, Kind, block_size, now_millis
from conveyor.kept import KeptKeys
from conveyor.keys import KeyRewriter
from conveyor.log import Record

if TYPE_CHECKING:
    from conveyor.databases import TargetDbs

log = logging.getLogger("conveyor.apply")


class Decoder:
    """Decodes batches for one Applier: counts into its ``stats``; an undecodable record goes to
    ``dead_letter(record, reason)``."""

    def __init__(self, codec: Codec, stats: ApplyStats,
                 dead_letter: Callable[[Record, str], None]) -> None:
        self.codec, self.stats, self.dead_letter = codec, stats, dead_letter

    def decode(self, records: list[Record]
               ) -> tuple[dict[tuple, tuple[Event, Record]], list[tuple[Kind, str]]]:
        """Latest event per (db, key) in the batch (events are whole states, so the last one
        wins), and the markers in log order."""
        latest: dict[tuple, tuple[Event, Record]] = {}
        markers: list[tuple[Kind, str]] = []
        for rec, got in zip(records, self.codec.decode_many([r.value for r in records])):
            if isinstance(got, list):          # a block: UPSERTs and DELETEs of whole states
                for ev in got:
                    k = (ev.db, ev.key)
                    if latest.pop(k, None) is not None:
                        self.stats.superseded += 1
                    # (block, event) stands for the key where apply speaks of it alone (a
                    # dead letter holds that event); the block is what is committed.
                    latest[k] = (ev, (rec, ev))
                continue
            if isinstance(got, CodecError):
                n = block_size(rec.key)
                self.dead_letter(rec, f"undecodable record: {got}" if n is None else
                                  f"undecodable block of {n} keys: {got}")
                continue
            ev = got
            if ev.chunk is not None:
                # Parts of a key are applied one by one, in order. A whole state of the key read
                # before them is superseded by them (the last part replaces the key).
                if latest.pop((ev.db, ev.key), None) is not None:
                    self.stats.superseded += 1
                latest[(ev.db, ev.key, ev.chunk["id"], ev.chunk["index"])] = (ev, rec)
            elif ev.kind in (Kind.UPSERT, Kind.DELETE):
                # re-insert: keep log order among keys
                if latest.pop((ev.db, ev.key), None) is not None:
                    self.stats.superseded += 1
                latest[(ev.db, ev.key)] = (ev, rec)
            else:
                self.stats.markers += 1
                if ev.kind is Kind.SNAPSHOT_END:
                    self.stats.snapshot_ends += 1
                markers.append((ev.kind, ev.capture_id))
                log.info("marker %s of capture %s (count %s)", ev.kind.value, ev.capture_id, ev.count)
        return latest, markers

    def keep(self, events: dict, kept: KeptKeys, rename: KeyRewriter | None,
             dbs: TargetDbs | None) -> dict:
        """Leave out the events of keys the target held before the group's first apply."""
        out = {}
        for k, item in events.items():
            ev = item[0]
            name = rename(ev.key) if rename is not None else ev.key
            if kept.holds(dbs.target_of(ev.db) if dbs is not None else ev.db, name):
                self.stats.kept += 1
            else:
                out[k] = item
        return out

    def count_dry(self, events: dict) -> None:
        """What a dry run would have written, counted as a real run counts it."""
        now, st = now_millis(), self.stats
        for ev, _ in events.values():
            if ev.chunk is not None:
                st.chunks += 1
            elif ev.kind is Kind.DELETE:
                st.deleted += 1
            elif ev.expired(now):
                st.expired += 1
            elif ev.payload is not None:
                st.restored += 1
            else:
                st.written += 1
