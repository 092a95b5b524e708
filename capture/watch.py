"""The source's identity and the commands that send no keyspace notification.

A restart (a new run_id) loses the subscription and, without persistence, the data; FLUSHDB,
FLUSHALL and SWAPDB change whole databases without one notification. All three show in one INFO
call (server + commandstats), cheap enough to make about once a second in live modes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import redis

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
