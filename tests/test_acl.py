"""Least-privilege ACL users: every process runs as a user with exactly the README's rule, and a
user missing one command gets one line naming it (exit 1, never a wait).

The rules are read from the README (what users copy) and must equal conveyor.acl.rules(): docs,
code and tests cannot drift apart. Results are checked with tests/compare.py (plain redis-py
reads), and ACL LOG on every server must stay empty: nothing was refused, not even something
conveyor tolerates.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from conveyor.acl import rules
from conveyor.sample import load_mixed
from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_identical
from tests.servers import start_server
from tests.test_live import wait_for_subscriber

README = Path(__file__).resolve().parent.parent / "README.md"
PASSWORD = "acl-secret-pw"
BIG = ("--big-key-bytes", "64KiB")
# Which users live on which server.
USERS = {"src": ("capture", "verify", "replicate-source"),
         "dst": ("apply", "verify", "replicate-target"),
         "buf": ("log",)}


def readme_rules() -> dict[str, str]:
    """Every ``ACL SETUSER NAME reset on >PASSWORD RULE`` line of the README's ACL section."""
    text = README.read_text()
    section = text[text.index("## Least-privilege ACL users"):]
    section = section[:section.index("\n## ", 1)]
    return dict(re.findall(r"`ACL SETUSER (\S+) reset on >PASSWORD ([^`]+)`", section))


RULES = readme_rules()


def set_user(server, name: str, without: str | None = None) -> None:
    """Create ``name`` with exactly its documented rule (less ``+without``)."""
    rule = [t for t in RULES[name].split() if t != f"+{without}"]
    assert without is None or len(rule) == len(RULES[name].split()) - 1, (name, without)
    server.client().execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", *rule)


def url(server, user: str) -> str:
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}"


@pytest.fixture
def servers():
    """A source with keyspace notifications, a target and a buffer Redis (AOF on: no warning),
    each with its users."""
    started = {"src": start_server(extra=("--notify-keyspace-events", "KEA")),
               "dst": start_server(),
               "buf": start_server(extra=("--appendonly", "yes"))}
    try:
        for where, names in USERS.items():
            for name in names:
                set_user(started[where], name)
        yield started
    finally:
        for s in started.values():
            s.cleanup()


def load(src) -> None:
    """Every type, plus one big key of each type (read and applied in parts with BIG)."""
    r = src.client()
    load_mixed(r, 200)
    r.hset("big:hash", mapping={f"f{i}": "x" * 50 for i in range(3000)})
    r.rpush("big:list", *[f"e{i}" * 10 for i in range(10000)])
    r.sadd("big:set", *[f"m{i}" * 10 for i in range(6000)])
    r.zadd("big:zset", {f"z{i}" * 5: i for i in range(6000)})
    for i in range(2000):
        r.xadd("big:stream", {"f": "v" * 50})
    r.xgroup_create("big:stream", "g1", id="0")
    r.xreadgroup("g1", "c1", {"big:stream": ">"}, count=10)
    r.set("big:string", "y" * 200_000)


def assert_nothing_refused(servers) -> None:
    for name, s in servers.items():
        entries = s.client().execute_command("ACL", "LOG")
        assert entries == [], (name, entries)


def run_ok(*args: str) -> cli.subprocess.CompletedProcess:
    p = cli.run(*args, check=True, timeout=240)
    assert PASSWORD not in p.stdout + p.stderr
    return p


# -- the rules -------------------------------------------------------------------------------------
def test_the_readme_states_exactly_the_rules_conveyor_knows():
    assert RULES == rules(), "README's ACL section and conveyor.acl.rules() differ"
    assert set(RULES) >= {"capture", "apply", "verify", "log"}


# -- every process as its least-privilege user -----------------------------------------------------
@pytest.mark.parametrize("value_type", ["dump", "struct"])
def test_snapshot_through_a_stream_log_as_least_privilege_users(servers, value_type):
    # given a source with every type and big keys, and one user per process on each server
    src, dst, buf = servers["src"], servers["dst"], servers["buf"]
    load(src)
    log = f"{url(buf, 'log')}/0"
    # when capture, apply and verify run as those users
    out = run_ok("capture", url(src, "capture"), "--log", log, "--type", value_type, *BIG).stdout
    assert "read in parts" in out, out
    run_ok("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1")
    verified = run_ok("verify", url(src, "verify"), url(dst, "verify")).stdout
    # then the target holds the source's data, and no server refused anything
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in verified, verified
    assert differences(src.client(), dst.client()) == []
    assert_nothing_refused(servers)


