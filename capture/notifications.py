"""Keyspace notifications -> a bounded set of dirty keys, with every gap detected.

redis-py's PubSub reconnects and resubscribes on its own after a lost connection, which is exactly
how a client-side tool loses changes without noticing. Here every subscription confirmation after
the first one, and every error, is a gap: changes made while we were not subscribed were missed, so
the capture is asked to resync (a catch-up scan) once the subscription is live again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import redis

from conveyor.keys import KeyFilter

log = logging.getLogger("conveyor.capture")

DIRTY_LIMIT = 1_000_000          # keys waiting to be read; beyond it the set is dropped for a resync
RECONNECT_MAX_WAIT_S = 10.0
READY_TIMEOUT_S = 10.0
REQUIRED_FLAGS = "KA"            # keyspace channel + every generic and type event (incl. expired, evicted)


class DirtySet:
    """Keys changed on the source and not read yet; a key already waiting is not queued twice."""

    def __init__(self, limit: int = DIRTY_LIMIT) -> None:
        self.limit = limit
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._event = threading.Event()
        self.marked = 0              # notifications that marked a key (including repeats)

    def add(self, key: bytes) -> bool:
        """False when the set is full: the caller must treat that as a gap."""
        with self._lock:
            self.marked += 1
            if key not in self._keys:
                if len(self._keys) >= self.limit:
                    return False
                self._keys[key] = None
        self._event.set()
        return True

    def take(self, n: int) -> list[bytes]:
        with self._lock:
            out = []
            while self._keys and len(out) < n:
                out.append(self._keys.popitem(last=False)[0])
            if not self._keys:
                self._event.clear()
            return out

    def clear(self) -> int:
        with self._lock:
            n = len(self._keys)
            self._keys.clear()
            self._event.clear()
            return n

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def __len__(self) -> int:
        return len(self._keys)


def missing_flags(config_value: str) -> str:
    """What ``notify-keyspace-events`` lacks for capture ('' when it has everything)."""
    have = set(config_value)
    if "A" in have:
        have |= set("g$lshzxet")
    need = ["K"] + [c for c in "g$lshzxet"]
    return "".join(c for c in need if c not in have)


class Notifications:
    """Subscribes to ``__keyspace@DB__:*`` on its own thread and marks keys dirty."""

    def __init__(self, *, connect: Callable[[], redis.Redis], db: int, dirty: DirtySet,
                 key_filter: KeyFilter, on_gap: Callable[[str], None]) -> None:
        self.connect, self.db, self.dirty, self.filter = connect, db, dirty, key_filter
        self.on_gap = on_gap
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.last_message = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
        self._prefix = f"__keyspace@{db}__:".encode()

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(READY_TIMEOUT_S):
            raise TimeoutError(f"no subscription confirmation within {READY_TIMEOUT_S}s: "
                               f"{self.error or 'source did not answer PSUBSCRIBE'}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        pending_gap: str | None = None
        wait = 0.1
        while not self._stop.is_set():
            try:
                pending_gap = self._listen(pending_gap)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                self.error = e
                pending_gap = f"subscriber connection lost ({type(e).__name__}: {e})"
                log.warning("%s; reconnecting in %.1fs", pending_gap, wait)
                self._stop.wait(wait)
                wait = min(wait * 2, RECONNECT_MAX_WAIT_S)
                continue
            wait = 0.1

    def _listen(self, pending_gap: str | None) -> None:
        pubsub = self.connect().pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.psubscribe(self._prefix + b"*")
            confirmations = 0
            prefix_len = len(self._prefix)
            while not self._stop.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg is None:
                    continue
                kind = msg["type"]
                if kind == "pmessage":
                    self.last_message = time.monotonic()
                    key = msg["channel"][prefix_len:]
                    if self.filter.accepts_name(key, check_glob=True) and not self.dirty.add(key):
                        dropped = self.dirty.clear()
                        self.on_gap(f"dirty-key set full ({self.dirty.limit} keys, "
                                    f"{dropped} dropped for a resync)")
                elif kind == "psubscribe":
                    confirmations += 1
                    if confirmations > 1:      # redis-py reconnected and resubscribed by itself
                        self.on_gap("subscriber reconnected (connection lost or killed by the server)")
                    elif pending_gap:
                        self.on_gap(pending_gap)
                        pending_gap = None
                    self.ready.set()
        finally:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass


def check_notifications(client: redis.Redis, *, enable: bool, where: str) -> str | None:
    """Make sure the source publishes the keyspace events capture needs.

    Returns a warning when the check could not be made (CONFIG refused, as on managed services);
    raises SourceError with the exact setting to change when events are missing and ``enable`` is
    off; sets them with CONFIG SET when ``enable`` is on.
    """
    from conveyor.errors import SourceError

    try:
        current = client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    except redis.ResponseError as e:
        return (f"could not check notify-keyspace-events on {where} (CONFIG refused: {e}); "
                "continuing, but if keyspace notifications are off no change will be captured")
    lacking = missing_flags(current)
    if not lacking:
        return None
    # Keep the flags already set (E, m, n, d...), add K, and name the classes with A.
    kept = [c for c in (current or "") if c not in "Kg$lshzxetA"]
    wanted = "K" + "".join(kept) + "A"
    if enable:
        try:
            client.config_set("notify-keyspace-events", wanted)
        except redis.ResponseError as e:
            raise SourceError(f"cannot enable keyspace notifications on {where}: {e}") from e
        log.warning("enabled keyspace notifications on %s: notify-keyspace-events %r -> %r",
                    where, current, wanted)
        return None
    raise SourceError(
        f"keyspace notifications on {where} lack {lacking!r} (notify-keyspace-events is "
        f"{current!r}): set notify-keyspace-events to {wanted!r} — in redis.conf "
        f"(notify-keyspace-events {wanted}), with CONFIG SET notify-keyspace-events {wanted}, or in "
        "a managed service's parameter group — or pass --enable-notifications to let conveyor set it")
