"""Log options every backend reads the same way: durations (``retention``, ``compact_after``)."""
from __future__ import annotations

import re

from conveyor.errors import ConfigError

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str, name: str) -> float:
    """Seconds of a log option such as ``retention=7d`` or ``1.5h`` (a bare number: seconds)."""
    m = DURATION_RE.match(text)
    if not m:
        raise ConfigError(f"log option {name}={text!r}: expected a number with s, m, h or d "
                          "(e.g. 7d)")
    return float(m.group(1)) * UNITS_S[m.group(2)]
