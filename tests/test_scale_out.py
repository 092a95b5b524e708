"""Scale-out on real servers: several capture processes (one per third of the hash slots) and
several apply processes of one group on one log, one of each SIGKILLed mid-run and restarted; the
topic defaults (partitions, replication factor); `status` listing every process; apply's idle
timeout waiting for every capture's snapshot; the file log's single writer."""
from __future__ import annotations

import json
import signal
import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from conveyor.log import open_meta, open_writer
from conveyor.log.kafka import DEFAULT_PARTITIONS, creation
from tests import cli
from tests.compare import differences, wait_until
from tests.kafka_broker import kafka_log_uri
from tests.test_faults_kafka import finished, load_strings_and_hashes as load

THIRDS = ("0-5460", "5461-10922", "10923-16383")
KEYS = 60_000
GONE_AFTER = 15         # status --gone-after: the killed processes are shown gone after this
                        # (long enough that a live member, slowed by a group rebalance on a
                        # loaded machine, has refreshed its document meanwhile)


def capture(source, log: str, slots: str, *opts: str):
    # A small SCAN page makes each capture take long enough to be killed in the middle.
    return cli.start("capture", source.url, "--log", log, "--key-slots", slots,
                     "--scan-count", "5", *opts)


def apply(target, log: str, *opts: str):
    return cli.start("apply", target.url, "--log", log, "--idle-timeout", "4", "--batch", "200",
                     *opts)


def checkpoints(log: str, opts: dict) -> dict[str, dict]:
    meta = open_meta(log, opts)
    try:
        return {n: d for n, d in meta.documents().items() if n.startswith("capture-")}
    finally:
        meta.close()


def of_slots(docs: dict[str, dict], slots: str) -> dict:
    return next((d for d in docs.values() if d.get("slots") == slots), {})


def status(log: str, *opts: str) -> dict:
    return json.loads(cli.run("status", "--log", log, "--json", *opts, check=True).stdout)


def kill(proc) -> None:
    assert proc.poll() is None, "the process ended before it could be killed mid-run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def scale_out(source, target, log: str, log_opts: tuple[str, ...]) -> dict:
    """Three captures and two applies, one of each SIGKILLed and restarted; returns the final
    status (JSON). Asserts the target identical and the status taken while they were down."""
    opts = dict(o.split("=", 1) for o in log_opts[1::2])
    load(source.client(), KEYS)
    procs = [apply(target, log, *log_opts) for _ in range(2)]
    caps = {slots: capture(source, log, slots, *log_opts) for slots in THIRDS}
    procs += caps.values()
    try:
        # when the first capture is in the middle of its scan, it and one apply are killed
        wait_until(lambda: of_slots(checkpoints(log, opts), THIRDS[0]).get("keys", 0) > 0, 120,
                   "the first capture to save a checkpoint in the middle of its scan")
        kill(caps[THIRDS[0]])
        kill(procs[0])
        assert of_slots(checkpoints(log, opts), THIRDS[0])["state"] == "scanning"
        # (the live ones refresh their documents every second or so, on a loaded machine too)
        time.sleep(GONE_AFTER + 1.5)
        down = status(log, "--gone-after", str(GONE_AFTER), *log_opts)
        # then status lists all three captures, the killed one as gone
        assert sorted(c["slots"] for c in down["captures"].values()) == sorted(THIRDS)
        gone = [c for c in down["captures"].values() if c["gone"]]
        assert [c["slots"] for c in gone] == [THIRDS[0]], down["captures"]
        # and both apply members, the killed one as gone, each with its state and lag
        assert len(down["members"]) == 2, down["members"]
        assert sorted(m["gone"] for m in down["members"]) == [False, True], down["members"]
        assert all(m["state"] and m["lag"] is not None and m["pid"] for m in down["members"])
        # when both are started again, the capture resumes its checkpoint
        caps[THIRDS[0]] = capture(source, log, THIRDS[0], *log_opts)
        procs[0] = apply(target, log, *log_opts)
        procs += [caps[THIRDS[0]]]
        outs = {}
        for p in [*caps.values(), procs[0], procs[1]]:
            code, out, err = finished(p)
            assert code == 0, (out, err)
            outs[p] = out
        assert "[resumed]" in outs[caps[THIRDS[0]]], outs[caps[THIRDS[0]]]
    finally:
        stop_all(procs)
    # then the target is identical to the source
    assert differences(source.client(), target.client()) == []
    return status(log, "--gone-after", "2", *log_opts)


