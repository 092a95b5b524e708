"""Long unattended runs: JSON log lines for shippers, progress lines off a terminal."""
from __future__ import annotations

import json

from conveyor.workload import Workload
from tests import cli
from tests.compare import wait_until
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


# -- metrics, health and readiness ------------------------------------------------------------------
def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def series(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text exposition (parsed by prometheus-client)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_move_during_a_live_run(redis_factory, tmp_path):
    from tests.servers import free_port
    source, target = notifying_source(redis_factory), redis_factory()
    port = free_port()
    proc = cli.start("replicate", source.url, target.url, "--mode", "live", "--idle-timeout", "6",
                     "--state-dir", str(tmp_path), "--no-verify", "--metrics-port", str(port))
    wait_for_subscriber(source)
    Workload(source.client(), rate=500, keyspace=200, seed=9).run(2)
    first = wait_until(lambda: series(scrape(port)[1]).get('conveyor_capture_events_total{kind="upsert"}'))
    assert scrape(port, "/healthz")[0] == 200
    source.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub")    # one gap, one resync
    Workload(source.client(), rate=500, keyspace=200, seed=10).run(2)
    m = wait_until(lambda: (lambda s: s if s.get("conveyor_gaps_total", 0) >= 1
                          and s.get("conveyor_resyncs_total", 0) >= 1 else None)(series(scrape(port)[1])))
    assert m['conveyor_capture_events_total{kind="upsert"}'] > first
    applied = sum(v for k, v in m.items() if k.startswith("conveyor_apply_events_total"))
    assert applied > 0 and m["conveyor_target_up"] == 1
    assert m["conveyor_dead_letters_total"] == 0 and "conveyor_target_retries_total" in m
    assert 0 <= m["conveyor_apply_lag_seconds"] < 60 and "conveyor_log_lag_records" in m
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err


def test_readyz_turns_ready_when_the_lag_reaches_zero(redis_factory, tmp_path):
    from tests.datasets import load_mixed
    from tests.servers import free_port
    source, target = redis_factory(), redis_factory()
    load_mixed(source.client(), 30_000)
    log = f"file:{tmp_path / 'log'}"
    cli.run("capture", source.url, "--log", log, check=True)
    port = free_port()
    proc = cli.start("apply", target.url, "--log", log, "--idle-timeout", "8", "--batch", "200",
                     "--metrics-port", str(port), "--ready-lag", "0")
    codes = []
    wait_until(lambda: codes.append(scrape(port, "/readyz")[0]) or codes[-1] == 200, timeout=60,
             every=0.05)
    assert 503 in codes, codes                    # not ready while the log still had a backlog
    assert series(scrape(port)[1])["conveyor_log_lag_records"] == 0
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
