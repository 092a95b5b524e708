"""conveyor.cluster.run against real clusters: batches per node, redirections followed while slots
move and primaries fail over, never an error reply taken as a command's outcome."""
from __future__ import annotations

import threading

import pytest
import redis
from redis.cluster import RedisCluster

from conveyor import cluster, packed
from tests.cluster import start_cluster


def _sets(keys, version: int) -> list[tuple]:
    return [(b"SET", k, b"v%d" % version) for k in keys]


class Versions:
    """Writes version 1, 2, ... of every key through conveyor.cluster.run in a thread until the
    ``with`` block ends; ``last`` is the last version every key took, ``errors`` what failed
    (a reply other than OK included), ``redirects`` what the routing followed."""

    def __init__(self, client, keys) -> None:
        self.client, self.keys = client, keys
        self.last, self.errors, self.redirects = 0, [], []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        v = 0
        try:
            while not self._done.is_set():
                v += 1
                replies = cluster.run(self.client, _sets(self.keys, v),
                                      on_redirect=lambda e: self.redirects.append(type(e).__name__))
                assert all(r == b"OK" for r in replies), replies[:3]
                self.last = v
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def __enter__(self) -> "Versions":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(60)


def test_a_batch_reaches_every_primary_and_reads_back_through_the_routing():
    with start_cluster(3) as c:
        client = c.client()
        keys = [b"key:%d" % i for i in range(3000)]
        replies = packed.run(client, _sets(keys, 1))
        assert replies == [b"OK"] * len(keys)
        per_node = [n.client().dbsize() for n in c.primaries()]
        assert sum(per_node) == len(keys) and min(per_node) > 500      # spread, not one node
        got = packed.run(client, [(b"GET", k) for k in keys])
        assert got == [b"v1"] * len(keys)


def test_writes_during_a_reshard_follow_ask_and_moved_and_keep_the_last_version():
    with start_cluster(3) as c:
        src, dst = c.primaries()[0], c.primaries()[1]
        client = c.client()
        # keys of the first 400 slots of src: exactly what the reshard moves
        src_slots = [s for lo, hi in c.view()[c.node_id(src)].slots for s in range(lo, hi + 1)]
        moving = set(src_slots[:400])
        keys = [b"k:%d" % i for i in range(40000)]
        keys = [k for k in keys if client.keyslot(k) in moving][:1500]
        assert len(keys) > 500
        packed.run(client, _sets(keys, 0))
        with Versions(client, keys) as w:
            c.reshard(400, src, dst)
        assert not w.errors, w.errors
        assert w.redirects, "the reshard redirected nothing: the test did not exercise ASK/MOVED"
        plain = RedisCluster(host="127.0.0.1", port=dst.port)
        assert all(plain.get(k) == b"v%d" % w.last for k in keys)
        assert dst.client().dbsize() >= len(keys)            # they really moved


def test_batches_go_on_through_a_primary_failover():
    with start_cluster(3, replicas=1) as c:
        client = c.client()
        keys = [b"f:%d" % i for i in range(2000)]
        victim = c.primary_of(keys[0])
        with Versions(client, keys) as w:
            new = c.failover(victim)
            before = w.last
            threading.Event().wait(0.5)
        assert not w.errors, w.errors
        assert w.last > before                         # writes went on after the failover
        assert c.primary_of(keys[0]) is new
        fresh = RedisCluster(host="127.0.0.1", port=new.port)
        assert all(fresh.get(k) == b"v%d" % w.last for k in keys)


def test_a_stale_slot_table_is_corrected_not_answered_with_moved():
    """A redirection reply is followed, never returned: a client whose table points a slot at the
    wrong node still gets the data where it belongs."""
    with start_cluster(3) as c:
        client = c.client()
        key = b"wrong-node"
        right = c.primary_of(key)
        wrong = next(p for p in c.primaries() if p is not right)
        slot = client.keyslot(key)
        wrong_node = client.nodes_manager.get_node(host="127.0.0.1", port=wrong.port)
        client.nodes_manager.slots_cache[slot] = [wrong_node]     # a stale table, as after a move
        assert cluster.run(client, [(b"SET", key, b"x")]) == [b"OK"]
        assert right.client().get(key) == b"x"
        assert wrong.client().dbsize() == 0
        with pytest.raises(redis.exceptions.MovedError):
            wrong.client().get(key)
        assert client.nodes_manager.slots_cache[slot][0].port == right.port   # table learnt
