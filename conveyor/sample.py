"""Sample data written to a real server: every type and encoding a migration meets (demo, tests, bench)."""
from __future__ import annotations

import random

import redis


def load_mixed(r: redis.Redis, n: int = 200, *, seed: int = 7, prefix: str = "") -> int:
    """Write about ``n`` keys of every type; returns how many keys were written.

    Covers strings (text, integer, binary), hashes (small/listpack and large/hashtable), lists
    (small and quicklist), sets (intset, listpack, hashtable), sorted sets (small and skiplist),
    streams with a consumer group, HyperLogLogs, keys with TTL, and binary / non-ASCII key names.
    """
    rnd = random.Random(seed)
    p = r.pipeline(transaction=False)
    count = 0
    for i in range(n):
        kind = i % 10
        k = f"{prefix}{kind}:{i}".encode()
        if kind == 0:
            p.set(k, f"value-{i}" * rnd.randint(1, 5))
        elif kind == 1:
            p.set(k, rnd.randint(-10**12, 10**12))
        elif kind == 2:
            p.set(k, bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300))))
        elif kind == 3:
            size = 5 if i % 20 else 300
            p.hset(k, mapping={f"f{j}": f"v{j}" * (1 + j % 3) for j in range(size)})
        elif kind == 4:
            size = 5 if i % 20 else 400
            p.rpush(k, *[f"item{j}" if j % 2 else j for j in range(size)])
        elif kind == 5:
            if i % 3 == 0:
                p.sadd(k, *range(0, 50))                        # intset
            elif i % 3 == 1:
                p.sadd(k, *[f"m{j}" for j in range(10)])          # listpack (7.2+) / hashtable
            else:
                p.sadd(k, *[f"member-{j}" for j in range(600)])   # hashtable
        elif kind == 6:
            size = 5 if i % 20 else 300
            p.zadd(k, {f"z{j}": rnd.choice([j * 1.5, -j / 3, 1e100, 0.1 + j]) for j in range(size)})
        elif kind == 7:
            for j in range(3 + i % 5):
                p.xadd(k, {"field": f"v{j}", "n": j}, id=f"{1700000000000 + j}-{i}")
            if i % 2:
                p.xgroup_create(k, "grp", id="0")
        elif kind == 8:
            p.pfadd(k, *[f"e{j}" for j in range(5 if i % 20 else 5000)])
        else:
            p.set(k, f"ttl-{i}", px=rnd.randint(60_000, 3_600_000))
        count += 1
    # binary and non-ASCII key names
    p.set(b"\x00\xffbin\r\nkey", b"\x00\x01\x02")
    p.hset("ключ:ünïcode:🔑", mapping={"é": "ü"})
    p.sadd(b"\xfe\xfdset", b"\x00", b"\xff")
    p.execute()
    return count + 3
