"""Model files: ``weights.safetensors`` + ``model.json``, in a directory or a zip.

``model.json`` (the model card) holds everything needed to rebuild and to
trust the network without executing anything from the file::

    {
      "format": "perfusionai-model", "format_version": 1,
      "architecture": {"name": "dsc.phae", "hyperparameters": {...}},
      "inputs": {...},             # what the network eats and how it is normalised
      "outputs": {...},            # optional
      "training_data": "...",      # free text or dict
      "trained_on_phantoms": true, # shown as "trained on phantoms" wherever used
      "metrics": {...},
      "package_version": "0.1.0", "torch_version": "...", "created_utc": "...",
      "weights": {"file": "weights.safetensors", "sha256": "...", "parameters": n, "tensors": m}
    }

Loading checks, in order: both files present, JSON readable and of a known
format version, the sha256 of the weights, the architecture name known to the
registry (and the expected one), the hyperparameters rebuilding a network
whose state dict has exactly the stored names and shapes, and the caller's
``expected_inputs`` (e.g. the number of frames). Any mismatch raises
:class:`perfusionai.errors.PerfusionAIError` naming the file. Weights are read
with safetensors only: no pickle, no ``torch.load``.

Models that are not networks (linear coefficients, decision-tree ensembles of the
diffusion-relaxation learners) use the same two files and the same card through
:func:`save_arrays` / :func:`load_arrays`: their parameters are named numpy arrays in
``weights.safetensors`` (``"weights": {"kind": "arrays", ...}``), checked by sha256,
name and shape on load. This module imports torch only for networks.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from ..deps import require
from ..errors import input_error

FORMAT_NAME = "perfusionai-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"
PHANTOM_LABEL = "trained on phantoms"

Builder = Callable[..., Any]
ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str, builder: Optional[Builder] = None):
    """Register ``builder(**hyperparameters) -> nn.Module`` under ``name``.

    Usable as a decorator (``@register_architecture("dsc.phae")``) or a call.
    Names are dotted module paths below ``perfusionai`` (``"dsc.phae"`` is registered
    by ``perfusionai.dsc.phae``; ``"dsc.tmaxnet.conv2"`` by ``perfusionai.dsc.tmaxnet``)
    so that :func:`load_model` can import the module of a network that was not
    imported yet. Hyperparameters must be JSON values.
    """
    def decorate(fn: Builder) -> Builder:
        ARCHITECTURES[name] = fn
        return fn

    return decorate(builder) if builder is not None else decorate


def build_model(name: str, builders: Optional[Mapping[str, Builder]] = None, **hyperparameters) -> Any:
    """Build a registered architecture and remember its name and hyperparameters
    on the module (``model.architecture``) so :func:`save_model` can record them."""
    registry = builders if builders is not None else ARCHITECTURES
    if name not in registry:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(registry)}")
    model = registry[name](**hyperparameters)
    model.architecture = {"name": name, "hyperparameters": _jsonable(hyperparameters)}
    return model


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("perfusionai")
    except Exception:
        try:
            from .. import __version__
            return str(__version__)
        except Exception:
            return "unknown"


def is_trained_on_phantoms(card: Mapping[str, Any]) -> bool:
    return bool(card.get("trained_on_phantoms", False))


def model_label(card: Mapping[str, Any]) -> str:
    """Short label for summaries and Slicer: architecture name plus
    ``"trained on phantoms"`` when the card says so."""
    name = card.get("architecture", {}).get("name", "?")
    return f"{name} ({PHANTOM_LABEL})" if is_trained_on_phantoms(card) else str(name)


def _jsonable(value):
    """Round-trip through JSON so what is saved is what will be compared."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if type(o).__module__.startswith("torch") and type(o).__name__ == "device":
        return str(o)
    raise TypeError(f"not JSON serialisable in a model card: {type(o).__name__}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_bytes(model) -> tuple[bytes, dict]:
    require("safetensors", "saving a model file")
    from safetensors.torch import save

    from .training import state_dict_for_file

    state = state_dict_for_file(model)
    return save(state, metadata={"format": FORMAT_NAME}), state


def save_model(path: Union[str, os.PathLike], model, card: Mapping[str, Any],
               builders: Optional[Mapping[str, Builder]] = None) -> Path:
    """Write ``model`` and its card to ``path`` (a directory, or a ``.zip`` file).

    Parameters
    ----------
    path
        Output directory (created; existing ``weights.safetensors``/``model.json``
        replaced) or a path ending in ``.zip``. Written atomically.
    model
        The network. Its architecture comes from ``card["architecture"]`` or, when
        absent, from ``model.architecture`` (set by :func:`build_model`).
    card
        Must contain ``inputs`` (dict), ``training_data`` and
        ``trained_on_phantoms`` (bool); may contain ``outputs``, ``metrics`` and any
        other JSON-serialisable keys. Format, versions, time and the weights
        checksum are filled in here.

    The card is checked before writing: the architecture must be registered and
    rebuild exactly this state dict, so a file that saves always loads.
    """
    card = dict(card)
    arch = card.get("architecture") or getattr(model, "architecture", None)
    if not arch or "name" not in arch:
        raise ValueError("save_model needs card['architecture'] = {'name', 'hyperparameters'} "
                         "or a model made by build_model()")
    arch = {"name": str(arch["name"]), "hyperparameters": _jsonable(arch.get("hyperparameters", {}))}
    for key in ("inputs", "training_data", "trained_on_phantoms"):
        if key not in card:
            raise ValueError(f"model card is missing {key!r}")
    if not isinstance(card["trained_on_phantoms"], bool):
        raise ValueError("card['trained_on_phantoms'] must be True or False")
    data, state = _weights_bytes(model)
    registry = builders if builders is not None else ARCHITECTURES
    if arch["name"] in registry:
        rebuilt = registry[arch["name"]](**arch["hyperparameters"])
        problem = _state_mismatch(rebuilt.state_dict(), state)
        if problem:
            raise ValueError(f"architecture {arch['name']} with {arch['hyperparameters']} does not rebuild "
                             f"this model: {problem}")
    else:
        raise ValueError(f"architecture {arch['name']!r} is not registered; register its builder first")
    full = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "inputs": card.pop("inputs"),
        "outputs": card.pop("outputs", {}),
        "training_data": card.pop("training_data"),
        "trained_on_phantoms": card.pop("trained_on_phantoms"),
        "metrics": card.pop("metrics", {}),
        "package_version": package_version(),
        "torch_version": require("torch", "saving a network").__version__.split("+")[0],
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(data),
                    "parameters": int(sum(p.numel() for p in model.parameters())),
                    "tensors": len(state)},
    }
    card.pop("architecture", None)
    for key in ("format", "format_version", "package_version", "torch_version", "created_utc", "weights"):
        card.pop(key, None)
    full.update(_jsonable(card))
    text = json.dumps(_jsonable(full), indent=2) + "\n"
    return _write_model(Path(path), text, data)


