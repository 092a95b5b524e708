"""The verify process: compare source and target, report what differs."""
from __future__ import annotations

from conveyor.verify.compare import Verifier
from conveyor.verify.report import Diff, VerifyReport

__all__ = ["Verifier", "VerifyReport", "Diff"]
