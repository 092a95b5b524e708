from __future__ import annotations

import pytest

from tests.servers import start_server


@pytest.fixture
def redis_server():
    """A fresh Redis 7.0 (Debian's redis-server)."""
    s = start_server("redis7.0")
    yield s
    s.cleanup()


@pytest.fixture
def redis_factory():
    """Start any number of servers: ``redis_factory("valkey8.1", password="x")``."""
    started = []

    def make(kind: str = "redis7.0", **kw):
        s = start_server(kind, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.cleanup()


@pytest.fixture
def cluster_factory():
    """Start any number of real clusters: ``cluster_factory(3, replicas=1, kind="valkey8.1")``;
    every server is stopped at the end, also when the test fails."""
    from tests.cluster import start_cluster

    started = []

    def make(primaries: int = 3, replicas: int = 0, **kw):
        c = start_cluster(primaries, replicas, **kw)
        started.append(c)
        return c

    yield make
    for c in started:
        c.cleanup()


# -- logs: one fixture, one entry per backend; every log test runs against each ----------------------
def _file_log(request, tmp_path):
    return f"file:{tmp_path / 'log'}"


def _redis_log(request, tmp_path):
    buffer = start_server("redis7.0")
    request.addfinalizer(buffer.cleanup)
    # A log of one stream, as if created with partitions=1 (the count a log keeps): these tests
    # read records back in append order across keys (the default of 6: tests/test_scale_out.py).
    buffer.client().set("conveyor:partitions", 1)
    return f"{buffer.url}/0"


def _kafka_log(request, tmp_path):
    from tests.kafka_broker import kafka_log_uri
    # One partition: these tests read records back in append order across keys, which only one
    # partition keeps (the default of 6 and several members: tests/test_scale_out.py).
    return kafka_log_uri(request.getfixturevalue("kafka_broker")) + "?partitions=1"


LOG_BACKENDS = {"file": _file_log, "redis": _redis_log, "kafka": _kafka_log}


@pytest.fixture(params=sorted(LOG_BACKENDS))
def log_uri(request, tmp_path):
    """A fresh, empty log on each backend: file dir, a buffer Redis, a new Kafka topic."""
    return LOG_BACKENDS[request.param](request, tmp_path)


@pytest.fixture(scope="session")
def kafka_broker():
    """One real Kafka broker (KRaft) for the whole session; each test uses its own topics."""
    from tests.kafka_broker import KafkaBroker

    broker = KafkaBroker().start()
    yield broker
    broker.stop()
