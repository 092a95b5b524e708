"""verify with a Redis Cluster on either side: every primary of a cluster source is scanned, values
are read through the cluster's routing, keys only in a cluster target are found on every
primary. The differences are put on a primary other than the node the URI names: a verify that
read only that node would agree."""
from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from conveyor.keys import quoted
from tests import cli
from tests.datasets import load_mixed

CLEAN = "0 missing, 0 type, 0 value, 0 ttl, 0 extra"


def nodes(client) -> list[redis.Redis]:
    if isinstance(client, RedisCluster):
        return [client.get_redis_connection(n) for n in client.get_primaries()]
    return [client]


def copy_all(src, dst) -> int:
    """The test's own copy (DUMP / RESTORE with plain redis-py on every primary)."""
    n = 0
    for node in nodes(src):
        for key in node.scan_iter(count=1000):
            ttl = node.pttl(key)
            dst.restore(key, max(ttl, 0), node.dump(key), replace=True)
            n += 1
    return n


def keys_away_from(client: RedisCluster, port: int, n: int) -> list[bytes]:
    """``n`` keys held by primaries other than the one on ``port`` (the URI's node)."""
    out = []
    for node in client.get_primaries():
        if node.port != port:
            out += list(client.get_redis_connection(node).scan_iter(match="0:*", count=1000))
    assert len(out) >= n
    return out[:n]


def verify(src_url: str, dst_url: str) -> tuple[int, str]:
    p = cli.run("verify", src_url, dst_url, "--recheck-delay", "0.2", "--show-diffs")
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout


def test_a_cluster_source_is_verified_on_every_primary(redis_factory, cluster_factory):
    src, dst = cluster_factory(3), redis_factory()
    source = src.client()
    load_mixed(source, 1500)
    total = copy_all(source, dst.client())
    code, out = verify(src.url, dst.url)
    assert code == 0 and f"{CLEAN} ({total} keys checked)" in out, out
    # a key missing and a value changed on the target, both of keys another primary holds
    missing, changed = keys_away_from(source, src.live()[0].port, 2)
    dst.client().delete(missing)
    dst.client().set(changed, "changed")
    code, out = verify(src.url, dst.url)
    assert code != 0, out
    assert "1 missing, 0 type, 1 value, 0 ttl, 0 extra" in out, out
    assert quoted(missing) in out and quoted(changed) in out, out


def test_a_cluster_target_is_verified_on_every_primary(redis_factory, cluster_factory):
    src, dst = redis_factory(), cluster_factory(3)
    load_mixed(src.client(), 1500)
    target = dst.client()
    total = copy_all(src.client(), target)
    code, out = verify(src.url, dst.url)
    assert code == 0 and f"{CLEAN} ({total} keys checked)" in out, out
    missing, changed = keys_away_from(target, dst.live()[0].port, 2)
    target.delete(missing)
    target.set(changed, "changed")
    extra = next(k for i in range(1000) if target.keyslot(k := f"extra:{i}")
                 not in _slots_of(target, dst.live()[0].port))
    target.set(extra, "only here")
    code, out = verify(src.url, dst.url)
    assert code != 0, out
    assert "1 missing, 0 type, 1 value, 0 ttl, 1 extra" in out, out
    assert quoted(missing) in out and quoted(changed) in out and extra in out, out


def _slots_of(client: RedisCluster, port: int) -> set[int]:
    return {s for s, owners in client.nodes_manager.slots_cache.items() if owners[0].port == port}


def test_cluster_to_cluster_verify(cluster_factory):
    src, dst = cluster_factory(3), cluster_factory(2, kind="valkey8.1")
    source, target = src.client(), dst.client()
    load_mixed(source, 1000)
    # Valkey 8.1 reads Redis 7.0 payloads; DUMP bytes may differ: compared by value then
    total = copy_all(source, target)
    code, out = verify(src.url, dst.url)
    assert code == 0 and f"{CLEAN} ({total} keys checked)" in out, out
    (changed,) = keys_away_from(source, src.live()[0].port, 1)
    source.set(changed, "changed on the source")
    code, out = verify(src.url, dst.url)
    assert code != 0 and "0 missing, 0 type, 1 value, 0 ttl, 0 extra" in out, out
