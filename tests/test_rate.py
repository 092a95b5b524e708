"""``--max-rate``/``--max-bytes-rate``: the source is read no faster than asked, and live changes
are never held back by it.

Unit tests drive the pacer with a fake clock; the integration tests run the real command against a
real Redis and measure from the outside: how long a paced capture and a paced verify take for a
known number of keys, that a key written on the source during a paced scan reaches the log
before the scan ends, and that the copy is complete (independent compare).
"""
from __future__ import annotations

import time

import pytest

from conveyor.rate import Pacer
from tests import cli
from tests.compare import differences, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pacer_holds_the_key_rate_over_a_window():
    clock = Clock()
    p = Pacer(1000, clock=clock)
    assert p.batch_for(500) == 100          # a tenth of the rate per read
    read = 0
    while clock.now < 110.0:                # ten seconds of a reader that reads when allowed
        clock.now += p.delay()
        p.charge(keys=p.batch_for(500))
        read += p.batch_for(500)
    assert 10_000 <= read <= 10_000 + 2 * 100, read


def test_pacer_byte_rate_and_the_slower_of_two_limits_wins():
    clock = Clock()
    p = Pacer(1_000_000, 1000, clock=clock)    # keys allow a lot, bytes do not
    p.charge(keys=1, nbytes=5000)
    assert p.delay() == pytest.approx(5.0)
    clock.now += 10
    assert p.delay() == 0.0
    # an idle reader does not build up a burst: after a pause only a tenth of a second is free
    p.charge(keys=0, nbytes=1000)
    assert p.delay() == pytest.approx(0.9)


def test_unlimited_pacer_never_waits():
    p = Pacer()
    p.charge(keys=10**9, nbytes=10**12)
    assert p.delay() == 0.0 and p.batch_for(1000) == 1000 and not p.limited
    with pytest.raises(ValueError):
        Pacer(0)


def test_rate_options_refuse_bad_values_in_one_line(tmp_path):
    for args in (["--max-rate", "0"], ["--max-rate", "-3"], ["--max-bytes-rate", "0"],
                 ["--max-bytes-rate", "lots"]):
        p = cli.run("capture", "redis://127.0.0.1:1", "--log", f"file:{tmp_path}/log", *args)
        line = cli.assert_one_line_error(p, 2)
        assert "max" in line and "rate" in line, line


def _source(redis_factory, n):
    s = redis_factory(extra=("--notify-keyspace-events", "KEA", "--enable-debug-command", "yes"))
    s.client().execute_command("DEBUG", "POPULATE", n, "key", 20)
    return s


def test_paced_snapshot_takes_as_long_as_the_rate_says_and_is_complete(redis_factory, tmp_path):
    source, target = _source(redis_factory, 3000), redis_factory()
    log = f"file:{tmp_path}/log"
    t0 = time.monotonic()
    cli.run("capture", source.url, "--log", log, "--max-rate", "1000", check=True)
    took = time.monotonic() - t0
    # 3000 keys at 1000/s: about 3 s of reading (less the first tenth of a second of credit)
    assert took >= 2.7, took
    cli.run("apply", target.url, "--log", log, "--idle-timeout", "1", check=True)
    assert differences(source.client(), target.client()) == []
    t0 = time.monotonic()
    cli.run("verify", source.url, target.url, "--max-rate", "1500", check=True)
    assert time.monotonic() - t0 >= 1.8


def test_live_changes_pass_a_paced_scan(redis_factory, tmp_path):
    """A key written while a slow scan runs reaches the target long before the scan could end."""
    source, target = _source(redis_factory, 6000), redis_factory()
    log = f"file:{tmp_path}/log"
    cap = cli.start("capture", source.url, "--log", log, "--mode", "live", "--max-rate", "400")
    app = cli.start("apply", target.url, "--log", log)
    try:
        # once capture listens and the scan's first keys are on the target (the scan has ~15 s
        # to go at 400 keys/s): a wait on those, not a sleep that a loaded machine outlasts
        wait_until(lambda: source.client().pubsub_numpat() >= 1, timeout=30,
                   what="capture to subscribe")
        wait_until(lambda: target.client().dbsize() > 0, timeout=30, what="the scan under way")
        source.client().set("written-during-scan", "v")
        wait_until(lambda: target.client().get("written-during-scan") == b"v", timeout=10)
        assert target.client().dbsize() < 5000          # the scan was still far from its end
        wait_until(lambda: differences(source.client(), target.client()) == [], timeout=60)
    finally:
        for p in (cap, app):
            p.terminate()
            p.wait(timeout=30)
