"""Which implementation runs here: the one place that picks torch or Triton.

Every fast path has an exact torch twin. Callers ask this module for the implementation of
an operation on a device and get the functions plus a line saying why (printed by the CLI,
recorded in summaries); tests patch the functions here, never private names elsewhere.

Training steps (:func:`training_ops`): ``train.kernel = "fused"`` gets the Triton kernels
when they compile on the device — checked once per device by launching a tiny kernel
(:func:`probe_fused`: a missing C compiler or ``Python.h`` breaks Triton's launcher only at
the first launch) — else the torch twin with one warning naming the reason.

The fill (:func:`fill_kernel`, called by :func:`svdfill.kernels.fill.fill_topk`, the one
entry point of both fills): on CUDA with a usable triton, ``SVDFILL_FILL_KERNEL`` says
``auto`` (default: time the fused kernel against the torch tiles once per shape on a trial
block and keep the faster, the tiles when the kernel fails or disagrees), ``torch`` or
``triton``. Decisions are cached per process (:func:`kernel_choices`); off CUDA the answer
is the torch tiles at the cost of one comparison.

Imports: nothing of the package at module level; the Triton modules lazily, when asked for
(they never import this module or :mod:`svdfill.kernels.fill`: no import cycle).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

TRAINING_OPS = ("sgd", "sparse_adam", "adagrad")
"""Training steps that have a fused Triton twin."""

_WARNED: set[str] = set()


def reset_warnings() -> None:
    """Forget which fallbacks were already warned about (tests: warn-once is per process)."""
    _WARNED.clear()


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
    step = "step" if op == "sgd" else "row step"
    why = fused_unavailable(device)
    if why is None:
        failed = probe_fused(device)
        if failed is None:
            return _triton_ops(op)
        reason = (f"train.kernel = 'fused': the Triton kernels do not build or run on "
                  f"{torch.device(device)} ({failed}); using the torch {op} {step}")
    else:
        reason = f"train.kernel = 'fused' needs CUDA and triton ({why}); using the torch {op} {step}"
    if "training" not in _WARNED:
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        _WARNED.add("training")
    return _torch_ops(op, reason)


_PROBED: dict[str, str | None] = {}


def probe_fused(device: torch.device | str) -> str | None:
    """None when a tiny Triton kernel compiles, launches and writes the right values on
    ``device``; else one line saying why not (``"ExcType: message"``). Run once per device
    and process (the answer is cached): the first launch is where Triton builds its C
    launcher, so a missing compiler or ``Python.h`` shows here, not at training step 1."""
    key = str(torch.device(device))
    if key not in _PROBED:
        try:
            from svdfill.kernels.triton_sgd import probe

            probe(device)
            _PROBED[key] = None
        except Exception as e:  # any failure: the torch twin is exact, so it runs instead
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            _PROBED[key] = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return _PROBED[key]


def reset_probes() -> None:
    """Forget the probe results (tests; a process whose environment changed)."""
    _PROBED.clear()


# ---------------------------------------------------------------------------------------
# the fill: fused Triton kernel or torch tiles
# ---------------------------------------------------------------------------------------

FILL_KERNEL_ENV = "SVDFILL_FILL_KERNEL"
"""Environment variable: ``auto`` (default) | ``torch`` | ``triton``."""

AUTO_TRIAL_USERS = 8192
"""Users of the trial block on which ``auto`` times the fused kernel against the tiles."""
AUTO_MIN_USERS = 1024
"""Calls with fewer users take the torch tiles without a trial (nothing to win there)."""

AUTO_TOLERANCE = {"float32": 1e-5, "tf32": 2.0**-9, "bfloat16": 2.0**-6}
"""How far (relative to the largest |score|) the two kernels' score lists may differ on the
trial: the fp32 accumulation orders differ, and with bf16 the tiles round the GEMM output to
bf16 while the fused kernel keeps fp32. A wrong mask, bias or row is off by far more."""

_CHOICES: dict[tuple, dict] = {}


def fill_setting() -> str:
    """``SVDFILL_FILL_KERNEL``: auto (default) | torch | triton; ValueError otherwise."""
    v = os.environ.get(FILL_KERNEL_ENV, "auto").strip().lower() or "auto"
    if v not in ("auto", "torch", "triton"):
        raise ValueError(f"{FILL_KERNEL_ENV} must be auto, torch or triton, got {v!r}")
    return v


def fused_fill(device: torch.device) -> Callable | None:
    """The fused Triton fill for CUDA tensors unless ``SVDFILL_FILL_KERNEL=torch``, when
    triton can compile it here; None otherwise (the torch tiles run, without a trial)."""
    if device.type != "cuda" or fill_setting() == "torch":
        return None
    try:
        from svdfill.kernels.triton_fill import fill_topk_triton
        from svdfill.kernels.triton_util import triton_mode
    except ImportError:
        return None
    # no usable triton (absent, or too old to compile it right): the tiles, without a trial
    return fill_topk_triton if triton_mode(device) is not None else None


def kernel_choices() -> dict[tuple, dict]:
    """The ``auto`` decisions made in this process: ``{(device, d, k, mode, has_seen):
    {"kernel", "torch_s", "triton_s", "reason"}}`` (what ``svdfill bench`` and logs print)."""
    return dict(_CHOICES)


def reset_choices() -> None:
    """Forget the ``auto`` decisions (tests; a benchmark that wants a fresh trial)."""
    _CHOICES.clear()


def fill_kernel(device: torch.device, key: tuple, n_users: int, mode: str,
                make_trial: Callable[[int, Callable], tuple[Callable, Callable]]) -> Callable | None:
    """The fused fill function to run for one ``fill_topk`` call, or None for the torch tiles.

    ``key`` = ``(device, d, k, mode, has_seen)`` identifies the shape the ``auto`` decision
    is kept for; ``make_trial(n, fused) -> (run_tiles, run_fused)`` builds the two timed
    runs on the first ``n`` users (see :func:`pick_fill_kernel`); it is only called for a
    trial. Off CUDA this is one comparison.
    """
    fused = fused_fill(device)
    if fused is None:
        return None
    setting = fill_setting()
    if setting == "triton":
        return fused
    if setting == "auto" and n_users >= AUTO_MIN_USERS:
        n = min(n_users, AUTO_TRIAL_USERS)
        run_tiles, run_fused = make_trial(n, fused)
        if pick_fill_kernel(key, n, run_tiles, run_fused, rel_tol=AUTO_TOLERANCE[mode]) == "triton":
            return fused
    return None


def pick_fill_kernel(key: tuple, trial: int, run_tiles: Callable, run_fused: Callable, *,
                     rel_tol: float) -> str:
    """``auto``: time the fused kernel against the torch tiles once per ``key`` on a trial
    block and keep the faster (``"triton"`` or ``"torch"``); if the fused one fails or
    disagrees, the tiles.

    ``run_tiles()`` / ``run_fused()`` ``-> ((scores, items), seconds)`` run each on the
    trial block. An error of the tiles propagates (they are the answer either way); one of
    the fused kernel only rules it out. The two agree when their -inf (padding) positions
    are equal and their score lists (each sorted descending, so order statistics) are
    within ``rel_tol`` of the largest |score|; items may trade places at near-ties, as
    :mod:`svdfill.kernels.fill` allows for tf32/bf16.
    """
    got = _CHOICES.get(key)
    if got is not None:
        return got["kernel"]
    (t_s, _), torch_s = run_tiles()
    try:
        (f_s, _), fused_s = run_fused()
    except Exception as e:  # a compile or launch failure: the tiles still give the answer
        first = str(e).splitlines()[0][:200] if str(e) else ""
        warnings.warn(f"svdfill fill: the fused Triton fill failed its trial ({type(e).__name__}: "
                      f"{first}); using the torch tiles")
        _CHOICES[key] = {"kernel": "torch", "torch_s": torch_s, "triton_s": None,
                         "reason": f"fused failed: {type(e).__name__}"}
        return "torch"
    fin = torch.isfinite(t_s)
    scale = max(1.0, float(t_s[fin].abs().max())) if bool(fin.any()) else 1.0
    agree = torch.equal(torch.isneginf(t_s), torch.isneginf(f_s)) and bool(
        ((t_s - f_s)[fin].abs() <= rel_tol * scale).all())
    if not agree:
        warnings.warn("svdfill fill: the fused Triton fill disagreed with the torch tiles on its "
                      "trial block; using the torch tiles")
        choice, reason = "torch", "fused disagreed"
    else:
        choice = "triton" if fused_s < torch_s else "torch"
        reason = f"faster on a {trial}-user trial"
    _CHOICES[key] = {"kernel": choice, "torch_s": torch_s, "triton_s": fused_s, "reason": reason}
    return choice


def timed(fn: Callable, device: torch.device):
    """``(fn(), seconds)``, the device synchronized before and after (for trials)."""
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