def check_final(st: dict) -> None:
    """Three captures done, three member documents of which the killed one is gone, lag 0."""
    assert sorted(c["slots"] for c in st["captures"].values()) == sorted(THIRDS)
    assert all(c["state"] == "done" and not c["gone"] for c in st["captures"].values())
    assert sum(c["keys"] for c in st["captures"].values()) >= KEYS
    states = sorted((m["gone"], m["state"]) for m in st["members"])
    assert [s for g, s in states if not g] == ["stopped", "stopped"], st["members"]
    assert len([g for g, _ in states if g]) == 1, st["members"]
    assert st["lag"] == 0 and all(m["lag"] == 0 for m in st["members"] if not m["gone"])


def test_three_captures_and_two_applies_over_kafka_one_of_each_killed(kafka_broker,
                                                                       redis_factory):
    source, target = redis_factory(), redis_factory()
    log = kafka_log_uri(kafka_broker)
    st = scale_out(source, target, log, ())
    check_final(st)
    # and the topic was created with the default partitions and a replication factor of
    # min(3, brokers) = 1, read back from the broker
    topic = log.rsplit("/", 1)[1]
    md = AdminClient({"bootstrap.servers": kafka_broker.bootstrap}).list_topics(topic, timeout=10)
    parts = md.topics[topic].partitions
    assert len(parts) == DEFAULT_PARTITIONS == st["partition_count"] == 6
    assert {len(p.replicas) for p in parts.values()} == {1}
    # and the text status names every process
    text = cli.run("status", "--log", log, "--gone-after", "2", check=True).stdout
    assert text.count("capture capture-") == 3 and text.count("apply member ") == 3, text
    assert "(6 partitions)" in text and text.count("GONE (last seen") == 1, text


def test_three_captures_and_two_applies_over_redis_streams_one_of_each_killed(redis_factory):
    source, target, buffer = redis_factory(), redis_factory(), redis_factory()
    st = scale_out(source, target, f"{buffer.url}/0", ("--log-opt", "lease_ms=3000"))
    check_final(st)
    assert st["partition_count"] == 6


def test_apply_idle_timeout_waits_for_every_snapshot_capture(redis_factory):
    # given two captures of one log, one of them frozen (SIGSTOP) in the middle of its scan
    source, target, buffer = redis_factory(), redis_factory(), redis_factory()
    load(source.client(), 30_000)
    log = f"{buffer.url}/0"
    fast = cli.run("capture", source.url, "--log", log, "--key-slots", THIRDS[0], check=True)
    assert "snapshot complete" in fast.stdout
    slow = capture(source, log, "5461-16383")
    try:
        wait_until(lambda: of_slots(checkpoints(log, {}), "5461-16383").get("keys", 0) > 0, 60,
                   "the second capture in the middle of its scan")
        slow.send_signal(signal.SIGSTOP)
        # when apply runs with a short idle timeout
        app = apply(target, log, "--idle-timeout", "1")
        # then once idle it does not end: it waits for the frozen capture, and says so in status
        wait_until(lambda: any(m["state"].startswith("waiting for 1 capture(s) to finish")
                               for m in status(log)["members"]), 90, "apply to wait for it")
        time.sleep(3)
        assert app.poll() is None, app.communicate()
        # and once that capture finishes, apply ends with everything applied
        slow.send_signal(signal.SIGCONT)
        code, out, err = finished(slow)
        assert code == 0, (out, err)
        code, out, err = finished(app)
        assert code == 0, (out, err)
    finally:
        if slow.poll() is None:
            slow.send_signal(signal.SIGCONT)
        stop_all([slow])
    assert differences(source.client(), target.client()) == []


