"""Fixtures for the microbenchmarks (run with ``python -m pytest bench/ --benchmark-only``).

The normal test run does not collect this folder (pyproject's testpaths is ``tests``)."""

from __future__ import annotations

import pytest

from ctms_media.benchmark import BATCH, Scene


@pytest.fixture
def scene_factory():
    """Scene(size, fan_out, factory): one sender, fan_out receivers at one position, a
    batch of BATCH packets restamped with fresh indices before every round."""
    return Scene


@pytest.fixture
def batch_size() -> int:
    return BATCH
