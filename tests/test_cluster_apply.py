"""apply into a real Redis Cluster: batches routed per node, typed writes, big keys in parts
(temporary keys in the key's slot), cross-version conversion, and a target failover or a killed
target primary mid-run waited out. Outcomes read independently on every primary."""
from __future__ import annotations

import os
import threading
import time

import pytest

from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_until
from tests.datasets import load_mixed

CLEAN = "verify: 0 missing, 0 type, 0 value, 0 ttl, 0 extra"
FOLLOWED = "redirected or failed batches"


def keys_per_primary(dst) -> dict[int, int]:
    return {p.port: dst.conn(p).dbsize() for p in dst.primaries()}


def assert_identical(src, dst) -> None:
    """Every key of the source on the cluster and nothing else, read on every primary."""
    assert dst.dbsize() == src.dbsize()
    assert differences(src, dst.client()) == []


def test_standalone_into_a_cluster_snapshot_is_identical(redis_factory, cluster_factory, tmp_path):
    src, dst = redis_factory(), cluster_factory(3)
    n = load_mixed(src.client(), 3000)
    p = cli.run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), check=True)
    assert CLEAN in p.stdout and f"({n} keys checked)" in p.stdout, p.stdout
    assert "0 dead letters" in p.stdout, p.stdout
    per_node = keys_per_primary(dst)
    assert len(per_node) == 3 and all(v > n / 6 for v in per_node.values()), per_node
    assert_identical(src.client(), dst)


def test_typed_writes_into_a_cluster_given_by_target_cluster(redis_factory, cluster_factory, tmp_path):
    src, dst = redis_factory(), cluster_factory(3)
    n = load_mixed(src.client(), 2000)
    p = cli.run("replicate", src.url, dst.url, "--type", "struct", "--target-cluster",
                "--state-dir", str(tmp_path), check=True)
    assert f"(0 restored, {n} typed" in p.stdout, p.stdout
    assert CLEAN in p.stdout, p.stdout
    assert_identical(src.client(), dst)


def load_big(r) -> None:
    """Keys of several MiB (the capture reads them in parts of 1 MiB) in different slots."""
    p = r.pipeline(transaction=False)
    for i in range(0, 60_000, 2000):
        p.rpush("big:list", *[f"e{j}-" * 4 for j in range(i, i + 2000)])
        p.hset("big:hash", mapping={f"f{j}": "v" * 30 for j in range(i, i + 2000)})
        p.zadd("{other}big:zset", {f"z{j}" * 3: j for j in range(i, i + 2000)})
    p.set("big:string", os.urandom(3_000_000))
    p.expire("big:hash", 3600)
    p.execute()
    load_mixed(r, 300)


@pytest.mark.parametrize("value_type", ["dump", "struct"])
def test_big_keys_in_parts_into_a_cluster(redis_factory, cluster_factory, tmp_path, value_type):
    src, dst = redis_factory(), cluster_factory(3)
    load_big(src.client())
    p = cli.run("replicate", src.url, dst.url, "--type", value_type, "--big-key-bytes", "64KiB",
                "--state-dir", str(tmp_path), check=True)
    assert "4 keys read in parts" in p.stdout, p.stdout
    assert "4 keys completed from" in p.stdout, p.stdout
    assert CLEAN in p.stdout, p.stdout
    assert_identical(src.client(), dst)
    assert dst.client().ttl("big:hash") > 3000
    for node in dst.primaries():                 # no temporary key left on any primary
        assert list(dst.conn(node).scan_iter(match="*conveyor-tmp:*")) == []


def test_valkey_source_into_a_redis70_cluster_is_converted(redis_factory, cluster_factory, tmp_path):
    src, dst = redis_factory("valkey8.1"), cluster_factory(3)
    n = load_mixed(src.client(), 1000)
    p = cli.run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), check=True)
    assert f"{n} converted" in p.stdout, p.stdout      # Valkey 8.1 payloads refused by 7.0
    assert CLEAN in p.stdout, p.stdout
    assert_identical(src.client(), dst)


def test_standalone_into_a_valkey81_cluster(redis_factory, cluster_factory, tmp_path):
    src, dst = redis_factory(), cluster_factory(3, kind="valkey8.1")
    n = load_mixed(src.client(), 1000)
    p = cli.run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), check=True)
    assert f"({n} restored" in p.stdout, p.stdout      # 7.0 payloads: 8.1 reads them
    assert CLEAN in p.stdout, p.stdout
    assert_identical(src.client(), dst)


