"""Redis Cluster on either side: detection, the cluster client, and hot-path batches per node.

Routing is redis-py's: ``RedisCluster`` keeps the slot table (its NodesManager), ``keyslot`` hashes a
key, ``move_slot`` learns a MOVED redirection and ``initialize`` reloads the topology. What is ours is
the batch: the commands of a batch are grouped by the node that owns each key's slot and every group
goes out as one packed buffer (conveyor.exchange), all nodes at once. A reply that is a redirection or
a cluster-state error (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a node that went away during a failover) is
never taken as the command's outcome: the topology is refreshed and the command is sent again, in
its original order among the commands of its key, until it gets a real reply.
"""
from __future__ import annotations

import logging
import time
from functools import lru_cache
from itertools import count
from typing import Callable, Iterable

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (AskError, ClusterDownError, MasterDownError, MovedError,
                              RedisClusterException, TryAgainError)

from conveyor import retry
from conveyor.exchange import run_on

log = logging.getLogger("conveyor.cluster")

SLOTS = 16384
# Commands whose first argument is their only key: routed without asking redis-py's command parser
# (the hot paths use only these; anything else goes through RedisCluster.determine_slot).
KEY_FIRST = frozenset(
    c.encode() if isinstance(c, str) else c for c in (
        "DUMP", "PTTL", "PEXPIRETIME", "RESTORE", "DEL", "UNLINK", "TYPE", "PEXPIREAT", "PEXPIRE",
        "PERSIST", "SET", "GET", "HSET", "HGETALL", "RPUSH", "LRANGE", "SADD", "SMEMBERS", "ZADD",
        "ZRANGE", "XADD", "XRANGE", "XINFO", "EXISTS", "MEMORY", "OBJECT", "HSCAN", "SSCAN",
        "ZSCAN", "LLEN", "HLEN", "SCARD", "ZCARD", "XLEN", "STRLEN", "RENAME", "APPEND", "SETRANGE",
        "GETRANGE", "XGROUP", "XSETID", "LPUSH", "HMSET", "INCRBY", "PSETEX"))
TWO_WORD = frozenset((b"MEMORY", b"OBJECT", b"XINFO", b"XGROUP"))   # the key comes after a subcommand


def cluster_enabled(client: redis.Redis) -> bool | None:
    """True when the server is a node of a Redis Cluster, None when INFO is refused (ACL)."""
    try:
        return str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    except redis.ResponseError:
        return None


def is_cluster(client) -> bool:
    return isinstance(client, RedisCluster)


def cluster_client(uri: str, **opts) -> RedisCluster:
    """The cluster client for the cluster ``uri`` names one node of (same credentials and TLS for
    every node). Replicas are known too (``--read-from replica``)."""
    return RedisCluster.from_url(uri, require_full_coverage=False, **opts)


def primaries(client: RedisCluster) -> list[ClusterNode]:
    return sorted(client.get_primaries(), key=lambda n: n.name)


def node_client(client: RedisCluster, node: ClusterNode) -> redis.Redis:
    """A plain client of one node (its own pool, as redis-py keeps it)."""
    conn = client.get_redis_connection(node)
    if conn is None:
        client.nodes_manager.create_redis_connections([node])
        conn = client.get_redis_connection(node)
    return conn


def primary_clients(client) -> list[redis.Redis]:
    """Plain clients of every primary of a cluster (what SCAN, DBSIZE and INFO must each ask),
    or ``[client]`` for a single server."""
    if not is_cluster(client):
        return [client]
    return [node_client(client, n) for n in primaries(client)]


def refresh(client: RedisCluster) -> None:
    """Reload the slot table (a failover or a resharding since); every node down: next time."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, RedisClusterException, OSError) as err:
        # every node unreachable for now (redis-py says so with RedisClusterException): next round
        log.debug("cluster topology refresh failed: %s", err)


def slot_ranges(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted slots as inclusive ranges: {1,2,3,7} -> [(1, 3), (7, 7)]."""
    out: list[list[int]] = []
    for s in sorted(set(slots)):
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return [(a, b) for a, b in out]


def slots_of(client: RedisCluster, node: ClusterNode) -> set[int]:
    """The slots the client's table gives to ``node`` (as primary)."""
    return {s for s, nodes in client.nodes_manager.slots_cache.items() if nodes and nodes[0] is node}


def topology(client: RedisCluster) -> dict[int, str]:
    """slot -> name (host:port) of its primary, from the client's current table."""
    return {s: nodes[0].name for s, nodes in client.nodes_manager.slots_cache.items() if nodes}


@lru_cache(maxsize=1)
def _slot_tags() -> tuple[bytes, ...]:
    """For every slot, a short string whose hash is that slot (found once, about 0.1 s)."""
    tags: list[bytes | None] = [None] * SLOTS
    missing = SLOTS
    for i in count():
        t = b"%x" % i
        s = key_slot(t)
        if tags[s] is None:
            tags[s] = t
            missing -= 1
            if not missing:
                return tuple(tags)  # type: ignore[arg-type]
    raise AssertionError("unreachable")


def slot_tag(slot: int) -> bytes:
    """A hash tag (``{...}``) that puts a key into ``slot``: temporary keys built next to a key
    live in the key's slot, so RENAME onto the key stays on one node."""
    return b"{" + _slot_tags()[slot] + b"}"


