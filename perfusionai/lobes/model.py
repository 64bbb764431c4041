"""Lobe model files: nnU-Net v2 networks in the project's model-file format (never a pickle).

A lobe model is a :mod:`perfusionai.nn.modelfile` model (``model.json`` + ``weights.safetensors``,
a folder or a ``.zip``). The card's architecture ``lobes.nnunet`` carries everything
``nnUNetPredictor`` needs, as JSON::

    "architecture": {"name": "lobes.nnunet", "hyperparameters": {
        "plans": {...nnU-Net plans.json...}, "dataset_json": {...dataset.json...},
        "trainer_name": "nnUNetTrainer",
        "configurations": {"3d_fullres": ["0"], "3d_cpu": ["0"]}}}      # trained folds
    "inputs": {"channel_names": {"0": "VIBE"}, "orientation": "LPS", "labels": {...}}
    "nnunet": {"mirroring_axes": {"3d_fullres": [0, 1, 2], ...}, "nnunetv2": "2.x", "training": {...}}

The safetensors file holds one tensor set per configuration and fold (``<configuration>-fold_<f>.<name>``).
:func:`load_lobe_model` rebuilds the U-Nets from the plans (the architecture class must be one of
``dynamic_network_architectures``, its building blocks ``torch.nn`` classes: a plans file cannot
name any other callable), checks the stored tensors against them (modelfile), and
:meth:`LobeModel.predictor` hands them to ``nnUNetPredictor.manual_initialization``, so nothing
is ever unpickled.

An nnU-Net training folder from elsewhere (``fold_X/checkpoint_final.pth``: a pickle) is converted
once by :func:`import_nnunet_folder` (``perfusionai lobes import-model``): its checkpoints are read
with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which refuses every global
other than tensors, containers and plain values; a checkpoint that would run code is refused
before anything of it runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..deps import require
from ..errors import PerfusionAIError, ParameterError, input_error

ARCHITECTURE = "lobes.nnunet"
#: nnU-Net label names of the project's lobes (values = ARCHITECTURE.md lobe labels).
NNUNET_LABELS = {"background": 0, "RUL": 1, "RML": 2, "RLL": 3, "LUL": 4, "lingula": 5, "LLL": 6}
DEFAULT_ORIENTATION = "LPS"
#: the PerfusionAI CPU configuration: 3d_fullres at twice the in-plane spacing (see nnunet.add_cpu_configuration)
CPU_CONFIGURATION = "3d_cpu"
FULL_CONFIGURATION = "3d_fullres"
_ARCH_PREFIX = "dynamic_network_architectures.architectures."
_IMPORT_PREFIX = "torch.nn."
PURPOSE = "nnU-Net lobe segmentation"


def _nnunet():
    """Import nnunetv2 (and torch) or raise one line naming the ``[lobes]`` extra."""
    from ..deps import available, install_hint
    from ..errors import MissingDependency

    if not available("torch"):
        raise MissingDependency(f"{PURPOSE} needs torch and nnunetv2, which are not installed; install them with: "
                                f"{install_hint('lobes')}")
    return require("nnunetv2", PURPOSE)


def check_labels(labels, where) -> None:
    """Refuse a label set that is not the project's six lobes (``where`` names the file)."""
    try:
        values = {str(k): int(v) for k, v in dict(labels).items()}
    except (TypeError, ValueError, AttributeError):
        raise input_error(where, f"labels {labels!r} are not name: integer pairs (region-based models are not "
                                 "lobe models)") from None
    expected = set(NNUNET_LABELS.values())
    if set(values.values()) != expected or len(values) != len(expected):
        found = ", ".join(f"{k}={v}" for k, v in sorted(values.items(), key=lambda kv: kv[1]))
        want = ", ".join(f"{k}={v}" for k, v in NNUNET_LABELS.items())
        raise input_error(where, f"wrong label set for a lobe model: found {found}; expected {want}")


