"""Learned prediction of the advanced diffusion-relaxation protocol from the clinical one.

Two strategies (Macarro et al., JMRI 2025):

* ``signal-to-signal``: predict the 21 advanced-protocol signals from the 5 clinical signals
  (both divided by the voxel's clinical b=0 signal), then fit T2-IVIM-Kurtosis to the prediction;
* ``maps-to-maps``: predict the T2-IVIM-Kurtosis maps ``f, dv, t2v, dt, k, t2t`` directly from
  the clinical maps ``adc_fast, adc_slow, f_proxy``. (S0 is a scale without a clinical counterpart
  in these inputs and is not predicted by this strategy.)

Algorithms (keys of :data:`ALGORITHMS`): ``lr`` linear regression, ``rf`` random forest, ``etr``
extra trees, ``gbr`` gradient boosting (one model per output), ``slnn`` single-hidden-
layer network, ``mlnn`` three-hidden-layer network (both voxel-wise), and ``patchnn`` a network
whose input is the 3x3 in-plane neighbourhood of every input channel. Networks are torch MLPs
(ReLU, Adam, early stopping) trained by :func:`perfusionai.nn.fit`; all inputs and outputs are standardised.

Model folder (no pickles, ever): the one model-file format of the package
(:mod:`perfusionai.nn.modelfile`: ``weights.safetensors`` + the checked ``model.json`` card with the
algorithm, strategy, protocols, hyper-parameters, standardisation, training description incl.
"trained on phantoms", metrics, versions and the sha256 of the weights):

* networks (``slnn``, ``mlnn``, ``patchnn``): architecture ``dr.mlp``, loaded with its checks (torch);
* ``lr``: architecture ``dr.lr``, coefficients and intercept as arrays; prediction is a matrix product;
* tree ensembles (``rf``, ``etr`` averaged trees; ``gbr`` boosted trees, one model per output):
  architectures ``dr.rf``/``dr.etr``/``dr.gbr``, every fitted tree stored as node arrays (feature,
  threshold, children, leaf values) and evaluated with numpy on load: no refit, no scikit-learn
  needed to predict. The conversion is checked against scikit-learn's own predictions when saved.

Torch and scikit-learn are imported only when a learner that needs them is trained or applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from ..deps import require
from ..errors import ParameterError, input_error
from . import fitting
from . import models as M

STRATEGIES = ("signal-to-signal", "maps-to-maps")
ALGORITHMS = ("lr", "rf", "etr", "gbr", "slnn", "mlnn", "patchnn")
ALGORITHM_NAMES = {"lr": "linear regression", "rf": "random forest", "etr": "extra trees",
                   "gbr": "gradient boosting", "slnn": "single-layer neural network",
                   "mlnn": "multi-layer neural network", "patchnn": "patch-wise (3x3) neural network"}
#: Inputs of maps-to-maps and the maps it predicts.
M2M_INPUTS = ("adc_fast", "adc_slow", "f_proxy")
M2M_OUTPUTS = ("f", "dv", "t2v", "dt", "k", "t2t")
FORMAT_VERSION = 1


def default_hyperparameters(algorithm: str) -> dict:
    """Hyper-parameters of each algorithm (the paper's are unpublished; sizes limited for speed)."""
    return {
        "lr": {},
        "rf": {"n_estimators": 60, "min_samples_leaf": 3, "max_features": 1.0},
        "etr": {"n_estimators": 60, "min_samples_leaf": 3, "max_features": 1.0},
        "gbr": {"n_estimators": 60, "learning_rate": 0.15, "max_depth": 3},
        "slnn": {"hidden": [64], "epochs": 200, "learning_rate": 3e-3, "weight_decay": 1e-5, "batch_size": 256},
        "mlnn": {"hidden": [64, 64, 64], "epochs": 200, "learning_rate": 2e-3, "weight_decay": 1e-5, "batch_size": 256},
        "patchnn": {"hidden": [96, 64], "epochs": 200, "learning_rate": 2e-3, "weight_decay": 1e-5, "batch_size": 256},
    }[algorithm]


# --------------------------------------------------------------------------------------
# features


@dataclass
class PatientFeatures:
    """Learning data of one patient's region of interest.

    All arrays are ``(N, ...)`` over the ROI voxels in C order of the ``[k, j, i]`` mask.
    ``x_signal`` ``(N, 5)`` clinical signals / ``s_ref``; ``x_signal_patch`` ``(N, 45)`` their 3x3
    neighbourhoods (divided by the centre's ``s_ref``); ``x_maps`` ``(N, 3)`` clinical maps;
    ``x_maps_patch`` ``(N, 27)``; ``s_ref`` ``(N,)`` the clinical b=0 signal; ``y_signal``
    ``(N, 21)`` advanced signals / ``s_ref`` and ``y_maps`` name -> ``(N,)`` reference maps (when
    the advanced data are known).
    """

    name: str
    x_signal: np.ndarray
    x_signal_patch: np.ndarray
    x_maps: np.ndarray
    x_maps_patch: np.ndarray
    s_ref: np.ndarray
    y_signal: Optional[np.ndarray] = None
    y_maps: Optional[dict] = None
    roi: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)


