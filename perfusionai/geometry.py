"""The voxel grid and the in-memory image types shared by every module.

:class:`Geometry` (a 3D voxel grid in LPS), :class:`Volume` (a 3D image) and
:class:`Series` (a 4D series, time last) sit below :mod:`perfusionai.io` and
:mod:`perfusionai.dicom`, which both build them; neither reader imports the
other at module level. :mod:`perfusionai.io` re-exports all three, so
``from perfusionai.io import Geometry`` keeps working.

Axis order: arrays are ``[k, j, i]`` (slice, row, column), series ``[k, j, i, t]``;
``spacing`` and ``origin`` are in ``(i, j, k)``/``(x, y, z)`` order, in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ParameterError, PerfusionAIError

# Tolerances for "same grid": geometry read back from files is float32 in NIfTI.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3D image (LPS, as ITK and DICOM).

    Attributes
    ----------
    shape
        Array shape ``(k, j, i)`` (slices, rows, columns).
    spacing
        Voxel size in mm along ``(i, j, k)``.
    origin
        Position of voxel ``(0, 0, 0)`` in LPS mm.
    direction
        3x3 direction cosines as a flat row-major tuple; column ``c`` is the LPS
        direction of index axis ``c`` (``i``, ``j``, ``k``).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing, dtype=float)[None, :]
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to RAS mm (Slicer's convention)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray, shape: tuple[int, int, int]) -> "Geometry":
        """Build a geometry from Slicer's 4x4 IJK-to-RAS matrix and a ``(k, j, i)`` shape."""
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(matrix, dtype=float)
        columns = lps[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise PerfusionAIError("the IJK-to-RAS matrix has a zero-length axis")
        direction = columns / spacing[None, :]
        return cls(tuple(int(s) for s in shape), tuple(float(s) for s in spacing),
                   tuple(float(o) for o in lps[:3, 3]), tuple(float(d) for d in direction.ravel()))

    def with_shape(self, shape: tuple[int, int, int]) -> "Geometry":
        return Geometry(tuple(int(s) for s in shape), self.spacing, self.origin, self.direction)

    def same_grid(self, other: "Geometry") -> bool:
        """True when both describe the same voxel grid (within file-precision tolerances)."""
        return (
            tuple(self.shape) == tuple(other.shape)
            and np.allclose(self.spacing, other.spacing, rtol=_SPACING_RTOL, atol=0)
            and np.allclose(self.origin, other.origin, rtol=0,
                            atol=max(_ORIGIN_ATOL_MM, 1e-4 * max(self.spacing)))
            and np.allclose(self.direction, other.direction, rtol=0, atol=_DIRECTION_ATOL)
        )

    def describe(self, with_direction: Optional[bool] = None) -> str:
        """One line: shape, spacing and origin, and the direction cosines when they are not the
        identity (or when ``with_direction`` is True), so two grids that differ only in direction
        never read the same. For a mismatch message prefer :meth:`differences`."""
        text = (f"shape (k,j,i) {tuple(self.shape)}, spacing {tuple(round(s, 4) for s in self.spacing)} mm, "
                f"origin {tuple(round(o, 3) for o in self.origin)} mm")
        if with_direction is None:
            with_direction = not np.allclose(self.direction, np.eye(3).ravel(), rtol=0, atol=_DIRECTION_ATOL)
        if with_direction:
            text += f", direction {tuple(round(d, 4) for d in self.direction)}"
        return text

    def differences(self, other: "Geometry") -> str:
        """The parts of the grid that differ from ``other``, described side by side.

        Used by grid-mismatch messages so that two grids differing only in direction
        (or by less than the rounding of :meth:`describe`) never print identically.
        """
        parts = []
        if tuple(self.shape) != tuple(other.shape):
            parts.append(f"shape (k,j,i) {tuple(self.shape)} vs {tuple(other.shape)}")
        if not np.allclose(self.spacing, other.spacing, rtol=_SPACING_RTOL, atol=0):
            parts.append(f"spacing {_fmt(self.spacing, 6)} vs {_fmt(other.spacing, 6)} mm")
        if not np.allclose(self.origin, other.origin, rtol=0,
                           atol=max(_ORIGIN_ATOL_MM, 1e-4 * max(self.spacing))):
            parts.append(f"origin {_fmt(self.origin, 4)} vs {_fmt(other.origin, 4)} mm")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=_DIRECTION_ATOL):
            parts.append(f"direction {_fmt(self.direction, 5)} vs {_fmt(other.direction, 5)}")
        return "; ".join(parts) if parts else "the same grid"

    def to_dict(self) -> dict:
        return {"shape_kji": list(self.shape), "spacing_mm": list(self.spacing),
                "origin_lps_mm": list(self.origin), "direction": list(self.direction)}


@dataclass
class Volume:
    """A 3D image: ``array[k, j, i]`` on ``geometry``."""

    array: np.ndarray
    geometry: Geometry
    path: Optional[str] = None
    metadata: dict = field(default_factory=dict)


@dataclass
class Series:
    """A 4D series: ``array[k, j, i, t]`` (time last) on a 3D ``geometry``.

    Attributes
    ----------
    times
        Acquisition time of each frame in seconds from the first frame, shape ``(t,)``,
        or None when the file carries no timing (then ``tr`` must be given).
    tr
        Frame interval in seconds (the repetition time of a DSC series), or None.
    te
        Echo time in seconds, when the header or a BIDS sidecar gives it, else None.
    """

    array: np.ndarray
    geometry: Geometry
    times: Optional[np.ndarray] = None
    tr: Optional[float] = None
    te: Optional[float] = None
    path: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.array.shape[-1])

    def frame_times(self) -> np.ndarray:
        """Frame times in seconds, shape ``(t,)``; from ``times`` or ``tr``."""
        if self.times is not None:
            return np.asarray(self.times, dtype=float)
        if self.tr is None:
            raise ParameterError("tr", f"{self.path or 'the series'}: the frame interval (TR) is not in the "
                                       "header; give it in seconds")
        return np.arange(self.n_frames, dtype=float) * float(self.tr)




def _fmt(values, digits: int) -> str:
    return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"