def test_merge_policy_into_a_cluster(redis_factory, cluster_factory, tmp_path):
    src, dst = redis_factory(), cluster_factory(3)
    s, t = src.client(), dst.client()
    load_big(s)
    # the target already holds members of two of the keys: merge keeps them, overwrite would not
    t.hset("big:hash", "theirs", "kept")
    t.zadd("{other}big:zset", {"theirs": -1})
    log = f"file:{tmp_path / 'log'}"
    run = ("apply", dst.url, "--log", log, "--merge-policy", "merge", "--idle-timeout", "1")
    cli.run("capture", src.url, "--log", log, "--big-key-bytes", "64KiB", check=True)
    cli.run(*run, check=True)
    cli.run(*run, "--group", "again", check=True)           # replayed: still the same data
    assert t.hgetall("big:hash") == {**s.hgetall("big:hash"), b"theirs": b"kept"}
    assert dict(t.zrange("{other}big:zset", 0, -1, withscores=True)) == \
        {**dict(s.zrange("{other}big:zset", 0, -1, withscores=True)), b"theirs": -1.0}
    t.hdel("big:hash", "theirs")
    t.zrem("{other}big:zset", "theirs")
    assert_identical(s, dst)                                # and every other key as the source


# -- live, with the target cluster changing under apply -------------------------------------------
def live_run(redis_factory, dst, tmp_path, change) -> tuple[str, object]:
    """A standalone source under writes replicated live into ``dst``; ``change(dst)`` is done
    while apply writes. Returns the run's output and the source."""
    src = redis_factory(extra=("--notify-keyspace-events", "KEA"))
    Workload(src.client(), rate=2000, keyspace=2000, seed=11).run(1.0)
    proc = cli.start("replicate", src.url, dst.url, "--mode", "live", "--idle-timeout", "4",
                     "--state-dir", str(tmp_path), "--recheck-delay", "2")
    wait_until(lambda: src.client().pubsub_numpat() >= 1, 60, "capture to subscribe")
    load = Workload(src.client(), rate=1500, keyspace=2000, seed=12).start(10)
    time.sleep(3)
    changer = threading.Thread(target=change, args=(dst,), daemon=True)
    changer.start()
    load.join()
    changer.join()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err[-3000:]
    return out + err, src


def test_a_target_primary_failed_over_mid_apply_is_waited_out(redis_factory, cluster_factory, tmp_path):
    dst = cluster_factory(3, replicas=1)
    before = {p.port for p in dst.primaries()}
    out, src = live_run(redis_factory, dst, tmp_path, lambda c: c.failover(c.primaries()[1]))
    assert {p.port for p in dst.primaries()} != before           # the failover happened
    assert "0 dead letters" in out and CLEAN in out, out
    assert "converged" in out and "CANNOT" not in out, out
    assert "target lost data" not in out, out                     # a failover is no data loss
    assert FOLLOWED in out, out                                   # apply met the failover
    assert_identical(src.client(), dst)


def test_a_target_primary_killed_mid_apply_is_waited_out(redis_factory, cluster_factory, tmp_path):
    dst = cluster_factory(3, replicas=1)
    named = dst.live()[0]                        # the node the URI names: a primary, killed
    assert named in dst.primaries()
    out, src = live_run(redis_factory, dst, tmp_path, lambda c: c.kill(named))
    assert named.proc is None and named not in dst.primaries() and len(dst.primaries()) == 3
    assert FOLLOWED in out, out
    assert "0 dead letters" in out and CLEAN in out, out
    assert "converged" in out and "CANNOT" not in out, out
    assert_identical(src.client(), dst)


# -- a target cluster that lost data, or only changed roles ---------------------------------------
N = 20_000
REPLAY = "replaying the log from its earliest record"


def load_keys(r, n: int) -> None:
    for i in range(0, n, 5000):
        p = r.pipeline(transaction=False)
        for j in range(i, min(n, i + 5000)):
            p.set(b"k:%d" % j, b"v" * 20 + b"%d" % j)
        p.execute()


def captured(redis_factory, tmp_path, n: int = N):
    src = redis_factory()
    load_keys(src.client(), n)
    log = f"file:{tmp_path / 'log'}"
    cli.run("capture", src.url, "--log", log, check=True)
    return src, log


def other_primary(dst):
    """A primary other than the node the URI names."""
    return next(p for p in dst.primaries() if p.port != dst.live()[0].port)


