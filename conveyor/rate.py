"""``--max-rate``: how fast capture and verify may read the source, in keys and bytes per second.

A pacer in the GCRA style: each read of ``n`` keys (and ``b`` bytes) moves a "free again at"
time forward by n/rate (b/byte_rate); the reader waits until that time has come. The average rate
is held exactly, with bursts of one batch at most: a reader that wants the rate held over short
windows reads in batches of about a tenth of the rate (``batch_for``).

Reads that follow keyspace notifications are never paced (a dirty key waiting too long would
turn into a full dirty set, that is a gap): the live loop asks ``delay()`` and goes on with the
changed keys while a scan waits for its turn.
"""
from __future__ import annotations

import threading
import time

BATCH_SHARE = 10                  # a paced scan reads about rate / BATCH_SHARE keys at a time


class Pacer:
    """Holds reads to ``keys_per_s`` keys and ``bytes_per_s`` bytes a second (None: no limit)."""

    def __init__(self, keys_per_s: float | None = None, bytes_per_s: float | None = None,
                 clock=time.monotonic) -> None:
        if (keys_per_s is not None and keys_per_s <= 0) or (bytes_per_s is not None
                                                            and bytes_per_s <= 0):
            raise ValueError("a rate must be positive")
        self.keys_per_s, self.bytes_per_s = keys_per_s, bytes_per_s
        self._clock = clock
        self._free_at = clock()
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        return self.keys_per_s is not None or self.bytes_per_s is not None

    def batch_for(self, wanted: int) -> int:
        """How many keys one paced read should ask for (SCAN COUNT, a page)."""
        if self.keys_per_s is None:
            return wanted
        return max(1, min(wanted, int(self.keys_per_s / BATCH_SHARE)))

    def charge(self, keys: int = 0, nbytes: int = 0) -> None:
        """Count a read already made: later reads wait for it."""
        if not self.limited:
            return
        cost = max(keys / self.keys_per_s if self.keys_per_s else 0.0,
                   nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
        with self._lock:
            now = self._clock()
            self._free_at = max(self._free_at, now - 1.0 / BATCH_SHARE) + cost

    def delay(self) -> float:
        """Seconds until the next read may start (0: now)."""
        if not self.limited:
            return 0.0
        return max(0.0, self._free_at - self._clock())

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Wait until the next read may start; False when ``stop`` was set meanwhile."""
        d = self.delay()
        if d <= 0:
            return True
        if stop is None:
            time.sleep(d)
            return True
        return not stop.wait(d)


UNLIMITED = Pacer()
