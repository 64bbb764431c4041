"""One training loop for every network: validation each epoch, early stopping that
restores the best weights, safetensors checkpoints, progress and cancellation.

Batches are tuples of tensors. By default the last tensor is the target and the
others are the model inputs: ``loss = loss_fn(model(*batch[:-1]), batch[-1])``.
Self-supervised or multi-output models pass ``step_fn(model, batch) -> loss``
instead (``loss_fn`` is then ignored and may be None).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import Cancelled, input_error
from ..progress import ProgressCallback, as_progress
from .device import choose_device

Batch = Sequence[torch.Tensor]
StepFn = Callable[[nn.Module, Batch], torch.Tensor]


class TensorBatchLoader:
    """Minibatches of in-memory tensors, sliced in one operation per batch.

    ``torch.utils.data.DataLoader`` over a ``TensorDataset`` indexes and collates
    sample by sample; for millions of voxel curves that Python loop costs more
    than the network. This loader draws a random permutation per epoch (when
    ``shuffle``) and indexes every tensor with a whole index block.

    Parameters
    ----------
    tensors
        Tensors sharing their first (sample) axis.
    batch_size
        Samples per batch.
    shuffle
        New random order each epoch (uses ``generator``).
    samples_per_epoch
        Draw only this many samples per epoch (a fresh random subset each
        epoch); None means all. Lets a large volume be seen over several
        shorter epochs with a validation check in between.
    drop_last
        Skip a last incomplete batch (keeps batch-norm statistics sane when it
        would be tiny).
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 256, shuffle: bool = False,
                 generator: Optional[torch.Generator] = None, samples_per_epoch: Optional[int] = None,
                 drop_last: bool = False) -> None:
        if not tensors:
            raise ValueError("TensorBatchLoader needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors must share their first axis")
        self.tensors = tensors
        self.n = n
        self.batch_size = max(1, int(batch_size))
        self.shuffle = shuffle
        self.generator = generator
        self.samples_per_epoch = min(n, int(samples_per_epoch)) if samples_per_epoch else n
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(self.samples_per_epoch, self.batch_size)
        return full + (1 if rest and not (self.drop_last and full > 0) else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.shuffle or self.samples_per_epoch < self.n:
            order = torch.randperm(self.n, generator=self.generator)[: self.samples_per_epoch]
        else:
            order = None
        for b in range(len(self)):
            start = b * self.batch_size
            stop = min(start + self.batch_size, self.samples_per_epoch)
            if order is None:
                yield tuple(t[start:stop] for t in self.tensors)
            else:
                index = order[start:stop]
                yield tuple(t[index] for t in self.tensors)


@dataclass
class TrainingHistory:
    """What :func:`fit` did. Losses are per-epoch means over samples."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1            # 0-based epoch whose weights the model holds at the end
    best_loss: float = math.inf     # validation loss of that epoch (train loss without validation)
    epochs_run: int = 0
    stopped_early: bool = False
    stopped_by_time: bool = False
    seconds: float = 0.0
    checkpoints: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "best_epoch": self.best_epoch,
                "best_loss": self.best_loss, "epochs_run": self.epochs_run,
                "stopped_early": self.stopped_early, "stopped_by_time": self.stopped_by_time,
                "seconds": round(self.seconds, 3)}


def state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors with no shared storage
    (what safetensors requires)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, path: Path, metadata: Optional[dict] = None) -> Path:
    """Write the model's weights to ``path`` as safetensors (string metadata allowed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(state_dict_for_file(model), str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def load_checkpoint(model: nn.Module, path: Path, strict: bool = True) -> nn.Module:
    """Load safetensors weights written by :func:`save_checkpoint` into ``model``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "checkpoint file not found")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise input_error(path, f"not a readable safetensors checkpoint ({exc})") from None
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise input_error(path, f"checkpoint does not fit this network: {exc}") from None
    return model


def _to_device(batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)


def _default_step(loss_fn) -> StepFn:
    def step(model: nn.Module, batch: Batch) -> torch.Tensor:
        if len(batch) < 2:
            raise ValueError("batches need inputs and a target (or pass step_fn)")
        return loss_fn(model(*batch[:-1]), batch[-1])
    return step


def _batch_size(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") and first.dim() > 0 else 1


def evaluate(model: nn.Module, loader: Iterable, step_fn: StepFn, device: torch.device) -> float:
    """Mean loss over ``loader`` in eval mode without gradients (sample-weighted)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, device)
            n = _batch_size(batch)
            total += float(step_fn(model, batch)) * n
            count += n
    return total / max(count, 1)


