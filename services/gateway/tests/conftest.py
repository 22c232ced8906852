"""The gateway tests' helpers import by name: with importlib import mode this directory (``corpus``,
the input builders) and ``../fuzz`` (``fuzz_edge``, whose invariants the regression replay reuses)
are put on sys.path, as the integration tests do for ``corpus``."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for directory in (HERE, HERE.parent / "fuzz"):
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
