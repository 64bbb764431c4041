"""Learned DSC methods behind ``perfusionai dsc maps --method phae | tmax-net``.

:func:`compute_learned_maps` is what :func:`perfusionai.dsc.pipeline.compute_dsc_maps` calls for
the learned methods. It returns maps ``[k, j, i]`` for the keys it computes; the pipeline fills
the others:

* ``phae`` (:mod:`.phae`): ``cbv`` (integral ratio), ``mtt`` (encoder), ``cbf`` = 60 CBV/MTT, and
  ``tmax`` only for a model trained with ``estimate_delay`` (otherwise the pipeline takes Tmax
  from oSVD, as the paper does not generate Tmax). Without ``options.model_path`` the PHAE is
  first trained on this very series (self-supervised, the paper's setting).
* ``tmax-net`` (:mod:`.tmaxnet`): ``tmax`` only; CBV, CBF, MTT and TTP come from the pipeline's
  oSVD / integral maps. A model is required.

Besides the maps the dict carries ``"notes"`` (a list of strings for the summary, e.g.
"trained on phantoms" when the model card says so), ``"label"`` (one line) and ``"model_card"``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import input_error
from ..nn import PHANTOM_LABEL, is_trained_on_phantoms, load_model, model_label
from ..progress import ProgressCallback, as_progress
from . import maps as maps_mod
from .deconvolution import frame_interval

METHODS = ("phae", "tmax-net")


def _option(options, name: str, default):
    value = getattr(options, name, None) if options is not None else None
    return default if value is None else value


def compute_learned_maps(method: str, concentration: np.ndarray, aif: np.ndarray, times: np.ndarray,
                         mask: np.ndarray, options=None,
                         progress: Optional[ProgressCallback] = None) -> dict:
    """Maps of a learned method.

    Parameters
    ----------
    method
        ``"phae"`` or ``"tmax-net"`` (case-insensitive).
    concentration
        ``[k, j, i, t]`` delta R2* in 1/s.
    aif
        ``(t,)`` arterial delta R2* in 1/s.
    times
        ``(t,)`` frame times in s.
    mask
        ``[k, j, i]`` bool brain mask (maps are computed inside it).
    options
        :class:`perfusionai.dsc.pipeline.DSCOptions` or any object with ``model_path`` (None:
        PHAE trains on this input first; tmax-net refuses), ``kh``, ``rho``; optional PHAE
        training settings ``phae_residue``, ``phae_epochs``, ``phae_max_seconds``,
        ``phae_estimate_delay``, ``seed``, ``device``.
    progress
        ``progress(fraction, message)``; may raise Cancelled.

    Returns
    -------
    dict
        ``{map name: float32 [k, j, i]}`` plus ``"notes"`` (list of str), ``"label"`` (str) and
        ``"model_card"`` (dict).
    """
    report = as_progress(progress)
    key = str(method).strip().lower()
    if key not in METHODS:
        raise input_error("--method", f"{method!r} is not a learned method ({', '.join(METHODS)})")
    mask = np.asarray(mask, bool)
    model_path = _option(options, "model_path", None)
    kh = float(_option(options, "kh", maps_mod.DEFAULT_KH))
    rho = float(_option(options, "rho", maps_mod.DEFAULT_RHO))
    device = _option(options, "device", "auto")
    notes: list[str] = []
    if key == "phae":
        from .phae import ARCHITECTURE, check_model_inputs, phae_maps, prepare_subject, train_phae

        if model_path is None:
            subject = prepare_subject(concentration, aif, times, mask)
            training = train_phae(
                subject, residue=_option(options, "phae_residue", "lorentzian"),
                estimate_delay=bool(_option(options, "phae_estimate_delay", False)),
                epochs=int(_option(options, "phae_epochs", 65)),
                max_seconds=_option(options, "phae_max_seconds", -1.0),
                seed=int(_option(options, "seed", 0)), device=device, progress=report.sub(0.0, 0.85),
                training_description="the input series itself (self-supervised)")
            model, card = training.model, training.card
            notes.append(f"PHAE trained on this series (self-supervised, {training.history.epochs_run} epochs, "
                         f"{training.seconds:.0f} s)")
        else:
            model, card = load_model(model_path, expected_architecture=ARCHITECTURE)
            check_model_inputs(card, np.asarray(concentration).shape[-1], frame_interval(times), str(model_path))
            notes.append(f"PHAE model {model_path}")
        maps = phae_maps(model, concentration, aif, times, mask, kh=kh, rho=rho, device=device,
                         progress=report.sub(0.85, 1.0))
        maps.pop("delay", None)
        if "tmax" not in maps:
            notes.append("Tmax from oSVD (the PHAE of Fayolle et al. does not model the bolus delay)")
        notes.append("CBV by the integral ratio; CBF = CBV / MTT (central volume theorem)")
    else:
        from .tmaxnet import ARCHITECTURES, tmax_maps

        if model_path is None:
            raise input_error("--model", "--method tmax-net needs a trained model (--model MODEL); "
                                         "train one with 'perfusionai dsc train-tmax'")
        model, card = load_model(model_path, expected_architecture=tuple(ARCHITECTURES.values()))
        tmax = tmax_maps(model, card, concentration, aif, times, mask, device=device,
                         model_name=str(model_path), progress=report)
        maps = {"tmax": tmax}
        notes.append(f"Tmax from the learned network {model_path}; CBV, CBF, MTT and TTP from oSVD")
    if is_trained_on_phantoms(card):
        notes.insert(0, PHANTOM_LABEL)
    out: dict = {name: np.where(mask, np.asarray(v, np.float32), np.float32(0)) for name, v in maps.items()}
    out["notes"] = notes
    out["label"] = model_label(card)
    out["model_card"] = card
    report(1.0, "learned maps")
    return out
