"""Shared torch infrastructure for every PerfusionAI network.

* :func:`choose_device`, :func:`set_threads` -- CUDA when present, CPU threads = cores;
* :func:`seed_everything` -- reproducible runs;
* :mod:`.blocks` -- ConvNormAct (1D/2D/3D), ResidualBlock, GlobalAvgPool, fold_batchnorm,
  inference_copy (folded batch norm, channels-last 1D convolutions on CPU),
  parameter counts (PyTorch and Keras conventions);
* :func:`fit` / :class:`TrainingHistory` / :class:`TensorBatchLoader` -- the training loop with
  validation, early stopping restoring the best weights, safetensors checkpoints, progress and
  cancellation;
* :func:`save_model` / :func:`load_model` / :func:`register_architecture` / :func:`build_model` --
  model files (``weights.safetensors`` + ``model.json``), verified on load, never pickled;
  :func:`save_arrays` / :func:`load_arrays` -- the same files for models whose parameters are plain
  arrays (no torch needed).
"""

#: public name -> submodule; imported on first use, so ``perfusionai.nn.modelfile`` (and array
#: models, see :func:`save_arrays`) work without torch and ``import perfusionai.nn`` stays cheap
_EXPORTS = {
    **{name: "blocks" for name in ("ChannelsLastConv1d", "ConvNormAct", "GlobalAvgPool", "ResidualBlock",
                                   "count_parameters", "fold_batchnorm", "inference_copy", "keras_parameter_count",
                                   "make_activation", "make_norm")},
    **{name: "device" for name in ("available_cpus", "choose_device", "set_threads")},
    **{name: "modelfile" for name in ("ARCHITECTURES", "PHANTOM_LABEL", "build_model", "is_trained_on_phantoms",
                                      "load_arrays", "load_model", "model_label", "read_card",
                                      "register_architecture", "save_arrays", "save_model")},
    "seed_everything": "seeding",
    **{name: "training" for name in ("TensorBatchLoader", "TrainingHistory", "evaluate", "fit", "load_checkpoint",
                                     "save_checkpoint")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perfusionai.nn' has no attribute {name!r}")
    value = getattr(_submodule(module), name)
    globals()[name] = value
    return value


def _submodule(module: str):
    # explicit imports (no importlib): blocks and training need torch, modelfile and device do not
    if module == "blocks":
        from . import blocks as found
    elif module == "device":
        from . import device as found
    elif module == "modelfile":
        from . import modelfile as found
    elif module == "seeding":
        from . import seeding as found
    else:
        from . import training as found
    return found


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
