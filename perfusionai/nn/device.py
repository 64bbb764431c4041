"""Device choice and CPU thread count for every torch computation in PerfusionAI.

CUDA is used whenever it is present (``preference="auto"``); the command line
exposes the same choice as ``--device auto|cpu|cuda``. The CPU thread count
defaults to the cores this process may run on, so a 2-core runner uses 2.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..errors import ParameterError

DevicePreference = Union[str, torch.device, None]


def available_cpus() -> int:
    """Number of CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_device(preference: DevicePreference = "auto") -> torch.device:
    """Return the torch device to compute on.

    Parameters
    ----------
    preference
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``, or a :class:`torch.device`. None means ``"auto"``.

    Raises
    ------
    PerfusionAIError
        When CUDA is requested but not available, or the name is unknown.
    """
    if isinstance(preference, torch.device):
        return preference
    name = (preference or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParameterError("device", f"'{preference}' was requested but no CUDA device is available "
                                          "(choose cpu or auto)")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ParameterError("device", f"'{preference}' is not a device name (auto, cpu, cuda, cuda:N)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParameterError("device", f"'{preference}': only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise ParameterError("device", f"'{preference}' is not a device name (auto, cpu, cuda, cuda:N)")


def set_threads(n_threads: Optional[int] = None) -> int:
    """Set torch's intra-op CPU thread count; returns the count used.

    ``None`` (default) uses every core available to this process
    (:func:`available_cpus`); the environment variable ``PERFUSIONAI_THREADS``
    overrides the default when set.
    """
    if n_threads is None:
        env = os.environ.get("PERFUSIONAI_THREADS", "").strip()
        n_threads = int(env) if env.isdigit() and int(env) > 0 else available_cpus()
    n_threads = max(1, int(n_threads))
    if torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)
    return n_threads
