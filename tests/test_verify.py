"""verify: every kind of difference found, nothing false reported, across server versions."""
from __future__ import annotations

import re
import threading
import time

import pytest

from conveyor.keys import KeyFilter, KeyRewriter
from tests import cli
from tests.datasets import load_mixed
from conveyor.verify import Verifier


def copy(src, dst, rename=lambda k: k):
    """DUMP/RESTORE every key (same server version on both sides)."""
    for k in src.scan_iter(count=1000):
        dst.restore(rename(k), max(src.pttl(k), 0), src.dump(k), replace=True)


def run(src, dst, **kw):
    kw.setdefault("recheck_delay", 0.1)
    return Verifier(source=src, target=dst, key_filter=kw.pop("key_filter", KeyFilter()),
                    rewriter=kw.pop("rewriter", KeyRewriter()), **kw).run()


@pytest.fixture
def pair(redis_factory):
    s, t = redis_factory(), redis_factory()
    load_mixed(s.client(), 300)
    copy(s.client(), t.client())
    return s.client(), t.client()


def test_identical_copies_have_no_difference(pair):
    report = run(*pair)
    assert not report.differs and report.complete
    assert report.checked == pair[0].dbsize()
    assert report.summary_line() == f"0 missing, 0 type, 0 value, 0 ttl, 0 extra ({report.checked} keys checked)"


def test_each_kind_of_difference_is_found(pair):
    s, t = pair
    t.delete("0:0")                                   # missing
    t.delete("1:1"); t.sadd("1:1", "x")               # type
    t.hset("3:3", "f0", "changed")                    # value (hash)
    t.lset("4:4", 0, "changed")                       # value (list)
    t.zincrby("6:6", 0.5, "z0")                       # value (zset score)
    t.xadd("7:7", {"extra": "entry"})                 # value (stream)
    t.persist("9:9")                                  # ttl (target has none)
    t.set("only-in-target", "x")                      # extra
    report = run(s, t)
    assert report.counts == {"missing": 1, "type": 1, "value": 4, "ttl": 1, "extra": 1}
    kinds = {d.key: d.kind for d in report.diffs}
    assert kinds[b"0:0"] == "missing" and kinds[b"only-in-target"] == "extra"


def test_ttl_within_tolerance_is_not_a_difference(pair):
    s, t = pair
    s.pexpire("0:10", 100_000)
    t.pexpireat("0:10", s.pexpiretime("0:10") + 500)
    assert not run(s, t, ttl_tolerance_ms=1000).differs
    assert run(s, t, ttl_tolerance_ms=100).counts["ttl"] == 1


def test_a_key_fixed_during_the_recheck_delay_is_not_reported(pair):
    s, t = pair
    t.set("0:20", "stale")
    fixer = threading.Timer(0.5, lambda: t.restore("0:20", 0, s.dump("0:20"), replace=True))
    fixer.start()
    report = run(s, t, recheck_delay=1.5)
    fixer.join()
    assert not report.differs


def test_keys_vanishing_from_the_source_are_not_differences(pair):
    s, t = pair
    s.delete("0:30")                                  # deleted on the source, target still has it
    report = run(s, t)
    assert report.counts["extra"] == 1 and report.counts["missing"] == 0


@pytest.mark.parametrize("src_kind,dst_kind", [("valkey8.1", "redis7.0"), ("redis7.0", "redis6.2")])
def test_logically_equal_values_across_versions_are_equal(redis_factory, src_kind, dst_kind):
    # given the same data written on two versions (so DUMP bytes and encodings differ)
    s, t = redis_factory(src_kind).client(), redis_factory(dst_kind).client()
    load_mixed(s, 200)
    load_mixed(t, 200)
    for k in s.scan_iter():                           # same absolute expiries on both sides
        ms = s.pttl(k)
        if ms > 0:
            at = int(time.time() * 1000) + ms
            s.pexpireat(k, at)
            t.pexpireat(k, at)
    assert s.dump(b"5:5") != t.dump(b"5:5") or s.dump(b"3:3") != t.dump(b"3:3")
    report = run(s, t)
    assert not report.differs, report.diffs[:5]
    t.hset("3:3", "f1", "other")
    assert run(s, t).counts["value"] == 1


