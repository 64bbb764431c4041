"""Training of the multi-sequence MRI -> PRM network on a cohort (Xu et al.).

A cohort is a CSV with one row per subject and the columns ``subject, split, vibe, post_vibe,
irmax, pbf, lung_mask, lobes, prm`` (paths relative to the CSV; any subset of the four sequence
cells may be empty; ``split`` is ``train``, ``val`` or ``test``; ``lobes`` may be empty). Every
image of a row must lie on the grid of its lung mask (co-registered to VIBE, as in the paper).

Training uses the shared loop :func:`perfusionai.nn.fit` (validation every epoch, early stopping
restoring the best weights, progress and cancellation) with Adam (paper: learning rate 1e-4,
batch size 8, 200 epochs) and the loss of :mod:`.mri_losses`. The model is written with
:func:`perfusionai.nn.save_model` (``weights.safetensors`` + ``model.json``); the card lists the
sequences the network was trained with and the grid it expects.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ParameterError, input_error
from ..io import Geometry, check_same_grid, read_labels, read_volume
from ..nn import TensorBatchLoader, build_model, choose_device, fit, load_model, save_model, seed_everything, set_threads
from ..progress import ProgressCallback, as_progress
from .mri_losses import DEFAULT_BLUR_SIZE, DEFAULT_WEIGHTS, prm_loss
from .mri_network import ARCHITECTURE_NAME, DEFAULT_SHAPE, SEQUENCES, crop_labels, prepare_inputs

COHORT_COLUMNS = ("subject", "split", "vibe", "post_vibe", "irmax", "pbf", "lung_mask", "lobes", "prm")
NORMALISATION = ("per sequence: clip to [0, 2 x P99 inside the lung mask], map to [-1, 1]; "
                 "outside the lung -1")


@dataclass
class MRICase:
    """One subject's arrays, all ``[k, j, i]`` on ``geometry``.

    ``sequences`` maps each of :data:`SEQUENCES` to an array or None (missing);
    ``lung_labels`` nonzero = lung; ``lobes`` labels 1-6 or None; ``prm`` reference PRM 0-4 or None.
    """

    subject: str
    split: str
    geometry: Geometry
    sequences: dict
    lung_labels: np.ndarray
    lobes: Optional[np.ndarray] = None
    prm: Optional[np.ndarray] = None

    @property
    def available(self) -> list[str]:
        return [s for s in SEQUENCES if self.sequences.get(s) is not None]


def case_from_phantom(phantom, split: str = "train", drop: Sequence[str] = ()) -> MRICase:
    """An :class:`MRICase` from a :class:`perfusionai.phantoms.prm_mri.PRMMRIPhantom`."""
    seqs = {s: (None if s in drop else phantom.sequences[s]) for s in SEQUENCES}
    return MRICase(phantom.subject, split, phantom.geometry, seqs, phantom.lung_labels, phantom.lobes,
                   phantom.reference_prm)


def read_cohort(csv_path: str | Path, need_prm: bool = True) -> list[dict]:
    """Rows of a cohort CSV with resolved paths (no images read yet).

    Raises :class:`PerfusionAIError` naming the CSV for a missing column, an empty subject,
    a row without any sequence or lung mask, an unknown split, or a file that does not exist.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise input_error(path, "cohort CSV not found")
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise input_error(path, f"cannot read the cohort CSV ({exc})") from None
    required = ["subject", "lung_mask"] + (["prm"] if need_prm else [])
    missing = [c for c in required if c not in header]
    if missing:
        raise input_error(path, f"missing column(s) {', '.join(missing)}; expected {', '.join(COHORT_COLUMNS)}")
    if not any(s in header for s in SEQUENCES):
        raise input_error(path, f"no sequence column; expected some of {', '.join(SEQUENCES)}")
    if not rows:
        raise input_error(path, "the cohort has no rows")
    out = []
    for n, row in enumerate(rows, start=2):
        subject = row.get("subject", "")
        where = f"row {n} ({subject or 'no subject'})"
        if not subject:
            raise input_error(path, f"{where}: empty subject")
        split = (row.get("split") or "train").lower()
        if split not in ("train", "val", "test"):
            raise input_error(path, f"{where}: split '{split}' is not train, val or test")
        resolved = {"subject": subject, "split": split}
        for key in (*SEQUENCES, "lung_mask", "lobes", "prm"):
            cell = row.get(key, "")
            if not cell:
                resolved[key] = None
                continue
            p = Path(cell)
            p = p if p.is_absolute() else path.parent / p
            if not p.exists():
                raise input_error(path, f"{where}: {key} file {p} does not exist")
            resolved[key] = p
        if resolved["lung_mask"] is None:
            raise input_error(path, f"{where}: no lung mask")
        if need_prm and resolved["prm"] is None:
            raise input_error(path, f"{where}: no reference PRM")
        if not any(resolved[s] is not None for s in SEQUENCES):
            raise input_error(path, f"{where}: no MRI sequence given")
        out.append(resolved)
    return out