def _check_architecture(plans: Mapping, configuration: str, where) -> None:
    """The network a plans file asks for must be a dynamic_network_architectures class built from
    torch.nn blocks (nnU-Net resolves these names with pydoc.locate: any other name could be a
    callable that runs code)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        conf = PlansManager(dict(plans)).get_configuration(configuration)
        arch_class = str(conf.network_arch_class_name)
        kwargs = dict(conf.network_arch_init_kwargs)
        needs_import = list(conf.network_arch_init_kwargs_req_import)
    except Exception as exc:  # malformed plans: name the file
        raise input_error(where, f"plans of configuration {configuration!r} are not readable ({exc})") from None
    if not arch_class.startswith(_ARCH_PREFIX):
        raise input_error(where, f"network class {arch_class!r} is not one of dynamic_network_architectures; "
                                 "refusing to import it")
    for key in needs_import:
        value = kwargs.get(key)
        if value is not None and not str(value).startswith(_IMPORT_PREFIX):
            raise input_error(where, f"network option {key}={value!r} is not a torch.nn class; refusing to import it")


def build_nnunet_networks(plans: dict, dataset_json: dict, trainer_name: str, configurations: dict):
    """``torch.nn.ModuleDict`` of one nnU-Net network per ``configurations[name]`` fold, keyed
    ``"<configuration>-fold_<f>"``; the architecture builder of ``lobes.nnunet`` model files."""
    _nnunet()
    from torch import nn
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    check_labels(dataset_json.get("labels", {}), "dataset.json of the model")
    manager = PlansManager(dict(plans))
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    nets = nn.ModuleDict()
    for configuration, folds in dict(configurations).items():
        if configuration not in plans.get("configurations", {}):
            raise ValueError(f"configuration {configuration!r} is not in the plans")
        _check_architecture(plans, configuration, "plans of the model")
        conf = manager.get_configuration(configuration)
        channels = determine_num_input_channels(manager, conf, dataset_json)
        for fold in folds:
            # the network of nnUNetTrainer.build_network_architecture (inference: no deep supervision)
            nets[f"{configuration}-fold_{fold}"] = get_network_from_plans(
                conf.network_arch_class_name, conf.network_arch_init_kwargs,
                conf.network_arch_init_kwargs_req_import, channels, heads, allow_init=False,
                deep_supervision=False)
    return nets


BUILDERS = {ARCHITECTURE: build_nnunet_networks}


def save_lobe_model(out: str | Path, plans: dict, dataset_json: dict, configurations: Mapping[str, Mapping[str, dict]],
                    trainer_name: str = "nnUNetTrainer", mirroring_axes: Optional[Mapping[str, Sequence[int]]] = None,
                    orientation: str = DEFAULT_ORIENTATION, trained_on_phantoms: bool = False,
                    training_data: str | dict = "", extra: Optional[dict] = None) -> Path:
    """Write a lobe model file (folder, or ``.zip`` when ``out`` ends so).

    ``configurations`` maps a configuration name to ``{fold: state_dict}`` (nnU-Net's
    ``network_weights``); ``mirroring_axes`` the axes nnU-Net allows for mirroring per configuration.
    """
    _nnunet()
    from ..nn.modelfile import save_model

    check_labels(dataset_json.get("labels", {}), "dataset.json")
    folds = {c: [str(f) for f in states] for c, states in configurations.items()}
    nets = build_nnunet_networks(plans, dataset_json, trainer_name, folds)
    for c, states in configurations.items():
        for f, state in states.items():
            try:
                nets[f"{c}-fold_{f}"].load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise PerfusionAIError(f"configuration {c} fold {f}: the weights do not fit the network of its "
                                       f"plans ({str(exc).splitlines()[0]})") from None
    import nnunetv2  # noqa: F401  (version for the card)

    card = {
        "architecture": {"name": ARCHITECTURE, "hyperparameters": {
            "plans": plans, "dataset_json": dataset_json, "trainer_name": str(trainer_name), "configurations": folds}},
        "inputs": {"channel_names": dataset_json.get("channel_names", {}), "orientation": str(orientation),
                   "labels": dict(NNUNET_LABELS), "axis_order": "[k, j, i] as read by SimpleITK"},
        "outputs": {"labels": {str(v): k for k, v in NNUNET_LABELS.items()}},
        "training_data": training_data or "unknown",
        "trained_on_phantoms": bool(trained_on_phantoms),
        "nnunet": {"mirroring_axes": {c: (list(a) if a is not None else None)
                                      for c, a in (mirroring_axes or {}).items()},
                   "nnunetv2": _nnunet_version(), **(extra or {})},
    }
    return save_model(out, nets, card, builders=BUILDERS)


def _nnunet_version() -> str:
    try:
        from importlib.metadata import version
        return version("nnunetv2")
    except Exception:
        return "unknown"


@dataclass
class LobeModel:
    """A loaded lobe model file: the networks, the card and what nnU-Net needs to predict."""

    path: Path
    networks: object            # torch.nn.ModuleDict "<configuration>-fold_<f>" -> network
    card: dict

    @property
    def hyper(self) -> dict:
        return self.card["architecture"]["hyperparameters"]

    @property
    def configurations(self) -> dict:
        """``{configuration: [folds]}`` stored in the file."""
        return {c: [str(f) for f in folds] for c, folds in self.hyper["configurations"].items()}

    @property
    def trained_on_phantoms(self) -> bool:
        return bool(self.card.get("trained_on_phantoms", False))

    @property
    def orientation(self) -> str:
        return str(self.card.get("inputs", {}).get("orientation", DEFAULT_ORIENTATION))

    def label(self, configuration: Optional[str] = None) -> str:
        conf = f" {configuration}" if configuration else ""
        return f"nnU-Net lobes{conf}" + (" (trained on phantoms)" if self.trained_on_phantoms else "")

    def check(self, configuration: str, folds: Sequence[str]) -> None:
        """Refuse a configuration or fold the file does not hold (ParameterError naming the parameter)."""
        available = self.configurations
        if configuration not in available:
            raise ParameterError("configuration", f"{self.path} holds {', '.join(sorted(available))}, not "
                                                  f"{configuration}")
        missing = [str(f) for f in folds if str(f) not in available[configuration]]
        if missing:
            raise ParameterError("folds", f"fold {', '.join(missing)} missing in {self.path} ({configuration}); "
                                          f"available folds: {', '.join(available[configuration]) or 'none'}")

    def predictor(self, configuration: str, folds: Sequence[str], device, tile_step_size: float = 0.5,
                  use_mirroring: bool = False):
        """An ``nnUNetPredictor`` set up with :meth:`nnUNetPredictor.manual_initialization` (no checkpoint)."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.check(configuration, folds)
        manager = PlansManager(self.hyper["plans"])
        conf = manager.get_configuration(configuration)
        nets = [self.networks[f"{configuration}-fold_{f}"] for f in folds]
        parameters = [n.state_dict() for n in nets]
        axes = self.card.get("nnunet", {}).get("mirroring_axes", {}).get(configuration)
        with contextlib.redirect_stdout(io.StringIO()):   # nnU-Net prints a CPU notice on stdout
            predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                        use_mirroring=use_mirroring, perform_everything_on_device=device.type == "cuda",
                                        device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(nets[0], manager, conf, parameters, self.hyper["dataset_json"],
                                        self.hyper["trainer_name"], tuple(axes) if axes is not None else None)
        return predictor


