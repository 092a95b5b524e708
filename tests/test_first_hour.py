"""Issue 20, the first hour of a new user: errors that come before anything is read, output
that a pipe can cut, counts that add up. Real CLI against real servers."""
from __future__ import annotations

import re

import pytest

from tests import cli


@pytest.mark.parametrize("command", ["replicate", "verify", "apply"])
@pytest.mark.parametrize("pattern, replacement, why", [
    (r"^str:(\d+)", r"\2", "invalid group reference 2"),
    (r"^str:(?P<n>\d+)", r"x:\g<m>", "unknown group name 'm'"),
])
def test_a_bad_key_replacement_is_a_usage_error_before_anything_is_read(
        redis_factory, tmp_path, command, pattern, replacement, why):
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"str:{i}": i for i in range(50)})
    log = f"file:{tmp_path}/log"
    args = {"replicate": [source.url, target.url, "--log", log],
            "verify": [source.url, target.url],
            "apply": [target.url, "--log", log, "--idle-timeout", "1"]}[command]
    p = cli.run(command, *args, "--key-replace", pattern, replacement)
    line = cli.assert_one_line_error(p, 2)
    assert why in line and replacement in line, line
    assert not (tmp_path / "log").exists()              # nothing was captured or created
    assert target.client().dbsize() == 0
    # a valid one of the same shape works
    ok = cli.run("verify", source.url, target.url, "--key-replace", pattern.replace("?P<n>", ""),
                 r"\1")
    assert ok.returncode == 1 and "50 missing" in ok.stdout, (ok.stdout, ok.stderr)


def _closed_reader(*args: str):
    """Run conveyor with its stdout a pipe nobody reads any more (``| head`` that ended)."""
    import subprocess
    p = subprocess.Popen([*cli.CONVEYOR, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=cli.env())
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(60), err


def test_a_closed_pipe_ends_status_and_verify_quietly(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(3000)})
    log = f"file:{tmp_path}/log"
    cli.run("capture", source.url, "--log", log, check=True)
    for args in (("status", "--log", log), ("verify", source.url, target.url, "--show-diffs")):
        code, err = _closed_reader(*args)
        assert code == 141 and err == "", (args, code, err)   # 128 + SIGPIPE, as Unix tools


def test_show_diffs_prints_keys_as_redis_cli_does(redis_factory):
    source, target = redis_factory(), redis_factory()
    s = source.client()
    s.set(b'hash:2', 1)
    s.set(b'odd "key"\\\n\x00\xff', 1)
    p = cli.run("verify", source.url, target.url, "--show-diffs")
    assert p.returncode == 1
    assert '  missing  "hash:2"' in p.stdout.splitlines(), p.stdout
    assert '  missing  "odd \\"key\\"\\\\\\n\\x00\\xff"' in p.stdout.splitlines(), p.stdout
    assert "b'" not in p.stdout


def test_global_options_work_after_the_command_and_json_mode_is_json_to_the_end(
        redis_factory, tmp_path):
    import json
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(20)})
    p = cli.run("verify", source.url, target.url, "--log-format", "json", "-v")
    assert p.returncode == 1, p.stderr
    docs = [json.loads(ln) for ln in p.stderr.splitlines() if ln.strip()]   # JSON, every line
    report = next(d for d in docs if d.get("event") == "report")
    assert report["missing"] == 20 and report["checked"] == 20 and report["complete"] is True
    log = f"file:{tmp_path}/log"
    p = cli.run("capture", source.url, "--log", log, "-v", "--log-format=json")
    assert p.returncode == 0, p.stderr
    report = next(d for d in map(json.loads, p.stderr.splitlines()) if d.get("event") == "report")
    assert report["keys"] == 20 and report["complete"] is True
    # a fatal error is one JSON object too, with its exit code
    p = cli.run("verify", source.url, "redis://127.0.0.1:1", "--log-format", "json")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    doc = json.loads(lines[0])
    assert doc["level"] == "error" and doc["exit_code"] == 1 and "cannot connect" in doc["message"]
    p = cli.run("verify", source.url, "--log-format", "json")          # a usage error
    assert p.returncode == 2 and json.loads(p.stderr)["exit_code"] == 2


