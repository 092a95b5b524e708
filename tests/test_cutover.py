"""Cutover: ``status --wait-synced`` answers "may clients switch now?" on every log backend, under
a write load paused on the source as the README's procedure says; the target is then compared
with the paused source by plain reads (tests/compare.py), not by conveyor's verify."""
from __future__ import annotations

import time

import pytest

from conveyor.log import PartitionStatus
from conveyor.workload import Workload
from tests import cli
from tests.compare import differences, wait_until
from tests.test_live import notifying_source, wait_for_subscriber


def _stop(*procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.communicate(timeout=60)


def test_wait_synced_under_a_paused_write_load_leaves_the_target_equal_to_the_source(
        redis_factory, log_uri):
    # given a live capture and an apply following a source under a steady write load
    source, target = notifying_source(redis_factory), redis_factory()
    Workload(source.client(), rate=2000, keyspace=3000, seed=51).run(1.0)
    cap = cli.start("capture", source.url, "--log", log_uri, "--mode", "live")
    app = cli.start("apply", target.url, "--log", log_uri)
    load = None
    try:
        wait_for_subscriber(source)
        load = Workload(source.client(), rate=1500, keyspace=3000, seed=52).start(60)
        # the load runs and its changes reach the target through capture and apply
        t = target.client()
        wait_until(lambda: load.stats.commands > 3000 and t.dbsize() > 0, timeout=60,
                   what="the load under way and applied")
        assert cap.poll() is None and app.poll() is None
        # when writes are paused on the source (the load keeps trying) and the wait is asked
        source.client().execute_command("CLIENT", "PAUSE", 90_000, "WRITE")
        p = cli.run("status", "--log", log_uri, "--wait-synced", "--timeout", "60")
        # then it says synced, and the target already equals the paused source
        assert p.returncode == 0 and "status: synced after" in p.stdout, p.stdout + p.stderr
        assert differences(source.client(), target.client()) == []
    finally:
        source.client().execute_command("CLIENT", "UNPAUSE")
        if load is not None:
            load.stop()
        _stop(cap, app)


def test_wait_synced_times_out_naming_what_is_behind(redis_factory, tmp_path):
    source, target = notifying_source(redis_factory), redis_factory()
    source.client().mset({f"k:{i}": i for i in range(300)})
    log = f"file:{tmp_path}/log"
    # a snapshot capture: nothing follows the source
    cli.run("capture", source.url, "--log", log, check=True)
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    p = cli.run("status", "--log", log, "--wait-synced", "--timeout", "2")
    assert p.returncode == 1 and "NOT synced" in p.stdout, p.stdout + p.stderr
    assert "is not following the source" in p.stdout, p.stdout
    # a live capture, and an apply that is not running: the group is behind
    cap = cli.start("capture", source.url, "--log", log, "--mode", "live")
    try:
        wait_for_subscriber(source)
        source.client().set("k:1", "changed")
        time.sleep(1)
        p = cli.run("status", "--log", log, "--wait-synced", "--timeout", "12", "--json")
        assert p.returncode == 1, p.stdout + p.stderr
        import json
        doc = json.loads(p.stdout)
        assert doc["synced"] is False and doc["groups"] == ["apply"], doc
        assert any("group 'apply' has not applied" in why for why in doc["behind"]), doc
    finally:
        _stop(cap)
    # bad input: one line, exit 2
    p = cli.run("status", "--log", log, "--timeout", "5")
    assert "--wait-synced" in cli.assert_one_line_error(p, 2)


@pytest.mark.parametrize("committed, end, lag, reached", [
    (10, 10, 3, True),            # an offset is the position after a record
    (9, 10, 3, False),
    (None, 10, 3, False),         # nothing committed yet
    (None, 10, 0, True),          # ... but nothing to apply either
    (None, 0, 5, True),           # the log was empty at the call
    ("1700-3", "1700-2", 4, True),     # a Redis Streams position: past the end's entry
    ("1700-2", "1700-2", 4, False),    # the end's own entry is still pending
    ("999-9", "1000-0", 4, False),     # ids compare as (ms, seq), not as text
    ("1000-10", "1000-9", 4, True),
    (None, "0-0", 4, True),
])
def test_a_group_reached_an_end_in_each_backends_positions(committed, end, lag, reached):
    assert PartitionStatus("0", committed, end, lag).reached(end) is reached
