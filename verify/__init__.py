"""The verify process: compare source and target, report what differs."""
from __future__ import annotations

from conveyor.verify.compare import Diff, Verifier, VerifyReport

__all__ = ["Verifier", "VerifyReport", "Diff"]
