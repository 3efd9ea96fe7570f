"""Shared fixtures: every forwarder test runs against every twin (aiohttp-style), so a test
cannot tell which implementation it drives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctms_media.conformance import implementations

HERE = Path(__file__).parent
SAMPLE_VECTORS = HERE / "vectors"


def vector_dirs() -> list[Path]:
    """The vectors shipped with the repo, plus the shared set (and any set named by
    CTMS_VECTORS) when present, so held-back vectors dropped there are run too."""
    dirs = [SAMPLE_VECTORS]
    shared = HERE.parent.parent / "shared" / "vectors"
    for d in (shared, Path(os.environ["CTMS_VECTORS"]) if "CTMS_VECTORS" in os.environ else None):
        if d is not None and d.is_dir() and d.resolve() != SAMPLE_VECTORS.resolve():
            dirs.append(d)
    return dirs


IMPLEMENTATIONS = {
    name: impl
    for name, impl in implementations().items()
    if name in os.environ.get("CTMS_IMPLEMENTATIONS", name).split(",")
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS), ids=lambda n: n)
def make_forwarder(request: pytest.FixtureRequest):
    """A forwarder factory ``(ekt_format) -> forwarder`` for each twin."""
    return IMPLEMENTATIONS[request.param]
