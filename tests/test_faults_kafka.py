"""Faults of the Kafka log on real brokers: a broker killed (kill -9) and started again on the same
ports and data dir, several apply processes in one group (one SIGKILLed), a member waiting for a
down target, a topic deleted and recreated, retention, and librdkafka's own log lines."""
from __future__ import annotations

import signal
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from conveyor.errors import LogError, LogLost, LogUnavailable
from conveyor.log import open_reader, open_writer
from conveyor.log.kafka.errors import failure
from tests import cli
from tests.compare import differences
from tests.kafka_broker import KafkaBroker, kafka_log_uri
from tests.servers import free_port

DOWN_S = 3          # how long a killed broker stays down before it is started again


@pytest.fixture
def own_broker():
    """A broker of this test alone: the test kills it."""
    broker = KafkaBroker().start()
    yield broker
    broker.stop()


def restart_broker(broker: KafkaBroker) -> None:
    broker.kill()
    time.sleep(DOWN_S)
    broker.start_again()


def write(uri: str, items, opts=None) -> None:
    w = open_writer(uri, opts)
    for k, v in items:
        w.append(k, v)
    w.flush()
    w.close()


def drain(reader, want: int, timeout: float = 60.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out += reader.poll(1000, 0.5)
    return out


def until(cond, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


ITEMS = [(b"0:k%05d" % i, b"v%d" % i) for i in range(3000)]


# -- a broker restart, at the log level ------------------------------------------------------------
def test_broker_restart_is_log_unavailable_and_nothing_is_lost_or_reordered(own_broker):
    uri = kafka_log_uri(own_broker)
    opts = {"partitions": "2"}
    w = open_writer(uri, opts)
    for k, v in ITEMS[:1000]:
        w.append(k, v)
    w.flush()
    r = open_reader(uri, "g", opts)
    first = drain(r, 1000)
    assert len(first) == 1000

    own_broker.kill()
    for k, v in ITEMS[1000:]:
        w.append(k, v)                         # queued: the broker is down
    with pytest.raises(LogUnavailable):
        w.flush(2)
    with pytest.raises(LogUnavailable):
        r.commit(first)                        # the target has it; the commit waits
    with pytest.raises(LogUnavailable):
        r.status()
    assert r.poll(1000, 1.0) == []             # transport errors during poll are not fatal
    own_broker.start_again()

    until(lambda: _flushed(w), 120, "the producer's records to be acknowledged")
    until(lambda: _committed(r, first), 120, "the commit to go through")
    w.close()
    # At least once: records not committed before the restart may come again (the member
    # rejoined); the log itself holds each record once, in production order per partition.
    seen = {(x.partition, x.offset): x for x in first}
    deadline = time.monotonic() + 60
    while len({x.key for x in seen.values()}) < len(ITEMS) and time.monotonic() < deadline:
        got = r.poll(1000, 0.5)
        r.commit(got)
        seen.update({(x.partition, x.offset): x for x in got})
    assert sorted(x.key for x in seen.values()) == sorted(k for k, _ in ITEMS)   # none lost
    for p in {p for p, _ in seen}:                                            # none reordered
        values = [int(seen[k].value[1:]) for k in sorted(k for k in seen if k[0] == p)]
        assert values == sorted(values)
    assert r.status().lag == 0
    r.close()


def _flushed(w) -> bool:
    try:
        w.flush(2)
        return True
    except LogUnavailable:
        return False


def _committed(r, records) -> bool:
    try:
        r.commit(records)
        return True
    except LogUnavailable:
        r.keepalive()
        return False


def test_opening_a_log_while_the_broker_is_down_is_log_unavailable():
    with pytest.raises(LogUnavailable):
        open_writer(f"kafka://127.0.0.1:{free_port()}/t")


# -- librdkafka's own lines ------------------------------------------------------------------------
def test_librdkafka_lines_show_only_with_verbose():
    dead = f"kafka://127.0.0.1:{free_port()}/t"     # librdkafka logs its connection errors
    quiet = cli.run("status", "--log", dead)
    assert "Kafka unreachable" in cli.assert_one_line_error(quiet, 1)
    loud = cli.run("-v", "status", "--log", dead)
    assert loud.returncode == 1 and "Connect to ipv4#127.0.0.1" in loud.stderr, loud.stderr


# -- several members, keepalive ----------------------------------------------------------------------
def test_a_second_member_joins_without_fencing_and_owned_drops_moved_partitions(kafka_broker):
    uri = kafka_log_uri(kafka_broker)
    opts = {"partitions": "4"}
    write(uri, ITEMS, opts)
    r1 = open_reader(uri, "g", opts)
    held: list = []                            # a batch from every partition, not written yet
    until(lambda: held.extend(r1.poll(200, 0.5)) or len({x.partition for x in held}) == 4, 30,
          "r1 to read from all 4 partitions")
    assert r1.consumer and r1.owned(held) == held
    # r1 waits for a down target with its batch; r2 joins the group meanwhile
    r2 = open_reader(uri, "g", opts)
    assert r2.consumer != r1.consumer
    got2: list = []

    def r2_has_partitions():
        r1.keepalive()
        got2.extend(r2.poll(1000, 0.2))
        return got2

    until(r2_has_partitions, 60, "the second member to get partitions")
    kept = r1.owned(held)
    moved = [x for x in held if x not in kept]
    assert moved and kept                      # two partitions each
    r1.commit(held)                            # commits only the partitions r1 still holds
    r2.commit(got2)
    got1, everything = list(kept), {k for k, _ in ITEMS}
    deadline = time.monotonic() + 60
    while {x.key for x in got1 + got2} != everything and time.monotonic() < deadline:
        a, b = r1.poll(1000, 0.2), r2.poll(1000, 0.2)
        r1.commit(a)
        r2.commit(b)
        got1 += a
        got2 += b
    assert {x.key for x in got1 + got2} == everything
    # after the rebalance no partition is read by both members
    after = len(kept)
    assert not {x.partition for x in got1[after:]} & {x.partition for x in got2}
    # what r1 dropped unwritten, r2 read again from the committed position
    assert {x.key for x in moved} <= {x.key for x in got2}
    assert r1.status().lag == 0
    r1.close()
    r2.close()


def test_static_membership_only_with_a_named_consumer(kafka_broker):
    uri = kafka_log_uri(kafka_broker)
    write(uri, ITEMS[:10])
    plain, named = open_reader(uri, "plain"), open_reader(uri, "named", {"consumer": "blue"})
    until(lambda: plain.poll(10, 0.5), 30, "a first batch")
    until(lambda: named.poll(10, 0.5), 30, "a first batch")
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    groups = {g: f.result(30) for g, f in admin.describe_consumer_groups(["plain", "named"]).items()}
    assert [m.group_instance_id for m in groups["plain"].members] == [None]
    assert [m.group_instance_id for m in groups["named"].members][0].endswith("-blue")
    assert named.consumer == "blue" and plain.consumer != "blue"
    plain.close()
    named.close()


def test_keepalive_keeps_the_member_past_max_poll_interval(kafka_broker):
    uri = kafka_log_uri(kafka_broker)
    short = {"max.poll.interval.ms": "6000", "session.timeout.ms": "6000",
             "partitions": "1"}                    # one partition: records in append order
    write(uri, ITEMS[:300], short)
    alive, idle = open_reader(uri, "alive", short), open_reader(uri, "idle", short)
    held = until(lambda: alive.poll(100, 0.5), 30, "a first batch")
    idle_held = until(lambda: idle.poll(100, 0.5), 30, "a first batch")
    deadline = time.monotonic() + 12               # twice max.poll.interval.ms, target "down"
    while time.monotonic() < deadline:
        alive.keepalive()
        time.sleep(0.5)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    groups = {g: f.result(30) for g, f in admin.describe_consumer_groups(["alive", "idle"]).items()}
    assert len(groups["alive"].members) == 1         # kept its place
    assert groups["idle"].members == []              # without keepalive it was dropped
    alive.commit(held)
    rest = drain(alive, 300 - len(held))
    assert [x.key for x in held + rest] == [k for k, _ in ITEMS[:300]]   # nothing lost/skipped
    alive.commit(rest)
    assert alive.status().lag == 0
    # The broker may remove the dropped member's group once it is empty (it never committed):
    # done here for sure. The member's commit then joins a new group instead of failing, and the
    # records come again (at least once), none is lost.
    admin.delete_consumer_groups(["idle"], request_timeout=30)["idle"].result(30)
    idle.commit(idle_held)
    again = drain(idle, 300)
    assert {x.key for x in again} == {k for k, _ in ITEMS[:300]}
    alive.close()
    idle.close()


@pytest.mark.parametrize("code", ["UNKNOWN_LEADER_EPOCH", "FENCED_LEADER_EPOCH",
                                  "OFFSET_NOT_AVAILABLE", "NOT_LEADER_FOR_PARTITION"])
def test_leadership_moving_is_waited_for_not_an_error(code):
    """A topic just created, or a leader just moved: the broker answers an offsets request with a
    leader-epoch error for a moment (seen in CI: a writer opening a new topic failed with
    "Leader epoch is newer than broker epoch"). librdkafka does not flag these retriable."""
    e = KafkaException(KafkaError(getattr(KafkaError, code)))
    assert type(failure(e, "cannot read the offsets")) is LogUnavailable
    refused = KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    assert type(failure(refused, "cannot read the offsets")) is LogError


def test_a_deleted_and_recreated_topic_is_log_lost(kafka_broker):
    uri = kafka_log_uri(kafka_broker)
    topic = uri.rsplit("/", 1)[1]
    w = open_writer(uri)
    w.append(b"0:a", b"1")
    w.flush()
    r = open_reader(uri, "g")
    r.commit(drain(r, 1))
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    admin.delete_topics([topic])[topic].result(30)
    with pytest.raises(LogLost, match="the log lost records: Kafka topic .* was deleted"):
        until(lambda: _gone(w), 30, "the deletion to be seen")
    with pytest.raises(LogLost, match="was deleted"):   # a reader finds out by itself
        until(lambda: r.poll(10, 0.5) and False, 60, "the reader to see the deletion")
    w.adopt_new_log()                               # recreates it: a new id
    w.append(b"0:b", b"2")
    w.flush()
    with pytest.raises(LogLost, match="deleted and recreated"):
        r.check_identity()
    r.adopt_new_log()
    again = drain(r, 1)
    assert [x.key for x in again] == [b"0:b"]       # the new log, from its beginning
    r.check_identity()
    w.close()
    r.close()


def _gone(w) -> bool:
    w.check_identity()
    return False


def test_replayable_unless_retention_removed_records(kafka_broker):
    compacted = kafka_log_uri(kafka_broker)
    write(compacted, ITEMS[:10])
    r = open_reader(compacted, "g")
    assert r.replayable() == (True, "")
    r.close()
    deleting = kafka_log_uri(kafka_broker)
    opts = {"topic.cleanup.policy": "delete", "partitions": "1"}
    write(deleting, ITEMS[:10], opts)
    r = open_reader(deleting, "g", opts)
    assert r.replayable() == (True, "")             # nothing removed yet
    topic = deleting.rsplit("/", 1)[1]
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    for f in admin.delete_records([TopicPartition(topic, 0, 4)]).values():
        f.result(30)
    ok, why = r.replayable()
    assert not ok and "first 4 records" in why and "cleanup.policy=delete" in why
    r.close()


# -- the real CLI --------------------------------------------------------------------------------------
RDKAFKA_MARKS = ("rdkafka", "|FAIL|", "Connect to ipv4", "GroupCoordinator", "kafka client:")


def load_strings_and_hashes(r, n: int) -> None:
    p = r.pipeline(transaction=False)
    for i in range(n):
        if i % 10:
            p.set(f"s:{i}", f"value-{i}" * (1 + i % 4))
        else:
            p.hset(f"h:{i}", mapping={"a": i, "b": f"x{i}"})
        if i % 5000 == 4999:
            p.execute()
    p.execute()


def group_committed(bootstrap: str, topic: str, group: str = "apply") -> int:
    """Records the group has committed, over all partitions (0 while the broker is away)."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        res = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                request_timeout=5)[group].result(10)
    except Exception:  # noqa: BLE001 - not there yet
        return 0
    return sum(tp.offset for tp in res.topic_partitions if tp.topic == topic and tp.offset > 0)


def topic_end(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe", "log_level": 0})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)[1]
    except Exception:  # noqa: BLE001 - not there yet
        return 0
    finally:
        c.close()


def finished(proc, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_no_librdkafka_lines(stderr: str) -> None:
    leaked = [ln for ln in stderr.splitlines() if any(m in ln for m in RDKAFKA_MARKS)]
    assert not leaked, leaked[:5]


def test_broker_kill_9_during_capture_and_during_apply(own_broker, redis_factory):
    source, target = redis_factory(), redis_factory()
    load_strings_and_hashes(source.client(), 60_000)
    log = kafka_log_uri(own_broker)
    topic = log.rsplit("/", 1)[1]

    capture = cli.start("capture", source.url, "--log", log)
    until(lambda: topic_end(own_broker.bootstrap, topic) > 0, 120, "capture to write")
    assert capture.poll() is None, "capture ended before the broker was killed"
    restart_broker(own_broker)
    code, out, err = finished(capture)
    assert code == 0, (out, err)
    assert "snapshot complete" in out, out
    assert_no_librdkafka_lines(err)

    apply = cli.start("apply", target.url, "--log", log, "--idle-timeout", "5", "--batch", "500")
    until(lambda: group_committed(own_broker.bootstrap, topic) > 0, 120, "apply to commit")
    assert apply.poll() is None, "apply ended before the broker was killed"
    restart_broker(own_broker)
    code, out, err = finished(apply)
    assert code == 0, (out, err)
    assert_no_librdkafka_lines(err)
    assert differences(source.client(), target.client()) == []


def members_with_partitions(bootstrap: str, group: str = "apply") -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        g = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
    except Exception:  # noqa: BLE001 - not there yet
        return 0
    return sum(1 for m in g.members if m.assignment and m.assignment.topic_partitions)


@pytest.mark.parametrize("members", [2, 3])
def test_apply_processes_share_a_group_and_survive_one_sigkill(kafka_broker, redis_factory,
                                                               members):
    source, target = redis_factory(), redis_factory()
    load_strings_and_hashes(source.client(), 30_000)
    log = kafka_log_uri(kafka_broker)
    # The members join first, so that each holds partitions the capture then fills.
    procs = [cli.start("apply", target.url, "--log", log, "--log-opt", "partitions=4",
                       "--idle-timeout", "15", "--batch", "100") for _ in range(members)]
    until(lambda: members_with_partitions(kafka_broker.bootstrap) == members, 90,
          f"{members} members each holding partitions")
    # The target takes no write until the kill: every member is then in the middle of a batch
    # it has not committed (a snapshot's blocks would otherwise be applied within a second).
    target.client().client_pause(60_000, all=False)
    capture = cli.start("capture", source.url, "--log", log, "--log-opt", "partitions=4")
    code, out, err = finished(capture)
    assert code == 0, (out, err)
    time.sleep(1)                                      # the members polled their first records
    assert target.client().dbsize() == 0
    assert all(p.poll() is None for p in procs), "an apply ended before the kill"
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    target.client().client_unpause()
    for p in procs[1:]:
        code, out, err = finished(p)
        assert code == 0, (out, err)                   # nobody was fenced
        applied = [ln for ln in out.splitlines() if ln.startswith("apply: applied ")]
        assert applied and int(applied[-1].split()[2]) > 0, out
        assert_no_librdkafka_lines(err)
    assert differences(source.client(), target.client()) == []


def test_records_deleted_under_a_running_capture_are_noticed_and_healed(kafka_broker, redis_factory):
    from tests.test_live import notifying_source, wait_for_subscriber
    # given a live capture whose scan of 500 keys is on a topic (a deleting one: Kafka refuses
    # to delete records from a compacted topic)
    source, target = notifying_source(redis_factory), redis_factory()
    src, dst = source.client(), target.client()
    src.mset({f"k:{i}": i for i in range(500)})
    log = kafka_log_uri(kafka_broker) + "?partitions=1&topic.cleanup.policy=delete"
    topic = log.split("?")[0].rsplit("/", 1)[1]
    capture = cli.start("capture", source.url, "--log", log, "--mode", "live")
    apply = None
    try:
        wait_for_subscriber(source)
        until(lambda: '"phase": "live"' in cli.run("status", "--log", log, "--json").stdout, 60,
              "the capture to be live")
        end = topic_end(kafka_broker.bootstrap, topic)
        # when every record so far is deleted from the topic (no outage, no new topic id)
        admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
        for f in admin.delete_records([TopicPartition(topic, 0, end)]).values():
            f.result(30)
        src.set("after", "1")
        # then capture notices and writes the whole source again: an apply started now, from
        # what the topic still holds, makes the target equal to the source
        apply = cli.start("apply", target.url, "--log", log)
        until(lambda: not differences(src, dst), 90, "the target to equal the source")
    finally:
        for proc in (capture, apply):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
    code, out, err = finished(capture, 60)
    assert code == 0 and "records were deleted that its cleanup could not" in out + err, (out, err)
    code, out, err = finished(apply, 60)
    assert code == 0, (out, err)
