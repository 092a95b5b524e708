"""docker-compose.yml cannot be run here (no Docker engine), so prove at least that every command it
gives conveyor is a real command with options conveyor accepts, and that the Dockerfile exists."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from conveyor.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def conveyor_services() -> dict[str, list[str]]:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {name: svc["command"] for name, svc in spec["services"].items() if "build" in svc}


def test_compose_builds_conveyor_from_the_dockerfile():
    assert (ROOT / "Dockerfile").exists()
    assert set(conveyor_services()) >= {"capture", "apply", "verify", "status"}


@pytest.mark.parametrize("service", sorted(conveyor_services()))
def test_every_compose_command_parses_as_a_conveyor_command(service):
    args = conveyor_services()[service]
    # given the service's argv, when click parses it without running it, then no usage error
    sub = cli.get_command(click.Context(cli), args[0])
    assert sub is not None, f"{service}: {args[0]!r} is not a conveyor command"
    sub.make_context(args[0], list(args[1:]), parent=click.Context(cli))


def test_parse_check_can_fail_on_a_bad_option():
    sub = cli.get_command(click.Context(cli), "apply")
    with pytest.raises(click.UsageError):
        sub.make_context("apply", ["redis://x:1/0", "--log", "file:/tmp/x", "--no-such-option"],
                         parent=click.Context(cli))


def test_compose_runs_capture_and_apply_as_separate_healthchecked_services():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("capture", "apply"):
        svc = spec[name]
        port = svc["command"][svc["command"].index("--metrics-port") + 1]
        assert f"{port}/healthz" in " ".join(svc["healthcheck"]["test"])
        assert any(str(p).endswith(f":{port}") for p in svc["ports"])
        assert svc["env_file"], "secrets come from an env file"
        assert not any("PASSWORD" in str(v) for v in (svc.get("environment") or {}).values())
    docker = (ROOT / "Dockerfile").read_text()
    assert "\nUSER " in docker and "USER root" not in docker


def test_grafana_dashboard_charts_only_series_conveyor_serves():
    import json
    import re
    from conveyor.metrics import Metrics
    dash = json.loads((ROOT / "conveyor" / "deploy" / "grafana-dashboard.json").read_text())
    used = {name for p in dash["panels"] for t in p["targets"]
            for name in re.findall(r"conveyor_[a-z_]+", t["expr"])}
    served = {s.name for fam in Metrics().registry.collect() for s in fam.samples}
    served |= {f.name for f in Metrics().registry.collect()}
    assert used and used <= served | {n + "_total" for n in served}, used - served
    assert {"conveyor_apply_lag_seconds", "conveyor_log_lag_records", "conveyor_target_up"} <= used
