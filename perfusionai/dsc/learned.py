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

The result is a :class:`LearnedMaps`: the maps, and apart from them the notes for the summary
(e.g. "trained on phantoms" when the model card says so), a one-line label and the model card.
torch is imported only here, on the learned path, through :func:`perfusionai.deps.require`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..deps import require
from ..errors import ParameterError
from ..progress import ProgressCallback, as_progress
from . import maps as maps_mod
from .acquisition import frame_interval
from .methods import method_names, resolve_method


@dataclass
class LearnedMaps:
    """Output of :func:`compute_learned_maps`.

    maps: ``{name: float32 [k, j, i]}`` for the keys the method computes (zero outside the
    mask); notes: lines for the summary; label: one line naming the model (with "trained on
    phantoms" when its card says so); model_card: the model's ``model.json``.
    """

    maps: dict
    notes: list = field(default_factory=list)
    label: str = ""
    model_card: dict = field(default_factory=dict)

    @property
    def trained_on_phantoms(self) -> bool:
        return bool(self.model_card.get("trained_on_phantoms", False))


def compute_learned_maps(method: str, concentration: np.ndarray, aif: np.ndarray, times: np.ndarray,
                         mask: np.ndarray, options=None,
                         progress: Optional[ProgressCallback] = None) -> LearnedMaps:
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
        :class:`perfusionai.dsc.model.DSCOptions` (None: its defaults): ``model_path`` (None: PHAE
        trains on this input first; tmax-net refuses), ``kh``, ``rho``, ``device``, and the PHAE
        training settings ``phae_residue``, ``phae_epochs``, ``phae_max_seconds``,
        ``phae_estimate_delay``, ``seed``.
    progress
        ``progress(fraction, message)``; may raise Cancelled.

    Returns
    -------
    LearnedMaps
    """
    if options is None:
        from .model import DSCOptions  # model imports this module; the default options only when none are given

        options = DSCOptions()
    report = as_progress(progress)
    entry = resolve_method(method)
    if not entry.learned:
        raise ParameterError("method", f"{entry.name} is not a learned method ({', '.join(method_names('learned'))})")
    require("torch", f"the {entry.display} method")
    # torch is there: the modules built on it are imported on this path only (extra 'learned')
    from ..nn import PHANTOM_LABEL, is_trained_on_phantoms, load_model, model_label

    mask = np.asarray(mask, bool)
    model_path = options.model_path
    kh, rho, device = float(options.kh), float(options.rho), options.device
    notes: list[str] = []
    if entry.name == "phae":
        from .phae import ARCHITECTURE, check_model_inputs, phae_maps, prepare_subject, train_phae

        if model_path is None:
            subject = prepare_subject(concentration, aif, times, mask)
            training = train_phae(
                subject, residue=options.phae_residue, estimate_delay=bool(options.phae_estimate_delay),
                epochs=int(options.phae_epochs), max_seconds=options.phae_max_seconds if options.phae_max_seconds > 0 else -1.0,
                seed=int(options.seed), device=device, progress=report.sub(0.0, 0.85),
                training_description="the input series itself (self-supervised)",
                trained_on_phantoms=bool(options.series_is_phantom))
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
            raise ParameterError("model_path", "the tmax-net method needs a trained model; train one with "
                                               "'perfusionai dsc train-tmax'")
        model, card = load_model(model_path, expected_architecture=tuple(ARCHITECTURES.values()))
        tmax = tmax_maps(model, card, concentration, aif, times, mask, device=device,
                         model_name=str(model_path), progress=report)
        maps = {"tmax": tmax}
        notes.append(f"Tmax from the learned network {model_path}; CBV, CBF, MTT and TTP from oSVD")
    if is_trained_on_phantoms(card):
        notes.insert(0, PHANTOM_LABEL)
    out = {name: np.where(mask, np.asarray(v, np.float32), np.float32(0)) for name, v in maps.items()}
    report(1.0, "learned maps")
    return LearnedMaps(maps=out, notes=notes, label=model_label(card), model_card=dict(card))

