"""verify --repair: the keys verify finds different go to the log as ordinary events and apply
writes them; the remedy for a damaged file log; bad input refused before anything is read or
written. Outcomes are checked by plain redis-py reads (tests/compare.py)."""
from __future__ import annotations

import re

import pytest

from conveyor.events import block_size
from tests import cli
from tests.compare import differences
from tests.test_faults_file import captured_log, dead_letters, flip, frames, load, segments


def test_a_damaged_block_is_repaired_from_the_source(redis_factory, tmp_path):
    # given a captured file log with bytes flipped inside a block record
    source, target, log_dir, uri = captured_log(redis_factory, tmp_path)
    seg = segments(log_dir)[0]
    # the record holding the most keys (how a scan's keys fall into blocks depends on timing)
    start, end, key = max((r for r in frames(seg) if b"conveyor-marker" not in r[2]),
                          key=lambda r: block_size(r[2]) or 1)
    lost = block_size(key)
    assert lost and lost > 1, "the damaged record is no block: the test proves nothing"
    flip(seg, end - 3, b"\xff")
    # when apply replays it: that record is dead-lettered, exit 1, naming where and what to run
    p = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")
    assert p.returncode == 1, p.stdout + p.stderr
    assert [(d["segment"], d["byte"]) for d in dead_letters(log_dir, "apply")] == [(seg.name, start)]
    assert f"at byte {start}" in p.stderr and seg.name in p.stderr, p.stderr
    assert "--repair --log" in p.stdout, p.stdout
    assert len(differences(source.client(), target.client())) == lost
    # then verify --repair queues exactly the keys the block held, and apply writes them
    v = cli.run("verify", source.url, target.url, "--repair", "--log", uri, "--recheck-delay", "0")
    assert v.returncode == 1, v.stdout + v.stderr
    assert f"repair queued {lost} keys ({lost} missing)" in v.stdout, v.stdout
    a = cli.run("apply", target.url, "--log", uri, "--idle-timeout", "1")
    assert "0 dead letters" in a.stdout, a.stdout + a.stderr
    assert differences(source.client(), target.client()) == []


