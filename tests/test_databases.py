"""Several databases of a standalone source (--db all|N,M), each to its own target database or all
into one (--target-db N, collisions counted), and into a Redis Cluster (db 0 only)."""
from __future__ import annotations

import re
import time
from contextlib import contextmanager

import pytest

from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_until

DBS = (0, 3, 7)


def notifying(redis_factory):
    return redis_factory(extra=("--notify-keyspace-events", "KEA"))


def fill(server, dbs=DBS, n=200) -> None:
    """Keys of every type; names distinct per db (k<db>:...) and colliding (shared:...)."""
    for db in dbs:
        r = server.client(db)
        p = r.pipeline(transaction=False)
        for i in range(n):
            p.set(f"k{db}:s:{i}", f"v{db}-{i}")
            p.hset(f"k{db}:h:{i % 20}", f"f{i}", i)
        for i in range(10):
            p.set(f"shared:{i}", f"from db {db}")
        p.rpush(f"k{db}:list", *range(50))
        p.set(f"k{db}:ttl", "x", px=600_000)
        p.execute()


def drop_shared(server, dbs) -> None:
    """Remove the key names ``fill`` gives every db alike: what is left cannot collide."""
    for db in dbs:
        for k in list(server.client(db).scan_iter(match="shared:*")):
            server.client(db).delete(k)


def assert_identical_per_db(source, target, pairs) -> None:
    for sdb, tdb in pairs:
        diffs = differences(source.client(sdb), target.client(tdb))
        assert not diffs, (sdb, tdb, diffs[:5])


def wait_for_subscribers(server, n: int, timeout: float = 30.0) -> None:
    wait_until(lambda: server.client().pubsub_numpat() >= n, timeout,
               f"{n} keyspace subscriptions")


@contextmanager
def running(*args: str):
    """A conveyor process, killed at the end if the test left it running."""
    proc = cli.start(*args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc, loads) -> tuple[str, str]:
    for load in loads:
        load.join()
    return proc.communicate(timeout=180)


