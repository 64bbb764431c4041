"""nnU-Net v2 lobes: raw-dataset export, training into a lobe model file, prediction.

Everything goes through the real ``nnunetv2`` package (fingerprint extraction, experiment
planning, preprocessing, ``nnUNetTrainer``, ``nnUNetPredictor``). nnU-Net finds its folders
through the environment variables ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``;
:func:`nnunet_environment` sets them (and single-process data augmentation) only for the
duration of one call and restores the previous values afterwards.

Training keeps nnU-Net's standard trainer class (``nnUNetTrainer``) and only shortens it through
its attributes (epochs, iterations per epoch, optionally patch and batch size in the plans). It
trains nnU-Net's ``3d_fullres`` configuration and, for CPU inference, ``3d_cpu``
(:func:`add_cpu_configuration`: ``3d_fullres`` at twice the in-plane spacing, one patch covering
the image), and writes a lobe model file (:mod:`.model`: safetensors + model.json, no pickle).

Prediction (:func:`segment_lobes`) rebuilds ``nnUNetPredictor`` from that file with
``manual_initialization``. Its CPU recipe (the default on CPU): ``3d_cpu``, one fold, no
mirroring, torch threads = cores; the previous recipe is ``configuration="3d_fullres"``.
Arrays are ``[k, j, i]`` as read by SimpleITK; nnU-Net sees them in the same index order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import ParameterError, input_error
from ..io import Geometry, read_volume, to_sitk
from ..progress import ProgressCallback, as_progress
from .model import (CPU_CONFIGURATION, DEFAULT_ORIENTATION, FULL_CONFIGURATION, NNUNET_LABELS, LobeModel, _nnunet,
                    check_labels, load_lobe_model, save_lobe_model)

TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"
SPLIT_FILE = "perfusionai_split.json"


@contextlib.contextmanager
def nnunet_environment(raw: Optional[Path] = None, preprocessed: Optional[Path] = None,
                       results: Optional[Path] = None, augmentation_processes: int = 1) -> Iterator[None]:
    """Set nnU-Net's folder variables (and the number of augmentation processes, no torch.compile)
    for the duration of the ``with`` block; the previous environment and torch's thread count are
    restored afterwards. ``augmentation_processes=0`` makes nnU-Net's training data loading run in
    this process (its planner needs >= 1)."""
    import torch

    wanted = {"nnUNet_raw": raw, "nnUNet_preprocessed": preprocessed, "nnUNet_results": results}
    extra = {"nnUNet_n_proc_DA": str(int(augmentation_processes)), "nnUNet_compile": "false"}
    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in list(wanted) + list(extra)}
    try:
        for k, v in wanted.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        os.environ.update(extra)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)


def orientation_code(direction: Sequence[float]) -> str:
    """Three-letter DICOM orientation code (e.g. ``LPS``) of a direction matrix (ITK convention)."""
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(float(d) for d in direction))


def _reorient(img, code: str):
    import SimpleITK as sitk

    return sitk.DICOMOrient(img, code)


# ---------------------------------------------------------------------------------------- export


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ParameterError("dataset_id", f"must be 1-999 (nnU-Net uses three digits), got {dataset_id}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ParameterError("name", f"dataset name {name!r} may only contain letters, digits, '-' and '_'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def export_nnunet_dataset(cases: Sequence[dict], out_dir: str | Path, dataset_id: int = 501, name: str = "Lobes",
                          label_convention: str = "project", channel_name: str = "VIBE",
                          orientation: str = DEFAULT_ORIENTATION, phantom: bool = False,
                          progress: Optional[ProgressCallback] = None) -> Path:
    """Write an nnU-Net raw dataset ``out_dir/DatasetXXX_Name``.

    Parameters
    ----------
    cases
        Dicts with ``subject``, ``image`` (VIBE path), ``lobes`` (label path, may be None for test
        cases) and ``split`` (``train``/``val`` go to ``imagesTr``/``labelsTr``, ``test`` to
        ``imagesTs``).
    label_convention
        Convention of the label files (see :mod:`perfusionai.lung.lobes`); labels are
        converted to the project's 1-6.
    orientation
        Images and labels are reoriented (axis permutation/flip only, no resampling) to this
        orientation so that nnU-Net sees every case the same way; prediction does the same.

    Also writes ``perfusionai_split.json`` (train/val/test subjects: the PRM network's split), used
    as nnU-Net's fold 0 by :func:`train_nnunet`. Returns the dataset folder.
    """
    import SimpleITK as sitk
    from ..lung.lobes import import_lobes

    report = as_progress(progress)
    folder_name = dataset_folder_name(dataset_id, name)
    train = [c for c in cases if c.get("split", "train") in ("train", "val")]
    if len(train) < 2:
        raise ParameterError("cohort", f"nnU-Net needs at least 2 training cases with lobes, got {len(train)}")
    for c in train:
        if not c.get("lobes"):
            raise input_error(c.get("image"), f"subject {c['subject']}: no lobe label map for a training case")
    from ..io import atomic_output_dir

    out = Path(out_dir)
    with atomic_output_dir(out / folder_name) as stage:
        (stage / "imagesTr").mkdir()
        (stage / "labelsTr").mkdir()
        split = {"train": [], "val": [], "test": []}
        for n, c in enumerate(cases):
            sub = str(c["subject"])
            split_name = c.get("split", "train")
            vol = read_volume(c["image"], "VIBE")
            img = _reorient(to_sitk(np.asarray(vol.array, dtype=np.float32), vol.geometry), orientation)
            target = "imagesTr" if split_name in ("train", "val") else "imagesTs"
            (stage / target).mkdir(exist_ok=True)
            sitk.WriteImage(img, str(stage / target / f"{sub}_0000.nii.gz"), useCompression=True)
            if split_name in ("train", "val"):
                lab_vol = read_volume(c["lobes"], "lobe labels")
                if not lab_vol.geometry.same_grid(vol.geometry):
                    raise input_error(c["lobes"], f"lobe labels are not on the grid of {c['image']}")
                lobes = import_lobes(np.asarray(lab_vol.array), label_convention, str(c["lobes"]))
                lab = _reorient(to_sitk(lobes.astype(np.uint8), vol.geometry), orientation)
                sitk.WriteImage(lab, str(stage / "labelsTr" / f"{sub}.nii.gz"), useCompression=True)
            split[split_name].append(sub)
            report((n + 1) / len(cases), f"exported {sub}")
        dataset = {"channel_names": {"0": channel_name}, "labels": dict(NNUNET_LABELS),
                   "numTraining": len(train), "file_ending": ".nii.gz",
                   "name": name, "description": "lung lobes on inspiratory VIBE MRI (PerfusionAI export)"}
        (stage / "dataset.json").write_text(json.dumps(dataset, indent=2))
        if phantom:
            from ..cohorts import PHANTOM_COHORT_MARKER

            (stage / PHANTOM_COHORT_MARKER).write_text('{"phantom": true}\n')
        (stage / SPLIT_FILE).write_text(json.dumps({**split, "orientation": orientation,
                                                    "label_convention_of_source": label_convention}, indent=2))
    return out / folder_name


# ---------------------------------------------------------------------------------------- training


@dataclass
class NNUNetTrainingConfig:
    """Short or full nnU-Net training settings (nnU-Net's defaults: 1000 epochs x 250 iterations).

    ``configurations``: nnU-Net configurations trained into the one model file, in order
    (default ``3d_fullres`` and the CPU configuration ``3d_cpu``). ``patch_size``/``batch_size``
    override the plans of ``3d_fullres`` (``3d_cpu`` derives its patch from it).
    """

    configurations: tuple = (FULL_CONFIGURATION, CPU_CONFIGURATION)
    fold: int | str = 0
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    patch_size: Optional[tuple] = None
    batch_size: Optional[int] = None
    device: str = "auto"
    initial_lr: Optional[float] = None
    trained_on_phantoms: bool = False
    validate: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _dataset_id_from_folder(folder: Path) -> tuple[int, str]:
    name = folder.name
    if not (name.startswith("Dataset") and len(name) > 11 and name[7:10].isdigit() and name[10] == "_"):
        raise input_error(folder, "not an nnU-Net raw dataset folder (expected DatasetXXX_Name)")
    return int(name[7:10]), name


def _stride_products(conf: dict) -> list[int]:
    strides = conf["architecture"]["arch_kwargs"]["strides"]
    return [int(np.prod([s[a] for s in strides])) for a in range(len(strides[0]))]


def add_cpu_configuration(plans: dict, in_plane_factor: float = 2.0) -> dict:
    """Add ``3d_cpu`` to nnU-Net plans: ``3d_fullres`` (same U-Net, normalisation, resampling) at
    ``in_plane_factor`` times the spacing of its two finest axes, with a patch that covers the
    median image at that spacing (rounded up to the network's strides) when it holds no more voxels
    than the 3d_fullres patch, else the 3d_fullres patch. On the paper's 60x256x256 VIBE grid
    (4 x 1.4 x 1.4 mm) this is 60x128x128 voxels in one 64x128x128 tile instead of eight 48x192x192
    tiles. Returns ``plans`` (changed in place)."""
    full = plans["configurations"][FULL_CONFIGURATION]
    spacing = [float(s) for s in full["spacing"]]
    finest = sorted(range(len(spacing)), key=lambda a: (spacing[a], -a))[:2]
    new_spacing = [s * (in_plane_factor if a in finest else 1.0) for a, s in enumerate(spacing)]
    median = [float(m) for m in full["median_image_size_in_voxels"]]
    size = [m * s / n for m, s, n in zip(median, spacing, new_spacing)]
    steps = _stride_products(full)
    patch = [int(math.ceil(z / st) * st) for z, st in zip(size, steps)]
    full_patch = [int(p) for p in full["patch_size"]]
    if int(np.prod(patch)) > int(np.prod(full_patch)):
        patch = [min(p, q) for p, q in zip(patch, full_patch)]
    cpu = copy.deepcopy(full)
    cpu.pop("inherits_from", None)
    cpu.update({"data_identifier": f"{plans.get('plans_name', PLANS)}_{CPU_CONFIGURATION}", "spacing": new_spacing,
                "patch_size": patch, "median_image_size_in_voxels": [round(z, 1) for z in size]})
    plans["configurations"][CPU_CONFIGURATION] = cpu
    return plans


def train_nnunet(raw_dataset: str | Path, out_model: str | Path, config: Optional[NNUNetTrainingConfig] = None,
                 work_dir: Optional[str | Path] = None, progress: Optional[ProgressCallback] = None) -> Path:
    """Plan, preprocess and train nnU-Net on a raw dataset; write a lobe model file (folder or ``.zip``).

    Parameters
    ----------
    raw_dataset
        ``.../DatasetXXX_Name`` written by :func:`export_nnunet_dataset` (or any nnU-Net raw dataset
        with the project's lobe labels).
    out_model
        Output lobe model folder, or a path ending in ``.zip`` (:mod:`perfusionai.lobes.model`:
        safetensors weights + model.json with plans, dataset.json, configurations and folds).
    work_dir
        Where nnU-Net's preprocessed and results folders live during training (default: a
        temporary folder removed afterwards).
    """
    _nnunet()
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from ..nn import choose_device, seed_everything, set_threads

    cfg = config or NNUNetTrainingConfig()
    configurations = tuple(dict.fromkeys(str(c) for c in cfg.configurations))
    if not configurations:
        raise ParameterError("configurations", "give at least one nnU-Net configuration")
    report = as_progress(progress)
    raw = Path(raw_dataset).resolve()
    if not (raw / "dataset.json").is_file():
        raise input_error(raw, "no dataset.json: not an nnU-Net raw dataset (run 'perfusionai lobes export-nnunet')")
    dataset_id, dataset_name = _dataset_id_from_folder(raw)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    check_labels(dataset_json.get("labels", {}), raw / "dataset.json")
    device = choose_device(cfg.device)
    set_threads()
    seed_everything(cfg.seed)
    tmp_root = Path(tempfile.mkdtemp(prefix="perfusionai-nnunet-", dir=work_dir))
    raw_root = tmp_root / "raw"
    raw_root.mkdir()
    os.symlink(raw, raw_root / dataset_name)
    pre_root, res_root = tmp_root / "preprocessed", tmp_root / "results"
    started = time.perf_counter()
    split_path = raw / SPLIT_FILE
    split_info = json.loads(split_path.read_text()) if split_path.is_file() else {}
    try:
        with nnunet_environment(raw_root, pre_root, res_root):
            report(0.02, "nnU-Net: dataset fingerprint")
            extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False,
                                 show_progress_bar=False)
            report(0.06, "nnU-Net: experiment planning")
            plans_id = plan_experiments([dataset_id])
            plans_file = pre_root / dataset_name / f"{plans_id}.json"
            plans = json.loads(plans_file.read_text())
            full = plans["configurations"].get(FULL_CONFIGURATION)
            if full is not None:
                if cfg.patch_size is not None:
                    full["patch_size"] = [int(p) for p in cfg.patch_size]
                if cfg.batch_size is not None:
                    full["batch_size"] = int(cfg.batch_size)
                if CPU_CONFIGURATION in configurations:
                    add_cpu_configuration(plans)
            for c in configurations:
                if c not in plans["configurations"]:
                    raise ParameterError("configurations", f"nnU-Net planned {', '.join(plans['configurations'])} "
                                                           f"for this dataset, not {c}")
            plans_file.write_text(json.dumps(plans, indent=2))
            report(0.10, "nnU-Net: preprocessing")
            preprocess([dataset_id], plans_id, configurations=configurations, num_processes=(1,) * len(configurations),
                       verbose=False, show_progress_bar=False)
            if cfg.fold != "all" and int(cfg.fold) == 0 and split_info.get("train") and split_info.get("val"):
                # fold 0 is the cohort's own train/val split; folds 1-4 are nnU-Net's 5-fold split
                folds = [{"train": split_info["train"], "val": split_info["val"]}]
                (pre_root / dataset_name / "splits_final.json").write_text(json.dumps(folds))
            plans = json.loads(plans_file.read_text())
            ds_json = json.loads((pre_root / dataset_name / "dataset.json").read_text())
            fold = cfg.fold if cfg.fold == "all" else int(cfg.fold)
            weights, axes, patches = {}, {}, {}
            for n, c in enumerate(configurations):
                # the trainer takes keys out of the plans it is given: each gets its own copy
                trainer = nnUNetTrainer(plans={**copy.deepcopy(plans), "continue_training": False}, configuration=c,
                                        fold=fold, dataset_json=copy.deepcopy(ds_json), device=device)
                # Shorten nnU-Net's schedule through the standard trainer's own attributes.
                trainer.num_epochs = int(cfg.epochs)
                trainer.num_iterations_per_epoch = int(cfg.iterations_per_epoch)
                trainer.num_val_iterations_per_epoch = int(cfg.val_iterations_per_epoch)
                if cfg.initial_lr is not None:
                    trainer.initial_lr = float(cfg.initial_lr)
                share = 0.8 / len(configurations)
                report(0.15 + n * share, f"nnU-Net: training {c}, {cfg.epochs} epochs on {device.type}")
                set_threads()
                with nnunet_environment(raw_root, pre_root, res_root, augmentation_processes=0):
                    trainer.run_training()
                if cfg.validate:
                    trainer.perform_actual_validation(False)
                network = getattr(trainer.network, "_orig_mod", trainer.network)
                weights[c] = {str(cfg.fold): {k: v.detach().cpu() for k, v in network.state_dict().items()}}
                mirror = trainer.inference_allowed_mirroring_axes
                axes[c] = list(mirror) if mirror is not None else None
                patches[c] = plans["configurations"][c].get("patch_size")
            report(0.95, "writing the lobe model")
            training = {"configurations": list(configurations), "fold": str(cfg.fold), "epochs": cfg.epochs,
                        "iterations_per_epoch": cfg.iterations_per_epoch, "patch_size": patches,
                        "batch_size": {c: plans["configurations"][c].get("batch_size") for c in configurations},
                        "device": str(device), "seconds": round(time.perf_counter() - started, 1),
                        "torch": torch.__version__}
            out = save_lobe_model(out_model, plans, ds_json, weights, TRAINER, axes,
                                  orientation=split_info.get("orientation", DEFAULT_ORIENTATION),
                                  trained_on_phantoms=bool(cfg.trained_on_phantoms),
                                  training_data=f"nnU-Net raw dataset {dataset_name}",
                                  extra={"training": training})
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report(1.0, "lobe model written")
    return Path(out)


# ---------------------------------------------------------------------------------------- prediction


@dataclass
class LobeSegmentation:
    """Result of :func:`segment_lobes` / :class:`perfusionai.lobes.LobeSegmentJob`.

    ``lobes``: ``[k, j, i]`` uint8 lobes 1-6 (ARCHITECTURE.md) on the input grid ``geometry``;
    ``model``: the model's label ("trained on phantoms" when it was); ``configuration``/``folds``/
    ``tile_step_size``/``mirroring``/``threads``: the recipe used; ``seconds``: prediction time.
    """

    lobes: np.ndarray
    geometry: Geometry
    model: str
    seconds: float
    configuration: str = ""
    folds: tuple = ()
    tile_step_size: float = 0.5
    mirroring: bool = False
    threads: Optional[int] = None

    @property
    def lung_labels(self) -> np.ndarray:
        """Right (1) / left (2) lungs from the lobes (:func:`perfusionai.lung.lungs_from_lobes`)."""
        from ..lung import lungs_from_lobes

        return lungs_from_lobes(self.lobes)

    def voxels_per_lobe(self) -> dict:
        return {str(k): int((self.lobes == k).sum()) for k in sorted(set(NNUNET_LABELS.values()) - {0})}

    def volumes_ml(self) -> dict:
        """Volume of each lobe in mL (voxel volume from the geometry's spacing in mm)."""
        voxel_ml = float(np.prod(self.geometry.spacing)) / 1000.0
        return {k: round(n * voxel_ml, 3) for k, n in self.voxels_per_lobe().items()}

    def summary(self) -> dict:
        return {"model": self.model, "configuration": self.configuration, "folds": [str(f) for f in self.folds],
                "tile_step_size": self.tile_step_size, "mirroring": self.mirroring, "threads": self.threads,
                "voxels_per_lobe": self.voxels_per_lobe(), "volume_ml_per_lobe": self.volumes_ml(),
                "seconds": round(self.seconds, 2)}


def choose_configuration(model: LobeModel, configuration: str, device_type: str) -> str:
    """``auto``: ``3d_cpu`` on CPU when the model holds it, else ``3d_fullres`` (or the model's only one)."""
    held = model.configurations
    if configuration != "auto":
        return configuration
    if device_type == "cpu" and CPU_CONFIGURATION in held:
        return CPU_CONFIGURATION
    if FULL_CONFIGURATION in held:
        return FULL_CONFIGURATION
    return sorted(held)[0]


def segment_lobes(image: str | Path | tuple, model: str | Path | LobeModel, folds: Sequence[int | str] = ("0",),
                  device: str = "auto", configuration: str = "auto", tile_step_size: float = 0.5,
                  use_mirroring: bool = False, threads: Optional[int] = None,
                  progress: Optional[ProgressCallback] = None) -> LobeSegmentation:
    """Segment the lobes of one VIBE volume with ``nnUNetPredictor``; the result is on the input grid.

    Parameters
    ----------
    image
        A file path, or ``(array [k, j, i], Geometry)``.
    model
        Lobe model file (folder/zip, loaded with :func:`perfusionai.lobes.model.load_lobe_model`)
        or a loaded :class:`LobeModel`.
    folds
        Folds to ensemble (default fold 0).
    configuration
        ``auto`` (``3d_cpu`` on CPU when the model has it, else ``3d_fullres``), or a configuration
        the model holds. ``3d_fullres`` with the defaults is the recipe used before the CPU one.
    tile_step_size
        nnU-Net's sliding-window step as a fraction of the patch (0.5 = 50 % overlap).
    use_mirroring
        nnU-Net's mirroring test-time augmentation (up to 8x slower on CPU).
    threads
        torch CPU threads (default: every core available, or ``PERFUSIONAI_THREADS``).

    The image is reoriented (axis permutation/flip, no resampling) to the orientation of the
    training images, predicted, and the labels are reoriented back, so any direction matrix works.
    """
    import SimpleITK as sitk

    report = as_progress(progress)
    folds = tuple(str(f) for f in folds)
    if not folds:
        raise ParameterError("folds", "give at least one fold")
    if not 0.0 < float(tile_step_size) <= 1.0:
        raise ParameterError("tile_step_size", f"must be in (0, 1], got {tile_step_size}")
    if threads is not None and int(threads) < 1:
        raise ParameterError("threads", f"must be at least 1, got {threads}")
    _nnunet()
    import torch
    from ..nn import choose_device, set_threads

    dev = choose_device(device)
    report(0.02, "loading the lobe model")
    lobe_model = model if isinstance(model, LobeModel) else load_lobe_model(model)
    conf = choose_configuration(lobe_model, configuration, dev.type)
    lobe_model.check(conf, folds)
    if isinstance(image, tuple):
        array, geometry = image
        img = to_sitk(np.asarray(array, dtype=np.float32), geometry)
    else:
        vol = read_volume(image, "VIBE")
        geometry = vol.geometry
        img = to_sitk(np.asarray(vol.array, dtype=np.float32), geometry)
    original = orientation_code(geometry.direction)
    img_o = _reorient(img, lobe_model.orientation)
    arr = sitk.GetArrayFromImage(img_o).astype(np.float32)[None]
    props = {"sitk_stuff": {"spacing": img_o.GetSpacing(), "origin": img_o.GetOrigin(),
                            "direction": img_o.GetDirection()},
             "spacing": list(img_o.GetSpacing())[::-1]}
    saved_threads = torch.get_num_threads()
    used_threads = set_threads(threads) if dev.type == "cpu" else None
    started = time.perf_counter()
    try:
        predictor = lobe_model.predictor(conf, folds, dev, tile_step_size=float(tile_step_size),
                                         use_mirroring=bool(use_mirroring))
        report(0.2, f"predicting lobes ({conf}, fold {', '.join(folds)})")
        with nnunet_environment():
            seg = predictor.predict_single_npy_array(arr, props, None, None, False)
    finally:
        torch.set_num_threads(saved_threads)
    seg_img = sitk.GetImageFromArray(np.asarray(seg, dtype=np.uint8))
    seg_img.CopyInformation(img_o)
    back = _reorient(seg_img, original)
    lobes = sitk.GetArrayFromImage(back).astype(np.uint8)
    if lobes.shape != tuple(geometry.shape):
        raise RuntimeError(f"nnU-Net returned shape {lobes.shape}, input {geometry.shape}")
    report(1.0, "lobes segmented")
    return LobeSegmentation(lobes, geometry, lobe_model.label(conf), time.perf_counter() - started, conf, folds,
                            float(tile_step_size), bool(use_mirroring), used_threads)