def load_case(row: dict) -> MRICase:
    """Read one cohort row's images; every image must be on the lung mask's grid."""
    mask_vol = read_volume(row["lung_mask"], "lung mask")
    geometry = mask_vol.geometry
    lung = np.asarray(mask_vol.array)
    if not (lung != 0).any():
        raise input_error(row["lung_mask"], "lung mask is empty")
    sequences = {}
    for s in SEQUENCES:
        p = row.get(s)
        if p is None:
            sequences[s] = None
            continue
        vol = read_volume(p, s)
        check_same_grid(vol.geometry, geometry, p, s)
        arr = np.asarray(vol.array, dtype=np.float32)
        if not np.isfinite(arr[lung != 0]).all():
            raise input_error(p, f"{s} has NaN or infinite values inside the lung")
        sequences[s] = arr
    lobes = read_labels(row["lobes"], geometry, "lobes") if row.get("lobes") else None
    prm = read_labels(row["prm"], geometry, "reference PRM") if row.get("prm") else None
    if prm is not None and (prm.min() < 0 or prm.max() > 4):
        raise input_error(row["prm"], "reference PRM labels must be 0-4 (ARCHITECTURE.md)")
    return MRICase(row["subject"], row.get("split", "train"), geometry, sequences,
                   lung.astype(np.uint8) if lung.dtype != np.uint8 else lung, lobes, prm)


def is_phantom_cohort(csv_path: str | Path) -> bool:
    """True when the cohort folder carries the marker written for phantom cohorts
    (:func:`perfusionai.phantoms.is_phantom_cohort`)."""
    from ..cohorts import is_phantom_cohort as marked

    return marked(csv_path)


def load_split(cohort: str | Path, split: str = "all", need_prm: bool = True) -> list[MRICase]:
    """The cases of one split (``train``, ``val``, ``test`` or ``all``) of a cohort CSV, read."""
    if split not in ("train", "val", "test", "all"):
        raise ParameterError("split", f"must be train, val, test or all, got {split!r}")
    rows = read_cohort(cohort, need_prm=need_prm)
    chosen = [r for r in rows if split == "all" or r["split"] == split]
    if not chosen:
        raise input_error(cohort, f"no subject in split '{split}'")
    return [load_case(r) for r in chosen]


