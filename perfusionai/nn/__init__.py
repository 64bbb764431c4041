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
  model files (``weights.safetensors`` + ``model.json``), verified on load, never pickled.
"""

from .blocks import (ChannelsLastConv1d, ConvNormAct, GlobalAvgPool, ResidualBlock, count_parameters,
                     fold_batchnorm, inference_copy, keras_parameter_count, make_activation, make_norm)
from .device import available_cpus, choose_device, set_threads
from .modelfile import (ARCHITECTURES, PHANTOM_LABEL, build_model, is_trained_on_phantoms, load_model,
                        model_label, read_card, register_architecture, save_model)
from .seeding import seed_everything
from .training import (TensorBatchLoader, TrainingHistory, evaluate, fit, load_checkpoint, save_checkpoint)

__all__ = [
    "ARCHITECTURES", "PHANTOM_LABEL", "ChannelsLastConv1d", "ConvNormAct", "GlobalAvgPool", "ResidualBlock", "TensorBatchLoader",
    "TrainingHistory", "available_cpus", "build_model", "choose_device", "count_parameters", "evaluate", "fit",
    "fold_batchnorm", "inference_copy", "is_trained_on_phantoms", "keras_parameter_count", "load_checkpoint", "load_model",
    "make_activation", "make_norm", "model_label", "read_card", "register_architecture", "save_checkpoint",
    "save_model", "seed_everything", "set_threads",
]