def test_file_log_refuses_a_second_capture_in_one_line(redis_server, tmp_path):
    # given a capture writing a file log
    log = f"file:{tmp_path / 'log'}"
    first = cli.start("capture", redis_server.url, "--log", log, "--key-slots", THIRDS[0],
                      "--mode", "live", "--enable-notifications")
    try:
        wait_until(lambda: (tmp_path / "log" / "meta").is_dir(), 30, "the first capture")
        # when a second capture of other slots starts on the same log
        p = cli.run("capture", redis_server.url, "--log", log, "--key-slots", THIRDS[1])
        # then it is refused in one line that says what to use instead
        line = cli.assert_one_line_error(p, 1)
        assert "takes one capture at a time" in line and "Kafka or Redis Streams" in line, line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_an_existing_topic_is_used_as_it_is_and_explicit_options_win(kafka_broker, redis_server):
    # given a topic created beforehand with one partition
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    old = kafka_log_uri(kafka_broker)
    topic = old.rsplit("/", 1)[1]
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    redis_server.client().set("k", "v")
    # when capture writes to it, it keeps its one partition, says what that means, and status
    # shows the count
    p = cli.run("capture", redis_server.url, "--log", old, check=True)
    assert "existed with 1 partition(s)" in p.stdout + p.stderr, p
    assert "(1 partition)" in cli.run("status", "--log", old, check=True).stdout
    # and an explicit partitions= creates a new topic with that many
    new = kafka_log_uri(kafka_broker)
    w = open_writer(new, {"partitions": "3", "replication.factor": "1"})
    w.close()
    topic = new.rsplit("/", 1)[1]
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 3


@pytest.mark.parametrize("brokers, replication", [(1, 1), (2, 2), (3, 3), (7, 3)])
def test_default_replication_is_min_of_3_and_the_brokers(brokers, replication):
    assert creation({}, brokers) == (DEFAULT_PARTITIONS, replication)
    assert creation({"partitions": 2, "replication.factor": 1}, brokers) == (2, 1)


def test_one_capture_per_primary_and_two_applies_over_kafka_one_of_each_killed(
        kafka_broker, cluster_factory):
    """The issue's scale-out case on real clusters: a capture per source primary (--node) and two
    applies of one group over Kafka, one capture and one apply SIGKILLed mid-run and restarted."""
    src, dst = cluster_factory(3), cluster_factory(3)
    log = kafka_log_uri(kafka_broker)
    load(src.client(), KEYS)
    nodes = [f"127.0.0.1:{p.port}" for p in src.primaries()]

    def capture_node(node: str):
        return cli.start("capture", src.url, "--log", log, "--node", node, "--scan-count", "5")

    procs = [apply(dst, log) for _ in range(2)]
    caps = {n: capture_node(n) for n in nodes}
    procs += caps.values()
    try:
        first = lambda: next((d for d in checkpoints(log, {}).values()  # noqa: E731
                              if d.get("node") == nodes[0]), {})
        wait_until(lambda: first().get("keys", 0) > 0, 120,
                   "the first primary's capture to save a checkpoint mid-scan")
        kill(caps[nodes[0]])
        kill(procs[0])
        assert first()["state"] == "scanning"
        caps[nodes[0]] = capture_node(nodes[0])
        procs[0] = apply(dst, log)
        procs.append(caps[nodes[0]])
        outs = {}
        for p in [*caps.values(), procs[0], procs[1]]:
            code, out, err = finished(p)
            assert code == 0, (out, err)
            outs[p] = out
        assert "[resumed]" in outs[caps[nodes[0]]], outs[caps[nodes[0]]]
    finally:
        stop_all(procs)
    assert differences(src.client(), dst.client()) == []
    st = status(log, "--gone-after", "2")
    assert sorted(c.get("node") for c in st["captures"].values()) == sorted(nodes)