def test_live_capture_and_apply_as_least_privilege_users(servers):
    # given a live capture and an apply running as their users
    src, dst, buf = servers["src"], servers["dst"], servers["buf"]
    load(src)
    log = f"{url(buf, 'log')}/0"
    capture = cli.start("capture", url(src, "capture"), "--log", log, "--mode", "live",
                        "--idle-timeout", "3", *BIG)
    apply = cli.start("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "5")
    wait_for_subscriber(src)
    # when the source is written to (every type, deletes, renames, expiries)
    Workload(src.client(), rate=800, keyspace=300, seed=5).run(3)
    # then both end cleanly, the target converges, and nothing was refused
    outs = []
    for proc in (capture, apply):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
        outs.append(out)
    assert "converged" in outs[0] and "CANNOT" not in outs[0], outs[0]
    assert wait_identical(src.client(), dst.client(), timeout=30) == []
    assert_nothing_refused(servers)


@pytest.mark.parametrize("mode", ["snapshot", "live"])
def test_replicate_as_least_privilege_users(servers, tmp_path, mode):
    src, dst = servers["src"], servers["dst"]
    load(src)
    args = ["replicate", url(src, "replicate-source"), url(dst, "replicate-target"),
            "--state-dir", str(tmp_path), "--mode", mode, *BIG]
    if mode == "snapshot":
        out = run_ok(*args).stdout
    else:
        proc = cli.start(*args, "--idle-timeout", "3")
        wait_for_subscriber(src)
        Workload(src.client(), rate=800, keyspace=300, seed=6).run(3)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, out + err
        assert "converged" in out and "CANNOT" not in out, out
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out, out
    assert differences(src.client(), dst.client()) == []
    assert_nothing_refused(servers)


def commands_run(server) -> set[str]:
    return {name.removeprefix("cmdstat_") for name in server.client().info("commandstats")}


def test_every_command_of_the_rules_is_used(servers, tmp_path):
    """Nothing can be removed: with the rules alone on each server's side, every command they
    grant is sent by conveyor in this run (and ACL checks every command sent)."""
    src, dst, buf = servers["src"], servers["dst"], servers["buf"]
    # given data that takes every path: big keys, a value above the log's record limit (sent in
    # parts: APPEND), a key only on the target (verify: EXISTS), a temporary key left by an
    # earlier run (apply's sweep: OBJECT IDLETIME), and pending entries on the log (XPENDING)
    load(src)
    src.client().set("huge", os.urandom(3_000_000))   # incompressible: its DUMP is split too
    dst.client().set("only-on-target", 1)
    dst.client().set("{x}conveyor-tmp:gone:abc", 1)
    for s in servers.values():
        s.client().config_resetstat()
    log = f"{url(buf, 'log')}/0"
    # when every process runs as its user, in every mode
    run_ok("capture", url(src, "capture"), "--log", log, "--type", "struct", *BIG)
    run_ok("capture", url(src, "capture"), "--log", log, "--fresh")    # huge's DUMP in parts
    run_ok("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1")
    run_ok("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1", "--group", "merge",
           "--from", "earliest", "--merge-policy", "merge")
    # a compaction (retention 0s: the first capture's entries are superseded by the second's)
    run_ok("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "2", "--log-opt",
           "retention=0s")
    src.client().set("one-more", 1)
    run_ok("capture", url(src, "capture"), "--log", log, "--fresh", *BIG)
    buf.client().xreadgroup("merge", "someone", {"conveyor:0": ">"}, count=1)   # now pending
    run_ok("status", "--log", log, "--group", "merge")
    proc = cli.start("capture", url(src, "capture"), "--log", log, "--mode", "live",
                     "--idle-timeout", "1", *BIG)
    assert proc.wait(120) == 0
    run_ok("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1", "--group", "merge",
           "--log-opt", "trim=acked")                       # XTRIM
    sent = {"capture": commands_run(src), "apply": commands_run(dst), "log": commands_run(buf)}
    # (uncompressed DUMPs on the target: verify compares typed values, with its typed reads)
    dst.client().config_set("rdbcompression", "no")
    for s in (src, dst):
        s.client().config_resetstat()
    assert cli.run("verify", url(src, "verify"), url(dst, "verify")).returncode == 1
    sent["verify"] = commands_run(src) | commands_run(dst)
    # then each rule's commands were all sent to its server
    for user, used in sent.items():
        granted = {t[1:] for t in RULES[user].split() if t.startswith("+")}
        assert granted - used == set(), (user, "granted and never sent")
    assert_nothing_refused(servers)


def test_replicate_on_valkey_as_least_privilege_users(tmp_path):
    # given Valkey 8.1 on both sides, with the same users
    src, dst = start_server("valkey8.1"), start_server("valkey8.1")
    try:
        set_user(src, "replicate-source")
        set_user(dst, "replicate-target")
        load(src)
        # when replicate runs as them, then the copy is whole
        out = run_ok("replicate", url(src, "replicate-source"), url(dst, "replicate-target"),
                     "--state-dir", str(tmp_path), *BIG).stdout
        assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out, out
        assert differences(src.client(), dst.client()) == []
        # and only redis-py's CLIENT SETINFO (7.2+, refusal ignored) was refused
        for s in (src, dst):
            refused = {e[b"object"] for e in s.client().execute_command("ACL", "LOG")}
            assert refused <= {b"client|setinfo"}, refused
    finally:
        src.cleanup()
        dst.cleanup()


# -- one command missing: one line naming it -------------------------------------------------------
# (process, the user that lacks it, where that user lives, the command)
MISSING = [
    ("capture", "capture", "src", "scan"),
    ("capture", "capture", "src", "dump"),              # refused inside the read script first
    ("capture-live", "capture", "src", "psubscribe"),
    ("capture-enable", "capture", "src", "config|set"),  # --enable-notifications, not granted
    ("capture", "log", "buf", "xadd"),
    ("apply", "apply", "dst", "restore"),
    ("apply", "log", "buf", "xreadgroup"),
    ("verify", "verify", "src", "dump"),
    ("verify", "verify", "dst", "pexpiretime"),
    ("replicate", "replicate-source", "src", "info"),
    ("replicate", "replicate-target", "dst", "info"),
    ("replicate", "replicate-target", "dst", "restore"),   # mid-run, after capture began
]


def _run(process: str, servers, log: str, tmp_path) -> cli.subprocess.CompletedProcess:
    src, dst = servers["src"], servers["dst"]
    if process.startswith("capture"):
        mode = [] if process == "capture" else ["--mode", "live", "--idle-timeout", "2"]
        if process == "capture-enable":
            src.client().config_set("notify-keyspace-events", "")
            mode.append("--enable-notifications")
        return cli.run("capture", url(src, "capture"), "--log", log, *mode, *BIG, timeout=60)
    if process == "apply":
        return cli.run("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1",
                       timeout=60)
    if process == "verify":
        return cli.run("verify", url(src, "verify"), url(dst, "verify"), timeout=60)
    return cli.run("replicate", url(src, "replicate-source"), url(dst, "replicate-target"),
                   "--state-dir", str(tmp_path), timeout=60)


@pytest.mark.parametrize("process,user,where,command", MISSING,
                         ids=[f"{p}-{u}-{c}" for p, u, _, c in MISSING])
def test_a_missing_permission_is_one_line_naming_it(servers, tmp_path, process, user, where,
                                                    command):
    # given a log holding the source's keys (written with the full rules)
    load(servers["src"])
    log = f"{url(servers['buf'], 'log')}/0"
    if process in ("apply", "verify"):
        run_ok("capture", url(servers["src"], "capture"), "--log", log, *BIG)
    if process == "verify":
        run_ok("apply", url(servers["dst"], "apply"), "--log", log, "--idle-timeout", "1")
    # when one user lacks one command of its rule (or one the rule does not grant)
    granted = f"+{command}" in RULES[user].split()
    set_user(servers[where], user, without=command if granted else None)
    began = time.monotonic()
    p = _run(process, servers, log, tmp_path)
    # then the run stops at once with one line naming the command and how to grant it
    line = cli.assert_one_line_error(p, 1)
    grant = f"ACL SETUSER {user} +{command}"
    shown = command.upper().replace("|", " ")
    assert f"refused {shown} for user '{user}' (NOPERM): grant it with {grant}" in line, line
    assert PASSWORD not in p.stdout + p.stderr
    assert time.monotonic() - began < 30              # refused, not waited for


def test_replicate_reports_a_capture_refused_mid_run_in_its_summary(servers, tmp_path):
    # given a replicate whose source user may not SCAN
    src, dst = servers["src"], servers["dst"]
    load(src)
    set_user(src, "replicate-source", without="scan")
    p = cli.run("replicate", url(src, "replicate-source"), url(dst, "replicate-target"),
                "--state-dir", str(tmp_path), timeout=60)
    # then capture's part of the summary is the one line naming it, and the run fails
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p
    assert ("capture: failed: source refused SCAN for user 'replicate-source' (NOPERM): grant it "
            "with ACL SETUSER replicate-source +scan") in p.stdout.splitlines(), p.stdout


def test_a_refused_channel_or_key_pattern_is_one_line_naming_what_to_grant(servers):
    src, dst, buf = servers["src"], servers["dst"], servers["buf"]
    load(src)
    log = f"{url(buf, 'log')}/0"
    # a capture user without the keyspace channel: the line names the exact pattern
    channel = "&__keyspace@0__:*"
    rule = RULES["capture"].split()
    src.client().execute_command("ACL", "SETUSER", "capture", "reset", "on", f">{PASSWORD}",
                                 *[t for t in rule if t != channel])
    p = cli.run("capture", url(src, "capture"), "--log", log, "--mode", "live", "--idle-timeout",
                "1", timeout=60)
    line = cli.assert_one_line_error(p, 1)
    assert f"refused PSUBSCRIBE on a channel for user 'capture' (NOPERM): grant it with " \
           f"ACL SETUSER capture {channel}" in line, line
    # an apply user whose keys are narrower than the data
    set_user(src, "capture")
    run_ok("capture", url(src, "capture"), "--log", log)
    dst.client().execute_command("ACL", "SETUSER", "apply", "reset", "on", f">{PASSWORD}",
                                 *["~3:*" if t == "~*" else t for t in RULES["apply"].split()])
    p = cli.run("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1", timeout=60)
    line = cli.assert_one_line_error(p, 1)
    assert "target refused RESTORE on a key for user 'apply' (NOPERM)" in line, line


def test_another_database_needs_select_and_its_own_channel(servers, tmp_path):
    # given users with the rules for database 3 (what the README says to add)
    src, dst = servers["src"], servers["dst"]
    r3 = rules(db=3)
    for server, name in ((src, "replicate-source"), (dst, "replicate-target")):
        server.client().execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}",
                                        *r3[name].split())
    load_mixed(src.client(db=3), 100)
    # when a live replicate of database 3 runs as them, then it converges
    proc = cli.start("replicate", f"{url(src, 'replicate-source')}/3",
                     f"{url(dst, 'replicate-target')}/3", "--state-dir", str(tmp_path),
                     "--mode", "live", "--idle-timeout", "2")
    wait_for_subscriber(src)
    load_mixed(src.client(db=3), 50, seed=9, prefix="later:")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    assert "converged" in out and "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in out, out
    assert differences(src.client(db=3), dst.client(db=3)) == []
    assert_nothing_refused(servers)


def test_a_command_refused_inside_apply_s_part_script_stops_apply_in_one_line(servers):
    # given big keys on the log (their parts are applied by a script)
    src, dst, buf = servers["src"], servers["dst"], servers["buf"]
    load(src)
    log = f"{url(buf, 'log')}/0"
    run_ok("capture", url(src, "capture"), "--log", log, *BIG)
    # when the apply user may not run LLEN, which only the script uses
    set_user(dst, "apply", without="llen")
    p = cli.run("apply", url(dst, "apply"), "--log", log, "--idle-timeout", "1", timeout=60)
    # then apply stops with one line (not a dead letter per key) pointing at ACL LOG
    line = cli.assert_one_line_error(p, 1)
    assert "refused a command inside the script of EVAL for user 'apply' (NOPERM" in line, line
    assert "ACL LOG" in line and "dead-letter" not in p.stdout + p.stderr
