"""Big keys: read in parts, applied into a temporary key renamed over the real one at the end, with
bounded memory in capture and apply; DUMP payloads split at the log's record limit; --mem-limit."""
from __future__ import annotations

import os
import threading
import time

import pytest

from conveyor.apply import Applier
from bench.big_keys import load_big
from conveyor.events import Codec
from conveyor.keys import KeyRewriter
from conveyor.log import open_meta, open_reader
from tests.cli import CONVEYOR, env, run

N = 2_000_000
PEAK_MIB = 150          # stated bound for each process (measured: 47-116 MiB, see bench/big_keys.py)
CLEAN = "verify: 0 missing, 0 type, 0 value, 0 ttl, 0 extra"


def _hwm_kib(pid: int) -> int:
    """The process's own peak RSS so far (VmHWM of its address space), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(*args: str) -> tuple[int, int, str]:
    """Run one conveyor process; (exit code, peak RSS MiB, output).

    The peak is read from /proc while the process runs, not from wait4's ru_maxrss: Linux
    carries the forking parent's high-water mark into a child's ru_maxrss, so a large pytest
    process would be charged to conveyor."""
    import subprocess
    import threading
    proc = subprocess.Popen([*CONVEYOR, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env())
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm_kib(proc.pid))
        time.sleep(0.02)
    reader.join()
    return proc.returncode, peak // 1024, "".join(out)


@pytest.fixture(scope="module")
def big_source():
    from tests.servers import start_server
    s = start_server()
    load_big(s.client(), N)
    yield s
    s.cleanup()


class Watcher(threading.Thread):
    """Polls the target while apply runs: a key is either absent or complete, never partial."""

    def __init__(self, client) -> None:
        super().__init__(daemon=True)
        self.client, self.seen, self.partial = client, set(), []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            h, n = self.client.hlen("big:hash"), self.client.llen("big:list")
            self.seen.update({("hash", h), ("list", n)})
            self.partial += [x for x in (("hash", h), ("list", n)) if x[1] not in (0, N)]
            time.sleep(0.005)


def assert_big_keys_equal(src, dst) -> None:
    s, t = src.client(), dst.client()
    assert t.hlen("big:hash") == N and t.llen("big:list") == N
    for start in range(0, N, 100_000):       # the list, in order, page by page
        assert (s.lrange("big:list", start, start + 99_999)
                == t.lrange("big:list", start, start + 99_999)), start
    cursor, checked = 0, 0
    while True:
        cursor, page = t.hscan("big:hash", cursor, count=10_000)
        for f, v in page.items():
            assert v == b"value:" + f.split(b":", 1)[1], f
        checked += len(page)
        if cursor == 0:
            break
    assert checked == N
    assert [k for k in t.scan_iter(match="*conveyor-tmp*")] == []   # nothing left behind


def test_two_million_field_hash_and_list_through_each_log(big_source, redis_factory, log_uri):
    dst = redis_factory()
    code, cap_mib, out = measured("capture", big_source.url, "--log", log_uri)
    assert code == 0, out
    assert "2 keys read in parts" in out, out
    watcher = Watcher(dst.client())
    watcher.start()
    code, app_mib, out = measured("apply", dst.url, "--log", log_uri, "--idle-timeout", "1")
    watcher.halt.set()
    watcher.join()
    assert code == 0, out
    assert "2 keys completed from" in out, out
    assert watcher.partial == [], watcher.partial[:5]
    assert ("hash", 0) in watcher.seen                      # the watcher did look before the end
    assert 20 < cap_mib < PEAK_MIB and 20 < app_mib < PEAK_MIB, (cap_mib, app_mib)  # measured
    print(f"\n{log_uri.split(':')[0]}: capture peak {cap_mib} MiB, apply peak {app_mib} MiB")
    assert_big_keys_equal(big_source, dst)


@pytest.mark.parametrize("pair", [("valkey8.1", "redis6.2"), ("redis7.0", "redis7.0")],
                         ids=lambda p: f"{p[0]}->{p[1]}")
@pytest.mark.parametrize("value_type", ["dump", "struct"])
def test_every_type_in_parts_across_versions(redis_factory, tmp_path, pair, value_type):
    src, dst = redis_factory(pair[0]), redis_factory(pair[1])
    r = src.client()
    p = r.pipeline(transaction=False)
    for i in range(0, 60_000, 1000):
        p.hset("h", mapping={f"f{j}": f"v{j}" for j in range(i, i + 1000)})
        p.rpush("l", *[f"e{j}" for j in range(i, i + 1000)])
        p.sadd("s", *[f"s{j}" for j in range(i, i + 1000)])
        p.sadd("si", *range(i, i + 1000))
        p.zadd("z", {f"z{j}": j / 7 for j in range(i, i + 1000)})
    for j in range(8000):
        p.execute_command("XADD", "x", f"{j + 1}-1", "a", j, "a", "dup", "b", "y" * 20)
    p.set("str", os.urandom(700_000))
    p.pexpire("h", 3_600_000)
    p.execute()
    r.xgroup_create("x", "g", id="4000-1")
    r.xreadgroup("g", "reader", {"x": ">"}, count=5)          # 5 pending entries
    out = run("replicate", src.url, dst.url, "--type", value_type, "--big-key-bytes", "64KiB",
              "--state-dir", str(tmp_path), check=True).stdout
    assert CLEAN in out, out
    assert "7 keys read in parts" in out, out
    assert "7 keys completed from" in out, out
    assert dst.client().pttl("h") > 3_500_000
    pending = [src.client().xpending("x", "g"), dst.client().xpending("x", "g")]
    assert pending[0] == pending[1] and pending[0]["pending"] == 5, pending


@pytest.mark.parametrize("value_type", ["dump", "struct"])
def test_value_above_the_kafka_record_limit_is_split(redis_factory, kafka_broker, value_type):
    from tests.kafka_broker import kafka_log_uri
    src, dst = redis_factory("valkey8.1"), redis_factory("redis7.0")
    src.client().set("blob", os.urandom(3_000_000))           # Kafka takes ~1 MB per record
    src.client().set("small", "x")
    log = kafka_log_uri(kafka_broker)
    out = run("replicate", src.url, dst.url, "--log", log, "--big-key-bytes", "0",
              "--type", value_type, check=True).stdout
    assert "1 key read in parts" in out, out
    if value_type == "dump":
        assert "2 converted" in out, out                      # Valkey 8.1 -> 7.0: reassembled,
    assert CLEAN in out, out                                  # refused, converted


def test_parts_without_their_first_part_are_counted_not_applied(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    src.client().rpush("l", *range(100_000))
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, "--big-key-bytes", "64KiB", check=True)
    reader = open_reader(log, "late", {})
    first = reader.poll(2, 5)                                 # snapshot marker + first part
    reader.commit(first)
    reader.close()
    out = run("apply", dst.url, "--log", log, "--group", "late", "--idle-timeout", "1",
              check=True).stdout
    orphans = int(out.split(" parts skipped because the replay started after")[0].split()[-1])
    assert orphans >= 1, out
    assert dst.client().exists("l") == 0                      # never a partial key
    assert list(dst.client().scan_iter(match="*conveyor-tmp*")) == []


def test_mem_limit_reports_and_skip_leaves_the_key_out(redis_factory, tmp_path):
    src, dst = redis_factory(), redis_factory()
    r = src.client()
    r.rpush("huge", *range(100_000))
    r.set("tiny", "1")
    log = f"file:{tmp_path / 'a'}"
    out = run("capture", src.url, "--log", log, "--mem-limit", "100KiB", check=True).stdout
    assert "1 key above --mem-limit (migrated)" in out and '  "huge": ' in out, out
    out = run("capture", src.url, "--log", f"file:{tmp_path / 'b'}", "--mem-limit", "100KiB",
              "--mem-limit-skip", check=True).stdout
    assert "1 key above --mem-limit (SKIPPED, not on the log)" in out, out
    run("apply", dst.url, "--log", f"file:{tmp_path / 'b'}", "--idle-timeout", "1", check=True)
    assert dst.client().keys() == [b"tiny"]
    p = run("replicate", src.url, redis_factory().url, "--mem-limit", "100KiB", "--mem-limit-skip",
            "--state-dir", str(tmp_path / "state"))
    assert p.returncode == 1 and "verify: 1 missing" in p.stdout, p.stdout   # honest, not hidden
    p = run("capture", src.url, "--log", log, "--mem-limit-skip")
    assert p.returncode == 2 and "--mem-limit-skip needs --mem-limit" in p.stderr


class CrashAfterWrite:
    """A log reader whose commit fails once after ``n`` commits: apply wrote a batch to the target
    and died before its position was saved, as a SIGKILL at that instant would leave it."""

    def __init__(self, reader, n: int) -> None:
        self.reader, self.n = reader, n

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def commit(self, records):
        if self.n == 0:
            raise SystemExit("crash before commit")
        self.n -= 1
        return self.reader.commit(records)


@pytest.mark.parametrize("kind", ["list", "string", "stream"])
def test_parts_written_before_a_crash_are_not_applied_twice(redis_factory, tmp_path, kind):
    src, dst = redis_factory(), redis_factory()
    r = src.client()
    if kind == "list":
        for i in range(0, 200_000, 10_000):
            r.rpush("k", *[f"e{j}" for j in range(i, i + 10_000)])
    elif kind == "string":
        r.set("k", os.urandom(20_000_000))       # 20 parts of 1 MiB
    else:
        for j in range(30_000):
            r.xadd("k", {"n": j}, id=f"{j + 1}-0")
    log = f"file:{tmp_path / 'log'}"
    run("capture", src.url, "--log", log, "--big-key-bytes", "64KiB", check=True)
    t = dst.client()

    def applier(n_commits=None):
        reader = open_reader(log, "apply", {})
        if n_commits is not None:
            reader = CrashAfterWrite(reader, n_commits)
        return Applier(target_for_db=lambda db: t, reader=reader, meta=open_meta(log, {}),
                       codec=Codec(), rewriter=KeyRewriter(), group="apply", batch=4,
                       idle_timeout=0.5)

    crashed = applier(3)
    with pytest.raises(SystemExit):
        crashed.run()                          # three batches committed, the fourth written only
    crashed.reader.close()                     # the dead process's group lock goes with it
    assert t.exists("k") == 0                  # still building in the temporary key
    stats = applier().run()
    assert stats.duplicate_chunks >= 1, stats  # the written-but-uncommitted parts were skipped
    assert stats.chunked_keys == 1
    out = run("verify", src.url, dst.url).stdout
    assert CLEAN in out, out


def test_a_batch_over_the_read_budget_is_read_in_several_passes(redis_factory, tmp_path):
    from conveyor.capture.dumps import SCRIPT_BUDGET
    src, dst = redis_factory(), redis_factory()
    r = src.client()
    n = 3 * SCRIPT_BUDGET // 600_000 + 1
    for i in range(n):
        r.set(f"blob:{i}", os.urandom(600_000))     # under the big-key threshold, many per batch
    out = run("replicate", src.url, dst.url, "--state-dir", str(tmp_path), check=True).stdout
    assert f"capture: {n} keys" in out and CLEAN in out, out
    assert "read in parts" not in out


def test_a_source_that_refuses_scripts_is_read_with_pipelines(redis_factory, tmp_path):
    src = redis_factory(extra=("--rename-command", "EVALSHA", "", "--rename-command", "SCRIPT", ""))
    dst = redis_factory()
    r = src.client()
    r.rpush("big", *range(200_000))
    r.set("small", "x")
    p = run("replicate", src.url, dst.url, "--big-key-bytes", "256KiB", "--state-dir",
            str(tmp_path), check=True)
    assert "does not run scripts" in p.stderr and "reading with pipelines" in p.stderr, p.stderr
    assert "1 key read in parts" in p.stdout and CLEAN in p.stdout, p.stdout
