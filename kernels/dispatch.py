"""Which implementation runs here: the one place that picks torch or Triton.

Every fast path has an exact torch twin. Callers ask this module for the implementation of
an operation on a device and get the functions plus a line saying why (printed by the CLI,
recorded in summaries); tests patch the functions here, never private names elsewhere.

Training steps (:func:`training_ops`): ``train.kernel = "fused"`` gets the Triton kernels
when they compile on the device, else the torch twin with one warning naming the reason.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

TRAINING_OPS = ("sgd", "sparse_adam", "adagrad")
"""Training steps that have a fused Triton twin."""

_WARNED: set[str] = set()


@dataclass(frozen=True)
class TrainingOps:
    """The step functions of one training method on one device.

    impl: ``"torch"`` or ``"triton"``. reason: why ``impl`` was chosen ("" when it is what
    was asked for). ``step`` / ``step_split`` (``op = "sgd"``): the signatures of
    :func:`svdfill.kernels.sgd.sgd_step` / ``sgd_step_split``. ``accumulate`` / ``apply``
    (row-sparse optimizers): :func:`svdfill.kernels.row_optim.accumulate_gradients` and
    ``apply_adam`` (``sparse_adam``) or ``apply_adagrad`` (``adagrad``).
    """

    impl: str
    reason: str
    step: Callable | None = None
    step_split: Callable | None = None
    accumulate: Callable | None = None
    apply: Callable | None = None


def fused_unavailable(device: torch.device | str) -> str | None:
    """None when the fused training kernels can be compiled on ``device``; else one line
    saying why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device is {device}"
    from svdfill.kernels.triton_util import triton_mode, unavailable_reason

    # the kernel modules import without triton and then silently run torch: ask explicitly
    if triton_mode(device) == "compiled":
        return None
    return unavailable_reason(device) or "triton cannot compile here"


def _torch_ops(op: str, reason: str) -> TrainingOps:
    if op == "sgd":
        from svdfill.kernels.sgd import sgd_step, sgd_step_split

        return TrainingOps("torch", reason, step=sgd_step, step_split=sgd_step_split)
    from svdfill.kernels.row_optim import accumulate_gradients, apply_adagrad, apply_adam

    return TrainingOps("torch", reason, accumulate=accumulate_gradients,
                       apply=apply_adam if op == "sparse_adam" else apply_adagrad)


def _triton_ops(op: str) -> TrainingOps:
    if op == "sgd":
        from svdfill.kernels.triton_sgd import fused_sgd_step, fused_sgd_step_split

        return TrainingOps("triton", "", step=fused_sgd_step, step_split=fused_sgd_step_split)
    from svdfill.kernels import triton_row_optim as k

    return TrainingOps("triton", "", accumulate=k.fused_accumulate_gradients,
                       apply=k.fused_apply_adam if op == "sparse_adam" else k.fused_apply_adagrad)


def training_ops(op: str, device: torch.device | str, kernel: str = "torch") -> TrainingOps:
    """The step functions for training method ``op`` (one of :data:`TRAINING_OPS`) on
    ``device``; ``kernel`` is ``train.kernel`` (``"torch"`` or ``"fused"``).

    ``"fused"`` where the Triton kernels cannot run gives the torch twin and warns once per
    process (RuntimeWarning naming the reason and the fallback).
    """
    if op not in TRAINING_OPS:
        raise ValueError(f"no step functions for {op!r}; expected one of {TRAINING_OPS}")
    if kernel != "fused":
        return _torch_ops(op, "")
    why = fused_unavailable(device)
    if why is None:
        return _triton_ops(op)
    reason = f"train.kernel = 'fused' needs CUDA and triton ({why}); using the torch {op} step"
    if "training" not in _WARNED:
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        _WARNED.add("training")
    return _torch_ops(op, reason)
