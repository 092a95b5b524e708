"""Which keys exist according to the log, rebuilt from what it holds when a live run starts.

A key the log says exists that a later scan no longer sees was deleted (or renamed away) while no
capture ran or while notifications were lost: capture reads it again, which makes it a DELETE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from conveyor.errors import CodecError
from conveyor.events import Codec, Kind
from conveyor.keys import KeyFilter
from conveyor.log.base import History

log = logging.getLogger("conveyor.capture")


@dataclass
class KnownKeys:
    keys: set[bytes] | None     # None: more than the limit, names are no longer tracked
    records: int = 0            # records of the log read
    gap: str = ""               # why the log no longer holds everything appended ("" if it does)


def known_keys(history: History, codec: Codec, db: int, key_filter: KeyFilter,
               limit: int) -> KnownKeys:
    found = KnownKeys(set(), gap="" if history.complete else history.why)
    keys = found.keys
    try:
        for _key, value in history.records:
            found.records += 1
            try:
                evs = codec.decode_all(value)
            except CodecError:
                continue                      # apply dead-letters it; it wrote nothing
            for ev in evs:
                if ev.is_marker or ev.db != db:
                    continue
                if ev.kind == Kind.DELETE:
                    keys.discard(ev.key)
                else:
                    keys.add(ev.key)          # a part too: the key may be half-replaced
            if len(keys) > limit:
                found.keys = None
                break
            if found.records % 1_000_000 == 0:
                log.info("read %d records of the log's history", found.records)
    finally:
        close = getattr(history.records, "close", None)
        if close:
            close()
    if not history.complete:          # a backend may learn of damage only while reading
        found.gap = history.why
    if found.keys is not None and (key_filter.checks_names or key_filter.match):
        found.keys = {k for k in found.keys if key_filter.accepts_name(k, check_glob=True)}
    return found