def test_quiet_acceptances_are_said(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(10)})
    # a password given to a server that takes connections without one
    url = source.url.replace("redis://", "redis://:not-needed@")
    p = cli.run("verify", url, target.url)
    assert p.returncode == 1
    assert "takes connections without a password" in p.stderr and "not-needed" not in p.stderr
    # a --from time that has not come yet
    log = f"file:{tmp_path}/log"
    cli.run("capture", source.url, "--log", log, check=True)
    p = cli.run("apply", target.url, "--log", log, "--from", "2999-01-01T00:00:00Z")
    assert "has not come yet" in cli.assert_one_line_error(p, 2)
    # a mistyped --log: apply says there is no log there and what it waits for, and leaves
    # nothing behind
    typo = tmp_path / "typo"
    p = cli.run("apply", target.url, "--log", f"file:{typo}", "--idle-timeout", "1")
    assert p.returncode == 0            # apply may start before capture: nothing to apply is no error
    assert f"there is no log at file:{typo} yet" in p.stdout
    assert "nothing was applied" in p.stdout and not typo.exists()
    assert target.client().dbsize() == 0
    # a bad value from the environment is named as the variable
    env = {**cli.env(), "CONVEYOR_LOG_FORMAT": "xml"}
    p = cli.run("verify", source.url, target.url, env=env)
    assert "environment variable CONVEYOR_LOG_FORMAT='xml'" in cli.assert_one_line_error(p, 2)


@pytest.mark.parametrize("name", ["capture", "apply", "verify", "replicate", "status"])
def test_every_command_help_ends_with_examples_that_parse(name):
    import shlex

    from conveyor.cli import cli as group
    p = cli.run(name, "--help")
    assert p.returncode == 0
    examples = p.stdout.split("Examples:")[1].strip().splitlines()
    assert len(examples) >= 2
    cmd = group.commands[name]
    for line in examples:
        words = shlex.split(line.strip())
        assert words[:2] == ["conveyor", name], line
        cmd.make_context(name, words[2:])           # raises on an option that does not exist
    if name == "verify":                            # its own options before the TLS ones
        text = p.stdout
        assert text.index("--show-diffs") < text.index("--source-cacert")


def test_capture_and_apply_counts_add_up(redis_factory, tmp_path):
    """Apply writes only the latest event of a key within a batch: the events it skipped are
    counted, so that its events are capture's events."""
    import re
    source = redis_factory(extra=("--notify-keyspace-events", "KEA"))
    target = redis_factory()
    s = source.client()
    s.mset({f"k:{i}": i for i in range(500)})
    log = f"file:{tmp_path}/log"
    captured = 0
    for _ in range(2):                 # the same keys twice: the second copy supersedes the first
        out = cli.run("capture", source.url, "--log", log, "--fresh", check=True).stdout
        captured += int(re.search(r"capture: (\d+) keys", out).group(1))
    s.delete("k:0")
    out = cli.run("capture", source.url, "--log", log, "--mode", "live", "--idle-timeout", "1",
                  check=True).stdout
    m = re.search(r"capture: (\d+) events? \((\d+) upserts?, (\d+) deletes?\)", out)
    assert m and int(m.group(1)) == int(m.group(2)) + int(m.group(3)), out
    captured += int(m.group(1))
    out = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True).stdout
    m = re.search(r"holding (\d+) events \((\d+) restored, (\d+) typed, (\d+) converted, "
                  r"(\d+) deleted, (\d+) expired on arrival, (\d+) superseded", out)
    assert m, out
    total, parts = int(m.group(1)), [int(x) for x in m.groups()[1:]]
    assert total == sum(parts) == captured, (out, captured)
    assert int(m.group(7)) >= 500


