"""A Redis Cluster as the source StateReader reads: its batches routed per key by conveyor.cluster.

The readers StateReader is made of read through ``pipeline()`` / ``execute_command()`` of a plain
client. ClusterSource offers the same calls, but every batch goes through ``conveyor.cluster.run``
with the cluster client: grouped per node, MOVED and ASK followed (a key read while its slot
migrates is read where it is). Replies get the response callbacks a plain redis-py client would
apply, so the readers see what they see on a standalone source. Scripts are not used on a cluster
(the keys of one batch span slots, which a script may not touch): the pipelined reads take over.

``replica``: reads go to a replica of each shard (``--read-from replica`` while scanning). A key a
replica reports gone is read again from its primary before a DELETE is written (the replica may lag,
or the key may sit on the node importing its slot, which a replica does not redirect to).
"""
from __future__ import annotations

import re

import redis
from redis.cluster import RedisCluster

from conveyor.capture.emitting import Emitter
from conveyor.capture.reader import RAW_COMMANDS, StateReader, raw_reply
from conveyor import cluster
from conveyor.errors import ConfigError


class ClusterSource:
    """The subset of a redis-py client StateReader uses, over a RedisCluster."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client
        self.replica = False
        # The callbacks of a plain client (RESP2), as a standalone read would get its replies.
        self.callbacks = dict(redis.Redis().response_callbacks)
        for cmd in RAW_COMMANDS:
            self.callbacks[cmd] = raw_reply

    def set_response_callback(self, command: str, callback) -> None:
        self.callbacks[command.upper()] = callback

    def pipeline(self, transaction: bool = False) -> "_Batch":
        return _Batch(self)

    def execute_command(self, *args):
        return self.run([args], raise_on_error=True)[0]

    def run_packed(self, commands: list[tuple]) -> list:
        """conveyor.packed.run on this source: raw replies, errors in place, routed per key."""
        return cluster.run(self.client, commands, replica=self.replica)

    def run(self, commands: list[tuple], raise_on_error: bool = True) -> list:
        replies = self.run_packed(commands)
        out = []
        for cmd, r in zip(commands, replies):
            if isinstance(r, Exception):
                if raise_on_error:
                    raise r
                out.append(r)
                continue
            name = cmd[0].decode() if isinstance(cmd[0], bytes) else str(cmd[0])
            cb = self.callbacks.get(name.upper())
            out.append(cb(r) if cb else r)
        return out

    def script_load(self, _body):        # never reached: ClusterStateReader has no script
        raise redis.ResponseError("scripts are not used on a Redis Cluster source")


class _Batch:
    def __init__(self, source: ClusterSource) -> None:
        self.source, self.commands = source, []

    def execute_command(self, *args) -> None:
        self.commands.append(args)

    def execute(self, raise_on_error: bool = True) -> list:
        return self.source.run(self.commands, raise_on_error)


class SuspectingEmitter(Emitter):
    """An Emitter that, while ``suspects`` is a list, puts the keys it is told are gone there
    instead of writing their DELETE (ClusterStateReader.read asks their primaries)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.suspects: list[bytes] | None = None

    def delete(self, key: bytes, read_ms: int) -> None:
        if self.suspects is not None:
            self.suspects.append(key)        # decided by the primary's answer (read() below)
            return
        super().delete(key, read_ms)


class ClusterStateReader(StateReader):
    """StateReader over a ClusterSource; a key a replica says is gone is asked of its primary."""

    emitter_cls = SuspectingEmitter
    emitter: SuspectingEmitter
    scripts = False                          # keys of a batch span slots: pipelined reads

    def __init__(self, *, source: RedisCluster, **kw) -> None:
        super().__init__(source=ClusterSource(source), **kw)

    def read(self, keys: list[bytes], *, check_type: bool = False, scanned: bool = False) -> int:
        if not self.source.replica:
            return super().read(keys, check_type=check_type, scanned=scanned)
        self.emitter.suspects = []
        try:
            n = super().read(keys, check_type=check_type, scanned=scanned)
            suspects = self.emitter.suspects
        finally:
            self.emitter.suspects = None
        if suspects:
            self.source.replica = False
            try:
                super().read(suspects, check_type=check_type, scanned=scanned)
            finally:
                self.source.replica = True
        return n


NODE_RE = re.compile(r"(.+):(\d{1,5})")


def node_slots(client: RedisCluster, specs: list[str]) -> list[tuple[int, int]]:
    """The slots the primaries named by ``--node HOST:PORT`` serve now, as inclusive ranges; a name
    that is not a primary of the cluster is one line naming what it is."""
    primaries = {n.name: n for n in cluster.primaries(client)}
    slots: set[int] = set()
    for spec in specs:
        m = NODE_RE.fullmatch(spec.strip())
        if not m:
            raise ConfigError(f"--node {spec!r}: expected HOST:PORT of a primary of the source cluster")
        name = f"{m.group(1)}:{int(m.group(2))}"
        node = primaries.get(name) or _by_address(client, primaries, m.group(1), int(m.group(2)))
        if node is None:
            raise ConfigError(f"--node {spec}: {_what_is(client, name)}, not one of its "
                              f"primaries ({', '.join(sorted(primaries))})")
        slots |= cluster.slots_of(client, node)
    return cluster.slot_ranges(slots)


def _by_address(client, primaries, host: str, port: int):
    """A primary named by another spelling of its host (localhost for 127.0.0.1)."""
    import socket
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, port)}
    except OSError:
        return None
    for node in primaries.values():
        if node.port == port and node.host in addrs:
            return node
    return None


def _what_is(client: RedisCluster, name: str) -> str:
    """What CLUSTER NODES says ``name`` is (the slot table lists only primaries and synced
    replicas)."""
    try:
        nodes = client.cluster_nodes()
    except redis.RedisError:
        nodes = {}
    flags = str(nodes.get(name, {}).get("flags", ""))
    if "slave" in flags:
        return "a replica of the source cluster"
    if "master" in flags:
        return "a primary of the source cluster serving no slots"
    return "not a node of the source cluster"