def _neighbourhood(volume: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """3x3 in-plane neighbourhoods ``(N, 9, C)`` of a ``[k, j, i, C]`` volume at the ROI voxels (edges replicated)."""
    padded = np.pad(volume, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    kk, jj, ii = np.nonzero(roi)
    offsets = [(dj, di) for dj in (0, 1, 2) for di in (0, 1, 2)]
    return np.stack([padded[kk, jj + dj, ii + di] for dj, di in offsets], axis=1)


def clinical_features(clinical_dwi: np.ndarray, clinical_protocol: M.Protocol, roi: np.ndarray,
                      name: str = "patient") -> PatientFeatures:
    """Inputs of both strategies from a clinical series ``[k, j, i, 5]`` (b 0..900 s/mm^2, one TE)."""
    clinical_dwi = np.asarray(clinical_dwi, float)
    order = np.argsort(clinical_protocol.bvals, kind="stable")
    dwi = clinical_dwi[..., order]
    bvals = clinical_protocol.bvals[order]
    s_ref_vol = np.maximum(dwi[..., 0], 1e-6 * max(float(dwi.max()), 1e-30))
    maps_fit = fitting.fit_clinical(dwi.reshape(-1, dwi.shape[-1]), bvals)
    maps_vol = np.stack([maps_fit.maps[k].reshape(roi.shape) for k in M2M_INPUTS], axis=-1)
    s_ref = s_ref_vol[roi]
    sig_patch = _neighbourhood(dwi, roi) / s_ref[:, None, None]
    map_patch = _neighbourhood(maps_vol, roi)
    return PatientFeatures(name, dwi[roi] / s_ref[:, None], sig_patch.reshape(len(s_ref), -1), maps_vol[roi],
                           map_patch.reshape(len(s_ref), -1), s_ref, roi=roi,
                           extra={"clinical_bvals": bvals.tolist()})


def patient_features(dwi: np.ndarray, protocol: M.Protocol, roi: np.ndarray, name: str = "patient",
                     reference_maps: Optional[dict] = None, progress=None) -> PatientFeatures:
    """Training/evaluation data from a full advanced series ``[k, j, i, 21]`` and its ROI.

    The clinical protocol is extracted (5 lowest b at the minimum TE); the reference maps are the
    T2-IVIM-Kurtosis fit of the advanced protocol (as in the paper) unless ``reference_maps``
    (name -> ``[k, j, i]``) are given.
    """
    idx = protocol.clinical_indices()
    feats = clinical_features(dwi[..., idx], M.Protocol(protocol.bvals[idx], protocol.tes[idx]), roi, name)
    advanced = np.asarray(dwi, float)[roi]
    feats.y_signal = advanced / feats.s_ref[:, None]
    if reference_maps is None:
        fit = fitting.fit_t2ivimkurtosis(advanced, protocol.bvals, protocol.tes, progress=progress)
        feats.y_maps = fit.maps
    else:
        feats.y_maps = {k: np.asarray(v, float)[roi] for k, v in reference_maps.items()}
    feats.extra["advanced_protocol"] = protocol.to_dict()
    return feats


def _inputs(features: PatientFeatures, strategy: str, algorithm: str) -> np.ndarray:
    patch = algorithm == "patchnn"
    if strategy == "signal-to-signal":
        return features.x_signal_patch if patch else features.x_signal
    return features.x_maps_patch if patch else features.x_maps


def _targets(features: PatientFeatures, strategy: str) -> np.ndarray:
    if strategy == "signal-to-signal":
        return features.y_signal
    return np.stack([features.y_maps[k] for k in M2M_OUTPUTS], axis=1)


# --------------------------------------------------------------------------------------
# estimators


def _make_estimator(algorithm: str, hyper: dict, seed: int):
    require("sklearn", f"the {ALGORITHM_NAMES[algorithm]} learner")
    from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.multioutput import MultiOutputRegressor

    if algorithm == "lr":
        return LinearRegression()
    if algorithm == "rf":
        return RandomForestRegressor(random_state=seed, n_jobs=2, **hyper)
    if algorithm == "etr":
        return ExtraTreesRegressor(random_state=seed, n_jobs=2, **hyper)
    if algorithm == "gbr":
        # plain (single-threaded) gradient boosting, one model per output: the histogram variant's OpenMP
        # threads stall on a busy 2-core machine and gain nothing on a few thousand voxels
        return MultiOutputRegressor(GradientBoostingRegressor(random_state=seed, **hyper))
    raise ValueError(f"{algorithm} is not a scikit-learn learner")


NETWORKS = ("slnn", "mlnn", "patchnn")
ARCHITECTURE = "dr.mlp"


def _build_mlp(n_inputs: int, n_outputs: int, hidden: list):
    """ReLU multi-layer perceptron ``(N, n_inputs) -> (N, n_outputs)``."""
    nn = require("torch", "the DiffusionRelaxation networks").nn
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in [n_inputs, n_outputs, *hidden]):
        raise ValueError(f"layer sizes must be positive whole numbers, got {n_inputs}, {hidden}, {n_outputs}")

    layers = []
    width = int(n_inputs)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, int(n_outputs)))
    return nn.Sequential(*layers)