def test_status_shows_a_live_scan_as_scanning_with_its_keys_and_a_stopped_capture_as_stopped(
        redis_factory, tmp_path):
    import json
    import signal

    from tests.compare import wait_until
    source = redis_factory(extra=("--notify-keyspace-events", "KEA",
                                  "--enable-debug-command", "yes"))
    source.client().execute_command("DEBUG", "POPULATE", 20000, "key", 10)
    log = f"file:{tmp_path}/log"

    def captures(uri=log):
        p = cli.run("status", "--log", uri, "--json")
        return list(json.loads(p.stdout)["captures"].values()) if p.returncode == 0 else []

    cap = cli.start("capture", source.url, "--log", log, "--mode", "live", "--max-rate", "2000")
    try:
        # during the live capture's first scan (about 10 s at 2000 keys/s)
        doc = wait_until(lambda: next((c for c in captures() if c.get("keys", 0) > 0), None),
                         timeout=30)
        assert doc["state"] == "scanning" and doc["mode"] == "live", doc
        assert doc["keys"] < 20000 and doc["last_event_ms"] > 0
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(60)
    doc = captures()[0]
    assert doc["state"].startswith("stopped") and not doc["gone"], doc
    # a snapshot stopped by SIGINT in the middle of its scan says so too
    log2 = f"file:{tmp_path}/log2"
    cap = cli.start("capture", source.url, "--log", log2, "--max-rate", "2000")
    # once its scan is under way (a checkpoint with keys: 20000 keys take 10 s at this rate)
    wait_until(lambda: any(c.get("keys", 0) > 0 for c in captures(log2)), timeout=30,
               what="the snapshot's first checkpoint")
    cap.send_signal(signal.SIGINT)
    cap.wait(60)
    p = cli.run("status", "--log", log2)
    assert "stopped during the scan: run it again to continue" in p.stdout, p.stdout


def test_a_dry_run_says_what_it_would_do_and_leaves_no_trace_in_status(redis_factory, tmp_path):
    import json
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(300)})
    log = f"file:{tmp_path}/log"
    cli.run("capture", source.url, "--log", log, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    before = json.loads(cli.run("status", "--log", log, "--json", check=True).stdout)
    source.client().mset({f"new:{i}": i for i in range(40)})
    cli.run("capture", source.url, "--log", log, check=True)
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", "--dry-run", check=True)
    assert "would apply" in p.stdout and "(340 restored" in p.stdout, p.stdout
    after = json.loads(cli.run("status", "--log", log, "--json", check=True).stdout)
    assert after["apply"] == before["apply"]              # the real apply's summary, untouched
    assert [m["member"] for m in after["members"]] == [m["member"] for m in before["members"]]
    assert target.client().dbsize() == 300


def test_output_polish_singular_counts_one_mem_limit_warning_no_none(redis_factory, tmp_path):
    # given one key, and a source with 40 keys above --mem-limit
    one, many = redis_factory(), redis_factory()
    one.client().set("only", "v")
    many.client().mset({f"big:{i}": "x" * 2048 for i in range(40)})
    log = f"file:{tmp_path}/one"
    p = cli.run("capture", one.url, "--log", log)
    assert p.returncode == 0 and "capture: 1 key," in p.stdout and " 1 keys" not in p.stdout, p.stdout
    # then status before any apply says nothing was committed, never "None"
    st = cli.run("status", "--log", log)
    assert st.returncode == 0 and "None" not in st.stdout, st.stdout
    twin = redis_factory()
    twin.client().set("only", "v")
    v = cli.run("verify", one.url, twin.url)
    assert "(1 key checked)" in v.stdout, v.stdout
    # when capture meets 40 keys above the limit: one warning, the list at the end
    p = cli.run("capture", many.url, "--log", f"file:{tmp_path}/many", "--mem-limit", "1KiB")
    assert p.returncode == 0, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if "above --mem-limit" in ln]
    assert len(warnings) == 1 and "listed at the end" in warnings[0], p.stderr
    # worded as conveyor's own lines are (stage: level:), not as Python's logging does
    assert re.match(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d capture: warning: key "big:\d+" uses',
                    warnings[0]), warnings[0]
    assert "40 keys above --mem-limit (migrated)" in p.stdout, p.stdout


