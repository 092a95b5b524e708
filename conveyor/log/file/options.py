"""The file log's options ``segment_bytes``, ``cleanup`` and ``retention``: defaults and parsing."""
from __future__ import annotations

from conveyor.errors import ConfigError
from conveyor.log.options import duration_s

SEGMENT_BYTES = 256 * 1024 * 1024
DEFAULT_RETENTION = {"delete": "7d", "compact": "1h"}
CLEANUP = ("compact", "delete")


def duration(text: str) -> float:
    return duration_s(text, "retention")


def size_option(opts: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(opts.get(name, default))
    except ValueError:
        raise ConfigError(f"log option {name}={opts[name]!r} is not a whole number of bytes") from None
    if value <= 0:
        raise ConfigError(f"log option {name} must be positive")
    return value
