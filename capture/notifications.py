"""Keyspace notifications -> a bounded set of dirty keys, with every gap detected.

redis-py's PubSub reconnects and resubscribes on its own after a lost connection, which is exactly
how a client-side tool loses changes without noticing. Here the automatic reconnect is switched off,
and every error is a gap: changes made while we were not subscribed were missed, so
the capture is asked to resync (a catch-up scan) once the subscription is live again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conveyor.capture.supervise import fatal, short
from conveyor.retry import transient_source_error
from conveyor.acl import refused_line, user_of
from conveyor.errors import ConveyorError
from conveyor.keys import KeyFilter

log = logging.getLogger("conveyor.capture")

DIRTY_LIMIT = 1_000_000          # keys waiting to be read; beyond it the set is dropped for a resync
RECONNECT_FIRST_WAIT_S = 0.1
RECONNECT_MAX_WAIT_S = 5.0
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

    def wake(self) -> None:
        """Wake whoever waits, with no key marked (something else needs the loop)."""
        self._event.set()

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
    """Subscribes to ``__keyspace@DB__:*`` on its own thread and marks keys dirty.

    The thread never dies quietly: any connection failure is waited out (reconnect with backoff,
    the time unsubscribed reported as a gap once subscribed again); anything else (a refusal, a
    bug) is kept in ``fatal`` for the main loop to raise. ``up`` says whether the subscription is
    live now; ``epoch`` counts subscriptions confirmed, so a caller can tell whether it has been
    up without a break since a given moment.
    """

    def __init__(self, *, connect: Callable[[], redis.Redis], db: int, dirty: DirtySet,
                 key_filter: KeyFilter, on_gap: Callable[[str], None],
                 user: str | None = None) -> None:
        self.connect, self.db, self.dirty, self.filter = connect, db, dirty, key_filter
        self.user = user                     # named when the subscription is refused (ACL)
        self.on_gap = on_gap
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.fatal: ConveyorError | None = None
        self.up = False
        self.epoch = 0
        self.last_message = time.monotonic()
        self._pending_gap: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
        self._prefix = f"__keyspace@{db}__:".encode()

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(READY_TIMEOUT_S):
            raise TimeoutError(f"no subscription confirmation within {READY_TIMEOUT_S}s: "
                               f"{self.error or 'source did not answer PSUBSCRIBE'}")
        if self.fatal is not None:
            raise self.fatal

    def stop(self, join: bool = True) -> None:
        self._stop.set()
        if join and self._thread.is_alive():
            self._thread.join(5)

    @property
    def healthy(self) -> bool:
        return self.up and self.fatal is None and self._pending_gap is None

    def _run(self) -> None:
        wait = RECONNECT_FIRST_WAIT_S
        while not self._stop.is_set():
            try:
                self._listen()
                return
            except Exception as e:  # noqa: BLE001 - sorted below: wait it out, or hand it over
                self.up = False
                self.error = e
                if not transient_source_error(e):
                    self._give_up(e)
                    return
                if self._pending_gap is None:
                    self._pending_gap = f"subscriber connection lost ({short(e)})"
                log.warning("waiting for source: keyspace subscription: %s; reconnecting in %.1fs",
                            short(e), wait)
                self._stop.wait(wait)
                wait = min(wait * 2, RECONNECT_MAX_WAIT_S)

    def _give_up(self, e: BaseException) -> None:
        log.debug("keyspace subscriber stopped", exc_info=e)
        self.fatal = fatal(e, "subscribing to keyspace notifications", self.user, "PSUBSCRIBE",
                           "&" + (self._prefix + b"*").decode())
        self.ready.set()                     # start() must not wait for a confirmation now
        self.dirty.wake()              # wake the main loop, which raises it

    def _listen(self) -> None:
        pubsub = self.connect().pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.psubscribe(self._prefix + b"*")
            # redis-py would reconnect and resubscribe by itself, hiding the time we were not
            # subscribed: every failure comes to us instead.
            pubsub.connection.retry = Retry(NoBackoff(), 0, supported_errors=())
            prefix_len = len(self._prefix)
            confirmed = False
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
                    if confirmed and self._pending_gap is None:
                        # redis-py reconnected and resubscribed by itself (a cluster client's
                        # topology refresh renews connections): changes in between were lost.
                        self._pending_gap = "subscriber connection renewed by the client"
                    confirmed = True
                    self._subscribed()
        finally:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass

    def _subscribed(self) -> None:
        # Up (and a new epoch) before the gap is reported: a caller that sees the gap's resync
        # start also sees the epoch it belongs to.
        self.epoch += 1
        self.up = True
        gap, self._pending_gap = self._pending_gap, None
        if gap:
            self.on_gap(gap)
        self.ready.set()


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
            line = refused_line(e, "source", user_of(client))
            raise SourceError(line or f"cannot enable keyspace notifications on {where}: "
                              f"{e}") from e
        log.warning("enabled keyspace notifications on %s: notify-keyspace-events %r -> %r",
                    where, current, wanted)
        return None
    raise SourceError(
        f"keyspace notifications on {where} lack {lacking!r} (notify-keyspace-events is "
        f"{current!r}): set notify-keyspace-events to {wanted!r} — in redis.conf "
        f"(notify-keyspace-events {wanted}), with CONFIG SET notify-keyspace-events {wanted}, or in "
        "a managed service's parameter group — or pass --enable-notifications to let conveyor set it")
