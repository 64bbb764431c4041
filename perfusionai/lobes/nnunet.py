"""nnU-Net v2 lobe model: raw-dataset export, training, model folders/zips, prediction.

Everything goes through the real ``nnunetv2`` package (fingerprint extraction, experiment
planning, preprocessing, ``nnUNetTrainer``, ``nnUNetPredictor``). nnU-Net finds its folders
through the environment variables ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``;
:func:`nnunet_environment` sets them (and single-process data augmentation) only for the
duration of one call and restores the previous values afterwards.

Training keeps nnU-Net's standard trainer class (``nnUNetTrainer``) and only shortens it through
its attributes (epochs, iterations per epoch, optionally patch and batch size in the plans), so
the checkpoint names a trainer that ``nnUNetPredictor.initialize_from_trained_model_folder`` can
find inside ``nnunetv2``.

Model directory layout (nnU-Net's own)::

    MODEL/ dataset.json  plans.json  [dataset_fingerprint.json]  perfusionai_lobes.json
           fold_0/checkpoint_final.pth  ...

``perfusionai_lobes.json`` records the label convention, the channel, the orientation the
training images had, whether the model was trained on phantoms and the training settings. Arrays
are ``[k, j, i]`` as read by SimpleITK; nnU-Net sees them in the same index order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import PerfusionAIError, input_error
from ..io import Geometry, read_volume, to_sitk
from ..progress import ProgressCallback, as_progress

#: nnU-Net label names of the project's lobes (values = ARCHITECTURE.md lobe labels).
NNUNET_LABELS = {"background": 0, "RUL": 1, "RML": 2, "RLL": 3, "LUL": 4, "lingula": 5, "LLL": 6}
TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"
META_FILE = "perfusionai_lobes.json"
SPLIT_FILE = "perfusionai_split.json"
DEFAULT_ORIENTATION = "LPS"


def _require_nnunet():
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise PerfusionAIError("nnU-Net v2 is not installed: pip install nnunetv2 (with the torch of this "
                               "installation)") from None


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
        raise input_error("--dataset-id", f"must be 1-999 (nnU-Net uses three digits), got {dataset_id}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise input_error("--name", f"dataset name {name!r} may only contain letters, digits, '-' and '_'")
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
        Convention of the label files (see :mod:`perfusionai.prm.lobes_import`); labels are
        converted to the project's 1-6.
    orientation
        Images and labels are reoriented (axis permutation/flip only, no resampling) to this
        orientation so that nnU-Net sees every case the same way; prediction does the same.

    Also writes ``perfusionai_split.json`` (train/val/test subjects: the PRM network's split), used
    as nnU-Net's fold 0 by :func:`train_nnunet`. Returns the dataset folder.
    """
    import SimpleITK as sitk
    from ..prm.lobes_import import import_lobes

    report = as_progress(progress)
    folder_name = dataset_folder_name(dataset_id, name)
    train = [c for c in cases if c.get("split", "train") in ("train", "val")]
    if len(train) < 2:
        raise input_error("--cohort", f"nnU-Net needs at least 2 training cases with lobes, got {len(train)}")
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
            from ..phantoms import PHANTOM_COHORT_MARKER

            (stage / PHANTOM_COHORT_MARKER).write_text('{"phantom": true}\n')
        (stage / SPLIT_FILE).write_text(json.dumps({**split, "orientation": orientation,
                                                    "label_convention_of_source": label_convention}, indent=2))
    return out / folder_name


# ---------------------------------------------------------------------------------------- training


@dataclass
class NNUNetTrainingConfig:
    """Short or full nnU-Net training settings (nnU-Net's defaults: 1000 epochs x 250 iterations)."""

    configuration: str = "3d_fullres"
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


