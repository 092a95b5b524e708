"""Issue 20, the first hour of a new user: errors that come before anything is read, output
that a pipe can cut, counts that add up. Real CLI against real servers."""
from __future__ import annotations

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