def key_of(command: tuple) -> bytes | str | None:
    """The key a hot-path command is routed by (None: let redis-py's parser tell)."""
    name = command[0]
    name = name.upper() if isinstance(name, bytes) else name.upper().encode()
    if name in KEY_FIRST:
        return command[2] if name in TWO_WORD else command[1]
    return None


def _slot(client: RedisCluster, command: tuple) -> int:
    key = key_of(command)
    if key is not None:
        return client.keyslot(key)
    return client.determine_slot(*command)


RETRY = (MovedError, AskError, TryAgainError, ClusterDownError, MasterDownError)


def run(client: RedisCluster, commands: list[tuple],
        on_redirect: Callable[[BaseException], None] | None = None,
        replica: bool = False) -> list:
    """The replies of ``commands`` (error replies as exception instances), each from the node that
    owns its key's slot. Redirections are followed until every command has a real reply; a
    connection lost to a node mid-batch (a failover) refreshes the topology and resends that node's
    commands. After retry.CLUSTER_ROUNDS rounds the last error is raised (a cluster down for that long is
    the caller's to wait out). ``replica``: read-only commands, sent to a replica of the slot's
    shard (its primary when it has none), on a READONLY connection."""
    replies: list = [None] * len(commands)
    todo = list(range(len(commands)))
    asking: dict[int, ClusterNode] = {}
    last: BaseException | None = None
    for round_ in range(retry.CLUSTER_ROUNDS):
        todo, last = _round(client, commands, todo, asking, replies, on_redirect, replica)
        if not todo:
            return replies
        time.sleep(retry.cluster_pause(round_))
    raise last  # type: ignore[misc]


def shard_node(client: RedisCluster, slot: int, replica: bool = False) -> ClusterNode:
    """The node that serves ``slot``: its primary, or with ``replica`` its shard's first replica
    (the same one every time, so a read-your-scan barrier can wait for that one), else the
    primary."""
    if not replica:
        return client.nodes_manager.get_node_from_slot(slot)
    nodes = client.nodes_manager.slots_cache.get(slot)
    if not nodes:
        return client.nodes_manager.get_node_from_slot(slot)   # raises SlotNotCoveredError
    return nodes[1] if len(nodes) > 1 else nodes[0]


def replica_of(client: RedisCluster, primary: ClusterNode) -> ClusterNode | None:
    """The replica that ``shard_node(..., replica=True)`` picks for ``primary``'s slots."""
    for nodes in client.nodes_manager.slots_cache.values():
        if nodes and nodes[0].name == primary.name:
            return nodes[1] if len(nodes) > 1 else None
    return None


CONTROL = (("ASKING",), ("READONLY",))     # sent ahead of commands; their replies are dropped


def _round(client, commands, todo, asking, replies, on_redirect, replica=False):
    groups: dict[str, tuple[ClusterNode, list[int]]] = {}
    slot_of: dict[int, int] = {}
    for i in todo:
        slot_of[i] = _slot(client, commands[i])
        node = asking.get(i) or shard_node(client, slot_of[i], replica)
        groups.setdefault(node.name, (node, []))[1].append(i)
    batches, index = [], []
    for node, idx in groups.values():
        # READONLY: a replica answers reads of its primary's slots instead of redirecting them
        # (a per-connection flag; a primary ignores it).
        cmds: list[tuple] = [("READONLY",)] if replica else []
        for i in idx:
            if i in asking:
                cmds.append(("ASKING",))
            cmds.append(commands[i])
        batches.append((node_client(client, node), cmds))
        index.append(idx)
    try:
        results = run_on(batches)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        # One node failed (killed, failing over): the whole round is sent again after a topology
        # refresh (state writes and reads are idempotent, and per-key order is kept).
        if on_redirect is not None:
            on_redirect(e)
        refresh(client)
        return sorted(todo), e
    got: dict[int, object] = {}
    for idx, res, (_, cmds) in zip(index, results, batches):
        res = [r for c, r in zip(cmds, res) if c not in CONTROL]
        got.update(zip(idx, res))
    again, last, stale = [], None, False
    new_asking: dict[int, ClusterNode] = {}
    redo: set[int] = set()            # slots with a redirected command: later ones go again too
    for i in sorted(todo):
        r = got[i]
        if not isinstance(r, RETRY) and slot_of[i] not in redo:
            replies[i] = r
            continue
        if isinstance(r, MovedError):
            client.nodes_manager.move_slot(r)
        elif isinstance(r, AskError):
            new_asking[i] = _node(client, r)
        elif isinstance(r, RETRY):
            stale = True              # TRYAGAIN / CLUSTERDOWN: the slot table may be out of date
        redo.add(slot_of[i])
        again.append(i)
        last = r if isinstance(r, RETRY) else last
    if again:
        if on_redirect is not None and last is not None:
            on_redirect(last)
        if stale:
            refresh(client)
    asking.clear()
    asking.update(new_asking)
    return again, last


def _node(client: RedisCluster, e: AskError) -> ClusterNode:
    node = client.nodes_manager.get_node(host=e.host, port=e.port)
    if node is None:
        node = ClusterNode(e.host, e.port)
        client.nodes_manager.nodes_cache[node.name] = node
    return node

