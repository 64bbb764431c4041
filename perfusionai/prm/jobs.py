"""Job specifications of the PRM verbs: ``prm ct`` (:class:`PRMCTJob`) and ``prm predict`` (:class:`PRMPredictJob`).

A job holds every input path and option of one run (field names = the verb's argparse ``dest``
names); ``job.to_argv()`` is the exact command line, ``PRMCTJob.from_argv(argv)`` parses it back
with the real parser, ``job.to_json()`` is recorded in the outputs, and ``job.run(progress)``
reads the files, runs the model, writes the outputs into ``out`` atomically (never over an input
file) and returns the typed result (:class:`perfusionai.prm.pipeline.PRMFit`,
:class:`perfusionai.prm.mri_subject.MRIPRMResult`). Importing this module imports neither ANTsPy
nor torch; ``run`` asks for them through :func:`perfusionai.deps.require` when it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ParameterError
from ..jobs import Job, option, register_job
from .classification import ClassificationOptions

_DEFAULT_CLASSIFICATION = ClassificationOptions()


def parse_iterations(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"40x20x10"`` (or ``"40,20,10"``) -> ``(40, 20, 10)``; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).replace(",", "x").split("x") if v.strip())
    except ValueError:
        raise ParameterError("syn_iterations", f"expected iterations per level like 40x20x10, got {text!r}") from None
    if not values:
        raise ParameterError("syn_iterations", "give at least one level, e.g. 40x20x10")
    return values


@register_job
@dataclass(frozen=True)
class PRMCTJob(Job):
    """``perfusionai prm ct``: PRM of an inspiratory/expiratory CT pair (files in, output folder out)."""

    DOMAIN = "prm"
    VERB = "ct"

    insp: Optional[str] = option(None, help="inspiratory CT in HU (NIfTI, NRRD or a DICOM folder)")
    exp: Optional[str] = option(None, help="expiratory CT in HU")
    out: Optional[str] = option(None, help="output folder")
    lung_mask: Optional[str] = option(None, help="lung mask (or 1 right / 2 left) on the reference grid")
    lobes: Optional[str] = option(None, help="lobe label map on the reference grid")
    lobe_convention: str = option("project", help="label convention of lobes")
    no_registration: bool = option(False, help="the scans are already aligned on one grid")
    direction: str = option("exp_to_insp", help="exp_to_insp (PRM on the inspiratory grid) or insp_to_exp")
    threads: int = option(2, help="registration threads")
    registration_quality: str = option("fast", help="registration recipe: fast or accurate")
    registration_spacing: Optional[float] = option(None, help="registration grid spacing (mm)")
    syn_iterations: Optional[str] = option(None, help="SyN iterations per level, coarse to fine, e.g. 40x20x10")
    threshold_insp: float = option(_DEFAULT_CLASSIFICATION.threshold_insp_hu, help="inspiratory threshold (HU)")
    threshold_exp: float = option(_DEFAULT_CLASSIFICATION.threshold_exp_hu, help="expiratory threshold (HU)")
    valid_range: tuple = option((_DEFAULT_CLASSIFICATION.valid_min_hu, _DEFAULT_CLASSIFICATION.valid_max_hu),
                                help="valid HU range on both scans (low, high)")
    median: int = option(_DEFAULT_CLASSIFICATION.median_size, flag="--median-size",
                         help="median pre-filter size (0 = off)")
    median_2d: bool = option(_DEFAULT_CLASSIFICATION.median_2d, help="median filter per slice")
    no_figures: bool = option(False, help="skip prm_scatter.png and prm_overlay.png")
    allow_swapped: bool = option(False, help="run even when the inspiratory lungs are smaller and denser")
    allow_non_hu: bool = option(False, help="run even when a scan does not look like a CT in HU")

    def options(self):
        """The :class:`perfusionai.prm.pipeline.PRMOptions` of this job."""
        from .pipeline import PRMOptions
        from .registration import registration_recipe

        if int(self.threads) < 1:
            raise ParameterError("threads", f"must be at least 1, got {self.threads}")
        if len(self.valid_range) != 2:
            raise ParameterError("valid_range", f"give two values (low, high), got {self.valid_range}")
        overrides = {}
        if self.registration_spacing is not None:
            overrides["registration_spacing_mm"] = float(self.registration_spacing)
        iterations = parse_iterations(self.syn_iterations)
        if iterations is not None:
            overrides["syn_iterations"] = iterations
        classification = ClassificationOptions(float(self.threshold_insp), float(self.threshold_exp),
                                               float(self.valid_range[0]), float(self.valid_range[1]),
                                               int(self.median), bool(self.median_2d))
        registration = registration_recipe(self.registration_quality, direction=self.direction,
                                           threads=int(self.threads), **overrides)
        return PRMOptions(classification=classification, registration=registration,
                          register=not self.no_registration, allow_swapped=self.allow_swapped,
                          allow_non_hu=self.allow_non_hu)

    def inputs(self) -> list[str]:
        return [p for p in (self.insp, self.exp, self.lung_mask, self.lobes) if p]

    def run(self, progress=None):
        """Read the scans, fit, write the outputs into ``out``; returns the :class:`~perfusionai.prm.pipeline.PRMFit`."""
        import numpy as np

        from ..io import read_labels, read_volume
        from ..lung import import_lobes
        from .pipeline import PRMModel

        for name in ("insp", "exp", "out"):
            if not getattr(self, name):
                raise ParameterError(name, "is required")
        options = self.options()
        options.classification.validate()
        insp = read_volume(self.insp, "inspiratory CT")
        exp = read_volume(self.exp, "expiratory CT")
        reference = insp if self.direction == "exp_to_insp" or self.no_registration else exp
        lung = None
        if self.lung_mask:
            # binary masks and right/left labels (1/2) are both accepted
            lung = read_labels(self.lung_mask, reference.geometry, "lung mask")
            if not np.any(lung):
                from ..errors import input_error

                raise input_error(self.lung_mask, "lung mask is empty (no nonzero voxel)")
        lobes = None
        if self.lobes:
            lobes = import_lobes(read_labels(self.lobes, reference.geometry, "lobe map"), self.lobe_convention,
                                 self.lobes)
        fit = PRMModel(options).fit(insp, exp, lung, lobes, progress)
        fit.info["job"] = self.to_json()
        fit.save(self.out, figures=not self.no_figures, inputs=self.inputs())
        return fit


@register_job
@dataclass(frozen=True)
class PRMPredictJob(Job):
    """``perfusionai prm predict``: PRM from inspiratory MRI with a trained network (files in, folder out)."""

    DOMAIN = "prm"
    VERB = "predict"

    model: Optional[str] = option(None, help="MRI -> PRM model folder or zip")
    out: Optional[str] = option(None, help="output folder")
    vibe: Optional[str] = option(None, help="VIBE volume")
    post_vibe: Optional[str] = option(None, help="post-contrast VIBE")
    irmax: Optional[str] = option(None, help="IRmax map")
    pbf: Optional[str] = option(None, help="PBF map (mL/100 mL/min)")
    lung_mask: Optional[str] = option(None, help="lung mask, lung labels or lobe map (nonzero = lung)")
    lobes: Optional[str] = option(None, help="lobes 1-6 for per-lobe statistics")
    lobe_model: Optional[str] = option(None, help="nnU-Net lobe model: segment the lobes of the VIBE first")
    reference: Optional[str] = option(None, flag="--ref", help="CT-derived PRM on the same grid for comparison")
    device: str = option("auto", help="auto, cpu or cuda")

    def inputs(self) -> list[str]:
        return [p for p in (self.vibe, self.post_vibe, self.irmax, self.pbf, self.lung_mask, self.lobes,
                            self.lobe_model, self.reference, self.model) if p]

    def run(self, progress=None):
        """Predict and write the outputs into ``out``; returns the :class:`~perfusionai.prm.mri_subject.MRIPRMResult`."""
        from .mri_subject import predict_subject

        for name in ("model", "out"):
            if not getattr(self, name):
                raise ParameterError(name, "is required")
        result = predict_subject(model=self.model, vibe=self.vibe, post_vibe=self.post_vibe, irmax=self.irmax,
                                 pbf=self.pbf, lung_mask=self.lung_mask, lobes=self.lobes,
                                 lobe_model=self.lobe_model, reference=self.reference, device=self.device,
                                 progress=progress)
        result.summary["job"] = self.to_json()
        result.save(self.out, inputs=self.inputs())
        return result
