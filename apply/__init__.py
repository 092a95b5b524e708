"""The apply process: log -> target Redis."""
from __future__ import annotations

from conveyor.apply.applier import Applier
from conveyor.apply.stats import ApplyStats

__all__ = ["Applier", "ApplyStats"]
