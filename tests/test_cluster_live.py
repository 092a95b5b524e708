"""Live cluster -> cluster under writes, with the topology changed on both sides mid-run (issue 10):
a source primary failed over, 200 slots resharded on the source, a target primary failed over, a
node added to the source and given slots. The run must converge, exit 0, and the target must hold
what the source holds, by an independent compare reading every primary of both clusters."""
from __future__ import annotations

import random
import threading
import time

import redis

from tests import cli
from tests.cluster import start_cluster
from tests.compare import wait_identical, wait_until


class ClusterWrites:
    """Mixed single-key writes (every type, deletes, expiries) through a RedisCluster client in a
    thread. A write refused while the cluster changes (a failover) is simply tried again later:
    the source is the truth the target is compared with, whatever got in."""

    def __init__(self, client, keyspace: int = 3000, seed: int = 7) -> None:
        self.r, self.keyspace, self.rnd = client, keyspace, random.Random(seed)
        self.done, self.errors = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self) -> None:
        rnd, r = self.rnd, self.r
        n = rnd.randrange(self.keyspace)
        op = rnd.randrange(8)
        if op == 0:
            r.set(f"s:{n}", rnd.randbytes(rnd.randint(1, 80)))
        elif op == 1:
            r.hset(f"h:{n}", f"f{rnd.randrange(10)}", rnd.random())
        elif op == 2:
            r.rpush(f"l:{n}", rnd.randrange(1000))
        elif op == 3:
            r.sadd(f"z:{n}", rnd.randrange(50))
        elif op == 4:
            r.zadd(f"o:{n}", {f"m{rnd.randrange(10)}": rnd.random()})
        elif op == 5:
            r.delete(f"s:{n}")
        elif op == 6:
            r.pexpire(f"h:{n}", rnd.randint(60_000, 600_000))
        else:
            r.incrby(f"n:{n}", rnd.randint(1, 9))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._one()
                self.done += 1
            except (redis.RedisError, OSError):
                self.errors += 1
                time.sleep(0.05)

    def start(self) -> "ClusterWrites":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _notifying(c) -> None:
    for n in c.live():
        n.client().config_set("notify-keyspace-events", "KEA")


def test_live_cluster_to_cluster_follows_failovers_reshards_and_a_new_node(tmp_path):
    with start_cluster(3, replicas=1) as src, start_cluster(3, replicas=1) as dst:
        _notifying(src)
        client = src.client()
        for i in range(4000):
            client.set(f"pre:{i}", i)
        proc = cli.start("replicate", src.url, dst.url, "--mode", "live", "--idle-timeout", "6",
                         "--state-dir", str(tmp_path), "--recheck-delay", "2",
                         "--enable-notifications")      # also on the node added mid-run
        try:
            target = dst.client()
            wait_until(lambda: target.dbsize() >= 4000, 120, "the snapshot to reach the target")
            load = ClusterWrites(src.client()).start()
            time.sleep(1)
            src.failover(src.primaries()[0])                       # a source primary
            time.sleep(1)
            a, b = src.primaries()[0], src.primaries()[1]
            src.reshard(200, a, b)                                  # 200 slots on the source
            time.sleep(1)
            dst.failover(dst.primaries()[1])                       # a target primary
            time.sleep(1)
            src.add_node(with_slots=300)                            # a node added, given slots
            time.sleep(2)
            load.stop()
            assert load.done > 1000, "the writer barely wrote: the test proves little"
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        assert "converged" in out and "CANNOT" not in out, out[-3000:]
        assert "gap" in out                                       # the topology changes were seen
        assert wait_identical(src.client(), dst.client(), timeout=20) == []
