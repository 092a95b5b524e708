"""Capture from real Redis Clusters (tests/cluster.py): every primary scanned, replicas read with
--read-from replica, --node, checkpoints per node, and live capture through a failover, a reshard
and a node added. Outcomes are checked with tests/compare.py and plain redis-py reads."""
from __future__ import annotations

import json
import random
import re
import signal
import threading
import time

import redis
from redis.crc import key_slot

from tests import cli
from tests.cluster import Cluster
from tests.compare import differences, wait_until
from tests.test_faults_capture import checkpoint_doc

KEYS = 20_000


def fill(c: Cluster, n: int = KEYS, prefix: str = "k") -> None:
    """``n`` strings plus one key of each other type and one with an expiry."""
    rc = c.client()
    pipe = rc.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:{i}", f"v{i}")
    pipe.hset(f"{prefix}:hash", mapping={"a": "1", "b": "2"})
    pipe.rpush(f"{prefix}:list", "x", "y", "z")
    pipe.sadd(f"{prefix}:set", "m1", "m2")
    pipe.zadd(f"{prefix}:zset", {"a": 1.5, "b": 2})
    pipe.xadd(f"{prefix}:stream", {"f": "v"})
    pipe.set(f"{prefix}:ttl", "t", ex=1000)
    pipe.execute()
    rc.close()


