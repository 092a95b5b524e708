"""Progress display (rich) on stderr: Scanning with % of DBSIZE and keys/s, apply records/s."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn)


class Display:
    """A no-op when disabled, so processes report progress without caring whether it is shown."""

    def __init__(self, enabled: bool | None = None) -> None:
        console = Console(stderr=True)
        self.enabled = console.is_terminal if enabled is None else enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description:<10}"), BarColumn(), TaskProgressColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]:>10.0f} {task.fields[unit]}/s"),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
            console=console, transient=False, disable=not self.enabled, refresh_per_second=4)
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> "Display":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, name: str, completed: int, total: int | None = None, rate: float = 0.0,
               unit: str = "keys", note: str = "") -> None:
        if not self.enabled:
            return
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total, rate=0.0, unit=unit,
                                                        note="")
        self._progress.update(self._tasks[name], completed=completed,
                              total=max(total, completed) if total is not None else None,
                              rate=rate, unit=unit, note=note)


def echo(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
