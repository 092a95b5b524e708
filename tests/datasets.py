"""Test datasets: the mixed sample lives in the package (the demo and the benchmarks use it too)."""
from __future__ import annotations

from conveyor.sample import load_mixed

__all__ = ["load_mixed"]
