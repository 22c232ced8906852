"""The garbage-collection setting: None keeps Python's thresholds; a value sets generation 0 and
freezes what startup allocated."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from enclave_common.service import configure_gc
from enclave_common.settings import BaseServiceSettings


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_no_threshold_leaves_python_alone(restored_gc: None) -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    configure_gc(None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == frozen


def test_a_threshold_sets_generation_0_and_freezes_startup(restored_gc: None) -> None:
    older = gc.get_threshold()[1:]
    configure_gc(50_000)
    assert gc.get_threshold() == (50_000, *older)
    assert gc.get_freeze_count() > 0


def test_services_keep_python_defaults_unless_they_set_one() -> None:
    assert BaseServiceSettings().gc_threshold0 is None
