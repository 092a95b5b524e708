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