def train_nnunet(raw_dataset: str | Path, out_model: str | Path, config: Optional[NNUNetTrainingConfig] = None,
                 work_dir: Optional[str | Path] = None, progress: Optional[ProgressCallback] = None) -> Path:
    """Plan, preprocess and train nnU-Net on a raw dataset; pack the model as a folder or ``.zip``.

    Parameters
    ----------
    raw_dataset
        ``.../DatasetXXX_Name`` written by :func:`export_nnunet_dataset` (or any nnU-Net raw dataset
        with the project's lobe labels).
    out_model
        Output model folder, or a path ending in ``.zip`` (nnU-Net's export format).
    work_dir
        Where nnU-Net's preprocessed and results folders live during training (default: a
        temporary folder removed afterwards).
    """
    _require_nnunet()
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from ..nn import choose_device, seed_everything, set_threads

    cfg = config or NNUNetTrainingConfig()
    report = as_progress(progress)
    raw = Path(raw_dataset).resolve()
    if not (raw / "dataset.json").is_file():
        raise input_error(raw, "no dataset.json: not an nnU-Net raw dataset (run 'perfusionai lobes export-nnunet')")
    dataset_id, dataset_name = _dataset_id_from_folder(raw)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    _check_labels(dataset_json.get("labels", {}), raw / "dataset.json")
    device = choose_device(cfg.device)
    set_threads()
    seed_everything(cfg.seed)
    tmp_root = Path(tempfile.mkdtemp(prefix="perfusionai-nnunet-", dir=work_dir))
    raw_root = tmp_root / "raw"
    raw_root.mkdir()
    os.symlink(raw, raw_root / dataset_name)
    pre_root, res_root = tmp_root / "preprocessed", tmp_root / "results"
    started = time.perf_counter()
    try:
        with nnunet_environment(raw_root, pre_root, res_root):
            report(0.02, "nnU-Net: dataset fingerprint")
            extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False,
                                 show_progress_bar=False)
            report(0.06, "nnU-Net: experiment planning")
            plans_id = plan_experiments([dataset_id])
            plans_file = pre_root / dataset_name / f"{plans_id}.json"
            plans = json.loads(plans_file.read_text())
            if cfg.configuration not in plans["configurations"]:
                raise input_error("--configuration", f"nnU-Net planned {', '.join(plans['configurations'])} for "
                                                     f"this dataset, not {cfg.configuration}")
            conf = plans["configurations"][cfg.configuration]
            if cfg.patch_size is not None:
                conf["patch_size"] = [int(p) for p in cfg.patch_size]
            if cfg.batch_size is not None:
                conf["batch_size"] = int(cfg.batch_size)
            plans_file.write_text(json.dumps(plans, indent=2))
            report(0.10, "nnU-Net: preprocessing")
            preprocess([dataset_id], plans_id, configurations=(cfg.configuration,), num_processes=(1,),
                       verbose=False, show_progress_bar=False)
            split_path = raw / SPLIT_FILE
            if split_path.is_file() and cfg.fold != "all" and int(cfg.fold) == 0:
                # fold 0 is the cohort's own train/val split; folds 1-4 are nnU-Net's 5-fold split
                split = json.loads(split_path.read_text())
                if split.get("train") and split.get("val"):
                    folds = [{"train": split["train"], "val": split["val"]}]
                    (pre_root / dataset_name / "splits_final.json").write_text(json.dumps(folds))
            plans = json.loads(plans_file.read_text())
            plans["continue_training"] = False
            ds_json = json.loads((pre_root / dataset_name / "dataset.json").read_text())
            fold = cfg.fold if cfg.fold == "all" else int(cfg.fold)
            trainer = nnUNetTrainer(plans=plans, configuration=cfg.configuration, fold=fold,
                                    dataset_json=ds_json, device=device)
            # Shorten nnU-Net's schedule through the standard trainer's own attributes.
            trainer.num_epochs = int(cfg.epochs)
            trainer.num_iterations_per_epoch = int(cfg.iterations_per_epoch)
            trainer.num_val_iterations_per_epoch = int(cfg.val_iterations_per_epoch)
            if cfg.initial_lr is not None:
                trainer.initial_lr = float(cfg.initial_lr)
            report(0.15, f"nnU-Net: training {cfg.epochs} epochs on {device.type}")
            set_threads()
            with nnunet_environment(raw_root, pre_root, res_root, augmentation_processes=0):
                trainer.run_training()
            if cfg.validate:
                trainer.perform_actual_validation(False)
            model_src = Path(trainer.output_folder_base)
            meta = {"labels": NNUNET_LABELS, "channel_names": ds_json.get("channel_names", {}),
                    "orientation": json.loads(split_path.read_text()).get("orientation", DEFAULT_ORIENTATION)
                    if split_path.is_file() else DEFAULT_ORIENTATION,
                    "trained_on_phantoms": bool(cfg.trained_on_phantoms),
                    "training": {"configuration": cfg.configuration, "fold": str(cfg.fold), "epochs": cfg.epochs,
                                 "iterations_per_epoch": cfg.iterations_per_epoch,
                                 "patch_size": conf.get("patch_size"), "batch_size": conf.get("batch_size"),
                                 "device": str(device), "seconds": round(time.perf_counter() - started, 1),
                                 "nnunetv2": _nnunet_version(), "torch": torch.__version__},
                    "dataset": dataset_name}
            (model_src / META_FILE).write_text(json.dumps(meta, indent=2))
            report(0.95, "packing the model")
            out = Path(out_model)
            if out.suffix.lower() == ".zip":
                _write_zip(model_src, out, relative_to=res_root)
            else:
                from ..io import atomic_output_dir

                with atomic_output_dir(out) as stage:
                    for item in model_src.iterdir():
                        if item.is_dir():
                            shutil.copytree(item, stage / item.name)
                        else:
                            shutil.copy2(item, stage / item.name)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report(1.0, "nnU-Net model written")
    return Path(out_model)


