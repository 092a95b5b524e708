"""conveyor: snapshot and live Redis migration through a durable log."""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# The process packages live at the repository's top level (capture/, apply/, verify/) and are
# installed as conveyor.capture, conveyor.apply and conveyor.verify (pyproject's package-dir).
# Run from a source checkout (tests, bench, PYTHONPATH=.), this package is found as the folder
# conveyor/, so the checkout's root is added to where its subpackages are looked up.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and \
        _os.path.isfile(_os.path.join(_root, "capture", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