@pytest.mark.parametrize("rewrite", [(), ("--key-prefix", "new:")])
def test_every_kind_of_difference_is_repaired_through_the_log(redis_factory, tmp_path, rewrite):
    source, target = redis_factory(), redis_factory()
    load(source.client(), "k", 500)
    log = f"file:{tmp_path}/log"
    cli.run("capture", source.url, "--log", log, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", *rewrite, check=True)
    name = (lambda k: f"new:{k}") if rewrite else (lambda k: k)
    t = target.client()
    t.delete(name("k:1"), name("k:2"))                     # missing
    t.set(name("k:3"), "changed")                          # value
    t.delete(name("k:h7"))
    t.set(name("k:h7"), "a string")                        # type
    t.set(name("only-on-target"), 1)                       # extra
    t.set("outside-the-prefix", 1) if rewrite else None    # not ours: left alone
    t.expire(name("k:4"), 1000)                            # ttl
    source.client().delete("k:5")                          # gone from the source meanwhile
    v = cli.run("verify", source.url, target.url, "--repair", "--log", log, "--recheck-delay",
                "0", *rewrite)
    assert v.returncode == 1, v.stdout + v.stderr
    m = re.search(r"repair queued (\d+) keys \(([^)]*)\)", v.stdout)
    assert m and int(m.group(1)) == 7, v.stdout
    assert m.group(2) == "2 extra, 2 missing, 1 ttl, 1 type, 1 value", v.stdout   # k:5: extra
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", *rewrite, check=True)
    if rewrite:
        assert t.get("outside-the-prefix") == b"1"
        t.delete("outside-the-prefix")
        s = source.client()
        keys = set(s.keys("*"))
        assert set(t.keys("*")) == {b"new:" + k for k in keys}
        for k in keys:
            assert s.dump(k) == t.dump(b"new:" + k), k
            assert abs(s.pttl(k) - t.pttl(b"new:" + k)) < 2000, k
    else:
        assert differences(source.client(), target.client()) == []


def test_replicate_compare_repair_copies_what_differs_and_rechecks(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    load(source.client(), "k", 300)
    state = str(tmp_path / "state")
    cli.run("replicate", source.url, target.url, "--state-dir", state, check=True)
    target.client().delete("k:10", "k:11")
    target.client().set("k:12", "changed")
    p = cli.run("replicate", source.url, target.url, "--mode", "compare", "--repair",
                "--state-dir", state, "--recheck-delay", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "repair queued 3 keys (2 missing, 1 value)" in p.stdout, p.stdout
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in p.stdout.splitlines()[-1] or \
        "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in p.stdout, p.stdout
    assert differences(source.client(), target.client()) == []


def test_bad_repair_input_is_one_line_and_writes_nothing(redis_factory, tmp_path):
    source, target, other = redis_factory(), redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(50)})
    other.client().set("x", 1)
    # no log
    p = cli.run("verify", source.url, target.url, "--repair")
    assert "--repair needs --log" in cli.assert_one_line_error(p, 2)
    # a log that does not exist: nothing is created
    p = cli.run("verify", source.url, target.url, "--repair", "--log", f"file:{tmp_path}/typo")
    assert "no log at" in cli.assert_one_line_error(p, 2)
    assert not (tmp_path / "typo").exists()
    # a log of another source
    log = f"file:{tmp_path}/other"
    cli.run("capture", other.url, "--log", log, check=True)
    size = sum(f.stat().st_size for f in (tmp_path / "other").glob("*.log"))
    p = cli.run("verify", source.url, target.url, "--repair", "--log", log)
    assert "holds captures of" in cli.assert_one_line_error(p, 2)
    assert sum(f.stat().st_size for f in (tmp_path / "other").glob("*.log")) == size
    # a rewrite whose target names cannot be mapped back
    p = cli.run("verify", source.url, target.url, "--repair", "--log", log, "--key-replace",
                r"^k:(\d+)", r"n:\1")
    assert "cannot be mapped back" in cli.assert_one_line_error(p, 2)
    # replicate --dry-run with --repair
    p = cli.run("replicate", source.url, target.url, "--mode", "compare", "--repair", "--dry-run")
    cli.assert_one_line_error(p, 2)
    assert target.client().dbsize() == 0


def test_repair_with_a_cluster_on_either_side(redis_factory, cluster_factory, tmp_path):
    from tests.test_cluster_verify import copy_all, keys_away_from
    from tests.datasets import load_mixed
    # a cluster source: differences on primaries other than the node the URI names
    src, dst = cluster_factory(3), redis_factory()
    source = src.client()
    load_mixed(source, 600)
    copy_all(source, dst.client())
    missing, changed = keys_away_from(source, src.live()[0].port, 2)
    dst.client().delete(missing)
    dst.client().set(changed, "changed")
    dst.client().set("only-on-target", 1)
    log = f"file:{tmp_path}/a"
    cli.run("capture", src.url, "--log", log, "--scan-match", "nothing-matches-*", check=True)
    v = cli.run("verify", src.url, dst.url, "--repair", "--log", log, "--recheck-delay", "0")
    assert "repair queued 3 keys (1 extra, 1 missing, 1 value)" in v.stdout, v.stdout + v.stderr
    cli.run("apply", dst.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(source, dst.client()) == []
    # a cluster target: keys only on the target, on every primary, deleted through the log
    src2, dst2 = redis_factory(), cluster_factory(3)
    src2.client().mset({f"k:{i}": i for i in range(300)})
    target = dst2.client()
    log2 = f"file:{tmp_path}/b"
    cli.run("capture", src2.url, "--log", log2, check=True)
    cli.run("apply", dst2.url, "--log", log2, "--idle-timeout", "1", check=True)
    extra = [f"extra:{i}" for i in range(20)]              # spread over every primary's slots
    for k in extra:
        target.set(k, 1)
    target.delete("k:7")
    v = cli.run("verify", src2.url, dst2.url, "--repair", "--log", log2, "--recheck-delay", "0")
    assert "repair queued 21 keys (20 extra, 1 missing)" in v.stdout, v.stdout + v.stderr
    cli.run("apply", dst2.url, "--log", log2, "--idle-timeout", "1", check=True)
    assert differences(src2.client(), target) == []


def test_repair_of_several_databases_writes_each_to_its_own(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    for db in (0, 3):
        source.client(db).mset({f"d{db}:{i}": i for i in range(100)})
    log = f"file:{tmp_path}/log"
    cli.run("capture", source.url, "--db", "0,3", "--log", log, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    target.client(3).delete("d3:5")
    target.client(0).set("d0:6", "changed")
    v = cli.run("verify", source.url, target.url, "--db", "0,3", "--repair", "--log", log,
                "--recheck-delay", "0")
    assert "repair queued 2 keys (1 missing, 1 value)" in v.stdout, v.stdout + v.stderr
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    for db in (0, 3):
        assert differences(source.client(db), target.client(db)) == []


def test_repair_keeps_to_the_filter(redis_factory, tmp_path):
    # given a migration of the user:* keys only
    source, target = redis_factory(), redis_factory()
    source.client().mset({**{f"user:{i}": i for i in range(100)},
                          **{f"cache:{i}": i for i in range(100)}})
    log = f"file:{tmp_path}/log"
    cli.run("capture", source.url, "--log", log, "--scan-match", "user:*", check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    t = target.client()
    t.delete("user:1")
    t.set("user:extra", 1)
    t.set("cache:mine", 1)                 # outside the filter: not this migration's
    v = cli.run("verify", source.url, target.url, "--scan-match", "user:*", "--repair", "--log",
                log, "--recheck-delay", "0")
    assert "repair queued 2 keys (1 extra, 1 missing)" in v.stdout, v.stdout + v.stderr
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    s = source.client()
    assert sorted(t.keys("user:*")) == sorted(s.keys("user:*"))
    assert all(t.get(k) == s.get(k) for k in s.keys("user:*"))
    assert t.get("cache:mine") == b"1" and not t.keys("cache:[0-9]*")
