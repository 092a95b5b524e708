"""The capture process: source Redis -> events -> log."""
from __future__ import annotations

from capture.snapshot import CaptureStats, SnapshotCapture

__all__ = ["SnapshotCapture", "CaptureStats"]
