"""Waiting out transient failures of the source and of the log, for as long as it takes.

conveyor/retry.py decides what is transient (connection refused or reset, timeout, LOADING; the
log's LogUnavailable) and how long to wait; what is not (authentication, NOPERM, any other refusal: one line, exit 1).
Every wait is reported on stderr and through ``on_wait`` (capture puts it in its checkpoint's
``state``); stop() interrupts a wait, which then raises Interrupted.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, TypeVar

import redis
from tenacity import stop_when_event_set

from conveyor import retry
from conveyor.acl import refused_line
from conveyor.errors import ConveyorError, LogUnavailable, SourceError
from conveyor.log.base import History, LogWriter
from conveyor.rate import UNLIMITED, Pacer

log = logging.getLogger("conveyor.capture")

T = TypeVar("T")


class Interrupted(Exception):
    """stop() was called while waiting: the run ends without the call having succeeded."""


def short(e: BaseException) -> str:
    """A driver error with its class (ConnectionError, BusyLoadingError...); ours as they are."""
    return str(e) if isinstance(e, ConveyorError) else f"{type(e).__name__}: {e}"


class Supervisor:
    """Calls a function until it stops failing transiently; ``stop`` (an Event) interrupts.

    ``on_wait(message)`` is told about every wait, and ``on_wait(None)`` once the call succeeded
    after waiting. ``user``: the source's ACL user, named when it lacks a permission."""

    def __init__(self, stop: threading.Event,
                 on_wait: Callable[[str | None], None] | None = None,
                 user: str | None = None) -> None:
        self.stop, self.user = stop, user
        self.on_wait = on_wait or (lambda _msg: None)
        self.source_waits = 0
        self.log_waits = 0

    def source(self, fn: Callable[[], T], what: str) -> T:
        """``fn`` reads the source; a final refusal becomes one SourceError naming ``what``."""
        try:
            return self._call(fn, what, "source", retry.transient_source_error)
        except SourceError:
            raise
        except redis.RedisError as e:
            raise fatal(e, what, self.user) from e

    def log(self, fn: Callable[[], T], what: str) -> T:
        """``fn`` uses the log; LogUnavailable is waited out, LogLost and other errors pass."""
        return self._call(fn, what, "log", lambda e: isinstance(e, LogUnavailable))

    def log_again(self, fn: Callable[[], T], what: str, first: LogUnavailable) -> T:
        """``fn`` just failed with ``first``: wait the log out and call it again (for a caller
        that tries once itself, on a path where a wrapper per call costs too much)."""
        return self._wait(fn, what, "log", lambda e: isinstance(e, LogUnavailable), first)

    def _call(self, fn: Callable[[], T], what: str, whom: str,
              transient: Callable[[BaseException], bool]) -> T:
        try:
            return fn()                           # the common case costs one try
        except Exception as e:  # noqa: BLE001 - sorted by ``transient``; the rest re-raised
            if not transient(e):
                raise
            first = e
        return self._wait(fn, what, whom, transient, first)

    def _wait(self, fn, what, whom, transient, first: BaseException):
        started = time.monotonic()
        self._report(whom, what, first, retry.FIRST_WAIT_S)
        retrying = retry.policy(on=transient, max_wait_s=retry.SOURCE_MAX_WAIT_S,
                                stop=stop_when_event_set(self.stop), sleep=self.stop.wait,
                                before_sleep=lambda rs: self._report(
                                    whom, what, rs.outcome.exception(), rs.next_action.sleep),
                                reraise=True)
        self.stop.wait(retry.FIRST_WAIT_S)
        try:
            result = retrying(fn)
        except Exception as e:  # noqa: BLE001 - only a transient one turns into Interrupted
            if transient(e) and self.stop.is_set():
                raise Interrupted(f"stopped while waiting for the {whom} ({what}): "
                                  f"{short(e)}") from e
            raise
        log.warning("the %s is back after %.0fs (%s)", whom, time.monotonic() - started, what)
        self.on_wait(None)
        return result

    def _report(self, whom: str, what: str, e: BaseException | None, delay: float) -> None:
        if whom == "source":
            self.source_waits += 1
        else:
            self.log_waits += 1
        msg = f"waiting for {'the log' if whom == 'log' else 'source'}: {what}: {short(e)}"
        log.warning("%s; trying again in %.1fs", msg, delay)
        self.on_wait(msg)


class SupervisedWriter(LogWriter):
    """The capture's view of its log writer: LogUnavailable from any call is waited out and the
    call made again unchanged (the writer keeps its buffered records until a flush succeeds).
    LogLost passes through. The process that opened the writer closes it."""

    def __init__(self, inner: LogWriter, supervisor: Supervisor) -> None:
        self.inner, self.sup = inner, supervisor
        self._shaped_like(inner)
        # Live modes: the key ledger, whose entries reach the OS before their events the log.
        self.ledger = None
        # --max-bytes-rate: while ``paced`` (a scan's reads, not changed keys'), every record
        # appended is charged and the next read waits its turn, between a big key's pages too.
        self.pacer: Pacer = UNLIMITED
        self.paced = False

    @property
    def log_id(self) -> str:  # type: ignore[override]
        return self.inner.log_id

    @property
    def warnings(self) -> Iterable[str]:  # type: ignore[override]
        return self.inner.warnings

    def append(self, key: bytes, value: bytes, partition_key: bytes | None = None) -> None:
        if self.ledger is not None:
            self.ledger.write_ahead()
        try:
            self.inner.append(key, value, partition_key)   # per record: no wrapper in the way
        except LogUnavailable as e:
            self.sup.log_again(lambda: self.inner.append(key, value, partition_key), "appending",
                               e)
        if self.paced and self.pacer.bytes_per_s:
            self.pacer.charge(nbytes=len(value))
            self.pacer.wait(self.sup.stop)

    def flush(self, timeout: float = 60.0) -> None:
        self.sup.log(lambda: self.inner.flush(timeout), "flushing")

    def history(self) -> History:
        return self.sup.log(self.inner.history, "reading its history")

    def check_identity(self) -> None:
        self.sup.log(self.inner.check_identity, "checking its identity")

    def adopt_new_log(self) -> None:
        self.sup.log(self.inner.adopt_new_log, "adopting the new log")

    def close(self) -> None:
        pass


def fatal(e: BaseException, where: str, user: str | None = None, command: str = "",
          grant: str = "") -> ConveyorError:
    """An error a helper thread cannot wait out, as the one line the main loop raises; a refused
    permission names what to grant ``user`` (``grant``: the key or channel pattern it needs)."""
    if isinstance(e, ConveyorError):
        return e
    line = refused_line(e, "source", user, command, grant)
    if line:
        return SourceError(line)
    if isinstance(e, redis.RedisError):
        return SourceError(f"the source refused {where}: {short(e)}")
    return ConveyorError(f"{where} failed: {short(e)}")