def _refuse_nnunet_folder(p: Path) -> None:
    """A path that is an nnU-Net training folder (pickled checkpoints) is refused before anything is read."""
    pth = [q for q in (p.rglob("*.pth") if p.is_dir() else ()) if q.is_file()]
    if p.is_dir() and (pth or (p / "plans.json").is_file()):
        raise input_error(p, "an nnU-Net training folder (pickled .pth checkpoints), not a PerfusionAI lobe model; "
                             "convert it once with 'perfusionai lobes import-model --nnunet-folder "
                             f"{p} --out MODEL'")
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
        if any(n.endswith(".pth") for n in names) and not any(n.split("/")[-1] == "model.json" for n in names):
            raise input_error(p, "an nnU-Net model zip (pickled .pth checkpoints), not a PerfusionAI lobe model; "
                                 "convert it once with 'perfusionai lobes import-model --nnunet-folder "
                                 f"{p} --out MODEL'")


def load_lobe_model(path: str | Path, device="cpu") -> LobeModel:
    """Load and verify a lobe model file (modelfile checks: card, sha256, tensors against the
    architecture rebuilt from the plans). nnU-Net training folders and zips are refused with the
    ``lobes import-model`` command that converts them; nothing is unpickled."""
    p = Path(path)
    if not p.exists():
        raise input_error(p, "lobe model not found (expected a PerfusionAI lobe model folder or .zip)")
    _refuse_nnunet_folder(p)
    _nnunet()
    from ..nn.modelfile import load_model, read_card

    card = read_card(p)
    hyper = card.get("architecture", {}).get("hyperparameters", {}) if isinstance(card.get("architecture"), dict) else {}
    if card.get("architecture", {}).get("name") != ARCHITECTURE:
        raise input_error(p, f"not a lobe model: its architecture is {card.get('architecture', {}).get('name')!r}, "
                             f"not {ARCHITECTURE!r}")
    if not isinstance(hyper, dict) or not {"plans", "dataset_json", "configurations"} <= set(hyper):
        raise input_error(p, "lobe model card lacks plans, dataset_json or configurations")
    check_labels(hyper["dataset_json"].get("labels", {}), f"{p} (model.json dataset_json)")
    for configuration in hyper["configurations"]:
        _check_architecture(hyper["plans"], configuration, f"{p} (model.json plans)")
    networks, card = load_model(p, expected_architecture=ARCHITECTURE, builders=BUILDERS, device=device)
    return LobeModel(p, networks, card)


