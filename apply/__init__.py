"""The apply process: log -> target Redis."""
from __future__ import annotations

from apply.applier import Applier, ApplyStats

__all__ = ["Applier", "ApplyStats"]
