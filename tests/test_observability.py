"""Long unattended runs: JSON log lines for shippers, progress lines off a terminal."""
from __future__ import annotations

import json

from conveyor.workload import Workload
from tests import cli
from tests.test_live import notifying_source, wait_for_subscriber


def test_json_log_format_gives_one_object_per_stderr_line(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    Workload(source.client(), rate=2000, keyspace=300, seed=5).run(0.5)
    proc = cli.start("--log-format", "json", "replicate", source.url, target.url, "--mode", "live",
                     "--idle-timeout", "7", "--state-dir", str(tmp_path), "--recheck-delay", "1")
    wait_for_subscriber(source)
    Workload(source.client(), rate=500, keyspace=300, seed=6).run(7)
    source.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub")   # a gap: a warning record
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    docs = [json.loads(line) for line in err.splitlines() if line.strip()]   # every line parses
    events = {d.get("event") for d in docs}
    assert "progress" in events and "report" in events, docs[:5]
    assert any(d.get("level") == "warning" and "gap" in d["message"] for d in docs), docs
    progress = [d for d in docs if d.get("event") == "progress"]
    assert all(isinstance(d.get("rate_per_s"), (int, float)) for d in progress)
    assert "converged" in out                       # the report on stdout stays plain text


def test_progress_lines_off_a_terminal(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "7",
                     "--state-dir", str(tmp_path), "--no-verify")
    wait_for_subscriber(source)
    Workload(source.client(), rate=500, keyspace=300, seed=7).run(7)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("progress: ")]
    assert len(lines) >= 2 and any("events/s" in ln for ln in lines), err
    # the same run, asked for no progress, prints none
    source.client().config_set("notify-keyspace-events", "KEA")
    quiet = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "7",
                      "--state-dir", str(tmp_path / "q"), "--no-verify", "--no-progress")
    wait_for_subscriber(source)
    Workload(source.client(), rate=500, keyspace=300, seed=8).run(7)
    out, err = quiet.communicate(timeout=120)
    assert quiet.returncode == 0, out + err
    assert "progress: " not in err
