"""``perfusionai dsc maps`` as one job specification: :class:`DSCMapsJob`.

The same object describes a run for the library, the command line and the Slicer module:
``DSCMapsJob(dsc=..., te=0.03, out=...).run()`` reads the files, fits :class:`DSCModel`,
writes ``OUT/{cbv,cbf,mtt,tmax,ttp}.nii.gz`` (plus ``k2``/``k1`` with leakage correction),
``OUT/aif.csv`` and ``OUT/summary.json`` (which records ``job.to_json()``) atomically, and
returns a :class:`DSCMapsResult`. ``job.to_argv()`` is the equivalent command line.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ParameterError
from ..io import Geometry, check_same_grid, read_mask, read_series
from ..jobs import Job, option, register_job
from ..progress import ProgressCallback
from . import acquisition
from .deconvolution import DEFAULT_OI_THRESHOLD
from .maps import DEFAULT_KH, DEFAULT_RHO
from .methods import DEFAULT_METHOD
from .model import DSCFit, DSCModel, DSCOptions


@dataclass
class DSCMapsResult:
    """What :meth:`DSCMapsJob.run` returns: the :class:`DSCFit`, the output folder and the grid."""

    fit: DSCFit
    out: Path
    geometry: Geometry

    @property
    def maps(self) -> dict:
        return self.fit.maps

    def summary(self) -> dict:
        return self.fit.summary(self.geometry)


@register_job
@dataclass(frozen=True)
class DSCMapsJob(Job):
    """One ``perfusionai dsc maps`` run (field = option; see ``perfusionai dsc maps --help``).

    Times in seconds; ``dsc`` a 4D file or DICOM folder (time last); masks on its grid.
    """

    DOMAIN = "dsc"
    VERB = "maps"

    dsc: Optional[str] = option(None, help="4D DSC series: NIfTI/NRRD file or DICOM folder (time last)")
    out: Optional[str] = option(None, help="output folder")
    te: Optional[float] = option(None, help="echo time in seconds (None: from the header or BIDS sidecar)")
    tr: Optional[float] = option(None, help="frame interval in seconds (None: from the header)")
    aif_mask: Optional[str] = option(None, help="mask of arterial voxels; the AIF is their mean curve")
    aif_auto: bool = option(False, help="select arterial voxels automatically (also when no aif_mask is given)")
    mask: Optional[str] = option(None, help="brain mask (maps inside it; None: the whole image)")
    auto_mask: bool = option(False, help="without a mask: an automatic head mask (Otsu on the pre-bolus image)")
    motion_correction: bool = option(False, help="rigid frame-to-frame motion correction with ANTsPy ([prm] extra)")
    aif_quadratic: Optional[tuple] = option(None, help="(A, B): arterial delta R2* = A C + B C^2 (whole blood); "
                                                       "None: linear")
    method: str = option(DEFAULT_METHOD, help="a method of perfusionai.dsc.methods")
    threshold: Optional[float] = option(None, help="sSVD/cSVD truncation threshold in (0, 1) (None: method default)")
    oi_threshold: float = option(DEFAULT_OI_THRESHOLD, flag="--oi", help="oSVD oscillation-index limit")
    tikhonov_lambda: Optional[float] = option(None, flag="--lambda", help="fixed Tikhonov lambda relative to s_max")
    tikhonov_criterion: str = option("gcv", flag="--lambda-criterion", help="automatic lambda: gcv or lcurve")
    tikhonov_floor: float = option(DSCOptions.tikhonov_floor, flag="--lambda-floor",
                                   help="automatic lambda at least the volume's GCV lambda / this (0: none)")
    discretisation: str = option("rectangle", help="AIF convolution matrix: rectangle or simpson")
    kh: float = option(DEFAULT_KH, help="haematocrit factor kH")
    rho: float = option(DEFAULT_RHO, help="brain density in g/mL")
    baseline_frames: Optional[int] = option(None, help="pre-bolus frames for S0 (None: detected)")
    leakage_correction: bool = option(False, help="Boxerman-Schmainda-Weisskoff leakage correction")
    model_path: Optional[str] = option(None, flag="--model", help="model folder or zip of a learned method")
    cbv_integration: str = option("trapezoid", help="CBV integral: trapezoid or sum")
    cbv_window: str = option("full", help="CBV integration window: full or first_pass")
    refine_tmax: bool = option(False, help="parabolic sub-sample Tmax")
    allow_unusual_tr: bool = option(False, help="accept a frame interval outside 0.1-10 s")
    device: str = option("auto", help="learned methods: auto, cpu or cuda")
    phae_epochs: int = option(DSCOptions.phae_epochs, help="PHAE trained on the series: maximum epochs")
    phae_max_seconds: float = option(DSCOptions.phae_max_seconds,
                                     help="PHAE trained on the series: time budget in s (<= 0: 240 s on CPU)")
    aif_gamma_fit: bool = option(False, help="replace the AIF by a gamma-variate fit of its first pass")
    fwhm_map: bool = option(False, help="also write fwhm.nii.gz (s), the width of each concentration curve")
    save_residue: bool = option(False, help="also write residue.nii.gz (4D) and the regularisation/OI maps")
    dsc_echo2: Optional[str] = option(None, help="second echo of a dual-echo series (same grid and frames)")
    te2: Optional[float] = option(None, help="echo time of the second echo in seconds (None: from its header)")
    parametric_shape: Optional[float] = option(None, help="parametric method: fixed gamma shape (None: fitted)")
    parametric_dispersion_s: float = option(0.0, flag="--parametric-dispersion",
                                            help="parametric method: exponential dispersion of the input (s)")
    leakage_max_k2_cv: Optional[float] = option(None, help="correct leakage only where K2's coefficient of "
                                                             "variation is at most this (None: everywhere)")

    def options(self, te: float) -> DSCOptions:
        """The :class:`DSCOptions` of this job with echo time ``te`` (s)."""
        names = {f.name for f in dataclasses.fields(DSCOptions)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        if self.tikhonov_lambda is not None:
            values["tikhonov_criterion"] = "fixed"
        values["te"] = te
        return DSCOptions(**values)

    def run(self, progress: Optional[ProgressCallback] = None) -> DSCMapsResult:
        """Read the inputs, fit, write the outputs atomically; returns a :class:`DSCMapsResult`."""
        started = time.perf_counter()
        if not self.dsc:
            raise ParameterError("dsc", "give the 4D DSC series")
        if not self.out:
            raise ParameterError("out", "give the output folder")
        if self.aif_mask and self.aif_auto:
            raise ParameterError("aif_auto", "give either an AIF mask or automatic AIF selection, not both")
        series = read_series(self.dsc, tr=self.tr, name="DSC series", min_frames=acquisition.MIN_FRAMES)
        source = series.path or str(self.dsc)
        times = series.frame_times()
        te = acquisition.series_te(self.te, series)
        echo2 = None
        if self.dsc_echo2:
            second = read_series(self.dsc_echo2, tr=self.tr, name="second echo", min_frames=acquisition.MIN_FRAMES)
            if second.array.shape != series.array.shape:
                raise ParameterError("dsc_echo2", f"{second.path or self.dsc_echo2}: shape {second.array.shape} differs "
                                                  f"from the first echo's {series.array.shape}")
            check_same_grid(second.geometry, series.geometry, second.path or self.dsc_echo2, "second echo")
            echo2 = second.array
            te2 = acquisition.series_te(self.te2, second) if self.te2 is None else float(self.te2)
        elif self.te2 is not None:
            raise ParameterError("te2", "te2 needs the second echo (dsc_echo2)")
        options = self.options(te)
        if echo2 is not None:
            options = dataclasses.replace(options, te2=te2)
        if options.method.lower() == "phae" and acquisition.is_marked_phantom(self.dsc):
            options = dataclasses.replace(options, series_is_phantom=True)
        model = DSCModel.from_options(options, times, timing_source=None if self.tr is not None else source)
        mask = read_mask(self.mask, series.geometry, "brain mask") if self.mask else None
        aif_mask = read_mask(self.aif_mask, series.geometry, "AIF mask") if self.aif_mask else None
        fit = model.fit(series.array, mask=mask, aif_mask=aif_mask, progress=progress, source=source,
                        mask_source=str(self.mask or "brain mask"), aif_source=str(self.aif_mask or "AIF mask"),
                        echo2=echo2, spacing=tuple(series.geometry.spacing))
        fit.save(self.out, series.geometry, job=self,
                 extra_summary={"runtime_s": round(time.perf_counter() - started, 3)},
                 inputs=[self.dsc, self.dsc_echo2, self.mask, self.aif_mask, self.model_path])
        return DSCMapsResult(fit=fit, out=Path(self.out), geometry=series.geometry)