def fit(model: nn.Module, train_loader: Iterable, val_loader: Optional[Iterable],
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
        optimizer: torch.optim.Optimizer, epochs: int, early_stopping_patience: Optional[int] = 10,
        checkpoint_dir: Optional[Path] = None, progress: Optional[ProgressCallback] = None,
        device: Optional[torch.device | str] = None, step_fn: Optional[StepFn] = None,
        scheduler=None, min_delta: float = 0.0, restore_best: bool = True,
        max_seconds: Optional[float] = None, grad_clip_norm: Optional[float] = None,
        progress_every: int = 10, on_epoch_end: Optional[Callable[[int, float, float], None]] = None,
        ) -> TrainingHistory:
    """Train ``model`` and return its :class:`TrainingHistory`.

    Parameters
    ----------
    model
        Any ``nn.Module``; moved to ``device``.
    train_loader, val_loader
        Iterables of batches (tuples of tensors), e.g. :class:`TensorBatchLoader` or a
        ``DataLoader``. Without ``val_loader`` the training loss drives early stopping.
    loss_fn
        ``loss_fn(prediction, target) -> scalar``; ignored when ``step_fn`` is given.
    optimizer
        Built over ``model.parameters()`` (build it before calling; moving to the
        device keeps parameter identity).
    epochs
        Maximum number of epochs.
    early_stopping_patience
        Stop after this many epochs without an improvement larger than
        ``min_delta``; None disables early stopping.
    checkpoint_dir
        If given, ``last.safetensors`` is written after every epoch and
        ``best.safetensors`` whenever the monitored loss improves.
    progress
        ``progress(fraction, message)``; may raise :class:`Cancelled`, which is
        re-raised after the model was restored to its best weights so far.
    device
        Torch device or preference string; default :func:`choose_device` ("auto").
    step_fn
        ``step_fn(model, batch) -> loss`` for anything that is not "inputs ->
        prediction vs target" (self-supervised models).
    scheduler
        Optional LR scheduler; stepped once per epoch (``ReduceLROnPlateau`` gets
        the monitored loss).
    restore_best
        Load the weights of the best epoch at the end (and on cancellation).
    max_seconds
        Wall-clock budget; training stops after the epoch that exceeds it.
    grad_clip_norm
        Clip the gradient norm to this value when given.
    """
    device = choose_device(device) if not isinstance(device, torch.device) else device
    model.to(device)
    step = step_fn or _default_step(loss_fn)
    report = as_progress(progress)
    history = TrainingHistory()
    best_state: Optional[dict[str, torch.Tensor]] = None
    bad_epochs = 0
    started = time.perf_counter()
    try:
        n_batches = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def restore() -> None:
        if restore_best and best_state is not None:
            model.load_state_dict(best_state)

    try:
        for epoch in range(int(epochs)):
            model.train()
            total, count = 0.0, 0
            for b, batch in enumerate(train_loader):
                batch = _to_device(batch, device)
                optimizer.zero_grad(set_to_none=True)
                loss = step(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {float(loss)} at epoch {epoch + 1}")
                loss.backward()
                if grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
                optimizer.step()
                n = _batch_size(batch)
                total += float(loss.detach()) * n
                count += n
                if progress_every and b % progress_every == 0:
                    within = (b + 1) / n_batches if n_batches else 0.0
                    report((epoch + within) / epochs, f"epoch {epoch + 1}/{epochs}, loss {total / count:.4g}")
            train_loss = total / max(count, 1)
            history.train_loss.append(train_loss)
            if val_loader is not None:
                val_loss = evaluate(model, val_loader, step, device)
                history.val_loss.append(val_loss)
                monitored = val_loss
            else:
                monitored = train_loss
            history.epochs_run = epoch + 1
            if scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(monitored)
                else:
                    scheduler.step()
            improved = monitored < history.best_loss - min_delta
            if improved:
                history.best_loss = monitored
                history.best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bad_epochs = 0
                if ckpt_dir is not None:
                    save_checkpoint(model, ckpt_dir / "best.safetensors",
                                    {"epoch": epoch + 1, "loss": monitored})
            else:
                bad_epochs += 1
            if ckpt_dir is not None:
                history.checkpoints.append(str(save_checkpoint(
                    model, ckpt_dir / "last.safetensors", {"epoch": epoch + 1, "loss": monitored})))
            if on_epoch_end is not None:
                on_epoch_end(epoch, train_loss, monitored)
            report((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}: train {train_loss:.4g}"
                   + (f", validation {history.val_loss[-1]:.4g}" if history.val_loss else ""))
            if early_stopping_patience is not None and bad_epochs >= early_stopping_patience:
                history.stopped_early = True
                break
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                history.stopped_by_time = True
                break
    except Cancelled:
        restore()
        history.seconds = time.perf_counter() - started
        raise
    restore()
    model.eval()
    history.seconds = time.perf_counter() - started
    report(1.0, f"trained {history.epochs_run} epochs, best {history.best_loss:.4g} "
                f"at epoch {history.best_epoch + 1}")
    return history
