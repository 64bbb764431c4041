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


@pytest.fixture
def scene():
    """A fresh MRML scene (slicer-core) set as ``slicer.mrmlScene``, with the built-in colour
    nodes and the sequences logic registered as in the application (``scene.sequences_logic``)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML classes for Python) is not installed")
    sc = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = sc
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(sc)
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(sc)
    sc.sequences_logic = sequences
    yield sc
    sequences.SetMRMLScene(None)
    colors.SetMRMLScene(None)
    sc.Clear(1)
    slicer.mrmlScene = previous
