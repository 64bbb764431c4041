"""Shared pytest fixtures and helpers."""

import os
from pathlib import Path

import pytest

# Two cores on CI: keep BLAS/torch from oversubscribing when tests run in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_EXTERNAL = REPO.parent / "shared" / "external"


@pytest.fixture
def shared_external() -> Path:
    """``../shared/external`` beside the repository (peer reference data; may be absent)."""
    return SHARED_EXTERNAL
