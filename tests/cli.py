"""Run the real ``conveyor`` command as a separate process, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import cache

CONVEYOR = [sys.executable, "-m", "conveyor.cli"]


@cache
def _state_dir() -> str:
    """Where captures started by the tests keep their key ledgers (not the checkout's .conveyor)."""
    return tempfile.mkdtemp(prefix="conveyor-test-state-")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("CONVEYOR_DEBUG", None)
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("CONVEYOR_CAPTURE_STATE_DIR", _state_dir())
    return e


def run(*args: str, timeout: float = 180, check: bool = False, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", env())
    p = subprocess.run([*CONVEYOR, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"conveyor {' '.join(args)} exited {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def start(*args: str, **kw) -> subprocess.Popen:
    kw.setdefault("env", env())
    return subprocess.Popen([*CONVEYOR, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def assert_one_line_error(p: subprocess.CompletedProcess, code: int | None = None) -> str:
    """Bad input: non-zero exit, exactly one line on stderr, no traceback."""
    assert p.returncode != 0, p
    if code is not None:
        assert p.returncode == code, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]