def _register_network() -> None:
    from ..nn import ARCHITECTURES, register_architecture

    if ARCHITECTURE not in ARCHITECTURES:
        register_architecture(ARCHITECTURE, _build_mlp)


def _train_network(xs: np.ndarray, ys: np.ndarray, hyper: dict, seed: int, progress=None):
    """Train a :func:`_build_mlp` network on standardised arrays with :func:`perfusionai.nn.fit`."""
    torch = require("torch", "training the DiffusionRelaxation networks")

    from ..nn import TensorBatchLoader, choose_device, fit, seed_everything

    _register_network()
    generator = seed_everything(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xs))
    n_val = max(1, int(round(0.15 * len(xs)))) if len(xs) >= 20 else 0
    val, train = order[:n_val], order[n_val:]
    x = torch.as_tensor(xs, dtype=torch.float32)
    y = torch.as_tensor(ys, dtype=torch.float32)
    model = _build_mlp(xs.shape[1], ys.shape[1], hyper["hidden"])
    model.architecture = {"name": ARCHITECTURE, "hyperparameters": {"n_inputs": int(xs.shape[1]),
                                                                     "n_outputs": int(ys.shape[1]),
                                                                     "hidden": list(hyper["hidden"])}}
    train_loader = TensorBatchLoader(x[train], y[train], batch_size=int(hyper["batch_size"]), shuffle=True,
                                     generator=generator)
    val_loader = TensorBatchLoader(x[val], y[val], batch_size=4096) if n_val else None
    optimiser = torch.optim.Adam(model.parameters(), lr=float(hyper["learning_rate"]),
                                 weight_decay=float(hyper["weight_decay"]))
    # these networks are tiny: one CPU thread is fastest (more threads only add synchronisation, badly so
    # on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(model, train_loader, val_loader, torch.nn.functional.mse_loss, optimiser, epochs=int(hyper["epochs"]),
            early_stopping_patience=15, progress=progress, device=choose_device("auto"), progress_every=0)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


