"""Reproducible runs: one call seeds Python, numpy and torch (CPU and CUDA)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int = 0, deterministic: bool = False) -> torch.Generator:
    """Seed ``random``, ``numpy``, ``torch`` and CUDA with ``seed``.

    Parameters
    ----------
    seed
        Any non-negative integer.
    deterministic
        Also ask torch for deterministic kernels (slower on CUDA; CPU kernels
        used here are deterministic for a fixed thread count anyway).

    Returns
    -------
    torch.Generator
        A CPU generator seeded with ``seed``, for data shuffling that must not
        depend on how many random numbers model initialisation consumed.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