def test_rewritten_names_are_compared_and_extras_found(redis_factory):
    s, t = redis_factory().client(), redis_factory().client()
    load_mixed(s, 100)
    copy(s, t, rename=lambda k: b"new:" + k)
    t.set("new:stray", "x")
    t.set("unrelated", "x")                           # not ours: no prefix
    report = run(s, t, rewriter=KeyRewriter(prefix="new:"))
    assert report.counts == {"missing": 0, "type": 0, "value": 0, "ttl": 0, "extra": 1}
    rx = KeyRewriter(replacements=[("^([0-9]):", r"t\1-")])
    t2 = redis_factory().client()
    copy(s, t2, rename=rx)
    t2.set("t3-stray", "x")
    report = run(s, t2, rewriter=rx)
    assert report.counts["missing"] == 0 and report.counts["extra"] == 1


def test_filters_limit_what_is_compared(pair):
    s, t = pair
    t.set("0:0", "differs")
    assert run(s, t, key_filter=KeyFilter(exclude=["^0:"])).counts["value"] == 0
    assert run(s, t, key_filter=KeyFilter(match="0:*")).counts["value"] == 1


def test_report_json_shows_binary_and_unicode_keys(pair):
    s, t = pair
    t.delete(b"\x00\xffbin\r\nkey", "ключ:ünïcode:🔑")
    doc = run(s, t).to_json()
    keys = [d["key"] for d in doc["diffs"]]
    assert "ключ:ünïcode:🔑" in keys and {"base64": "AP9iaW4NCmtleQ=="} in keys
    assert doc["counts"]["missing"] == 2


def test_keys_the_source_evicts_during_verify_are_named_in_the_report(redis_factory):
    """A source at its maxmemory evicts keys when verify's own reads need buffer memory: the
    extras that follow are the source's changes, and the report says how many it evicted."""
    server = redis_factory(extra=("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-random"))
    src, dst = server.client(), redis_factory().client()
    for i in range(6000):
        src.set(f"k{i}", "v" * 1000)
    src.config_set("maxmemory", 0)               # copied while nothing is evicted
    copy(src, dst)
    src.config_set("maxmemory", "3mb")
    before = int(src.info("stats")["evicted_keys"])
    report = run(src, dst)
    src.config_set("maxmemory", 0)
    evicted = int(src.info("stats")["evicted_keys"]) - before
    assert 0 < report.evicted <= evicted
    assert 0 < report.counts["extra"] <= dst.dbsize() - src.dbsize()
    assert f"the source evicted {report.evicted} keys while verify read it" in report.summary_line()
    assert report.to_json()["source_evicted"] == report.evicted


def test_sample_checks_n_random_keys_and_says_it_is_a_sample(redis_factory):
    source, target = redis_factory(), redis_factory()
    data = {f"k:{i}": i for i in range(20_000)}
    source.client().mset(data)
    target.client().mset(data)
    p = cli.run("verify", source.url, target.url, "--sample", "1000")
    assert p.returncode == 0 and "(1000 keys checked); a random sample of the source's 20,000 " \
        "keys, not a full verify" in p.stdout, p.stdout + p.stderr
    # a tenth of the keys missing on the target: about a tenth of the sample is found missing
    target.client().delete(*[f"k:{i}" for i in range(0, 20_000, 10)])
    target.client().set("only-on-target", 1)
    p = cli.run("verify", source.url, target.url, "--sample", "1000", "--recheck-delay", "0")
    assert p.returncode == 1, p.stdout + p.stderr
    missing = int(re.search(r"verify: (\d+) missing", p.stdout).group(1))
    assert 50 <= missing <= 150 and " 0 extra (1000 keys checked)" in p.stdout, p.stdout
    # a sample above the source's size checks each key once
    small = redis_factory()
    small.client().mset({"a": 1, "b": 2, "c": 3})
    p = cli.run("verify", small.url, target.url, "--sample", "50", "--recheck-delay", "0")
    assert "3 missing" in p.stdout and "(3 keys checked)" in p.stdout, p.stdout
