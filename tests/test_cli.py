"""The CLI contract: replicate, filters, rewriting, status, and bad input as one clear line."""
from __future__ import annotations

import json
import re

import redis
from redis.crc import key_slot

from conveyor.log import log_exists

from tests import cli
from tests.datasets import load_mixed


# -- bad input -------------------------------------------------------------------------------------
def test_malformed_uri_is_a_usage_error(tmp_path):
    p = cli.run("capture", "redis://host:notaport/0", "--log", f"file:{tmp_path}")
    assert "malformed" in cli.assert_one_line_error(p, 2)
    p = cli.run("capture", "http://host:1/0", "--log", f"file:{tmp_path}")
    assert "redis://" in cli.assert_one_line_error(p, 2)
    p = cli.run("capture", "redis://127.0.0.1:1/0", "--log", "ftp://nowhere")
    cli.assert_one_line_error(p)


def test_unreachable_server_is_one_line_without_the_password(tmp_path):
    p = cli.run("capture", "redis://:hunter2@127.0.0.1:1/0", "--log", f"file:{tmp_path}")
    line = cli.assert_one_line_error(p, 1)
    assert "cannot connect" in line and "hunter2" not in p.stderr + p.stdout


def test_wrong_password_is_one_line_without_the_password(redis_factory, tmp_path):
    s = redis_factory(password="right-one")
    p = cli.run("capture", f"redis://:wrong-one@127.0.0.1:{s.port}/0", "--log", f"file:{tmp_path}")
    line = cli.assert_one_line_error(p, 1)
    assert "authentication failed" in line
    assert "wrong-one" not in p.stderr + p.stdout and "right-one" not in p.stderr + p.stdout