@pytest.mark.parametrize("loss", ["flushall", "restarted empty"])
def test_a_primary_that_lost_its_keys_mid_apply_is_rebuilt(redis_factory, cluster_factory,
                                                           tmp_path, loss):
    """A primary flushed, or killed and restarted empty (no replica: its slots are down
    meanwhile, CLUSTERDOWN waited out): apply notices and replays the (file) log."""
    dst = cluster_factory(3)
    src, log = captured(redis_factory, tmp_path)
    proc = cli.start("apply", dst.url, "--log", log, "--batch", "50", "--idle-timeout", "2")
    wait_until(lambda: dst.dbsize() > N // 4, 60, "apply to be under way")
    node = other_primary(dst)
    if loss == "flushall":
        dst.conn(node).flushall()
    else:
        dst.kill(node)
        time.sleep(1)
        dst.restart(node)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err[-3000:]
    assert REPLAY in err, err[-3000:]
    why = "DBSIZE fell" if loss == "flushall" else f"primary {dst.addr(node)} of the target " \
        "cluster restarted"
    assert why in err, err[-3000:]
    assert "0 dead letters" in out, out
    assert_identical(src.client(), dst)


def test_a_whole_target_cluster_down_mid_apply_is_waited_out(redis_factory, cluster_factory,
                                                              tmp_path):
    """Every node killed at once, started again seconds later (empty): apply waits, commits
    nothing meanwhile, sees every primary restarted and replays the log."""
    dst = cluster_factory(3)
    src, log = captured(redis_factory, tmp_path)
    proc = cli.start("apply", dst.url, "--log", log, "--batch", "50", "--idle-timeout", "2")
    wait_until(lambda: dst.dbsize() > N // 4, 60, "apply to be under way")
    nodes = dst.live()
    for node in nodes:
        node.proc.kill()
        node.proc.wait()
        node.proc = None
    time.sleep(4)                                 # longer than --idle-timeout: apply must wait
    assert proc.poll() is None, proc.communicate()
    for node in nodes:
        node.start()
    dst.settle()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err[-3000:]
    assert REPLAY in err and "of the target cluster restarted" in err, err[-3000:]
    assert FOLLOWED in out, out
    assert "0 dead letters" in out, out
    assert_identical(src.client(), dst)


def test_a_failover_between_two_runs_is_no_loss_a_restart_empty_is(redis_factory,
                                                                    cluster_factory, tmp_path):
    dst = cluster_factory(3, replicas=1)
    src, log = captured(redis_factory, tmp_path, 5000)
    apply = ("apply", dst.url, "--log", log, "--idle-timeout", "1")
    cli.run(*apply, check=True)
    dst.failover(other_primary(dst))
    p = cli.run(*apply, check=True)
    assert "lost" not in p.stderr and "restarted" not in p.stderr, p.stderr
    assert_identical(src.client(), dst)
    # a primary (its replica gone first) restarted empty
    node = other_primary(dst)
    dst.kill(dst.replicas(of=node)[0])
    dst.kill(node)
    dst.restart(node)
    p = cli.run(*apply, check=True)
    assert REPLAY in p.stderr and "since the last apply" in p.stderr, p.stderr
    assert f"primary {dst.addr(node)} of the target cluster restarted" in p.stderr, p.stderr
    assert_identical(src.client(), dst)


def test_a_target_resharded_mid_apply_is_followed(redis_factory, cluster_factory, tmp_path):
    """Slots moving under apply (ASK during the migration, MOVED after): nothing dead-lettered,
    no loss concluded."""
    dst = cluster_factory(3)
    src, log = captured(redis_factory, tmp_path)
    proc = cli.start("apply", dst.url, "--log", log, "--batch", "10", "--idle-timeout", "2")
    wait_until(lambda: dst.dbsize() > N // 20, 60, "apply to be under way")
    a, b = dst.primaries()[:2]
    dst.reshard(300, a, b)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err[-3000:]
    assert "0 dead letters" in out and "lost" not in err, out + err[-3000:]
    assert FOLLOWED in out, out                                   # ASK / MOVED met
    assert_identical(src.client(), dst)


def test_the_sweep_deletes_temporary_keys_on_every_primary(cluster_factory):
    """Temporary keys of part sequences that cannot complete, in many slots of every primary."""
    from conveyor.apply.watch import sweep_temp_keys
    from conveyor.apply.writes import temp_key
    dst = cluster_factory(3)
    c = dst.client()
    tmps = [temp_key(b"key:%d" % i, b"seq") for i in range(300)]
    for t in tmps:
        c.rpush(t, "part")
    c.set("kept", "x")
    assert sweep_temp_keys(c, set(tmps)) == 300
    assert dst.dbsize() == 1 and c.get("kept") == b"x"


def test_a_refused_permission_on_a_cluster_stops_apply_with_one_line(redis_factory,
                                                                    cluster_factory, tmp_path):
    from tests.cli import assert_one_line_error
    src, dst = redis_factory(), cluster_factory(3)
    load_keys(src.client(), 100)
    for node in dst.live():
        dst.conn(node).execute_command("ACL", "SETUSER", "writer", "on", ">secret-pw", "~*",
                                       "&*", "+@all", "-restore")
    log = f"file:{tmp_path / 'log'}"
    cli.run("capture", src.url, "--log", log, check=True)
    p = cli.run("apply", f"redis://writer:secret-pw@127.0.0.1:{dst.live()[0].port}", "--log",
                log, "--idle-timeout", "1", timeout=60)
    line = assert_one_line_error(p, 1)
    assert "RESTORE" in line and "NOPERM" in line and "'writer'" in line, line
    assert "secret-pw" not in p.stderr + p.stdout
    assert dst.dbsize() == 0