def _nnunet_version() -> str:
    try:
        from importlib.metadata import version
        return version("nnunetv2")
    except Exception:
        return "unknown"


def _write_zip(model_dir: Path, out: Path, relative_to: Optional[Path] = None) -> None:
    """Zip the model folder's inference files (checkpoints, plans, dataset.json, fingerprint,
    our metadata), written atomically. Paths are relative to ``relative_to`` (nnU-Net's results
    folder gives nnU-Net's export layout ``DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres/...``,
    which ``nnUNetv2_install_pretrained_model_from_zip`` installs) or to the model folder itself."""
    base = Path(relative_to) if relative_to is not None else model_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(model_dir.rglob("*")):
                if p.is_file() and (p.suffix in (".json", ".pth") or p.name == "progress.png"):
                    zf.write(p, p.relative_to(base).as_posix())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- model folders


def _check_labels(labels: dict, where) -> None:
    """Refuse a label set that is not the project's six lobes."""
    try:
        values = {str(k): int(v) for k, v in labels.items()}
    except (TypeError, ValueError, AttributeError):
        raise input_error(where, f"labels {labels!r} are not name: integer pairs (region-based models are not "
                                 "lobe models)") from None
    expected = set(NNUNET_LABELS.values())
    if set(values.values()) != expected or len(values) != len(expected):
        found = ", ".join(f"{k}={v}" for k, v in sorted(values.items(), key=lambda kv: kv[1]))
        want = ", ".join(f"{k}={v}" for k, v in NNUNET_LABELS.items())
        raise input_error(where, f"wrong label set for a lobe model: found {found}; expected {want}")


@dataclass
class LobeModel:
    """A checked nnU-Net lobe model folder (``path``) and its metadata."""

    path: Path
    folds: tuple
    meta: dict
    dataset_json: dict
    _tmp: Optional[Path] = None

    @property
    def trained_on_phantoms(self) -> bool:
        return bool(self.meta.get("trained_on_phantoms", False))

    @property
    def orientation(self) -> str:
        return str(self.meta.get("orientation", DEFAULT_ORIENTATION))

    def label(self) -> str:
        return "nnU-Net lobes" + (" (trained on phantoms)" if self.trained_on_phantoms else "")

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _find_model_root(root: Path) -> Path:
    """The folder holding plans.json + dataset.json (the root itself or one level below, or the
    nnU-Net results layout Dataset/Trainer__Plans__conf)."""
    candidates = [p.parent for p in root.rglob("plans.json") if (p.parent / "dataset.json").is_file()]
    candidates = [c for c in candidates if len(c.relative_to(root).parts) <= 3]
    if not candidates:
        raise input_error(root, "not an nnU-Net model: no folder with plans.json and dataset.json")
    if len(candidates) > 1:
        raise input_error(root, f"contains {len(candidates)} nnU-Net models; give one of "
                                f"{', '.join(str(c) for c in candidates)}")
    return candidates[0]


