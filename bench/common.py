"""What the benchmarks share: a log URI per backend on throwaway servers, cleaned up at the end."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import start_server  # noqa: E402


class Logs:
    """``uri(backend, name)`` gives a fresh log of that backend: a file log in a temp dir, a
    stream on a buffer Redis, or a topic on a KRaft broker started on first use."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="conveyor-bench-")
        self.buffer = start_server()
        self.broker = None

    def uri(self, backend: str, name: str) -> str:
        if backend == "file":
            return f"file:{self.tmp}/{name}"
        if backend == "redis":
            return f"{self.buffer.url}/0?stream={name}"
        if backend == "kafka":
            if self.broker is None:
                from tests.kafka_broker import KafkaBroker
                self.broker = KafkaBroker().start()
            return f"kafka://{self.broker.bootstrap}/{name}-{int(time.time())}"
        raise SystemExit(f"unknown backend {backend!r} (file, redis or kafka)")

    def __enter__(self) -> "Logs":
        return self

    def __exit__(self, *exc) -> None:
        self.buffer.cleanup()
        if self.broker:
            self.broker.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
