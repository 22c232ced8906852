"""Fixtures for the deid domain tests. Helper modules carry a ``deid_`` prefix: with importlib import mode
this directory is put on sys.path, and the prefix keeps their names apart from other services' helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deid_keys import HmacKeys  # noqa: E402


@pytest.fixture
def keys() -> HmacKeys:
    return HmacKeys()
