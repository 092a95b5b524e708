"""Sizing: TYPE + MEMORY USAGE per key, to route each key to a whole read or a read in parts,
and to report (or skip) keys above --mem-limit."""
from __future__ import annotations

import logging

import redis

from conveyor.words import text
from conveyor import values
from conveyor.capture.emitting import Emitter
from conveyor.capture.paging import BigKeyPager
from conveyor.capture.typed import TypedReader
from conveyor.events import now_millis
from conveyor.keys import quoted

log = logging.getLogger("conveyor.capture")

MAX_NAMED = 20                      # keys named in reports (over --mem-limit)


class Sizer:
    """The pipelined read: which keys are gone, big or over --mem-limit, each key then read whole
    (``typed``) or in parts (``pager``). Without a size threshold nor --mem-limit only TYPE is
    asked (``--type struct``)."""

    def __init__(self, *, source: redis.Redis, emitter: Emitter, typed: TypedReader,
                 pager: BigKeyPager, type_filter: str | None, big_key_bytes: int | None,
                 mem_limit: int | None, mem_limit_skip: bool) -> None:
        self.source, self.emitter, self.typed, self.pager = source, emitter, typed, pager
        self.type_filter = type_filter
        self.big_key_bytes = big_key_bytes
        self.mem_limit, self.mem_limit_skip = mem_limit, mem_limit_skip
        self.sizing = bool(big_key_bytes or mem_limit)

    def read(self, keys: list[bytes], check_type: bool) -> list[bytes]:
        """One round of reads; returns the keys to read again (changed type meanwhile)."""
        sizing = self.sizing
        pipe = self.source.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("TYPE", key)
            if sizing:
                pipe.execute_command("MEMORY", "USAGE", key)
        first = pipe.execute(raise_on_error=False)
        step = 2 if sizing else 1
        small: list[tuple[bytes, str]] = []
        big: list[tuple[bytes, str]] = []
        read_ms = now_millis()
        for i, key in enumerate(keys):
            t = first[step * i]
            if isinstance(t, Exception):
                raise t
            type_ = text(t)
            size = first[step * i + 1] if sizing else None
            size = size if isinstance(size, int) else None
            if type_ == "none" or (check_type and type_ != self.type_filter):
                self.emitter.delete(key, read_ms)
                continue
            if self.mem_limit and size is not None and size > self.mem_limit:
                self.over_limit(key, size)
                if self.mem_limit_skip:
                    continue
            if (self.big_key_bytes and size is not None and size > self.big_key_bytes
                    and type_ in values.TYPES):
                big.append((key, type_))
            else:
                small.append((key, type_))
        again = self.typed.read(small) if small else []
        for key, type_ in big:
            if not self.pager.read(key, type_):
                again.append(key)
        return again

    def over_limit(self, key: bytes, size: int) -> None:
        """``key`` uses ``size`` bytes, above --mem-limit: counted, named in the summary, logged."""
        c = self.emitter.counts
        c.over_limit += 1
        c.skipped += self.mem_limit_skip
        if len(c.over_limit_keys) < MAX_NAMED:
            c.over_limit_keys.append((key, size))
        # one warning, not one per key: the summary lists them (-v logs each as it is met)
        first = c.over_limit == 1
        log.log(logging.WARNING if first else logging.INFO,
                "key %s uses %d bytes, above --mem-limit%s%s", quoted(key), size,
                " (skipped)" if self.mem_limit_skip else "",
                "; further keys above it are listed at the end (-v: as they are met)"
                if first else "")
