"""The capture process: source Redis -> events -> log."""
from __future__ import annotations

from conveyor.capture.process import MODES, Capture
from conveyor.capture.stats import CaptureStats, checkpoint_name

__all__ = ["Capture", "CaptureStats", "MODES", "checkpoint_name"]
