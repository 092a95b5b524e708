"""The source's identity and the commands that send no keyspace notification.

A restart (a new run_id) loses the subscription and, without persistence, the data; FLUSHDB,
FLUSHALL and SWAPDB change whole databases without one notification. All three show in one INFO
call (server + commandstats), cheap enough to make about once a second in live modes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from conveyor.capture.notifications import check_notifications
from conveyor.errors import SourceError

log = logging.getLogger("conveyor.capture")

WATCHED_COMMANDS = ("flushdb", "flushall", "swapdb")


@dataclass(frozen=True)
class SourceFacts:
    run_id: str
    calls: dict[str, int] = field(default_factory=dict)   # WATCHED_COMMANDS -> calls so far


def read_facts(client: redis.Redis, version: tuple[int, ...]) -> SourceFacts:
    """One INFO call. Redis < 7 takes a single section: "all" holds both."""
    info = client.info("server", "commandstats") if version >= (7, 0) else client.info("all")
    calls = {}
    for cmd in WATCHED_COMMANDS:
        stat = info.get(f"cmdstat_{cmd}")
        calls[cmd] = int(stat.get("calls", 0)) if isinstance(stat, dict) else 0
    return SourceFacts(str(info.get("run_id", "")), calls)


class SourceWatch:
    """Compares each new reading with the last one; every difference is a gap to heal."""

    def __init__(self, first: SourceFacts) -> None:
        self.last = first

    def changes(self, now: SourceFacts) -> list[str]:
        last, self.last = self.last, now
        if now.run_id != last.run_id:
            return [f"source restarted (run_id {last.run_id[:12]} -> {now.run_id[:12]})"]
        out, reset = [], False
        for cmd in WATCHED_COMMANDS:
            before, after = last.calls.get(cmd, 0), now.calls.get(cmd, 0)
            if after > before:
                out.append(f"{cmd.upper()} on the source" + (f" ({after - before} calls)"
                                                              if after - before > 1 else ""))
            reset |= after < before
        if reset:
            out.append("the source's command statistics went down (CONFIG RESETSTAT): a FLUSHDB, "
                       "FLUSHALL or SWAPDB may have gone unseen")
        return out


class Watcher:
    """A standalone source watched in live modes: a restart, FLUSHDB, FLUSHALL or SWAPDB since
    the last look is a gap; a restart also rechecks keyspace notifications. ``read(fn, what)``
    is the capture's supervised source read; ``gap(why)`` reports."""

    def __init__(self, *, source: redis.Redis, version: tuple[int, ...], read, gap,
                 enable_notifications: bool) -> None:
        self.source, self.version, self.read, self.gap = source, version, read, gap
        self.enable_notifications = enable_notifications
        self.watch: SourceWatch | None = None

    def start(self) -> None:
        facts = self._facts()
        self.watch = SourceWatch(facts) if facts else None

    def look(self) -> None:
        facts = self._facts() if self.watch is not None else None
        if facts is None or self.watch is None:
            return
        restarted = facts.run_id != self.watch.last.run_id
        for why in self.watch.changes(facts):
            self.gap(why)
        if restarted:
            self._recheck_notifications()

    def _recheck_notifications(self) -> None:
        """A restarted source may have lost notify-keyspace-events set with CONFIG SET: without
        them no change would arrive, silently. Set them again (--enable-notifications) or stop."""
        warning = self.read(lambda: check_notifications(self.source,
                                                        enable=self.enable_notifications,
                                                        where="the restarted source"),
                            "CONFIG GET notify-keyspace-events")
        if warning:
            log.warning("%s", warning)

    def _facts(self) -> SourceFacts | None:
        try:
            return self.read(lambda: read_facts(self.source, self.version),
                             "INFO (run_id and FLUSHDB/FLUSHALL/SWAPDB counters)")
        except SourceError as e:
            # INFO refused (a managed service): the rest of the capture works; say what is blind.
            log.warning("%s: restarts, FLUSHDB, FLUSHALL and SWAPDB on the source cannot be "
                        "detected in this run", e)
            self.watch = None
            return None
