"""Real Redis Clusters for the apply and verify tests (built by hand until tests/cluster.py)."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

import redis
from redis.cluster import RedisCluster

from tests.compare import wait_until
from tests.servers import BINARIES, RedisServer, free_port

CLI = "/usr/bin/redis-cli"


@dataclass
class Cluster:
    servers: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.servers[0].url

    def cleanup(self) -> None:
        for s in self.servers:
            s.cleanup()


def start_cluster(primaries: int = 3, replicas: int = 0, kind: str = "redis7.0") -> Cluster:
    c = Cluster()
    try:
        for _ in range(primaries * (1 + replicas)):
            c.servers.append(RedisServer(BINARIES[kind](), extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "1000")).start())
        subprocess.run([CLI, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in c.servers],
                        "--cluster-replicas", str(replicas), "--cluster-yes"], check=True,
                       capture_output=True, timeout=60)
        wait_until(lambda: all(_state_ok(s) for s in c.servers), 60, "the cluster to be ok")
        wait_until(lambda: _replicas_synced(c, primaries * replicas), 60, "replicas to sync")
    except BaseException:
        c.cleanup()
        raise
    return c


def _state_ok(s: RedisServer) -> bool:
    try:
        info = s.client().execute_command("CLUSTER INFO")
    except redis.RedisError:
        return False
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def _replicas_synced(c: Cluster, n: int) -> bool:
    up = [s for s in c.servers if s.proc is not None]
    roles = [s.client().info("replication") for s in up]
    synced = [r for r in roles if r["role"] == "slave" and r.get("master_link_status") == "up"]
    return len(synced) >= n


def cluster_client(c: Cluster) -> RedisCluster:
    alive = next(s for s in c.servers if s.proc is not None and s.proc.poll() is None)
    return RedisCluster(host="127.0.0.1", port=alive.port)


def keys_per_primary(rc: RedisCluster) -> dict[str, int]:
    return {n.name: rc.get_redis_connection(n).dbsize() for n in rc.get_primaries()}


def _server(c: Cluster, port: int) -> RedisServer:
    return next(s for s in c.servers if s.port == port)


def _a_replica(c: Cluster) -> RedisServer:
    for s in c.servers:
        if s.proc is not None and s.client().info("replication")["role"] == "slave":
            return s
    raise AssertionError("no replica in the cluster")


def failover(c: Cluster) -> None:
    """CLUSTER FAILOVER on a replica: it takes its primary's slots once it caught up."""
    replica = _a_replica(c)
    replica.client().execute_command("CLUSTER FAILOVER")
    wait_until(lambda: replica.client().info("replication")["role"] == "master", 30,
               "the replica to take over")
    wait_until(lambda: all(_state_ok(s) for s in c.servers if s.proc is not None), 30,
               "the cluster to be ok after the failover")


def kill_primary(c: Cluster) -> None:
    """SIGKILL the first server (a primary: the node the URIs name); its replica takes its slots
    after cluster-node-timeout."""
    primary = c.servers[0]
    assert primary.client().info("replication")["role"] == "master"
    replica = next(s for s in c.servers
                   if s.client().info("replication").get("master_port") == primary.port)
    primary.proc.kill()
    primary.proc.wait()
    primary.proc = None
    wait_until(lambda: replica.client().info("replication")["role"] == "master", 60,
               "the replica to take over")
    wait_until(lambda: all(_state_ok(s) for s in c.servers if s.proc is not None), 60,
               "the cluster to be ok after the failover")
