"""Progress and log output on stderr.

On a terminal: rich progress bars. Elsewhere (a container, a pipe): one line per process every
``LINE_INTERVAL_S`` seconds, so a container log shows movement long before the end. With
``--log-format json`` every log record and every progress report is one JSON object per line,
for log shippers. The final report lines of each command stay on stdout.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn)

LINE_INTERVAL_S = 5.0
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, plus any ``extra`` fields."""

    _plain = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in self._plain and k != "message"})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """A log record worded as conveyor's own lines are: ``<time> apply: warning: <message>``
    (the stage from the logger's name), beside ``capture: warning: …`` report lines."""

    STAGES = ("capture", "apply", "verify", "log", "kafka", "cluster", "metrics")

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        stage = parts[1] if len(parts) > 1 and parts[1] in self.STAGES else "conveyor"
        when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{when} {stage}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: int, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    Display.json = fmt == "json"


class Display:
    """Progress of the processes of one command; callers report without caring how it shows."""

    json = False                    # set by setup_logging(); one format per command line

    def __init__(self, enabled: bool | None = None) -> None:
        console = Console(stderr=True)
        self.bars = console.is_terminal and not self.json if enabled is None else enabled
        self.lines = enabled is None and not self.bars     # the default off a terminal
        self._progress = Progress(
            TextColumn("[bold]{task.description:<10}"), BarColumn(), TaskProgressColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]:>10.0f} {task.fields[unit]}/s"),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
            console=console, transient=False, disable=not self.bars, refresh_per_second=4)
        self._tasks: dict[str, int] = {}
        self._last_line: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.bars or self.lines

    def __enter__(self) -> "Display":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, name: str, completed: int, total: int | None = None, rate: float = 0.0,
               unit: str = "keys", note: str = "") -> None:
        if self.lines:
            self._line(name, completed, total, rate, unit, note)
        if not self.bars:
            return
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total, rate=0.0, unit=unit,
                                                        note="")
        self._progress.update(self._tasks[name], completed=completed,
                              total=max(total, completed) if total is not None else None,
                              rate=rate, unit=unit, note=note)

    def _line(self, name, completed, total, rate, unit, note) -> None:
        now = time.monotonic()
        first = self._last_line.setdefault(name, now)
        if now - first < LINE_INTERVAL_S or now - self._last_line.get(f"{name}:shown", 0) < LINE_INTERVAL_S:
            return
        self._last_line[f"{name}:shown"] = now
        if self.json:
            doc = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   "event": "progress", "stage": name.lower(), unit: completed,
                   "rate_per_s": round(rate, 1)}
            if total:
                doc["total"] = total
            if note:
                doc["note"] = note
            print(json.dumps(doc), file=sys.stderr, flush=True)
            return
        of = f"/{total:,}" if total else ""
        print(f"progress: {name} {completed:,}{of} {unit}, {rate:,.0f} {unit}/s"
              + (f"; {note}" if note else ""), file=sys.stderr, flush=True)


def echo(msg: str, **fields) -> None:
    """A report line on stdout; with --log-format json also a ``report`` event on stderr, with
    ``fields`` (a final report's counts) as fields of their own."""
    print(msg, file=sys.stdout, flush=True)
    if Display.json:
        print(json.dumps({"ts": _now(), "event": "report", "message": msg, **fields},
                         default=str), file=sys.stderr, flush=True)


def fatal(msg: str, code: int) -> None:
    """The line that ends a command that failed: text, or with --log-format json an ``error``
    event, on stderr."""
    if Display.json:
        print(json.dumps({"ts": _now(), "level": "error", "event": "fatal", "message": msg,
                          "exit_code": code}), file=sys.stderr, flush=True)
    else:
        print(msg, file=sys.stderr, flush=True)


def counts(obj) -> dict:
    """The scalar fields of a stats dataclass (its counts), for a JSON report."""
    return {f.name: v for f in dataclasses.fields(obj)
            if isinstance(v := getattr(obj, f.name), (int, float, str, bool)) and v is not None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
