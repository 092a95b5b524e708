"""The file log's options ``segment_bytes``, ``cleanup`` and ``retention``: defaults and parsing."""
from __future__ import annotations

import re

from conveyor.errors import ConfigError

SEGMENT_BYTES = 256 * 1024 * 1024
DEFAULT_RETENTION = {"delete": "7d", "compact": "1h"}
CLEANUP = ("compact", "delete")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    m = DURATION_RE.match(text)
    if not m:
        raise ConfigError(f"log option retention={text!r}: expected a number with s, m, h or d (e.g. 7d)")
    return float(m.group(1)) * UNITS[m.group(2)]


def size_option(opts: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(opts.get(name, default))
    except ValueError:
        raise ConfigError(f"log option {name}={opts[name]!r} is not a whole number of bytes") from None
    if value <= 0:
        raise ConfigError(f"log option {name} must be positive")
    return value