@dataclass
class PRMTrainingConfig:
    """Training options (defaults: the paper's, except where noted).

    ``shape`` is the network grid ``(k, j, i)`` every case is cropped/padded to (paper 60x256x256).
    ``sequences`` restricts the inputs used (default: every sequence present in the training set).
    ``max_seconds`` bounds the wall-clock time (None: no bound). ``augment`` flips the i axis
    (left-right) of random batches.
    """

    shape: tuple = DEFAULT_SHAPE
    epochs: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-4
    patience: Optional[int] = 20
    input_dropout: float = 0.3
    kernel_size: int = 5
    loss_weights: tuple = DEFAULT_WEIGHTS
    blur_size: tuple = DEFAULT_BLUR_SIZE
    sequences: Optional[tuple] = None
    seed: int = 0
    device: str = "auto"
    max_seconds: Optional[float] = None
    augment: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def build_tensors(cases: Sequence[MRICase], shape: Sequence[int], sequences: Sequence[str] = SEQUENCES
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack cases into ``x (n, 4, *shape)`` float16, ``available (n, 4)`` float32 and
    ``target (n, *shape)`` uint8 (reference PRM labels; 0 outside the window).

    Sequences not in ``sequences`` are treated as missing.
    """
    n = len(cases)
    x = torch.zeros((n, len(SEQUENCES)) + tuple(int(s) for s in shape), dtype=torch.float16)
    avail = torch.zeros((n, len(SEQUENCES)), dtype=torch.float32)
    target = torch.zeros((n,) + tuple(int(s) for s in shape), dtype=torch.uint8)
    for c, case in enumerate(cases):
        vols = {s: case.sequences.get(s) for s in SEQUENCES if s in sequences}
        xi, ai, src, dst = prepare_inputs(vols, case.lung_labels, shape)
        x[c] = torch.from_numpy(xi).to(torch.float16)
        avail[c] = torch.from_numpy(ai)
        if case.prm is not None:
            ref = np.where(np.asarray(case.lung_labels) != 0, case.prm, 0).astype(np.uint8)
            target[c] = torch.from_numpy(crop_labels(ref, shape, src, dst))
    return x, avail, target


def train_prm_network(train_cases: Sequence[MRICase], val_cases: Sequence[MRICase],
                      config: Optional[PRMTrainingConfig] = None, progress: Optional[ProgressCallback] = None,
                      trained_on_phantoms: bool = False, training_data: str = "",
                      checkpoint_dir: Optional[Path] = None) -> tuple[torch.nn.Module, dict, dict]:
    """Train the network; returns ``(model, card, history dict)``.

    ``card`` is ready for :func:`save_prm_model`. Raises :class:`PerfusionAIError` when there
    is no training case or no reference PRM.
    """
    cfg = config or PRMTrainingConfig()
    if not train_cases:
        raise ParameterError("cohort", "no training subject (split 'train')")
    for case in list(train_cases) + list(val_cases):
        if case.prm is None:
            raise input_error(case.subject, "no reference PRM for training")
    report = as_progress(progress)
    present = [s for s in SEQUENCES if any(c.sequences.get(s) is not None for c in train_cases)]
    used = [s for s in present if cfg.sequences is None or s in cfg.sequences]
    if not used:
        raise ParameterError("sequences", f"none of {list(cfg.sequences or [])} is present in the training set "
                                          f"(present: {present})")
    set_threads()
    generator = seed_everything(cfg.seed)
    device = choose_device(cfg.device)
    report(0.0, "preparing training data")
    x_tr, a_tr, t_tr = build_tensors(train_cases, cfg.shape, used)
    keep = a_tr.sum(dim=1) > 0
    if not bool(keep.all()):
        x_tr, a_tr, t_tr = x_tr[keep], a_tr[keep], t_tr[keep]
    val_loader = None
    if val_cases:
        x_va, a_va, t_va = build_tensors(val_cases, cfg.shape, used)
        keep_v = a_va.sum(dim=1) > 0
        val_loader = TensorBatchLoader(x_va[keep_v], a_va[keep_v], t_va[keep_v], batch_size=cfg.batch_size)
    train_loader = TensorBatchLoader(x_tr, a_tr, t_tr, batch_size=cfg.batch_size, shuffle=True,
                                     generator=generator)
    model = build_model(ARCHITECTURE_NAME, n_inputs=len(SEQUENCES), kernel_size=cfg.kernel_size,
                        input_dropout=cfg.input_dropout)
    flip_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def step(net: torch.nn.Module, batch) -> torch.Tensor:
        x, avail, target = batch
        x = x.float()
        if cfg.augment and net.training and bool(torch.rand(1, generator=flip_gen) < 0.5):
            x, target = torch.flip(x, dims=(-1,)), torch.flip(target, dims=(-1,))
        return prm_loss(net(x, avail), target, cfg.loss_weights, cfg.blur_size)

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    started = time.perf_counter()
    history = fit(model, train_loader, val_loader, None, optimizer, cfg.epochs,
                  early_stopping_patience=cfg.patience, checkpoint_dir=checkpoint_dir,
                  progress=report.sub(0.02, 1.0) if hasattr(report, "sub") else report, device=device,
                  step_fn=step, max_seconds=cfg.max_seconds, progress_every=1)
    model.to("cpu").eval()
    card = {
        "inputs": {
            "sequences": list(SEQUENCES),
            "trained_with": used,
            "shape": [int(s) for s in cfg.shape],
            "normalisation": NORMALISATION,
            "lung_mask": "required (lung mask on the VIBE grid; nonzero = lung)",
        },
        "outputs": {"classes": {"1": "normal", "2": "fsad", "3": "emph"},
                    "labels": "PRM labels 1 normal, 2 fSAD, 3 emphysema inside the lung mask, 0 outside"},
        "training_data": training_data or f"{len(train_cases)} training and {len(val_cases)} validation subjects",
        "trained_on_phantoms": bool(trained_on_phantoms),
        "training": {**cfg.to_dict(), "train_subjects": [c.subject for c in train_cases],
                     "val_subjects": [c.subject for c in val_cases], "device": str(device),
                     "seconds": round(time.perf_counter() - started, 2)},
        "history": history.to_dict(),
    }
    return model, card, history.to_dict()


def train_from_cohort(cohort: str | Path, out: str | Path, config: Optional[PRMTrainingConfig] = None,
                      trained_on_phantoms: bool = False, progress: Optional[ProgressCallback] = None
                      ) -> tuple[Path, dict, dict]:
    """``prm train``: train on the ``train`` rows of a cohort CSV (validate on ``val``) and write the model.

    A cohort written by a phantom generator (its folder carries the phantom marker) is labelled
    "trained on phantoms" in the model card whatever ``trained_on_phantoms`` says.
    Returns ``(model path, card, history)``.
    """
    rows = read_cohort(cohort)
    train = [load_case(r) for r in rows if r["split"] == "train"]
    val = [load_case(r) for r in rows if r["split"] == "val"]
    phantom = bool(trained_on_phantoms or is_phantom_cohort(cohort))
    model, card, history = train_prm_network(train, val, config, progress, trained_on_phantoms=phantom,
                                             training_data=f"cohort {Path(cohort).name}: {len(train)} train, "
                                                           f"{len(val)} validation subjects"
                                                           + (" (phantoms)" if phantom else ""))
    return save_prm_model(out, model, card), card, history


def save_prm_model(path: str | Path, model: torch.nn.Module, card: dict) -> Path:
    """Write the model directory (or ``.zip``) with :func:`perfusionai.nn.save_model`."""
    return save_model(path, model, card)


def load_prm_model(path: str | Path, device: str | torch.device | None = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load and verify an MRI -> PRM model (refuses any other architecture or a tampered file)."""
    model, card = load_model(path, expected_architecture=ARCHITECTURE_NAME, device=device)
    inputs = card.get("inputs", {})
    if list(inputs.get("sequences", [])) != list(SEQUENCES):
        raise input_error(path, f"the model's input sequences {inputs.get('sequences')} are not "
                                f"{list(SEQUENCES)}")
    shape = inputs.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise input_error(path, f"the model card's input shape {shape!r} is not three positive integers")
    return model, card
