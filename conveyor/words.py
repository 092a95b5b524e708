"""Counts in words: ``counted(1, "key")`` is "1 key", ``counted(2, "key")`` "2 keys"."""
from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def text(v) -> str:
    """A reply or name as text: bytes decoded (undecodable bytes replaced), anything else str()."""
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v)