TREE_ARRAYS = ("tree_feature", "tree_threshold", "tree_left", "tree_right", "tree_value", "tree_root",
               "tree_output", "tree_weight", "tree_base")


def tree_arrays(estimator, algorithm: str) -> dict:
    """The fitted trees of a scikit-learn ensemble as plain arrays (all trees' nodes concatenated).

    ``tree_feature``, ``tree_threshold``, ``tree_left``, ``tree_right`` (-1 at leaves, global node
    indices), ``tree_value`` ``(nodes, V)`` leaf values, ``tree_root`` ``(T,)`` first node of each tree,
    ``tree_output`` ``(T,)`` the output column a tree adds to (-1: all columns, V = outputs),
    ``tree_weight`` ``(T,)`` its factor, ``tree_base`` ``(outputs,)`` the constant start.
    ``rf``/``etr``: mean of the trees (weight 1/T, base 0); ``gbr`` (one boosted model per output):
    base = the initial constant, weight = the learning rate, each tree adding to its own output.
    """
    if algorithm in ("rf", "etr"):
        trees = [(e.tree_, -1, 1.0 / len(estimator.estimators_)) for e in estimator.estimators_]
        n_out = int(estimator.n_outputs_)
        base = np.zeros(n_out)
    elif algorithm == "gbr":
        trees, base = [], []
        for o, booster in enumerate(estimator.estimators_):
            base.append(float(np.asarray(booster.init_.predict(np.zeros((1, booster.n_features_in_)))).ravel()[0]))
            trees += [(t.tree_, o, float(booster.learning_rate)) for t in booster.estimators_[:, 0]]
        base = np.asarray(base)
    else:
        raise ValueError(f"{algorithm} is not a tree ensemble")
    feature, threshold, left, right, value, root, output, weight = [], [], [], [], [], [], [], []
    offset = 0
    for tree, out, w in trees:
        n = int(tree.node_count)
        is_leaf = tree.children_left == -1
        feature.append(np.where(is_leaf, 0, tree.feature).astype(np.int32))
        threshold.append(tree.threshold.astype(np.float64))
        left.append(np.where(is_leaf, -1, tree.children_left + offset).astype(np.int64))
        right.append(np.where(is_leaf, -1, tree.children_right + offset).astype(np.int64))
        v = tree.value[:, :, 0].astype(np.float64)
        value.append(v if out < 0 else v[:, :1])
        root.append(offset)
        output.append(out)
        weight.append(w)
        offset += n
    return {"tree_feature": np.concatenate(feature), "tree_threshold": np.concatenate(threshold),
            "tree_left": np.concatenate(left), "tree_right": np.concatenate(right),
            "tree_value": np.concatenate(value), "tree_root": np.asarray(root, np.int64),
            "tree_output": np.asarray(output, np.int64), "tree_weight": np.asarray(weight, np.float64),
            "tree_base": np.asarray(base, np.float64)}


