"""The apply process: log -> target Redis."""
from __future__ import annotations

from conveyor.apply.applier import Applier, ApplyStats

__all__ = ["Applier", "ApplyStats"]