# ---------------------------------------------------------------------------------------- import


def read_checkpoint_restricted(path: Path) -> dict:
    """``torch.load(path, weights_only=True)``: PyTorch's restricted unpickler (tensors, containers,
    numbers, strings; every other global refused before it is called). Raises PerfusionAIError
    naming the file when the pickle needs anything else."""
    torch = require("torch", PURPOSE)
    import numpy as np

    # nnU-Net's training log holds numpy scalars; numpy's scalar reconstructor builds a number from
    # its dtype and raw bytes (data only), so it and the numeric dtypes are the only globals added
    # to PyTorch's restricted set
    numeric = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType,
               np.dtypes.Float16DType, np.dtypes.Int64DType, np.dtypes.Int32DType, np.dtypes.BoolDType]
    try:
        with torch.serialization.safe_globals(numeric):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "global" in line.lower()), first[0] if first else "")
        raise input_error(path, f"refused: the checkpoint's pickle asks for more than tensors and plain values "
                                f"({detail[:160]}); it could run code, nothing of it was run") from None
    except Exception as exc:  # truncated or not a torch file
        raise input_error(path, f"not a readable nnU-Net checkpoint ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise input_error(path, "not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


def _model_roots(root: Path) -> list[Path]:
    """Folders holding plans.json + dataset.json + fold_*/ (an nnU-Net trained model folder), up to
    three levels below ``root`` (nnU-Net's results layout Dataset/Trainer__Plans__conf)."""
    found = [p.parent for p in root.rglob("plans.json") if (p.parent / "dataset.json").is_file()]
    return sorted(c for c in found if len(c.relative_to(root).parts) <= 3)


def import_nnunet_folder(folder: str | Path, out: str | Path, folds: Optional[Sequence[str]] = None,
                         checkpoint: str = "checkpoint_final.pth", trained_on_phantoms: bool = False,
                         orientation: Optional[str] = None) -> Path:
    """Convert an nnU-Net trained model folder (or nnU-Net export zip, or a results folder with one
    model per configuration) into a lobe model file at ``out``.

    Every ``fold_X/<checkpoint>`` (or the ``folds`` given) of every configuration found is read
    with :func:`read_checkpoint_restricted`. ``perfusionai_lobes.json`` (written by older
    PerfusionAI versions) supplies the orientation and the phantom flag when present.
    """
    _nnunet()
    src = Path(folder)
    if not src.exists():
        raise input_error(src, "nnU-Net model folder not found")
    tmp = None
    try:
        if src.is_file():
            if not zipfile.is_zipfile(src):
                raise input_error(src, "not a folder or a .zip file")
            tmp = Path(tempfile.mkdtemp(prefix="perfusionai-lobeimport-"))
            with zipfile.ZipFile(src) as zf:
                for member in zf.namelist():
                    target = (tmp / member).resolve()
                    if not str(target).startswith(str(tmp.resolve())):
                        raise input_error(src, f"unsafe path {member!r} in the zip")
                zf.extractall(tmp)
            root = tmp
        else:
            root = src
        roots = _model_roots(root)
        if not roots:
            raise input_error(src, "not an nnU-Net model: no folder with plans.json and dataset.json")
        plans = dataset_json = None
        configurations: dict = {}
        axes: dict = {}
        trainer_name = None
        meta: dict = {}
        for model_dir in roots:
            try:
                this_plans = json.loads((model_dir / "plans.json").read_text())
                this_ds = json.loads((model_dir / "dataset.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise input_error(model_dir, f"plans.json or dataset.json is not valid JSON ({exc})") from None
            check_labels(this_ds.get("labels", {}), model_dir / "dataset.json")
            if plans is None:
                plans, dataset_json = this_plans, this_ds
            elif this_ds.get("labels") != dataset_json.get("labels") or \
                    this_plans.get("dataset_name") != plans.get("dataset_name"):
                raise input_error(model_dir, f"belongs to another dataset than {roots[0]}; import one model at a time")
            else:
                plans["configurations"].update(this_plans.get("configurations", {}))
            if (model_dir / "perfusionai_lobes.json").is_file():
                meta = json.loads((model_dir / "perfusionai_lobes.json").read_text())
            available = sorted(d.name[5:] for d in model_dir.glob("fold_*") if (d / checkpoint).is_file())
            wanted = [str(f) for f in folds] if folds else available
            missing = [f for f in wanted if f not in available]
            if missing or not wanted:
                raise input_error(model_dir, f"fold {', '.join(missing) or '?'} missing (no fold_X/{checkpoint}); "
                                             f"available folds: {', '.join(available) or 'none'}")
            for f in wanted:
                ckpt = read_checkpoint_restricted(model_dir / f"fold_{f}" / checkpoint)
                init = ckpt.get("init_args") or {}
                configuration = str(init.get("configuration") or model_dir.name.split("__")[-1])
                if configuration not in this_plans.get("configurations", {}):
                    raise input_error(model_dir / f"fold_{f}" / checkpoint,
                                      f"configuration {configuration!r} is not in plans.json")
                _check_architecture(this_plans, configuration, model_dir / "plans.json")
                name = str(ckpt.get("trainer_name", "nnUNetTrainer"))
                if trainer_name is None:
                    trainer_name = name
                configurations.setdefault(configuration, {})[f] = ckpt["network_weights"]
                mirror = ckpt.get("inference_allowed_mirroring_axes")
                axes[configuration] = list(mirror) if mirror is not None else None
        return save_lobe_model(
            out, plans, dataset_json, configurations, trainer_name or "nnUNetTrainer", axes,
            orientation=orientation or meta.get("orientation", DEFAULT_ORIENTATION),
            trained_on_phantoms=bool(trained_on_phantoms or meta.get("trained_on_phantoms", False)),
            training_data=meta.get("dataset") or f"imported from the nnU-Net folder {src.name}",
            extra={"imported_from": str(src), "training": meta.get("training", {})})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