def test_replicate_says_where_it_keeps_its_log_and_cleanup_removes_it(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(200)})
    state = tmp_path / "state"
    # without --cleanup: the log stays, and the last lines say where, how big, how to remove it
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(state), "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    line = next(ln for ln in p.stdout.splitlines() if "stay in" in ln)
    assert str(state) in line and "iB)" in line and "--cleanup" in line and "rm -r" in line, line
    assert any(state.iterdir())
    # with --cleanup after a run that succeeds: removed, and said
    target.client().flushall()
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(state), "--cleanup",
                "--fresh", "--no-progress")
    assert p.returncode == 0 and "removed its log" in p.stdout, p.stdout + p.stderr
    assert not [f for f in state.rglob("*") if f.is_file()], list(state.rglob("*"))
    assert target.client().dbsize() == 200
    # with a log of the user's own: refused in one line, nothing run
    p = cli.run("replicate", source.url, target.url, "--log", f"file:{tmp_path}/mine", "--cleanup")
    assert "yours" in cli.assert_one_line_error(p, 2)
    assert not (tmp_path / "mine").exists()


def test_an_unreachable_kafka_at_start_is_one_line_after_log_wait(redis_factory):
    # given no broker at all on the log's address
    source = redis_factory()
    source.client().set("k", "v")
    p = cli.run("capture", source.url, "--log", "kafka://127.0.0.1:1/nobody", "--log-wait", "12")
    # then capture gave up after --log-wait (not forever), in one line, exit 1
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("conveyor: error: "), p.stderr
    assert "could not be reached at start" in line and "--log-wait 12s" in line, line
    # and each wait line says how long its attempt took, not only the pause after it
    waits = [ln for ln in p.stderr.splitlines() if "waiting for the log" in ln]
    assert waits and all("this attempt took" in w for w in waits), p.stderr


def test_a_non_empty_target_is_said_at_the_first_apply_and_fail_refuses_it(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(100)})
    target.client().mset({"k:1": "theirs", "own": "x"})
    target.client(2).set("elsewhere", 1)
    # fail: one line, exit 1, nothing written, no log left behind
    p = cli.run("replicate", source.url, target.url, "--log", f"file:{tmp_path}/a",
                "--on-existing", "fail")
    line = cli.assert_one_line_error(p, 1)
    assert "already holds 3 keys (db 0: 2, db 2: 1)" in line and "nothing was written" in line, line
    assert target.client().get("k:1") == b"theirs" and target.client().dbsize() == 2
    assert not (tmp_path / "a").exists()
    # overwrite (the default): said once, at the group's first apply
    log = f"file:{tmp_path}/b"
    p = cli.run("replicate", source.url, target.url, "--log", log, "--no-verify")
    assert p.returncode == 0 and "apply: warning: the target already holds 3 keys" in p.stdout, \
        p.stdout + p.stderr
    assert target.client().get("k:1") == b"1" and target.client().get("own") == b"x"
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", "--on-existing", "fail")
    assert p.returncode == 0 and "already holds" not in p.stdout, p.stdout + p.stderr