def _write_model(out: Path, text: str, data: bytes) -> Path:
    """Write the card text and the weights bytes to a folder (atomically) or a ``.zip``, mode 0644."""
    if out.suffix.lower() == ".zip":
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(CARD_FILE, text)
                zf.writestr(WEIGHTS_FILE, data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a model file is shared like any output
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out
    from ..io import atomic_output_dir

    with atomic_output_dir(out) as stage:
        (stage / WEIGHTS_FILE).write_bytes(data)
        (stage / CARD_FILE).write_text(text)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_files(path: Path) -> tuple[bytes, bytes, str]:
    """Return (card bytes, weights bytes, display name of the card file)."""
    if not path.exists():
        raise input_error(path, "model not found (expected a folder or .zip with model.json and "
                                "weights.safetensors)")
    if path.is_dir():
        card_p, weights_p = path / CARD_FILE, path / WEIGHTS_FILE
        for p in (card_p, weights_p):
            if not p.is_file():
                raise input_error(path, f"not a PerfusionAI model: {p.name} is missing")
        return card_p.read_bytes(), weights_p.read_bytes(), str(card_p)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            found = {}
            for wanted in (CARD_FILE, WEIGHTS_FILE):
                matches = [n for n in names if n == wanted or (n.endswith("/" + wanted) and n.count("/") == 1)]
                if len(matches) != 1:
                    raise input_error(path, f"not a PerfusionAI model: {'no' if not matches else 'several'} "
                                            f"{wanted} in the zip")
                found[wanted] = zf.read(matches[0])
        return found[CARD_FILE], found[WEIGHTS_FILE], f"{path}!{CARD_FILE}"
    raise input_error(path, "not a PerfusionAI model: expected a folder or a .zip file")


def _state_mismatch(expected: Mapping[str, Any], stored: Mapping[str, Any]) -> str:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        return "; ".join(parts)
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(stored[key].shape):
            return f"tensor {key} has shape {tuple(stored[key].shape)}, the architecture needs {tuple(tensor.shape)}"
    return ""


def _values_match(expected, actual) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected == actual
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if isinstance(expected, int) and isinstance(actual, int):
            return expected == actual
        return math.isclose(float(expected), float(actual), rel_tol=1e-3, abs_tol=1e-9)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(_values_match(e, a) for e, a in zip(expected, actual))
    return expected == actual


def _import_network_module(name: str) -> None:
    """Import the project module that registers architecture ``name`` (``"dsc.tmaxnet.conv2"``).

    Explicit and lazy (the networks need torch; ``nn`` sits below the domains, so they are not
    imported at module level). A name from a model card only selects among these modules.
    """
    domain = name.split(".")[0]
    if name.startswith("dsc.phae"):
        from ..dsc import phae  # noqa: F401 - registers dsc.phae
    elif name.startswith("dsc.tmaxnet"):
        from ..dsc import tmaxnet  # noqa: F401 - registers dsc.tmaxnet.*
    elif domain == "ctpm":
        from ..ctpm import arnn  # noqa: F401 - registers ctpm.arnn, ctpm.attention_unet
    elif domain == "prm":
        from ..prm import mri_network  # noqa: F401 - registers prm.mri_multiseq
    elif domain == "dr":
        from ..dr import learners

        learners._register_network()


def _lookup_builder(name: str, registry: Mapping[str, Builder], default_registry: bool) -> Optional[Builder]:
    """Find a builder; for the default registry import the project module that registers the
    name, so a model file loads without the caller importing the network's module first."""
    if name in registry:
        return registry[name]
    if default_registry:
        try:
            _import_network_module(name)
        except ImportError:
            return None
        return registry.get(name)
    return None


def read_card(path: Union[str, os.PathLike]) -> dict:
    """Read and sanity-check ``model.json`` only (no weights check); for showing a
    model's description in a picker before loading it."""
    card_bytes, _, card_name = _read_files(Path(path))
    return _parse_card(card_bytes, card_name)


def _parse_card(card_bytes: bytes, card_name: str) -> dict:
    try:
        card = json.loads(card_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise input_error(card_name, f"not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT_NAME:
        raise input_error(card_name, f"not a PerfusionAI model card (format is not '{FORMAT_NAME}')")
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise input_error(card_name, f"model format version {version!r} is not supported by this PerfusionAI "
                                     f"(supports 1..{FORMAT_VERSION}); update PerfusionAI")
    for key in ("architecture", "inputs", "weights", "trained_on_phantoms"):
        if key not in card:
            raise input_error(card_name, f"model card has no '{key}'")
    arch = card["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or \
            not isinstance(arch.get("hyperparameters", {}), dict):
        raise input_error(card_name, "model card's 'architecture' is not {\"name\": ..., \"hyperparameters\": {...}}")
    if not isinstance(card["weights"], dict) or not isinstance(card["inputs"], dict):
        raise input_error(card_name, "model card's 'weights' and 'inputs' must be JSON objects")
    if not isinstance(card["trained_on_phantoms"], bool):
        raise input_error(card_name, "model card's 'trained_on_phantoms' must be true or false")
    return card


def load_model(path: Union[str, os.PathLike], expected_architecture: Union[str, Iterable[str], None] = None,
               builders: Optional[Mapping[str, Builder]] = None,
               expected_inputs: Optional[Mapping[str, Any]] = None,
               device: Any = "cpu") -> tuple[Any, dict]:
    """Load and verify a model written by :func:`save_model`.

    Parameters
    ----------
    path
        Model directory or zip.
    expected_architecture
        Architecture name (or names) the caller can use; anything else is refused.
    builders
        Architecture registry (default: the global :data:`ARCHITECTURES`).
    expected_inputs
        ``{key: value}`` pairs that must equal ``card["inputs"][key]`` (floats to
        0.1 %), e.g. ``{"n_frames": 60}``.
    device
        Where to put the network (default CPU; pass ``choose_device()`` for CUDA).

    Returns
    -------
    (model, card)
        The network in eval mode and the parsed card.
    """
    torch = require("torch", "loading a network model")
    require("safetensors", "loading a model file")
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    card_bytes, weights_bytes, card_name = _read_files(path)
    card = _parse_card(card_bytes, card_name)
    weights_name = str(path / WEIGHTS_FILE) if path.is_dir() else f"{path}!{WEIGHTS_FILE}"

    stored_sha = str(card.get("weights", {}).get("sha256", ""))
    if _sha256(weights_bytes) != stored_sha:
        raise input_error(weights_name, "the weights do not match the sha256 recorded in model.json "
                                        "(the file was changed or corrupted); refusing to load it")
    arch = card["architecture"]
    name = arch.get("name") if isinstance(arch, dict) else None
    hyper = arch.get("hyperparameters", {}) if isinstance(arch, dict) else {}
    if expected_architecture is not None:
        allowed = [expected_architecture] if isinstance(expected_architecture, str) else list(expected_architecture)
        if name not in allowed:
            raise input_error(card_name, f"the model is a '{name}' network, but this method needs "
                                         f"{' or '.join(repr(a) for a in allowed)}")
    registry = builders if builders is not None else ARCHITECTURES
    builder = _lookup_builder(str(name), registry, builders is None)
    if builder is None:
        raise input_error(card_name, f"unknown architecture '{name}' (known: {', '.join(sorted(registry)) or 'none'})")
    if not isinstance(hyper, dict):
        raise input_error(card_name, f"the architecture's hyperparameters are not a JSON object: {hyper!r}")
    try:
        model = builder(**hyper)
    except (TypeError, ValueError, RuntimeError, KeyError, OverflowError) as exc:
        raise input_error(card_name, f"hyperparameters {hyper} do not build a '{name}' network ({exc})") from None
    try:
        state = load_safetensors(weights_bytes)
    except Exception as exc:
        raise input_error(weights_name, f"not a readable safetensors file ({exc})") from None
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise input_error(weights_name, f"the weights do not fit the '{name}' architecture of model.json: {problem}")
    model.load_state_dict(state, strict=True)
    model.architecture = {"name": name, "hyperparameters": hyper}
    if expected_inputs:
        inputs = card.get("inputs", {})
        for key, value in expected_inputs.items():
            if key not in inputs:
                raise input_error(card_name, f"the model card does not state its input '{key}'")
            if not _values_match(inputs[key], value):
                raise input_error(card_name, f"the model expects {key} = {inputs[key]}, but the input has "
                                             f"{key} = {value}")
    from .device import choose_device

    model.to(choose_device(device) if not isinstance(device, torch.device) else device)
    model.eval()
    return model, card


# ---------------------------------------------------------------------------------------------
# models whose parameters are plain arrays (no network): same files, same card, same checks

ARRAYS_KIND = "arrays"


def save_arrays(path: Union[str, os.PathLike], arrays: Mapping[str, Any], card: Mapping[str, Any]) -> Path:
    """Write a model whose parameters are named numpy arrays (``weights.safetensors``) and its card.

    ``card`` needs ``architecture`` (``{"name", "hyperparameters"}``), ``inputs``, ``training_data``
    and ``trained_on_phantoms`` (bool), as for :func:`save_model`; format, versions, time and the
    weights' sha256, names and shapes are filled in here. ``path`` is a folder (written
    atomically) or a ``.zip``. Needs safetensors (no torch).
    """
    import numpy as np

    require("safetensors", "saving a model file")
    from safetensors.numpy import save as save_safetensors

    card = dict(card)
    arch = card.get("architecture")
    if not isinstance(arch, Mapping) or "name" not in arch:
        raise ValueError("save_arrays needs card['architecture'] = {'name', 'hyperparameters'}")
    for key in ("inputs", "training_data", "trained_on_phantoms"):
        if key not in card:
            raise ValueError(f"model card is missing {key!r}")
    if not isinstance(card["trained_on_phantoms"], bool):
        raise ValueError("card['trained_on_phantoms'] must be True or False")
    tensors = {str(k): np.ascontiguousarray(v) for k, v in arrays.items()}
    data = save_safetensors(tensors, metadata={"format": FORMAT_NAME})
    full = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": str(arch["name"]), "hyperparameters": _jsonable(arch.get("hyperparameters", {}))},
        "inputs": card.pop("inputs"),
        "outputs": card.pop("outputs", {}),
        "training_data": card.pop("training_data"),
        "trained_on_phantoms": card.pop("trained_on_phantoms"),
        "metrics": card.pop("metrics", {}),
        "package_version": package_version(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "weights": {"file": WEIGHTS_FILE, "kind": ARRAYS_KIND, "sha256": _sha256(data),
                    "parameters": int(sum(v.size for v in tensors.values())), "tensors": len(tensors),
                    "shapes": {k: list(v.shape) for k, v in sorted(tensors.items())}},
    }
    for key in ("architecture", "format", "format_version", "package_version", "created_utc", "weights"):
        card.pop(key, None)
    full.update(_jsonable(card))
    return _write_model(Path(path), json.dumps(_jsonable(full), indent=2) + "\n", data)


def load_arrays(path: Union[str, os.PathLike], expected_architecture: Union[str, Iterable[str], None] = None,
                required: Iterable[str] = ()) -> tuple[dict, dict]:
    """Load and verify a model written by :func:`save_arrays`: returns ``(arrays, card)``.

    Checks, in order: both files, the card (format, version, fields), the sha256 of the weights,
    the architecture name (``expected_architecture``), that the weights are a readable safetensors
    file holding exactly the names and shapes the card lists, and the ``required`` names. Any
    mismatch raises :class:`PerfusionAIError` naming the file. Nothing is unpickled.
    """
    require("safetensors", "loading a model file")
    from safetensors.numpy import load as load_safetensors

    path = Path(path)
    card_bytes, weights_bytes, card_name = _read_files(path)
    card = _parse_card(card_bytes, card_name)
    weights_name = str(path / WEIGHTS_FILE) if path.is_dir() else f"{path}!{WEIGHTS_FILE}"
    if _sha256(weights_bytes) != str(card["weights"].get("sha256", "")):
        raise input_error(weights_name, "the weights do not match the sha256 recorded in model.json "
                                        "(the file was changed or corrupted); refusing to load it")
    name = card["architecture"]["name"]
    if expected_architecture is not None:
        allowed = [expected_architecture] if isinstance(expected_architecture, str) else list(expected_architecture)
        if name not in allowed:
            raise input_error(card_name, f"the model is a '{name}' model, but this needs "
                                         f"{' or '.join(repr(a) for a in allowed)}")
    if card["weights"].get("kind") != ARRAYS_KIND:
        raise input_error(card_name, f"the model '{name}' does not store its parameters as arrays")
    try:
        arrays = load_safetensors(weights_bytes)
    except Exception as exc:  # safetensors raises its own error types for any malformed file
        raise input_error(weights_name, f"not a readable safetensors file ({exc})") from None
    shapes = card["weights"].get("shapes")
    if not isinstance(shapes, dict) or {k: list(v.shape) for k, v in arrays.items()} != shapes:
        raise input_error(weights_name, "the arrays in the weights file are not the ones model.json lists")
    missing = sorted(set(required) - set(arrays))
    if missing:
        raise input_error(weights_name, f"lacks the arrays {', '.join(missing)} of a '{name}' model")
    return dict(arrays), card
