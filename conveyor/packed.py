"""Batches of commands on the hot paths, routed: to the one server of a plain client, per key's
node for a RedisCluster (conveyor.cluster), or to a source that routes batches itself. Each batch
goes out as one packed buffer and its replies are parsed by one hiredis Reader (conveyor.exchange):
raw replies, an error reply as an exception instance in its place.
"""
from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from conveyor import cluster
from conveyor.exchange import SEND_BYTES, run_on  # noqa: F401 - re-exported

__all__ = ["Batch", "run", "run_on", "SEND_BYTES"]


class Batch:
    """Commands queued like a pipeline's (``execute_command(*args)``), run with ``run(client)``."""

    def __init__(self) -> None:
        self.commands: list[tuple] = []

    def __len__(self) -> int:
        return len(self.commands)

    def execute_command(self, *args) -> None:
        self.commands.append(args)

    def run(self, client: redis.Redis) -> list:
        return run(client, self.commands)


def run(client: redis.Redis, commands: list[tuple]) -> list:
    """The replies of ``commands``, in order (error replies as exception instances). With a
    RedisCluster client, each command goes to the node of its key's slot (conveyor.cluster)."""
    if isinstance(client, RedisCluster):
        return cluster.run(client, commands)
    routed = getattr(client, "run_packed", None)   # a source that routes batches itself
    if routed is not None:
        return routed(commands)
    return run_on([(client, commands)])[0]
