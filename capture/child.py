"""Capture in a process of its own, for ``replicate``: capture and apply then run on two cores
instead of sharing one interpreter lock.

The parent tells the child to stop over a pipe (its own SIGINT/SIGTERM handler does, once); the
child sends back its progress (shown by the parent's display, next to apply's) and, at the end,
its CaptureStats or the one line of its failure. The child ignores SIGINT: a
Ctrl-C reaches the whole process group, and the parent's stop is the one that counts (a second
Ctrl-C aborts the parent, whose end closes the pipe: the child then stops cleanly too). SIGTERM
sent to the child itself stops it cleanly as well.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from types import SimpleNamespace
from typing import Callable

from conveyor.errors import ConveyorError
from conveyor.progress import Display, setup_logging
from conveyor.runner import Interrupts

log = logging.getLogger("conveyor.capture")

FORWARD_INTERVAL_S = 0.25


class CaptureChild:
    """Runs capture (as ``conveyor capture`` would) in a spawned process. ``build(display)``, called
    in the child, returns the capture ready to run: its ``proc`` and a ``close()`` for what it
    opened; it is pickled to the child (a module-level function, or a partial of one)."""

    def __init__(self, build: Callable, display) -> None:
        self.display = display
        ctx = multiprocessing.get_context("spawn")
        self._stop_r, self._stop_w = ctx.Pipe(duplex=False)
        self._result_r, result_w = ctx.Pipe(duplex=False)
        fmt = "json" if Display.json else "text"
        self.proc = ctx.Process(target=_main, name="conveyor-capture", daemon=True,
                                args=(self._stop_r, result_w, build, logging.getLogger().level,
                                      fmt))
        self._result_w = result_w
        self.result = None
        self.error: ConveyorError | None = None
        # What --metrics-port reads of the capture (the child's counts, as last forwarded).
        self.stats = SimpleNamespace(keys=0, deletes=0, gaps=[], resyncs=0)
        self.caught_up = False

    def start(self) -> None:
        self.proc.start()
        self._stop_r.close()                 # the child's ends belong to the child now
        self._result_w.close()
        self._listener = threading.Thread(target=self._listen, name="capture-results",
                                          daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        """Progress until the outcome: the stats, or the one line of a failure."""
        while True:
            try:
                kind, what = self._result_r.recv()
            except (EOFError, OSError):
                self.proc.join()
                self.error = ConveyorError(f"the capture process ended without a result (exit "
                                           f"code {self.proc.exitcode})")
                return
            if kind == "progress":
                name, args, kw = what
                self.display.update(name, *args, **kw)
                continue
            if kind == "counts":
                self.stats, self.caught_up = what
                continue
            if kind == "ok":
                self.result = what
            else:
                self.error = ConveyorError(what)
            return

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    @property
    def heartbeat(self) -> float:
        """A sign of life for /healthz: the capture process is running."""
        return time.monotonic() if self.proc.is_alive() else 0.0

    def stop(self) -> None:
        try:
            self._stop_w.send("stop")
        except (OSError, ValueError):
            pass                             # already gone: nothing left to stop

    def join(self) -> None:
        self._listener.join()
        self.proc.join()
        self._stop_w.close()
        self._result_r.close()


class _Forward:
    """The child's display: progress sent to the parent, a few times a second per stage."""

    def __init__(self, result_w) -> None:
        self.result_w = result_w
        self._sent: dict[str, float] = {}
        self.proc = None                     # the Capture, once built: its counts go along


    def update(self, name: str, *args, **kw) -> None:
        now = time.monotonic()
        if now - self._sent.get(name, 0.0) < FORWARD_INTERVAL_S:
            return
        self._sent[name] = now
        self.result_w.send(("progress", (name, args, kw)))
        if self.proc is not None:
            st = self.proc.stats
            counts = SimpleNamespace(keys=st.keys, deletes=st.deletes, gaps=list(st.gaps),
                                     resyncs=st.resyncs)
            self.result_w.send(("counts", (counts, self.proc.caught_up)))


def _main(stop_r, result_w, build: Callable, level: int, fmt: str) -> None:
    setup_logging(level, fmt)
    interrupts = Interrupts()
    with interrupts.installed():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        forward = _Forward(result_w)
        try:
            built = build(forward)
        except ConveyorError as e:
            result_w.send(("error", str(e)))
            return
        proc = forward.proc = built.proc
        interrupts.register(proc)
        threading.Thread(target=_stop_when_told, args=(stop_r, proc), daemon=True).start()
        try:
            result_w.send(("ok", proc.run()))
        except ConveyorError as e:
            result_w.send(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - reported by the parent as one line
            log.exception("capture failed")
            result_w.send(("error", f"capture failed: {type(e).__name__}: {e}"))
        finally:
            built.close()


def _stop_when_told(stop_r, proc) -> None:
    """A message, or the parent's end of the pipe closing (the parent is gone), stops capture."""
    try:
        stop_r.recv()
    except (EOFError, OSError):
        pass
    proc.stop()
