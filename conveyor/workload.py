"""A steady mixed write workload for tests and benchmarks.

Every type, deletes, expiries (some expiring while the run lasts), renames, at a configurable rate,
pipelined in small ticks so the rate is steady. ``python -m conveyor.workload URI --rate 2000
--seconds 30`` runs it from a shell.
"""
from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass, field

import redis

TICK_S = 0.01


@dataclass
class WorkloadStats:
    commands: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


class Workload:
    """Writes ``rate`` commands/s over ``keyspace`` keys named ``{prefix}<type>:<n>``."""

    OPS = ("set", "incr", "append", "hset", "hdel", "rpush", "lpop", "sadd", "srem", "zadd",
           "zincrby", "xadd", "pfadd", "del", "expire_short", "expire_long", "persist", "rename")

    def __init__(self, client: redis.Redis, *, rate: float = 1000, keyspace: int = 1000,
                 prefix: str = "w:", seed: int = 1) -> None:
        self.r, self.rate, self.keyspace, self.prefix = client, rate, keyspace, prefix
        self.rnd = random.Random(seed)
        self.stats = WorkloadStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def key(self, kind: str) -> str:
        return f"{self.prefix}{kind}:{self.rnd.randrange(self.keyspace)}"

    def _op(self, p, op: str) -> None:
        rnd, k = self.rnd, self.key
        if op == "set":
            p.set(k("s"), rnd.randbytes(rnd.randint(1, 64)))
        elif op == "incr":
            p.incr(k("n"), rnd.randint(1, 9))
        elif op == "append":
            p.append(k("s"), "x")
        elif op == "hset":
            p.hset(k("h"), f"f{rnd.randrange(20)}", rnd.random())
        elif op == "hdel":
            p.hdel(k("h"), f"f{rnd.randrange(20)}")
        elif op == "rpush":
            p.rpush(k("l"), *[rnd.randrange(1000) for _ in range(rnd.randint(1, 4))])
        elif op == "lpop":
            p.lpop(k("l"))
        elif op == "sadd":
            p.sadd(k("set"), rnd.choice([rnd.randrange(100), f"m{rnd.randrange(100)}"]))
        elif op == "srem":
            p.srem(k("set"), rnd.randrange(100))
        elif op == "zadd":
            p.zadd(k("z"), {f"m{rnd.randrange(50)}": rnd.uniform(-1e6, 1e6)})
        elif op == "zincrby":
            p.zincrby(k("z"), rnd.random(), f"m{rnd.randrange(50)}")
        elif op == "xadd":
            p.xadd(k("x"), {"v": rnd.randrange(10**6)}, maxlen=50, approximate=False)
        elif op == "pfadd":
            p.pfadd(k("hll"), rnd.randrange(10**6))
        elif op == "del":
            p.delete(k(rnd.choice(("s", "h", "l", "set", "z"))))
        elif op == "expire_short":
            p.pexpire(k(rnd.choice(("s", "h", "n"))), rnd.randint(50, 2000))   # expires during the run
        elif op == "expire_long":
            p.expire(k(rnd.choice(("s", "h", "l", "z"))), rnd.randint(600, 7200))
        elif op == "persist":
            p.persist(k("s"))
        elif op == "rename":
            p.execute_command("RENAME", k("s"), k("s"))  # may fail (no such key): ignored

    def step(self, n: int) -> None:
        p = self.r.pipeline(transaction=False)
        for _ in range(n):
            op = self.rnd.choice(self.OPS)
            self._op(p, op)
            self.stats.by_op[op] = self.stats.by_op.get(op, 0) + 1
        p.execute(raise_on_error=False)
        self.stats.commands += n

    def run(self, seconds: float) -> WorkloadStats:
        """Run at a steady rate for ``seconds`` (or until ``stop()``).

        What is owed is computed from the time elapsed, so a slow tick (a loaded machine, a slow
        server) is made up in the next ones instead of silently lowering the rate; a catch-up is
        capped at ten ticks' worth so a long stall does not turn into one huge burst.
        """
        start = time.monotonic()
        sent = 0
        burst = max(1, int(self.rate * TICK_S * 10))
        while not self._stop.is_set():
            now = time.monotonic()
            if now - start >= seconds:
                break
            n = min(int(self.rate * (now - start)) - sent, burst)
            if n > 0:
                self.step(n)
                sent += n
            time.sleep(max(0.0, TICK_S - (time.monotonic() - now)))
        self.stats.seconds = time.monotonic() - start
        return self.stats

    def start(self, seconds: float) -> "Workload":
        self._thread = threading.Thread(target=self.run, args=(seconds,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> WorkloadStats:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return self.stats

    def join(self) -> WorkloadStats:
        if self._thread:
            self._thread.join()
        return self.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("uri")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--keyspace", type=int, default=1000)
    ap.add_argument("--prefix", default="w:")
    a = ap.parse_args()
    w = Workload(redis.Redis.from_url(a.uri), rate=a.rate, keyspace=a.keyspace, prefix=a.prefix)
    st = w.run(a.seconds)
    print(f"workload: {st.commands} commands in {st.seconds:.1f}s ({st.rate:,.0f}/s)")


if __name__ == "__main__":
    main()
