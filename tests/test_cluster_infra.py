"""The cluster builder itself (tests/cluster.py): real clusters, facts read back from the servers."""
from __future__ import annotations

from collections import Counter

from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.cluster import Writer
from tests.compare import differences, wait_until

N_SLOTS = 16384


def slot_owners(node) -> dict[int, int]:
    """slot -> port of its primary, from one node's CLUSTER SLOTS."""
    owners = {}
    for lo, hi, primary, *_ in node.client().execute_command("CLUSTER SLOTS"):
        for slot in range(lo, hi + 1):
            assert slot not in owners, f"slot {slot} listed twice"
            owners[slot] = primary[1]
    return owners


def assert_full_coverage(cluster) -> dict[int, int]:
    """Every live node reports all 16384 slots, each owned by a current primary, the same way."""
    views = [slot_owners(n) for n in cluster.live()]
    assert len(views[0]) == N_SLOTS
    assert all(v == views[0] for v in views)
    assert set(views[0].values()) <= {p.port for p in cluster.primaries()}
    return views[0]


def role(node) -> str:
    return node.client().info("replication")["role"]


def test_three_primaries_redis70_cover_every_slot_and_route_keys(cluster_factory):
    c = cluster_factory(3)
    owners = assert_full_coverage(c)
    assert Counter(owners.values()).keys() == {p.port for p in c.primaries()}
    assert len(c.primaries()) == 3 and c.replicas() == []
    client = c.client()
    for i in range(300):
        client.set(f"k{i}", i)
    # each key sits on the primary that owns its slot, read there with a plain connection
    assert_all_present(c, {f"k{i}": str(i) for i in range(300)})
    assert c.primary_of("k7").client().get("k7") == b"7"
    assert c.dbsize() == 300


def assert_all_present(cluster, written: dict[str, str]) -> None:
    """Each key read with a plain connection on the primary that owns its slot now."""
    slots = slot_owners(cluster.live()[0])
    conns = {p.port: p.client() for p in cluster.primaries()}
    missing = [k for k, v in written.items()
               if conns[slots[key_slot(k.encode())]].get(k) != v.encode()]
    assert not missing, f"{len(missing)} keys lost, e.g. {missing[:3]}"


def test_failover_swaps_roles_on_every_node(cluster_factory):
    c = cluster_factory(3, replicas=1, password="s3cret")
    assert len(c.primaries()) == 3 and len(c.replicas()) == 3
    old = c.primaries()[0]
    (replica,) = c.replicas(of=old)
    c.client().set("before", "x")
    new = c.failover(old)
    assert new is replica
    assert role(new) == "master" and role(old) == "slave"
    assert old in c.replicas(of=new) and old not in c.primaries()
    assert_full_coverage(c)
    assert RedisCluster.from_url(c.url).get("before") == b"x"  # the url carries the password


def test_valkey81_cluster_with_replicas(cluster_factory):
    c = cluster_factory(3, replicas=1, kind="valkey8.1")
    assert "valkey" in c.nodes[0].binary
    assert_full_coverage(c)
    assert all(role(r) == "slave" for r in c.replicas()) and len(c.replicas()) == 3
    c.client().set("k", "v")
    assert c.primary_of("k").client().get("k") == b"v"


def test_reshard_200_slots_under_writes_keeps_every_key(cluster_factory):
    c = cluster_factory(3)
    src, dst = c.primaries()[0], c.primaries()[1]
    owners_before = assert_full_coverage(c)
    before = Counter(owners_before.values())
    with Writer(c) as w:
        wait_until(lambda: len(w.written) > 500, 30, "the first writes")
        c.reshard(200, src, dst)
        n_during = len(w.written)
    owners_after = assert_full_coverage(c)
    after = Counter(owners_after.values())
    moved = [k for k in w.written if owners_before[key_slot(k.encode())] == src.port
             and owners_after[key_slot(k.encode())] == dst.port]
    assert moved, "no written key was in a moved slot"
    assert after[src.port] == before[src.port] - 200
    assert after[dst.port] == before[dst.port] + 200
    assert len(w.written) > n_during > 500
    assert_all_present(c, w.written)
    assert c.dbsize() == len(w.written)


