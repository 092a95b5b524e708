"""``conveyor demo``: a real migration between two throwaway local Redis servers."""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from conveyor import commands
from conveyor.errors import ConfigError, ConveyorError
from conveyor.options import (ApplyOptions, CaptureOptions, DbOptions, LogSpec, ReplicateOptions,
                              VerifyOptions)
from conveyor.progress import echo
from conveyor.runner import Endpoint
from conveyor.sample import load_mixed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found is None and Path("/usr/bin/redis-server").exists():
        found = "/usr/bin/redis-server"
    if found is None:
        raise ConfigError("the demo needs a redis-server binary: apt-get install redis-server")
    return found


def _start(binary: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    workdir.mkdir(parents=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    for _ in range(200):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None:
                raise ConveyorError(f"{binary} exited at start (code {proc.returncode})")
            time.sleep(0.05)
    proc.kill()
    raise ConveyorError(f"{binary} did not answer on port {port}")


def run(keys: int, progress: bool | None) -> bool:
    binary = _server_binary()
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    procs = []
    try:
        src_proc, src = _start(binary, workdir / "source")
        procs.append(src_proc)
        dst_proc, dst = _start(binary, workdir / "target")
        procs.append(dst_proc)
        n = load_mixed(redis.Redis.from_url(src), keys)
        echo(f"demo: source {src} ({binary}) loaded with {n} keys of every type; target {dst} empty")
        opts = ReplicateOptions(CaptureOptions(), ApplyOptions(), VerifyOptions(show_diffs=True))
        ok = commands.replicate(Endpoint(src, "source"), Endpoint(dst, "target"),
                                LogSpec(f"file:{workdir / 'log'}"), opts, DbOptions(),
                                progress=progress)
        echo("demo: " + ("the target is identical to the source" if ok else "FAILED"))
        return ok
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