def test_password_from_the_environment_is_used_and_never_printed(redis_factory, tmp_path):
    s = redis_factory(password="env-secret")
    t = redis_factory()
    s.client().set("k", "v")
    p = cli.run("replicate", f"redis://127.0.0.1:{s.port}/0", t.url, "--state-dir", str(tmp_path),
                env={**cli.env(), "CONVEYOR_SOURCE_PASSWORD": "env-secret"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "env-secret" not in p.stdout + p.stderr
    assert t.client().get("k") == b"v"


def test_target_that_is_the_source_is_refused(redis_server, tmp_path):
    p = cli.run("replicate", redis_server.url + "/0", redis_server.url + "/0",
                "--state-dir", str(tmp_path))
    assert "is the source itself" in cli.assert_one_line_error(p, 2)


def test_missing_argument_is_one_line_with_exit_2():
    cli.assert_one_line_error(cli.run("apply"), 2)


# -- replicate -------------------------------------------------------------------------------------
def test_replicate_copies_and_verifies_through_the_embedded_file_log(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    n = load_mixed(source.client(), 500)
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(tmp_path / "state"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in p.stdout
    assert target.client().dbsize() == n
    assert any((tmp_path / "state").iterdir())          # the file log lives in the state dir


def test_replicate_dry_run_writes_nothing(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 100)
    p = cli.run("replicate", source.url, target.url, "--dry-run", "--state-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "would apply" in p.stdout
    assert target.client().dbsize() == 0


def test_compare_mode_exits_1_and_reports_each_kind(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    s, t = source.client(), target.client()
    s.set("a", "1"); s.set("b", "2"); s.set("c", "3")
    t.set("b", "changed"); t.set("c", "3", px=100_000); t.set("zz", "extra")
    report = tmp_path / "r.json"
    p = cli.run("replicate", source.url, target.url, "--mode", "compare", "--show-diffs",
                "--report", str(report), "--recheck-delay", "0.1")
    assert p.returncode == 1
    assert "1 missing, 0 type, 1 value, 1 ttl, 1 extra" in p.stdout
    assert json.loads(report.read_text())


# -- filters and rewriting -------------------------------------------------------------------------
def test_filters_select_exactly_the_matching_keys(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    s = source.client()
    for i in range(300):
        s.set(f"user:{i}", i)
        s.set(f"tmp:{i}", i)
        s.hset(f"hash:{i}", "f", i)
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(tmp_path),
                "--scan-match", "user:*", "--key-exclude", r":1\d$", "--key-slots", "0-8000")
    assert p.returncode == 0, p.stdout + p.stderr
    want = {k for k in (f"user:{i}".encode() for i in range(300))
            if not re.search(rb":1\d$", k) and key_slot(k) <= 8000}
    assert set(target.client().keys("*")) == want
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(tmp_path / "2"),
                "--scan-type", "hash", "--fresh")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(target.client().keys("hash:*")) == 300


def test_key_rewriting_is_applied_and_honoured_by_verify(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 200)
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(tmp_path),
                "--key-prefix", "new:", "--key-replace", "^([0-9]):", r"type\1:")
    assert p.returncode == 0, p.stdout + p.stderr
    t = target.client()
    assert t.exists("new:type3:3") and not t.exists("3:3")
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in p.stdout


# -- status ----------------------------------------------------------------------------------------
def test_status_shows_lag_and_last_apply_write(redis_factory, log_uri):
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 100)
    cli.run("capture", source.url, "--log", log_uri, check=True)
    before = json.loads(cli.run("status", "--log", log_uri, "--json", check=True).stdout)
    assert before["lag"] > 0
    assert [c["state"] for c in before["captures"].values()] == ["done"], before["captures"]
    p = cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    assert "holds no records" not in p.stdout
    after = json.loads(cli.run("status", "--log", log_uri, "--json", check=True).stdout)
    assert after["lag"] == 0
    assert after["apply"]["last_write_ms"] > 0
    text = cli.run("status", "--log", log_uri, check=True).stdout
    assert "last wrote" in text and "total lag 0" in text


def test_status_of_a_log_nothing_wrote_is_an_error_and_creates_nothing(log_uri):
    # a mistyped --log must not look like an empty, caught-up log, nor create one
    p = cli.run("status", "--log", log_uri)
    assert "no log at" in cli.assert_one_line_error(p, 1)
    assert not log_exists(log_uri)


def test_apply_from_a_log_nothing_captured_to_says_so(redis_server, log_uri):
    # apply may start before capture; when it ends on an empty log it says so instead of a bare 0
    p = cli.run("apply", redis_server.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    assert "applied 0 records" in p.stdout
    assert "holds no records: nothing has captured to it yet" in p.stdout, p.stdout


def test_status_of_an_unknown_group_creates_no_group(redis_factory, log_uri):
    # a Redis Stream group that nobody reads would hold back trimming for good
    source = redis_factory()
    load_mixed(source.client(), 20)
    cli.run("capture", source.url, "--log", log_uri, check=True)
    st = json.loads(cli.run("status", "--log", log_uri, "--group", "typo", "--json",
                            check=True).stdout)
    assert st["lag"] > 0 and all(p["committed"] is None for p in st["partitions"])
    if log_uri.startswith("redis://"):
        buffer = redis.Redis.from_url(log_uri)
        assert [g for s in buffer.scan_iter(_type="stream")
                for g in buffer.xinfo_groups(s)] == []


def test_a_log_option_nobody_reads_is_a_usage_error(redis_server, tmp_path):
    for log, opt in ((f"file:{tmp_path / 'log'}", "partitions=4"),
                     (f"{redis_server.url}/0", "segment_bytes=1"),
                     ("kafka://127.0.0.1:9/topic", "no.such.property=1")):
        p = cli.run("capture", redis_server.url, "--log", log, "--log-opt", opt)
        line = cli.assert_one_line_error(p, 2)
        assert opt.split("=")[0] in line, line


def test_size_options_take_units_and_refuse_nonsense(redis_server, tmp_path):
    p = cli.run("capture", redis_server.url, "--log", f"file:{tmp_path / 'l'}", "--mem-limit", "lots")
    line = cli.assert_one_line_error(p, 2)
    assert "'lots' is not a size" in line
    redis_server.client().set("k", "v" * 2000)
    p = cli.run("capture", redis_server.url, "--log", f"file:{tmp_path / 'l'}", "--mem-limit", "1KiB",
                check=True)
    assert "1 key above --mem-limit" in p.stdout


def test_quickstart_demo_migrates_and_verifies():
    """The README's first Quickstart command (after setup): a real migration, verified."""
    p = cli.run("demo", "--keys", "500", check=True)
    assert "verify: 0 missing, 0 type, 0 value, 0 ttl, 0 extra (503 keys checked)" in p.stdout, p.stdout
    assert "demo: the target is identical to the source" in p.stdout