# -- snapshot ------------------------------------------------------------------------------------
def test_snapshot_of_three_dbs_lands_each_in_its_own_db(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source)
    source.client(1).set("not-selected", "x")          # db 1 is not named: not copied
    p = cli.run("replicate", source.url, target.url, "--db", "7,0,3", "--state-dir",
                str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "db 0: " in p.stdout and "db 3: " in p.stdout and "db 7: " in p.stdout, p.stdout
    assert_identical_per_db(source, target, [(d, d) for d in DBS])
    assert target.client(1).dbsize() == 0
    # every event carried its db: the colliding names kept their own db's value
    for db in DBS:
        assert target.client(db).get("shared:3") == f"from db {db}".encode()


def test_verify_with_several_dbs_finds_a_difference_in_one_db(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source)
    p = cli.run("replicate", source.url, target.url, "--db", "0,3,7", "--state-dir",
                str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    target.client(3).set("k3:s:5", "changed")
    target.client(7).delete("k7:s:9")
    target.client(0).set("only-in-target", "x")
    v = cli.run("verify", source.url, target.url, "--db", "0,3,7", "--recheck-delay", "0",
                "--show-diffs")
    assert v.returncode == 1, v.stdout + v.stderr
    assert "verify: db 3 -> db 3: 0 missing, 0 type, 1 value" in v.stdout, v.stdout
    assert "verify: db 7 -> db 7: 1 missing" in v.stdout, v.stdout
    assert "verify: db 0 -> db 0: 0 missing, 0 type, 0 value, 0 ttl, 1 extra" in v.stdout
    assert "1 missing, 0 type, 1 value, 0 ttl, 1 extra" in v.stdout, v.stdout
    # --db all lists the databases holding keys; the 13 empty on both sides are one line
    v = cli.run("verify", source.url, target.url, "--db", "all", "--recheck-delay", "0")
    assert v.returncode == 1, v.stdout + v.stderr
    assert len([ln for ln in v.stdout.splitlines() if ln.startswith("verify: db ")]) == 3, v.stdout
    assert "verify: 13 other databases empty on both sides" in v.stdout, v.stdout


# -- live ----------------------------------------------------------------------------------------
def test_db_all_live_follows_writes_in_every_db_and_a_flushdb_of_one(redis_factory, tmp_path):
    source, target = notifying(redis_factory), redis_factory()
    fill(source)
    with running("replicate", source.url, target.url, "--db", "all", "--mode", "live",
                 "--idle-timeout", "3", "--state-dir", str(tmp_path), "--recheck-delay", "2",
                 "--no-progress") as proc:
        wait_for_subscribers(source, 16)       # every configured db, empty ones included
        loads = [Workload(source.client(db), rate=400, keyspace=200, seed=db).start(5)
                 for db in DBS]
        time.sleep(1.5)
        source.client(3).flushdb()                 # no notification: a gap, healed by a resync
        source.client(3).set("after-flush", "y")
        time.sleep(0.5)
        source.client().swapdb(7, 9)               # db 7's keys move to db 9 (and back later)
        time.sleep(1.0)
        source.client().swapdb(7, 9)
        source.client(12).set("born-later", "in an empty db")   # a db empty at the start
        out, err = finish(proc, loads)
    assert proc.returncode == 0, out + err
    assert "source databases: all 16 configured" in out, out
    assert "FLUSHDB on the source" in out and "SWAPDB on the source" in out, out
    assert "converged" in out and "CANNOT" not in out, out
    assert_identical_per_db(source, target, [(d, d) for d in (*DBS, 9, 12)])
    assert target.client(12).get("born-later") == b"in an empty db"
    assert target.client(3).get("after-flush") == b"y"


def test_separate_capture_and_apply_keep_a_checkpoint_per_db(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source, dbs=(0, 3))
    log = f"file:{tmp_path / 'log'}"
    cap = cli.run("capture", source.url, "--db", "0,3", "--log", log, "--no-progress")
    assert cap.returncode == 0, cap.stdout + cap.stderr
    st = cli.run("status", "--log", log)
    assert len(re.findall(r"^capture capture-\w+: done", st.stdout, re.M)) == 2, st.stdout
    app = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", "--no-progress")
    assert app.returncode == 0, app.stdout + app.stderr
    assert_identical_per_db(source, target, [(0, 0), (3, 3)])


def test_live_restart_finds_keys_deleted_meanwhile_in_each_db(redis_factory, tmp_path):
    """Each db learns the keys the log holds for it alone (its records of the log's history):
    a key deleted while no capture ran becomes a delete in its own db only."""
    source, target = notifying(redis_factory), redis_factory()
    fill(source, dbs=(0, 3), n=20)
    log = f"file:{tmp_path / 'log'}"
    assert cli.run("capture", source.url, "--db", "0,3", "--log", log).returncode == 0
    source.client(3).delete("k3:s:1", "shared:2")     # while no capture runs
    source.client(0).delete("k0:s:7")
    cap = cli.run("capture", source.url, "--db", "0,3", "--mode", "live", "--idle-timeout", "1",
                  "--log", log, "--no-progress")
    assert cap.returncode == 0, cap.stdout + cap.stderr
    # only the three deleted keys were read again (unchanged keys are not logged again)
    assert "read again 3 keys" in cap.stdout and "(0 upserts, 3 deletes)" in cap.stdout, \
        cap.stdout
    app = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", "--no-progress")
    assert app.returncode == 0, app.stdout + app.stderr
    assert_identical_per_db(source, target, [(0, 0), (3, 3)])
    assert target.client(0).exists("shared:2") and not target.client(3).exists("shared:2")


# -- several source dbs into one target db -------------------------------------------------------
def test_target_db_merges_and_reports_collisions(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source)
    log = f"file:{tmp_path / 'log'}"
    assert cli.run("capture", source.url, "--db", "0,3,7", "--log", log).returncode == 0
    app = cli.run("apply", target.url, "--log", log, "--target-db", "2", "--idle-timeout", "1",
                  "--no-progress")
    # the 10 shared names come from three dbs: the target cannot equal the source
    assert app.returncode == 1, app.stdout + app.stderr
    assert "apply: 10 key collisions" in app.stdout and "--allow-collisions" in app.stdout
    assert 'collision: "shared:' in app.stdout
    st = cli.run("status", "--log", log)
    assert "10 key collisions between source databases" in st.stdout, st.stdout
    # every distinct name is in db 2, and nothing went to the source dbs' numbers
    merged = target.client(2)
    for db in DBS:
        src = source.client(db)
        for k in src.scan_iter(match=f"k{db}:*"):
            assert merged.type(k) == src.type(k), k
    assert merged.dbsize() == sum(source.client(db).dbsize() for db in DBS) - 20
    assert all(target.client(db).dbsize() == 0 for db in DBS)
    # verify of the mapping: the colliding names differ in two of the three source dbs
    v = cli.run("verify", source.url, target.url, "--db", "0,3,7", "--target-db", "2",
                "--recheck-delay", "0")
    assert v.returncode == 1 and "0 missing, 0 type, 20 value, 0 ttl, 0 extra" in v.stdout, v.stdout


def test_allow_collisions_accepts_them_and_verify_maps_without_false_extras(redis_factory,
                                                                          tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source, dbs=(0, 3))
    for i in range(10):                          # same names, same values in both: no difference
        source.client(3).set(f"shared:{i}", "from db 0")
    p = cli.run("replicate", source.url, target.url, "--db", "0,3", "--target-db", "0",
                "--allow-collisions", "--state-dir", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "apply: 10 key collisions" in p.stdout and "accepted with --allow-collisions" in p.stdout
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in p.stdout, p.stdout
    names = {k for db in (0, 3) for k in source.client(db).scan_iter()}
    assert set(target.client(0).scan_iter()) == names
    target.client(0).set("stray", "x")             # in none of the source dbs: extra
    v = cli.run("verify", source.url, target.url, "--db", "0,3", "--target-db", "0",
                "--recheck-delay", "0")
    assert v.returncode == 1 and "0 value, 0 ttl, 1 extra" in v.stdout, v.stdout


def test_live_merge_of_two_dbs_into_one_under_writes_converges(redis_factory, tmp_path):
    source, target = notifying(redis_factory), redis_factory()
    prefixes = {0: "a:", 3: "b:"}                 # distinct names: no collision
    for db, prefix in prefixes.items():
        Workload(source.client(db), rate=2000, keyspace=200, prefix=prefix, seed=db).run(0.5)
    with running("replicate", source.url, target.url, "--db", "0,3", "--target-db", "0",
                 "--mode", "live", "--idle-timeout", "3", "--state-dir", str(tmp_path),
                 "--recheck-delay", "2", "--no-progress") as proc:
        wait_for_subscribers(source, 2)
        out, err = finish(proc, [Workload(source.client(db), rate=500, keyspace=200,
                                          prefix=prefix, seed=10 + db).start(4)
                                 for db, prefix in prefixes.items()])
    assert proc.returncode == 0, out + err
    assert "key collision" not in out and "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out
    merged = target.client(0)
    for db, prefix in prefixes.items():
        others = frozenset(k for k in merged.scan_iter() if not k.startswith(prefix.encode()))
        assert not differences(source.client(db), merged, ignore=others), db
    assert target.client(3).dbsize() == 0


def test_distinct_names_merge_into_one_target_db_without_collisions(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source, dbs=(3, 7))
    drop_shared(source, (3, 7))
    p = cli.run("replicate", source.url, target.url, "--db", "3,7", "--target-db", "0",
                "--state-dir", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "key collision" not in p.stdout
    assert target.client(0).dbsize() == source.client(3).dbsize() + source.client(7).dbsize()


def records_of_db(log: str, db: int) -> int:
    """Records of the log holding events of ``db`` (a block holds many keys of one db)."""
    from tests.test_blocks import log_records
    return sum(1 for r in log_records(log) if r.key.startswith(b"%d:" % db))


def test_apply_refuses_several_dbs_into_the_uris_db_without_committing(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    fill(source, dbs=(0, 3))
    log = f"file:{tmp_path / 'log'}"
    assert cli.run("capture", source.url, "--db", "0,3", "--log", log).returncode == 0
    lag_before = re.search(r"total lag (\d+)", cli.run("status", "--log", log).stdout).group(1)
    app = cli.run("apply", f"{target.url}/5", "--log", log, "--idle-timeout", "1")
    line = cli.assert_one_line_error(app, 2)
    assert "--target-db 5" in line, line
    lag_after = int(re.search(r"total lag (\d+)", cli.run("status", "--log", log).stdout).group(1))
    # batches of the first database seen alone may have been written and committed, never
    # one with the other database in it
    assert int(lag_before) >= lag_after >= min(records_of_db(log, 0), records_of_db(log, 3)) > 0
    assert not (target.client(5).keys("k0:*") and target.client(5).keys("k3:*"))
    # the same apply given --target-db 5 then writes everything from where it stopped
    app = cli.run("apply", target.url, "--log", log, "--target-db", "5", "--allow-collisions",
                  "--idle-timeout", "1", "--no-progress")
    assert app.returncode == 0, app.stdout + app.stderr
    merged = target.client(5)
    for db in (0, 3):
        for k in source.client(db).scan_iter(match=f"k{db}:*"):
            assert merged.exists(k), (db, k)


def test_a_lost_log_is_lost_for_every_database(tmp_path):
    """One database's capture adopting a log reset under it must not hide the reset from the
    others: each has to resync its own database into the new log."""
    import shutil

    from conveyor.capture.databases import SharedLog
    from conveyor.errors import LogLost
    from conveyor.log import open_meta, open_writer

    uri = f"file:{tmp_path / 'log'}"
    writer, meta = open_writer(uri, {}), open_meta(uri, {})
    try:
        shared = SharedLog(writer, meta)
        a, b = shared.view(0), shared.view(3)
        a.append(b"k", b"v")
        a.flush()
        shutil.rmtree(tmp_path / "log")
        with pytest.raises(LogLost):
            a.check_identity()
        a.adopt_new_log()
        a.check_identity()
        with pytest.raises(LogLost):
            b.check_identity()                     # the log itself is fine again, b missed it
        b.adopt_new_log()
        b.check_identity()
        assert shared.generation == 1              # adopted once, not once per database
    finally:
        writer.close()
        meta.close()


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (("--db", "foo"), "--db"),
    (("--db", "99"), "16 databases"),
    (("--db", "0,3", "@/3"), "URI"),
])
def test_bad_db_input_is_one_line_exit_2(redis_server, tmp_path, args, needle):
    uri = redis_server.url + ("/3" if "@/3" in args else "")
    args = tuple(a for a in args if a != "@/3")
    for cmd in (("capture", uri, "--log", f"file:{tmp_path / 'log'}"),
                ("replicate", uri, "redis://127.0.0.1:1", "--state-dir", str(tmp_path)),
                ("verify", uri, "redis://127.0.0.1:1")):
        line = cli.assert_one_line_error(cli.run(*cmd, *args), 2)
        assert needle in line, (cmd, line)


def test_target_db_and_target_uri_db_together_are_refused(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    p = cli.run("replicate", source.url, f"{target.url}/2", "--db", "0,3", "--target-db", "4",
                "--state-dir", str(tmp_path))
    assert "--target-db" in cli.assert_one_line_error(p, 2)
    p = cli.run("replicate", source.url, target.url, "--db", "0,3", "--allow-collisions",
                "--state-dir", str(tmp_path))
    assert "--allow-collisions" in cli.assert_one_line_error(p, 2)


def test_a_streams_log_in_one_of_the_captured_dbs_is_refused(redis_server):
    p = cli.run("capture", redis_server.url, "--db", "0,5", "--log", f"{redis_server.url}/5")
    assert "source database itself" in cli.assert_one_line_error(p, 2)
    assert redis_server.client(5).dbsize() == 0


def test_db_all_without_config_takes_the_dbs_with_keys_and_says_so(redis_factory, tmp_path):
    source = redis_factory(extra=("--rename-command", "CONFIG", ""))
    target = redis_factory()
    fill(source, dbs=(0, 5))
    p = cli.run("replicate", source.url, target.url, "--db", "all", "--state-dir",
                str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CONFIG GET databases refused" in p.stdout and "(0, 5)" in p.stdout, p.stdout
    assert_identical_per_db(source, target, [(0, 0), (5, 5)])
    bad = cli.run("capture", source.url, "--db", "20", "--log", f"file:{tmp_path / 'l2'}")
    assert "database 20" in cli.assert_one_line_error(bad, 2)


# -- a Redis Cluster target ----------------------------------------------------------------------
def test_several_dbs_into_a_cluster_need_target_db_0(redis_factory, cluster_factory, tmp_path):
    source, cluster = redis_factory(), cluster_factory(3)
    fill(source, dbs=(0, 3), n=20)
    p = cli.run("replicate", source.url, cluster.url, "--db", "0,3", "--state-dir",
                str(tmp_path))
    line = cli.assert_one_line_error(p, 2)
    assert "Redis Cluster" in line and "--target-db 0" in line and "database 3" in line, line
    assert not any(tmp_path.iterdir())             # refused before a log was made
    assert cluster.dbsize() == 0


def test_apply_into_a_cluster_stops_at_another_db_without_target_db(redis_factory,
                                                                     cluster_factory, tmp_path):
    source, cluster = redis_factory(), cluster_factory(3)
    fill(source, dbs=(0, 3), n=20)
    log = f"file:{tmp_path / 'log'}"
    assert cli.run("capture", source.url, "--db", "0,3", "--log", log).returncode == 0
    app = cli.run("apply", cluster.url, "--log", log, "--idle-timeout", "1")
    line = cli.assert_one_line_error(app, 2)
    assert "Redis Cluster" in line and "--target-db 0" in line and "database 3" in line, line
    lag = int(re.search(r"total lag (\d+)", cli.run("status", "--log", log).stdout).group(1))
    assert lag >= records_of_db(log, 3) > 0       # nothing of db 3 was committed


def test_several_dbs_into_a_cluster_with_target_db_0(redis_factory, cluster_factory, tmp_path):
    source, cluster = redis_factory(), cluster_factory(3)
    fill(source)
    drop_shared(source, DBS)                       # distinct names only: no collision
    p = cli.run("replicate", source.url, cluster.url, "--db", "0,3,7", "--target-db", "0",
                "--state-dir", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "key collision" not in p.stdout
    c = cluster.client()
    for db in DBS:
        others = frozenset(k for k in c.scan_iter() if not k.startswith(f"k{db}:".encode()))
        assert not differences(source.client(db), c, ignore=others), db
    assert cluster.dbsize() == sum(source.client(db).dbsize() for db in DBS)


def test_collisions_into_a_cluster_are_reported(redis_factory, cluster_factory, tmp_path):
    source, cluster = redis_factory(), cluster_factory(3)
    fill(source, dbs=(0, 3), n=20)
    p = cli.run("replicate", source.url, cluster.url, "--db", "0,3", "--target-db", "0",
                "--state-dir", str(tmp_path), "--no-progress")
    assert p.returncode == 1 and "apply: 10 key collisions" in p.stdout, p.stdout + p.stderr
