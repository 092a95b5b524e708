"""The write-workload generator used by the live tests and benchmarks, checked on a real server."""
from __future__ import annotations

import subprocess
import sys

from conveyor.workload import Workload

# what each operation of the generator sends, as the server's INFO commandstats names it
SERVER_COMMAND = {"set": "set", "incr": "incrby", "append": "append", "hset": "hset",
                  "hdel": "hdel", "rpush": "rpush", "lpop": "lpop", "sadd": "sadd", "srem": "srem",
                  "zadd": "zadd", "zincrby": "zincrby", "xadd": "xadd", "pfadd": "pfadd",
                  "del": "del", "expire_short": "pexpire", "expire_long": "expire",
                  "persist": "persist", "rename": "rename"}


def test_every_operation_reaches_the_server_at_the_configured_rate(redis_factory):
    server = redis_factory()
    c = server.client()
    c.config_resetstat()
    stats = Workload(c, rate=2000, keyspace=100, seed=5).run(3.0)
    # every operation was sent, and the server ran it
    assert set(stats.by_op) == set(Workload.OPS)
    ran = c.info("commandstats")
    for op, cmd in SERVER_COMMAND.items():
        assert ran.get(f"cmdstat_{cmd}", {}).get("calls", 0) > 0, (op, cmd)
    # at the rate asked for (paced by elapsed time: a slow tick is made up, not lost)
    assert 0.9 * 2000 <= stats.rate <= 1.05 * 2000, stats.rate
    # keys of every type exist, and short expiries expired while it ran
    types = {c.type(k) for k in c.scan_iter(count=1000)}
    assert {b"string", b"hash", b"list", b"set", b"zset", b"stream"} <= types, types
    assert c.info("stats")["expired_keys"] > 0


def test_runs_from_a_shell(redis_factory):
    server = redis_factory()
    p = subprocess.run([sys.executable, "-m", "conveyor.workload", server.url, "--rate", "500",
                        "--seconds", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("workload: "), p.stdout
    assert server.client().dbsize() > 0