def open_lobe_model(path: str | Path, folds: Sequence[int | str] = (0,), checkpoint: str = "checkpoint_final.pth"
                    ) -> LobeModel:
    """Open and check a lobe model folder or zip.

    Refuses (with :class:`PerfusionAIError` naming the model) a missing path, a zip or folder
    without ``plans.json``/``dataset.json``, a label set other than the six lobes, and any
    requested fold without ``fold_X/<checkpoint>`` (the available folds are listed).
    """
    p = Path(path)
    if not p.exists():
        raise input_error(p, "lobe model not found (expected an nnU-Net model folder or .zip)")
    tmp = None
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise input_error(p, "not a folder or a .zip file")
        tmp = Path(tempfile.mkdtemp(prefix="perfusionai-lobemodel-"))
        with zipfile.ZipFile(p) as zf:
            for member in zf.namelist():
                target = (tmp / member).resolve()
                if not str(target).startswith(str(tmp.resolve())):
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise input_error(p, f"unsafe path {member!r} in the zip")
            zf.extractall(tmp)
        root = tmp
    else:
        root = p
    try:
        model_dir = _find_model_root(root)
        try:
            dataset_json = json.loads((model_dir / "dataset.json").read_text())
        except json.JSONDecodeError as exc:
            raise input_error(p, f"dataset.json is not valid JSON ({exc})") from None
        _check_labels(dataset_json.get("labels", {}), f"{p} (dataset.json)")
        available = sorted(d.name[5:] for d in model_dir.glob("fold_*") if (d / checkpoint).is_file())
        wanted = [str(f) for f in folds]
        missing = [f for f in wanted if f not in available]
        if missing:
            raise input_error(p, f"fold {', '.join(missing)} missing (no fold_{missing[0]}/{checkpoint}); "
                                 f"available folds: {', '.join(available) or 'none'}")
        meta_path = model_dir / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fold_values = tuple(f if f == "all" else int(f) for f in wanted)
    return LobeModel(model_dir, fold_values, meta, dataset_json, tmp)


# ---------------------------------------------------------------------------------------- prediction


@dataclass
class LobeSegmentation:
    """``lobes``: ``[k, j, i]`` uint8 lobes 1-6 on the input grid; ``lung``: 1 right, 2 left."""

    lobes: np.ndarray
    geometry: Geometry
    model: str
    seconds: float

    @property
    def lung_labels(self) -> np.ndarray:
        return np.where(np.isin(self.lobes, (1, 2, 3)), 1, np.where(np.isin(self.lobes, (4, 5, 6)), 2, 0)
                        ).astype(np.uint8)


def segment_lobes(image: str | Path | tuple, model: str | Path | LobeModel, folds: Sequence[int | str] = (0,),
                  device: str = "auto", tile_step_size: float = 0.5, use_mirroring: bool = False,
                  progress: Optional[ProgressCallback] = None) -> LobeSegmentation:
    """Segment the lobes of one VIBE volume with ``nnUNetPredictor``; the result is on the input grid.

    Parameters
    ----------
    image
        A file path, or ``(array [k, j, i], Geometry)``.
    model
        Model folder/zip (opened and checked with :func:`open_lobe_model`) or an opened :class:`LobeModel`.
    folds
        Folds to ensemble (default fold 0).
    use_mirroring
        nnU-Net's mirroring test-time augmentation (up to 8x slower on CPU).

    The image is reoriented (axis permutation/flip, no resampling) to the orientation of the
    training images, predicted, and the labels are reoriented back, so any direction matrix works.
    """
    import SimpleITK as sitk

    report = as_progress(progress)
    owned = not isinstance(model, LobeModel)
    # check the model (labels, folds) before the slow nnU-Net import
    lobe_model = open_lobe_model(model, folds) if owned else model
    try:
        _require_nnunet()
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from ..nn import choose_device, set_threads

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
        dev = choose_device(device)
        if dev.type == "cpu":
            set_threads()
        started = time.perf_counter()
        report(0.05, "loading the nnU-Net lobe model")
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        with nnunet_environment():
            predictor.initialize_from_trained_model_folder(str(lobe_model.path), use_folds=lobe_model.folds,
                                                           checkpoint_name="checkpoint_final.pth")
            report(0.2, "predicting lobes")
            threads = torch.get_num_threads()
            try:
                seg = predictor.predict_single_npy_array(arr, props, None, None, False)
            finally:
                torch.set_num_threads(threads)
        seg_img = sitk.GetImageFromArray(np.asarray(seg, dtype=np.uint8))
        seg_img.CopyInformation(img_o)
        back = _reorient(seg_img, original)
        lobes = sitk.GetArrayFromImage(back).astype(np.uint8)
        if lobes.shape != tuple(geometry.shape):
            raise RuntimeError(f"nnU-Net returned shape {lobes.shape}, input {geometry.shape}")
        report(1.0, "lobes segmented")
        return LobeSegmentation(lobes, geometry, lobe_model.label(), time.perf_counter() - started)
    finally:
        if owned:
            lobe_model.close()
