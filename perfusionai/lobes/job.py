"""Job specification of ``perfusionai lobes segment`` (see :mod:`perfusionai.jobs`).

:class:`LobeSegmentJob` names the VIBE volume, the lobe model file, the output folder and the
inference recipe (configuration, folds, tile step, mirroring, device, threads). ``job.run()``
segments with :func:`perfusionai.lobes.nnunet.segment_lobes` and writes ``lobes.nii.gz``
(1-6), ``lung_mask.nii.gz`` (1 right, 2 left) and ``summary.json`` (with the job itself) into
``out`` atomically, never over one of its inputs; it returns the typed
:class:`~perfusionai.lobes.nnunet.LobeSegmentation`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Optional

from ..jobs import Job, option, register_job
from ..progress import as_progress
from .nnunet import LobeSegmentation, segment_lobes


@register_job
@dataclass(frozen=True)
class LobeSegmentJob(Job):
    """``perfusionai lobes segment``: lung lobes 1-6 of a VIBE volume with an nnU-Net lobe model."""

    DOMAIN = "lobes"
    VERB = "segment"

    image: str = option(None, help="VIBE volume (NIfTI/NRRD file or DICOM folder)")
    model: str = option(None, help="lobe model file (folder or .zip) from 'lobes train' or 'lobes import-model'")
    out: str = option(None, help="output folder")
    configuration: str = option("auto", help="nnU-Net configuration: auto (3d_cpu on CPU when the model has it, "
                                             "else 3d_fullres), 3d_cpu or 3d_fullres")
    folds: tuple = option(("0",), help="folds to ensemble (0-4 or all)")
    tile_step_size: float = option(0.5, help="sliding-window step as a fraction of the patch")
    mirroring: bool = option(False, help="nnU-Net mirroring test-time augmentation")
    device: str = option("auto", help="auto | cpu | cuda")
    threads: Optional[int] = option(None, help="torch CPU threads (default: every core)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, f.name, os.fspath(value))
        object.__setattr__(self, "folds", tuple(str(v) for v in self.folds))
        object.__setattr__(self, "tile_step_size", float(self.tile_step_size))

    def run(self, progress=None, model=None) -> LobeSegmentation:
        """Run the job; ``model``: a :class:`~.model.LobeModel` already loaded from ``self.model``."""
        import numpy as np

        from ..io import atomic_output_dir, write_json, write_volume
        from ..errors import ParameterError

        for name in ("image", "model", "out"):
            if not getattr(self, name):
                raise ParameterError(name, "is required")
        report = as_progress(progress)
        seg = segment_lobes(self.image, model if model is not None else self.model, self.folds, self.device,
                            self.configuration, self.tile_step_size, self.mirroring, self.threads,
                            progress=report.sub(0.0, 0.95))
        with atomic_output_dir(self.out, inputs=[self.image, self.model]) as stage:
            write_volume(seg.lobes, seg.geometry, stage / "lobes.nii.gz", np.uint8)
            write_volume(seg.lung_labels, seg.geometry, stage / "lung_mask.nii.gz", np.uint8)
            write_json({"image": str(self.image), **seg.summary(), "job": self.to_json()}, stage / "summary.json")
        report(1.0, "written")
        return seg