def test_add_node_with_slots_serves_them(cluster_factory):
    c = cluster_factory(3)
    client = c.client()
    for i in range(2000):
        client.set(f"k{i}", i)
    node = c.add_node(with_slots=300)
    owners = Counter(assert_full_coverage(c).values())
    assert owners[node.port] == 300 and len(c.primaries()) == 4
    assert node.client().dbsize() > 0  # keys of the moved slots came along
    assert_all_present(c, {f"k{i}": str(i) for i in range(2000)})


def test_kill_a_primary_promotes_its_replica_and_restart_rejoins_as_replica(cluster_factory):
    c = cluster_factory(3, replicas=1)
    victim = c.primaries()[0]
    (replica,) = c.replicas(of=victim)
    victim_slots = {s for s, port in assert_full_coverage(c).items() if port == victim.port}
    with Writer(c) as w:  # writes to the victim's slots wait out the failover
        wait_until(lambda: len(w.written) > 200, 30, "the first writes")
        c.kill(victim)
        n_after_kill = len(w.written)
        wait_until(lambda: len(w.written) > n_after_kill + 200, 30, "writes after the failover")
    # the writer went on writing into the dead primary's slots (redis-py may absorb the failed
    # attempts itself, so its retries are not counted here)
    assert [k for k in list(w.written)[n_after_kill:] if key_slot(k.encode()) in victim_slots]
    assert replica in c.primaries() and victim not in c.primaries()
    assert_full_coverage(c)
    c.restart(victim)
    assert c.replicas(of=replica) == [victim] and role(victim) == "slave"
    # an asynchronous replica may lose the last writes its primary acknowledged before dying,
    # so only the writes made after the failover are certain to be there
    late = dict(list(w.written.items())[n_after_kill:])
    assert_all_present(c, late)


def test_remove_node_hands_its_slots_and_keys_over(cluster_factory):
    c = cluster_factory(3)
    leaving = c.add_node(with_slots=300)  # few slots: redis-cli moves them one by one
    client = c.client()
    for i in range(1000):
        client.set(f"k{i}", i)
    assert leaving.client().dbsize() > 0
    c.remove_node(leaving)
    assert leaving not in c.nodes and leaving.proc is None
    assert len(c.primaries()) == 3 and len(c.view()) == 3
    assert_full_coverage(c)
    assert_all_present(c, {f"k{i}": str(i) for i in range(1000)})


def test_compare_reads_every_primary_of_a_cluster(cluster_factory, redis_server):
    c = cluster_factory(3)
    src, dst = c.client(), redis_server.client()
    for i in range(150):
        for r in (src, dst):
            r.hset(f"h{i}", mapping={"a": i})
            r.set(f"s{i}", i, ex=600)
    assert differences(src, dst) == [] and differences(dst, src) == []
    # one key per primary changed on the cluster side only: each is found
    changed = {c.primary_of(f"s{i}").port: f"s{i}" for i in range(150)}
    assert len(changed) == 3
    for key in changed.values():
        src.set(key, "other", ex=600)
    found = differences(src, dst, recheck_s=0)
    assert sorted(d.split(":")[0] for d in found) == sorted(repr(k.encode()) for k in changed.values())
    # cluster against cluster: a key missing on one side
    other = cluster_factory(2)
    assert len(differences(src, other.client(), recheck_s=0)) == 300


def test_compare_sees_a_primary_added_after_the_client_was_made(cluster_factory, redis_server):
    c = cluster_factory(3)
    src, dst = c.client(), redis_server.client()
    for i in range(300):
        src.set(f"k{i}", i)
    node = c.add_node(with_slots=1000)
    assert node.client().dbsize() > 0
    assert len(differences(src, dst, recheck_s=0)) == 300