def test_on_existing_skip_leaves_the_targets_own_keys_alone_across_runs(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    src, dst = source.client(), target.client()
    src.mset({f"k:{i}": i for i in range(100)})
    dst.mset({"k:1": "theirs", "own": "x"})
    log = f"file:{tmp_path}/log"
    p = cli.run("replicate", source.url, target.url, "--log", log, "--on-existing", "skip")
    out = p.stdout + p.stderr
    # the copy left the target's two keys alone and said so; verify counts k:1 apart, exit 0
    assert p.returncode == 0, out
    assert "already holds 2 keys (db 0: 2): they are left alone" in out, out
    assert "1 of keys the target held before, left alone (--on-existing skip)" in out, out
    # (k:1 differs, own is not in the source)
    assert "; 2 keys the target held before, left alone (--on-existing skip), differ" in out, out
    assert dst.get("k:1") == b"theirs" and dst.get("own") == b"x"
    assert {k: dst.get(k) for k in (f"k:{i}" for i in range(100)) if k != "k:1"} == \
        {k: src.get(k) for k in (f"k:{i}" for i in range(100)) if k != "k:1"}
    # a later change of the source reaches the keys the migration wrote, never the kept ones,
    # in a new apply process that reads the kept names back from the log's metadata
    src.set("k:1", "changed"), src.set("k:2", "changed")
    src.set("own", "from source")
    cli.run("capture", source.url, "--log", log, check=True)
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", "--on-existing", "skip")
    assert p.returncode == 0 and "leaving alone 2 keys the target held before" in p.stdout, \
        p.stdout + p.stderr
    assert dst.get("k:1") == b"theirs" and dst.get("own") == b"x"
    assert dst.get("k:2") == b"changed"


def test_on_existing_skip_into_a_cluster_reads_every_primary(redis_factory, cluster_factory,
                                                              tmp_path):
    source, target = redis_factory(), cluster_factory(3)
    src, dst = source.client(), target.client()
    src.mset({f"k:{i}": i for i in range(300)})
    theirs = {f"k:{i}": "theirs" for i in range(0, 300, 50)}       # spread over the primaries
    for k, v in theirs.items():
        dst.set(k, v)
    p = cli.run("replicate", source.url, target.url, "--state-dir", str(tmp_path),
                "--on-existing", "skip")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"already holds {len(theirs)} keys (db 0: {len(theirs)}): they are left alone" in \
        p.stdout, p.stdout
    for i in range(300):
        want = b"theirs" if f"k:{i}" in theirs else str(i).encode()
        assert dst.get(f"k:{i}") == want, i


def test_a_dry_run_from_elsewhere_never_moves_the_real_group(redis_factory, tmp_path):
    source, target = redis_factory(), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(200)})
    log_dir = tmp_path / "log"
    log = f"file:{log_dir}"
    cli.run("capture", source.url, "--log", log, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    position = (log_dir / "groups" / "apply.json").read_bytes()
    # a dry run from the start counts what a rebuild would write ...
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", "--dry-run",
                "--from", "earliest")
    assert p.returncode == 0 and "would apply" in p.stdout and "200 events" in p.stdout, p.stdout
    # ... and the real group is where it was: its next apply has nothing to write
    assert (log_dir / "groups" / "apply.json").read_bytes() == position
    p = cli.run("apply", target.url, "--log", log, "--idle-timeout", "1")
    assert "applied 0 records" in p.stdout, p.stdout


def _events(out: str) -> int:
    m = re.search(r"(?:would apply|applied) \S+ records? holding (\d+) events?", out)
    assert m, out
    return int(m.group(1))


def _groups_left(log: str) -> list[str]:
    """Consumer groups on the log's backend, read with its own client (not conveyor's)."""
    if log.startswith("kafka://"):
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": log[len("kafka://"):].split("/")[0]})
        return [g.group_id for g in admin.list_consumer_groups().result(timeout=30).valid]
    if log.startswith("redis://"):
        import redis
        r = redis.Redis.from_url(log)
        return [g["name"].decode() for s in r.scan_iter(match="conveyor:*", _type="stream")
                for g in r.xinfo_groups(s)]
    return []


def test_a_dry_run_leaves_no_trace_on_any_log_and_counts_what_apply_then_does(
        redis_factory, log_uri):
    source, target = redis_factory(), redis_factory()
    src = source.client()
    src.mset({f"k:{i}": i for i in range(200)})
    cli.run("capture", source.url, "--log", log_uri, check=True)
    cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", check=True)
    src.mset({f"k:{i}": "new" for i in range(50)})
    cli.run("capture", source.url, "--log", log_uri, check=True)
    # a dry run from the group's position and one from the start of the log ...
    p = cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", "--dry-run")
    assert p.returncode == 0 and "would apply" in p.stdout, p.stdout + p.stderr
    pending = _events(p.stdout)
    p = cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1", "--dry-run",
                "--from", "earliest")
    assert p.returncode == 0 and _events(p.stdout) >= 200 + pending, p.stdout + p.stderr
    # ... wrote nothing, left no group of their own behind ...
    assert target.client().get("k:0") == b"0"
    assert not [g for g in _groups_left(log_uri) if "dry-run" in g], _groups_left(log_uri)
    # ... and the real group applies exactly what the first dry run said it would
    p = cli.run("apply", target.url, "--log", log_uri, "--idle-timeout", "1")
    assert p.returncode == 0 and _events(p.stdout) == pending and pending >= 50, p.stdout
    assert target.client().get("k:0") == b"new" and target.client().get("k:199") == b"199"