def predict_trees(arrays: dict, x: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Evaluate the trees of :func:`tree_arrays` on ``x`` ``(N, F)`` -> ``(N, outputs)`` (numpy only).

    As scikit-learn does: inputs compared in float32 (``x <= threshold`` goes left), every tree
    descended to its leaf (vectorised over voxels and trees), leaf values weighted and summed.
    """
    feature, threshold = arrays["tree_feature"], arrays["tree_threshold"]
    left, right, value = arrays["tree_left"], arrays["tree_right"], arrays["tree_value"]
    root, output, weight = arrays["tree_root"], arrays["tree_output"], arrays["tree_weight"]
    base = arrays["tree_base"]
    x32 = np.asarray(x, np.float32).astype(np.float64)
    out = np.empty((len(x32), base.size))
    forest = bool(np.all(output < 0))
    for start in range(0, len(x32), chunk):
        xs = x32[start:start + chunk]
        rows = np.arange(len(xs))[:, None]
        node = np.broadcast_to(root, (len(xs), root.size)).copy()
        while True:
            inner = left[node] >= 0
            if not inner.any():
                break
            go_left = xs[rows, feature[node]] <= threshold[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)
        if forest:
            out[start:start + len(xs)] = base + np.einsum("t,ntv->nv", weight, value[node])
        else:
            leaf = value[node, 0] * weight  # (n, T)
            sums = np.zeros((len(xs), base.size))
            for o in range(base.size):
                sums[:, o] = leaf[:, output == o].sum(axis=1)
            out[start:start + len(xs)] = base + sums
    return out


class Learner:
    """One trained predictor: standardisation + estimator (see the module doc for storage).

    ``predict_standardised``-free API: :meth:`fit` and :meth:`predict` take raw ``(N, F)`` inputs
    and return raw ``(N, T)`` outputs.
    """

    def __init__(self, algorithm: str, strategy: str, seed: int = 0, hyper: Optional[dict] = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ParameterError("algorithm", f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        if strategy not in STRATEGIES:
            raise ParameterError("strategy", f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        self.algorithm = algorithm
        self.strategy = strategy
        self.seed = int(seed)
        self.hyper = dict(default_hyperparameters(algorithm) if hyper is None else hyper)
        self.arrays: dict = {}
        self._estimator = None
        self.network = None

    # standardisation keeps every algorithm on comparable, O(1) scales
    def _std_x(self, x):
        return (x - self.arrays["x_mean"]) / self.arrays["x_std"]

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Learner":
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        self.arrays = {"x_mean": x.mean(0), "x_std": x.std(0) + 1e-12, "y_mean": y.mean(0), "y_std": y.std(0) + 1e-12}
        xs = self._std_x(x)
        ys = (y - self.arrays["y_mean"]) / self.arrays["y_std"]
        if self.algorithm in NETWORKS:
            self.network = _train_network(xs, ys, self.hyper, self.seed)
            return self
        est = _make_estimator(self.algorithm, self.hyper, self.seed)
        est.fit(xs, ys)
        self._estimator = est
        if self.algorithm == "lr":
            self.arrays["coef"] = est.coef_.T.copy()
            self.arrays["intercept"] = np.asarray(est.intercept_, float).reshape(-1)
        else:
            self.arrays.update(tree_arrays(est, self.algorithm))
            # the stored trees must reproduce scikit-learn exactly (checked once, here)
            rows = xs[:256]
            if not np.allclose(predict_trees(self.arrays, rows), np.asarray(est.predict(rows)).reshape(len(rows), -1),
                               rtol=1e-9, atol=1e-12):
                raise RuntimeError(f"the {self.algorithm} trees could not be converted to arrays faithfully")
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        xs = self._std_x(np.asarray(x, np.float64))
        if self.algorithm == "lr":
            ys = xs @ self.arrays["coef"] + self.arrays["intercept"]
        elif self.algorithm in NETWORKS:
            torch = require("torch", f"the {ALGORITHM_NAMES[self.algorithm]} learner")

            device = next(self.network.parameters()).device
            with torch.no_grad():
                ys = self.network(torch.as_tensor(xs, dtype=torch.float32, device=device)).cpu().numpy()
        elif self._estimator is not None:
            ys = self._estimator.predict(xs)
        else:  # loaded from a model folder: the stored trees
            ys = predict_trees(self.arrays, xs)
        ys = np.asarray(ys, float).reshape(len(xs), -1)
        return ys * self.arrays["y_std"] + self.arrays["y_mean"]


# --------------------------------------------------------------------------------------
# training and prediction on patients


@dataclass
class TrainedModel:
    """A learner plus what it needs to be applied: strategy, protocols, description."""

    learner: Learner
    clinical_bvals: list
    advanced_protocol: dict
    description: dict = field(default_factory=dict)

    @property
    def strategy(self) -> str:
        return self.learner.strategy

    @property
    def algorithm(self) -> str:
        return self.learner.algorithm


def train(patients: list[PatientFeatures], algorithm: str, strategy: str, seed: int = 0,
          hyper: Optional[dict] = None, trained_on_phantoms: bool = False) -> TrainedModel:
    """Train one learner on the pooled ROI voxels of ``patients``."""
    if not patients:
        raise ParameterError("cohort", "no training patient")
    x = np.concatenate([_inputs(p, strategy, algorithm) for p in patients])
    y = np.concatenate([_targets(p, strategy) for p in patients])
    learner = Learner(algorithm, strategy, seed, hyper).fit(x, y)
    return TrainedModel(learner, patients[0].extra["clinical_bvals"], patients[0].extra["advanced_protocol"],
                        {"patients": [p.name for p in patients], "voxels": int(len(x)),
                         "trained_on_phantoms": bool(trained_on_phantoms)})


def predict(model: TrainedModel, features: PatientFeatures, progress=None) -> dict:
    """Predicted T2-IVIM-Kurtosis maps (name -> ``(N,)``) for a patient's ROI voxels.

    signal-to-signal also returns ``"signals"`` ``(N, 21)`` (predicted advanced signals in signal
    units) and ``s0``; maps-to-maps returns ``f, dv, t2v, dt, k, t2t`` clipped to the fit bounds.
    """
    x = _inputs(features, model.strategy, model.algorithm)
    y = model.learner.predict(x)
    if model.strategy == "signal-to-signal":
        protocol = M.Protocol(model.advanced_protocol["bvals"], model.advanced_protocol["tes"])
        signals = y * features.s_ref[:, None]
        # a learner may predict slightly negative signals at high b; the magnitude model cannot
        fit = fitting.fit_t2ivimkurtosis(np.maximum(signals, 1e-6 * features.s_ref[:, None]),
                                         protocol.bvals, protocol.tes, progress=progress)
        out = dict(fit.maps)
        out["signals"] = signals
        return out
    lower = dict(zip(M.ADVANCED_MAPS, M.ADVANCED_LOWER))
    upper = dict(zip(M.ADVANCED_MAPS, M.ADVANCED_UPPER))
    return {name: np.clip(y[:, i], lower[name], upper[name]) for i, name in enumerate(M2M_OUTPUTS)}


def train_from_cohort(cohort_csv: str | Path, out: str | Path, algorithm: str = "mlnn",
                      strategy: str = "signal-to-signal", seed: int = 0, trained_on_phantoms: Optional[bool] = None,
                      progress=None) -> TrainedModel:
    """``perfusionai dr train``: read a cohort CSV, train one learner, write the model folder ``out``.

    ``trained_on_phantoms`` None: True when the cohort was written by ``perfusionai dr phantom``
    (its marker file lies beside the CSV). The folder is written atomically.
    """
    from ..cohorts import is_phantom_cohort
    from ..progress import as_progress
    from .pipeline import read_cohort

    progress = as_progress(progress)
    Learner(algorithm, strategy)  # refuse an unknown algorithm or strategy before reading the cohort
    patients = read_cohort(cohort_csv, progress.sub(0.0, 0.6))
    progress(0.6, f"training {algorithm} ({strategy})")
    trained_on_phantoms = bool(trained_on_phantoms) or is_phantom_cohort(cohort_csv)
    model = train(patients, algorithm, strategy, seed=seed, trained_on_phantoms=trained_on_phantoms)
    model.description["cohort"] = str(cohort_csv)
    save_model(model, out)  # atomic: the model-file writer stages the folder
    progress(1.0, "model written")
    return model


# --------------------------------------------------------------------------------------
# model directory


def _card(model: TrainedModel, metrics: Optional[dict]) -> dict:
    """The model card of a learner (the fields of :mod:`perfusionai.nn.modelfile` plus ``dr_learner``)."""
    learner = model.learner
    versions = {"perfusionai": __version__, "numpy": np.__version__}
    if learner.algorithm not in NETWORKS:
        versions["scikit-learn"] = require("sklearn", "the DiffusionRelaxation learners").__version__
    return {
        "dr_learner": {"algorithm": learner.algorithm, "algorithm_name": ALGORITHM_NAMES[learner.algorithm],
                       "strategy": learner.strategy, "hyperparameters": learner.hyper, "seed": learner.seed,
                       "advanced_protocol": model.advanced_protocol, "format_version": FORMAT_VERSION},
        "inputs": {"clinical_bvals_s_per_mm2": list(model.clinical_bvals),
                   "features": "clinical signals / S(b=0)" if learner.strategy == "signal-to-signal"
                   else list(M2M_INPUTS),
                   "patch": "3x3 in-plane" if learner.algorithm == "patchnn" else None,
                   "x_mean": learner.arrays["x_mean"].tolist(), "x_std": learner.arrays["x_std"].tolist()},
        "outputs": {"what": ("advanced-protocol signals / S(b=0), then T2-IVIM-Kurtosis fit"
                             if learner.strategy == "signal-to-signal" else list(M2M_OUTPUTS)),
                    "y_mean": learner.arrays["y_mean"].tolist(), "y_std": learner.arrays["y_std"].tolist()},
        "training_data": model.description,
        "trained_on_phantoms": bool(model.description.get("trained_on_phantoms", False)),
        "metrics": metrics or {},
        "versions": versions,
    }


#: Arrays each classical learner stores (besides nothing else: the standardisation lives in the card).
STORED_ARRAYS = {"lr": ("coef", "intercept"), "rf": TREE_ARRAYS, "etr": TREE_ARRAYS, "gbr": TREE_ARRAYS}


def save_model(model: TrainedModel, folder: str | Path, metrics: Optional[dict] = None) -> Path:
    """Write ``model.json`` + ``weights.safetensors`` into ``folder`` (atomically; see the module doc)."""
    from ..nn.modelfile import save_arrays

    card = _card(model, metrics)
    learner = model.learner
    if learner.algorithm in NETWORKS:
        from ..nn.modelfile import save_model as save_network

        _register_network()
        card["architecture"] = learner.network.architecture
        return save_network(folder, learner.network, card)
    card["architecture"] = {"name": f"dr.{learner.algorithm}", "hyperparameters": learner.hyper}
    arrays = {k: learner.arrays[k] for k in STORED_ARRAYS[learner.algorithm]}
    return save_arrays(folder, arrays, card)


def _card_problem(card_name, problem: str):
    return input_error(card_name, f"{problem}; it is not a DiffusionRelaxation model written by 'perfusionai dr train'")


def load_model(folder: str | Path) -> TrainedModel:
    """Read a model folder (or zip) written by :func:`save_model`, checking everything it can.

    Refuses (one :class:`PerfusionAIError` naming the file) a missing file, a card that is not valid
    JSON or not a DiffusionRelaxation learner of a known format, an algorithm or strategy the card
    does not name correctly, a weights file whose sha256 differs from the card's or that is not a
    safetensors file, missing arrays or arrays of the wrong shapes, and networks that do not fit
    their card (checked by :func:`perfusionai.nn.load_model`).
    """
    from ..nn.modelfile import load_arrays, read_card

    folder = Path(folder)
    card = read_card(folder)
    card_name = folder / "model.json" if folder.is_dir() else folder
    info = card.get("dr_learner")
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise _card_problem(card_name, "the card has no 'dr_learner' entry of a known format version")
    algorithm, strategy = info.get("algorithm"), info.get("strategy")
    if algorithm not in ALGORITHMS:
        raise _card_problem(card_name, f"unknown learner algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    if strategy not in STRATEGIES:
        raise _card_problem(card_name, f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    hyper = info.get("hyperparameters")
    if hyper is not None and not isinstance(hyper, dict):
        raise _card_problem(card_name, "the learner's hyperparameters are not a JSON object")
    learner = Learner(algorithm, strategy, info.get("seed", 0) if isinstance(info.get("seed", 0), int) else 0, hyper)
    try:
        learner.arrays = {"x_mean": np.asarray(card["inputs"]["x_mean"], float),
                          "x_std": np.asarray(card["inputs"]["x_std"], float),
                          "y_mean": np.asarray(card["outputs"]["y_mean"], float),
                          "y_std": np.asarray(card["outputs"]["y_std"], float)}
        clinical_bvals = [float(b) for b in card["inputs"]["clinical_bvals_s_per_mm2"]]
        advanced = info["advanced_protocol"]
        M.Protocol(advanced["bvals"], advanced["tes"])
    except (KeyError, TypeError, ValueError):
        raise _card_problem(card_name, "the card lacks the input/output standardisation or the protocols") from None
    if any(v.ndim != 1 for v in learner.arrays.values()):
        raise _card_problem(card_name, "the standardisation is not a list of numbers per feature")
    if learner.algorithm in NETWORKS:
        from ..nn.modelfile import load_model as load_network

        _register_network()
        learner.network, card = load_network(folder, expected_architecture=ARCHITECTURE, device="auto")
        n_in = learner.network[0].in_features
        n_out = learner.network[-1].out_features
        if n_in != learner.arrays["x_mean"].size or n_out != learner.arrays["y_mean"].size:
            raise input_error(card_name, f"the network maps {n_in} inputs to {n_out} outputs but the card "
                                         f"standardises {learner.arrays['x_mean'].size} and "
                                         f"{learner.arrays['y_mean'].size}")
    else:
        arrays, card = load_arrays(folder, expected_architecture=f"dr.{algorithm}",
                                   required=STORED_ARRAYS[algorithm])
        learner.arrays.update({k: np.asarray(v) for k, v in arrays.items()})
        problem = _array_problem(learner)
        if problem:
            raise input_error(folder / "weights.safetensors" if folder.is_dir() else folder, problem)
    model = TrainedModel(learner, clinical_bvals, advanced, dict(card.get("training_data") or {}))
    model.description["card"] = card
    return model


def _array_problem(learner: Learner) -> str:
    """Why the stored arrays cannot be the learner the card describes ('' when they fit)."""
    a = learner.arrays
    n_in, n_out = a["x_mean"].size, a["y_mean"].size
    if learner.algorithm == "lr":
        if a["coef"].shape != (n_in, n_out) or a["intercept"].shape != (n_out,):
            return f"the linear coefficients have shape {a['coef'].shape}, the card needs ({n_in}, {n_out})"
        return ""
    nodes = a["tree_feature"].size
    if any(a[k].shape[:1] != (nodes,) for k in ("tree_threshold", "tree_left", "tree_right", "tree_value")):
        return "the tree arrays do not have one entry per node"
    if a["tree_base"].shape != (n_out,) or a["tree_root"].shape != a["tree_output"].shape != a["tree_weight"].shape:
        return "the tree arrays do not describe the card's outputs"
    children = np.concatenate([a["tree_left"], a["tree_right"]])
    if (nodes == 0 or children.max(initial=-1) >= nodes or children.min(initial=-1) < -1
            or a["tree_root"].min(initial=0) < 0 or a["tree_root"].max(initial=0) >= nodes
            or a["tree_feature"].min(initial=0) < 0 or a["tree_feature"].max(initial=0) >= n_in
            or a["tree_output"].max(initial=-1) >= n_out):
        return "the tree arrays index outside themselves (corrupted model)"
    inner = a["tree_left"] >= 0
    if np.any(a["tree_left"][inner] <= np.flatnonzero(inner)) or np.any(a["tree_right"][inner] <= np.flatnonzero(inner)):
        return "the trees are not stored parent-before-child (corrupted model)"
    return ""


def model_summary(folder: str | Path) -> dict:
    """What a model folder is, from its ``model.json`` only (for pickers and dependency checks).

    Returns ``{"algorithm", "strategy", "needs_torch", "trained_on_phantoms"}``; raises a clear error
    for a folder that is not a DiffusionRelaxation learner.
    """
    from ..nn.modelfile import read_card

    card = read_card(folder)
    info = card.get("dr_learner")
    card_name = Path(folder) / "model.json" if Path(folder).is_dir() else Path(folder)
    if not isinstance(info, dict) or info.get("algorithm") not in ALGORITHMS:
        raise _card_problem(card_name, "the card names no known learner")
    return {"algorithm": info["algorithm"], "strategy": info.get("strategy"),
            "needs_torch": info["algorithm"] in NETWORKS,
            "trained_on_phantoms": bool(card.get("trained_on_phantoms", False))}
