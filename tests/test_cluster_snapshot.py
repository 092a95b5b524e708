"""Snapshot replicate between clusters of different shapes (issue 10): a 3-primary Redis 7.0 cluster
into a 2-primary cluster (Redis 7.0, and Valkey 8.1), every type, checked by the independent compare
reading every primary of both sides."""
from __future__ import annotations

import pytest

from tests import cli
from tests.compare import differences


def fill(client, n: int) -> None:
    p = client.pipeline(transaction=False)
    for i in range(n):
        kind = i % 6
        if kind == 0:
            p.hset(f"h:{i}", mapping={"a": i, "b": f"x{i}"})
        elif kind == 1:
            p.rpush(f"l:{i}", *range(i % 7 + 1))
        elif kind == 2:
            p.sadd(f"z:{i}", *(f"m{j}" for j in range(i % 5 + 1)))
        elif kind == 3:
            p.zadd(f"o:{i}", {f"m{j}": j / 3 for j in range(i % 4 + 1)})
        else:
            p.set(f"s:{i}", f"value-{i}")
        if i % 10 == 0 and kind >= 4:                   # some strings expire (later)
            p.pexpire(f"s:{i}", 600_000)
    p.execute()


@pytest.mark.parametrize("target_kind", ["redis7.0", "valkey8.1"])
def test_three_primaries_into_two_primaries_is_identical(cluster_factory, tmp_path, target_kind):
    src, dst = cluster_factory(3), cluster_factory(2, kind=target_kind)
    fill(src.client(), 12_000)
    p = cli.run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "0 missing, 0 type, 0 value, 0 ttl, 0 extra" in p.stdout, p.stdout[-2000:]
    assert dst.dbsize() == src.dbsize() == 12_000
    assert differences(src.client(), dst.client()) == []