def capture_apply(src_url: str, target, log: str, *args: str) -> cli.subprocess.CompletedProcess:
    cap = cli.run("capture", src_url, "--log", log, *args, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    return cap


def dump_calls(node) -> int:
    stat = node.client().info("commandstats").get("cmdstat_dump")
    return int(stat["calls"]) if stat else 0


def test_snapshot_of_a_3_primary_cluster_is_complete(cluster_factory, redis_factory, tmp_path):
    """The issue's case: 20,000 keys on 3 primaries all reach a standalone target, not a third."""
    c = cluster_factory(3)
    fill(c)
    target = redis_factory()
    cap = capture_apply(c.url, target, f"file:{tmp_path / 'log'}")
    assert "snapshot complete" in cap.stdout
    assert target.client().dbsize() == KEYS + 6
    assert differences(c.client(), target.client()) == []


def test_read_from_replica_reads_replicas_not_primaries(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3, 1)
    fill(c, 3000)
    # (replicas caught up first: a key a lagging replica lacks is rightly re-read on its primary)
    wait_until(lambda: all(r.client().dbsize() == p.client().dbsize()
                           for p in c.primaries() for r in c.replicas(of=p)), 30,
               "the replicas to hold every key")
    # (and every node lists them in CLUSTER SLOTS: a shard whose replica capture does not see
    # yet is rightly scanned on its primary, with a warning)
    wait_until(lambda: all(len(r) > 3 for n in c.live()
                           for r in n.client().execute_command("CLUSTER", "SLOTS")), 30,
               "every node to list the replicas")
    for n in c.live():
        n.client().config_resetstat()
    target = redis_factory()
    cap = capture_apply(c.url, target, f"file:{tmp_path / 'log'}", "--read-from", "replica")
    assert "no replica" not in cap.stdout, cap.stdout
    on_primaries = sum(dump_calls(p) for p in c.primaries())
    on_replicas = sum(dump_calls(r) for r in c.replicas())
    assert on_primaries == 0, on_primaries
    assert on_replicas >= 3000 + 6
    for p in c.primaries():
        stats = p.client().info("commandstats")
        assert not {"cmdstat_scan", "cmdstat_type", "cmdstat_pttl"} & set(stats), stats.keys()
    assert differences(c.client(), target.client()) == []


def test_read_from_replica_falls_back_to_a_primary_without_replica(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3)
    fill(c, 500)
    target = redis_factory()
    cap = capture_apply(c.url, target, f"file:{tmp_path / 'log'}", "--read-from", "replica")
    assert cap.stdout.count("has no replica; reading it from the primary") == 3, cap.stdout
    assert differences(c.client(), target.client()) == []


def test_valkey_cluster_source(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3, kind="valkey8.1")
    fill(c, 5000)
    target = redis_factory()
    capture_apply(c.url, target, f"file:{tmp_path / 'log'}")
    assert target.client().dbsize() == 5006
    assert differences(c.client(), target.client()) == []


def test_node_captures_only_that_primarys_slots(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3)
    fill(c, 3000)
    first = c.primaries()[0]
    mine = {s for v in c.view().values() if v.port == first.port for lo, hi in v.slots
            for s in range(lo, hi + 1)}
    target = redis_factory()
    capture_apply(c.url, target, f"file:{tmp_path / 'log'}", "--node", c.addr(first))
    got = set(target.client().scan_iter(count=1000))
    expected = set(first.client().scan_iter(count=1000))
    assert got == expected and 500 < len(got) < 2500
    assert all(key_slot(k) in mine for k in got)


def test_bad_node_is_one_line(cluster_factory, tmp_path):
    c = cluster_factory(3, 1)
    replica = c.replicas()[0]
    for bad, says in (("nohost", "expected HOST:PORT"),
                      (c.addr(replica), "a replica of the source cluster"),
                      ("127.0.0.1:1", "not a node of the source cluster")):
        p = cli.run("capture", c.url, "--log", f"file:{tmp_path / 'log'}", "--node", bad)
        line = cli.assert_one_line_error(p)
        assert says in line and bad in line, line


def test_live_refuses_a_primary_without_notifications(cluster_factory, tmp_path):
    c = cluster_factory(3)
    for p in c.primaries()[:2]:
        p.client().config_set("notify-keyspace-events", "KA")
    lacking = c.primaries()[2]
    p = cli.run("capture", c.url, "--log", f"file:{tmp_path / 'log'}", "--mode", "live",
                "--idle-timeout", "1")
    line = cli.assert_one_line_error(p)
    assert c.addr(lacking) in line and "notify-keyspace-events" in line, line


def status_captures(log: str) -> dict:
    p = cli.run("status", "--log", log, "--json")
    if p.returncode != 0:
        return {}
    return json.loads(p.stdout).get("captures", {})


def checkpoint_keys(log_dir) -> int:
    """Keys the file log's capture checkpoint counts (read directly: polled every few ms)."""
    return checkpoint_doc(log_dir).get("keys", 0)



def hold(node, log_dir, ms: int = 10_000) -> None:
    """Once the capture has started (its first checkpoint), pause ``node``'s clients: the scan
    of that primary waits, whatever the speed of the others."""
    wait_until(lambda: checkpoint_doc(log_dir), 60, "the capture to start", every=0.01)
    node.client().execute_command("CLIENT", "PAUSE", ms, "ALL")


def test_killed_snapshot_resumes_per_node_after_a_reshard(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3)
    fill(c)
    log = f"file:{tmp_path / 'log'}"
    last = max(c.primaries(), key=c.addr)         # primaries are scanned in name order
    proc = cli.start("capture", c.url, "--log", log)
    try:
        hold(last, tmp_path / "log")              # the kill comes before its scan ends
        wait_until(lambda: checkpoint_keys(tmp_path / "log") >= KEYS // 4, 120,
                   "the first capture to checkpoint a quarter of the keys", every=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        last.client().execute_command("CLIENT", "UNPAUSE")
    doc = next(iter(status_captures(log).values()))
    assert doc["phase"] == "scanning" and len(doc["legs"]) >= 1, doc
    saved = doc["keys"]
    a, b, _ = c.primaries()
    c.reshard(100, a, b)               # while no capture runs: those slots are scanned again
    again = cli.run("capture", c.url, "--log", log, check=True)
    assert "[resumed]" in again.stdout, again.stdout
    assert "since the checkpoint: scanning slots" in again.stderr, again.stderr
    total = int(again.stdout.split("capture: ")[1].split(" keys")[0])
    reread = total - saved
    assert reread < KEYS - saved + 1000, (saved, total)       # a full scan would read 20,000
    target = redis_factory()
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(c.client(), target.client()) == []


class Writer(threading.Thread):
    """Writes, deletes and expires keys through a cluster client until stopped; a write that
    fails while the cluster changes is given up (the source stays the truth to compare with)."""

    def __init__(self, c: Cluster) -> None:
        super().__init__(daemon=True)
        self.rc = c.client()
        self.stop = threading.Event()
        self.done = 0

    def run(self) -> None:
        rnd = random.Random(7)
        while not self.stop.is_set():
            k = f"w:{rnd.randrange(3000)}"
            try:
                op = rnd.random()
                if op < 0.6:
                    self.rc.set(k, rnd.randrange(10**6))
                elif op < 0.8:
                    self.rc.hset(f"h{k}", str(rnd.randrange(20)), "x")
                elif op < 0.95:
                    self.rc.delete(k)
                else:
                    self.rc.set(k, "short", px=rnd.randrange(50, 2000))
                self.done += 1
            except (redis.RedisError, OSError):
                time.sleep(0.05)
            time.sleep(0.001)


def test_live_capture_follows_failover_reshard_and_new_node(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3, 1)
    fill(c, 5000)
    log = f"file:{tmp_path / 'log'}"
    proc = cli.start("capture", c.url, "--log", log, "--mode", "live", "--idle-timeout", "4",
                     "--enable-notifications")
    writer = Writer(c)
    writer.start()
    try:
        # once capture knows the topology: it has subscribed to every primary (a slow start
        # under load would otherwise meet the failover already done, and see no failover)
        a, b, d = c.primaries()
        wait_until(lambda: all(p.client().pubsub_numpat() >= 1 for p in (a, b, d)), 60,
                   "capture to subscribe to every primary")
        c.failover(a)                               # a replica of A takes over
        c.reshard(200, b, d)
        c.add_node(with_slots=300)
        time.sleep(2)
    finally:
        writer.stop.set()
        writer.join()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    assert "capture: converged" in out, out
    assert "failover:" in out and "moved from" in out, out
    assert writer.done > 500
    target = redis_factory()
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(c.client(), target.client()) == []


def test_big_keys_and_typed_reads_from_a_cluster(cluster_factory, redis_factory, tmp_path):
    """Keys read in parts (HSCAN, LRANGE, ZSCAN, SSCAN, GETRANGE, XRANGE pages) and typed reads
    go to the node of each key."""
    c = cluster_factory(3)
    rc = c.client()
    for i in range(6):
        rc.hset(f"bh{i}", mapping={f"f{j}": "x" * 50 for j in range(1200)})
        rc.rpush(f"bl{i}", *[f"e{j}" * 10 for j in range(1200)])
        rc.zadd(f"bz{i}", {f"m{j}": j for j in range(1200)})
        rc.sadd(f"bs{i}", *[f"s{j}" * 10 for j in range(1200)])
        rc.set(f"bstr{i}", "y" * 20_000)
        for j in range(1200):
            rc.xadd(f"bx{i}", {"f": "v" * 30})
        rc.xgroup_create(f"bx{i}", "g", id="0")
        rc.xreadgroup("g", "c1", {f"bx{i}": ">"}, count=5)
    fill(c, 300)
    for args in (("--big-key-bytes", "4KiB"), ("--type", "struct")):
        target = redis_factory()
        cap = capture_apply(c.url, target, f"file:{tmp_path / args[1]}", *args)
        if args[0] == "--big-key-bytes":
            m = re.search(r"(\d+) keys read in parts \((\d+) part events", cap.stdout)
            assert m and int(m.group(1)) >= 36 and int(m.group(2)) > int(m.group(1)) + 20, cap.stdout
        assert differences(c.client(), target.client()) == []
        t = target.client()
        assert t.xinfo_groups("bx0")[0]["pending"] == 5


def test_live_flushall_on_one_primary_is_a_gap_of_its_slots(cluster_factory, redis_factory, tmp_path):
    c = cluster_factory(3)
    fill(c, 2000)
    log = f"file:{tmp_path / 'log'}"
    proc = cli.start("capture", c.url, "--log", log, "--mode", "live", "--idle-timeout", "12",
                     "--enable-notifications")
    try:
        # once its scan is over (its checkpoint, saved every few seconds, says live), the run
        # not idle long enough to end
        wait_until(lambda: checkpoint_doc(tmp_path / "log").get("state") == "live", 60,
                   "the capture's scan to be over")
        flushed = c.primaries()[1]
        flushed.client().flushall()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    assert f"gap: node {c.addr(flushed)}: FLUSHALL on the source" in out, out
    target = redis_factory()
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(c.client(), target.client()) == []
    assert 1000 < target.client().dbsize() < 1800


def test_live_read_from_replica_under_writes(cluster_factory, redis_factory, tmp_path):
    """Scans read replicas, changed keys primaries; a scan batch waits until the replica has
    what the primary had, so an older replica value never follows a newer primary read."""
    c = cluster_factory(3, 1)
    fill(c, 3000)
    log = f"file:{tmp_path / 'log'}"
    writer = Writer(c)
    writer.start()
    try:
        proc = cli.start("capture", c.url, "--log", log, "--mode", "live", "--idle-timeout", "3",
                         "--enable-notifications", "--read-from", "replica", "--scan-count", "100")
        time.sleep(5)
    finally:
        writer.stop.set()
        writer.join()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    assert "capture: converged" in out
    target = redis_factory()
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(c.client(), target.client()) == []


def test_cluster_options_on_a_standalone_source_are_refused(redis_factory, tmp_path):
    src = redis_factory()
    for args in (("--node", "127.0.0.1:7000"), ("--read-from", "replica")):
        p = cli.run("capture", src.url, "--log", f"file:{tmp_path / 'log'}", *args)
        line = cli.assert_one_line_error(p)
        assert args[0] in line and "needs a Redis Cluster source" in line, line


def test_snapshot_while_a_slot_is_half_migrated(cluster_factory, redis_factory, tmp_path):
    """A slot stopped midway through a migration: some of its keys on the importing node, the
    rest on the owner. Reads of the moved keys are answered with ASK and followed."""
    c = cluster_factory(3)
    fill(c, 3000)
    rc = c.client()
    key = "k:1"
    slot = key_slot(key.encode())
    src = c.primary_of(key)
    dst = next(p for p in c.primaries() if p is not src)
    names = [f"{{{key}}}:{i}" for i in range(40)]
    for n in names:
        rc.set(n, n)
    dst.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", c.node_id(src))
    src.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", c.node_id(dst))
    moved = names[:20]
    src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *moved)
    assert dst.client().execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 20
    target = redis_factory()
    capture_apply(c.url, target, f"file:{tmp_path / 'log'}")
    t = target.client()
    assert [t.get(n) for n in names] == [n.encode() for n in names]
    assert t.dbsize() == 3000 + 6 + 40


def test_snapshot_goes_on_through_a_primary_killed_mid_scan(cluster_factory, redis_factory,
                                                            tmp_path):
    c = cluster_factory(3, 1)
    fill(c, 6000)
    log = f"file:{tmp_path / 'log'}"
    victim = max(c.primaries(), key=c.addr)       # primaries are scanned in name order: last
    proc = cli.start("capture", c.url, "--log", log)
    try:
        hold(victim, tmp_path / "log")            # its scan cannot be over before the kill
        c.kill(victim)                            # its replica takes over
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    assert "snapshot complete" in out and f"replaced {c.addr(victim)}" in out, (out, err)
    target = redis_factory()
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(c.client(), target.client()) == []


def test_one_capture_per_primary_into_one_log(cluster_factory, redis_factory, tmp_path):
    """Scale-out: one capture per primary (--node), each with its own checkpoint, one log."""
    c = cluster_factory(3)
    fill(c, 3000)
    log = f"{redis_factory().url}/0"                # a Redis Streams log takes several writers
    procs = [cli.start("capture", c.url, "--log", log, "--node", c.addr(p)) for p in c.primaries()]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    keys = [int(re.search(r"capture: (\d+) keys", out).group(1)) for out, _ in outs]
    assert sum(keys) == 3006 and min(keys) > 500, keys
    assert len(status_captures(log)) == 3
    target = redis_factory()
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(c.client(), target.client()) == []
