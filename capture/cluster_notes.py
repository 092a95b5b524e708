"""Keyspace notifications from every primary of a Redis Cluster, into one DirtySet.

A cluster node publishes the keyspace events of its own keys only: one subscriber per primary
(capture/notifications.Notifications each, with its gap detection). The set of primaries follows
the topology (``update``): a failed-over or removed primary's subscriber is stopped, a new primary
gets one. ``epoch`` changes whenever any subscriber (re)subscribes or the set changes, so "healthy
since the last resync" means every primary's subscription, unbroken.
"""
from __future__ import annotations

import logging
from typing import Callable

import redis

from conveyor.capture.notifications import DirtySet, Notifications
from conveyor.keys import KeyFilter

log = logging.getLogger("conveyor.capture")


class NotificationsGroup:
    def __init__(self, *, connect: Callable[[str], redis.Redis], db: int, dirty: DirtySet,
                 key_filter: KeyFilter, on_gap: Callable[[str, str], None],
                 user: str | None = None) -> None:
        self.connect, self.db, self.dirty, self.filter = connect, db, dirty, key_filter
        self.on_gap, self.user = on_gap, user
        self.members: dict[str, Notifications] = {}
        self.generation = 0

    def _member(self, name: str) -> Notifications:
        return Notifications(connect=lambda: self.connect(name), db=self.db, dirty=self.dirty,
                             key_filter=self.filter, user=self.user,
                             on_gap=lambda why: self.on_gap(name, f"node {name}: {why}"))

    def update(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Subscribe to exactly ``names`` (primaries); returns (added, removed). Subscribed before
        it returns: what a resync then scans is covered by notifications."""
        added = [n for n in names if n not in self.members]
        removed = [n for n in self.members if n not in names]
        for name in removed:
            self.members.pop(name).stop(join=False)   # it may be waiting on a dead node
        for name in added:
            m = self.members[name] = self._member(name)
            try:
                m.start()
            except TimeoutError as e:
                m.stop(join=False)
                del self.members[name]
                from conveyor.errors import SourceError
                raise SourceError(f"cannot subscribe to keyspace notifications of source node "
                                  f"{name}: {e}") from e
        if added or removed:
            self.generation += 1
        return added, removed

    def start(self) -> None:
        pass                                 # update() subscribes

    def stop(self) -> None:
        for m in self.members.values():
            m.stop(join=False)
        for m in self.members.values():
            m.stop()

    @property
    def healthy(self) -> bool:
        return bool(self.members) and all(m.healthy for m in self.members.values())

    @property
    def epoch(self) -> tuple:
        return (self.generation,) + tuple(sorted((n, m.epoch) for n, m in self.members.items()))

    @property
    def fatal(self):
        return next((m.fatal for m in self.members.values() if m.fatal is not None), None)
