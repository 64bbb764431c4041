"""Optional dependencies by capability.

The core installs numpy, scipy, SimpleITK, pydicom, nibabel, tqdm and
threadpoolctl: enough for image I/O, DICOM and the classical DSC maps.
nibabel is in the core, not an extra, because the NIfTI reader needs it for
correctness (NaN and Inf voxels that ITK reads as 0, qform/sform conflicts,
NIfTI-2, truncated files, Siemens MOSAIC DICOM); it is small and pure Python.
Each further capability is an extra of the package (``pyproject.toml``);
:func:`require` imports what a capability needs or raises one line saying
which extra to install. ``all`` is every extra; ``dev`` is ``all`` plus the
test tools.

========== ============================== ===================================================
extra      packages                       used by
========== ============================== ===================================================
learned    torch, safetensors             PHAE, tmax-net, MRI PRM network, DL-CTPM, DR nets
prm        antspyx                        CT PRM registration
report     matplotlib                     figures, the HTML report, the demo
lobes      nnunetv2 (with learned)        nnU-Net lobe segmentation
ml         scikit-learn, scikit-image     DR classical learners, lung masks, SSIM checks
batch      dask[distributed]              ``perfusionai batch``
all        every extra above
========== ============================== ===================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency

#: import name -> (pip distribution, extra that brings it)
PACKAGES = {
    "torch": ("torch", "learned"),
    "safetensors": ("safetensors", "learned"),
    "ants": ("antspyx", "prm"),
    "matplotlib": ("matplotlib", "report"),
    "nnunetv2": ("nnunetv2", "lobes"),
    "sklearn": ("scikit-learn", "ml"),
    "skimage": ("scikit-image", "ml"),
    "nibabel": ("nibabel", "core"),
    "dask": ("dask[distributed]", "batch"),
    "distributed": ("dask[distributed]", "batch"),
    "tqdm": ("tqdm", "core"),
    "pydicom": ("pydicom", "core"),
    "SimpleITK": ("SimpleITK", "core"),
}

#: what to type for an extra; torch pinned to the CPU build the README uses
INSTALL_HINT = {
    "learned": 'pip install torch==2.13.0 "perfusionai[learned]"',
    "lobes": 'pip install torch==2.13.0 torchvision==0.28.0 "perfusionai[lobes]"',
}


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` (``"core"``: reinstall the package itself)."""
    if extra == "core":
        return 'pip install "perfusionai"'
    return INSTALL_HINT.get(extra, f'pip install "perfusionai[{extra}]"')


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra to install.

    Parameters
    ----------
    module
        The import name (``"torch"``, ``"ants"``, ``"matplotlib.pyplot"``, ...).
    purpose
        What needs it, in a few words (``"the PHAE method"``), for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        dist, extra = PACKAGES.get(top, (top, "all"))
        if exc.name and exc.name.split(".")[0] != top:
            # the package is there but one of its own imports is broken: say so, not "install it"
            raise MissingDependency(
                f"{purpose} needs {dist}, which is installed but failed to import ({exc})") from None
        raise MissingDependency(
            f"{purpose} needs {dist}, which is not installed; install it with: {install_hint(extra)}") from None


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing anything else of the project)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
