"""kernels.dispatch: the one place that picks torch or Triton — the fill's choice (the
SVDFILL_FILL_KERNEL setting, the ``auto`` timing trial and its record) and the training
steps' (mode check, then a probe launch once per device; a failing probe gives the torch
twin with the reason). The implementations' results are the contract tests' business
(test_fill.py and the kernels' own tests)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from svdfill.kernels import dispatch
from svdfill.kernels.fill import _fill_tiles, fill_topk


@pytest.fixture(autouse=True)
def fresh_dispatch():
    """Every test starts with no fill decisions, probe results or warnings recorded."""
    dispatch.reset_choices()
    dispatch.reset_probes()
    dispatch.reset_warnings()
    yield
    dispatch.reset_choices()
    dispatch.reset_probes()
    dispatch.reset_warnings()


# --------------------------------------------------------------------------- the fill

def test_triton_fill_only_on_cuda(monkeypatch):
    assert dispatch.fused_fill(torch.device("cpu")) is None
    monkeypatch.setenv("SVDFILL_FILL_KERNEL", "torch")
    assert dispatch.fused_fill(torch.device("cuda")) is None
    monkeypatch.setenv("SVDFILL_FILL_KERNEL", "fastest")
    with pytest.raises(ValueError, match="SVDFILL_FILL_KERNEL"):
        dispatch.fused_fill(torch.device("cuda"))


def test_old_triton_gets_the_tiles_without_a_trial(monkeypatch):
    """A triton too old for the kernels' atomics: triton_mode is None on CUDA, so the fill
    takes the tiles without a trial (the reason: test_triton_util)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from svdfill.kernels import triton_util

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SVDFILL_FILL_KERNEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_util, "triton_version", lambda: (3, 4))
    assert dispatch.fused_fill(torch.device("cuda")) is None


def _result(scores):
    scores = torch.tensor(scores, dtype=torch.float32)
    return scores, torch.arange(scores.numel()).reshape(scores.shape)


TIES = [[4.0, 3.5, 3.5, float("-inf")]]


@pytest.mark.parametrize("torch_s,fused_s,fused_scores,want", [
    (1.0, 0.1, TIES, "triton"),                                    # faster, same scores
    (0.1, 1.0, TIES, "torch"),                                     # slower
    (1.0, 0.1, [[4.0, 3.5, 3.5 + 3e-5, float("-inf")]], "triton"),  # an ulp-level difference
    (1.0, 0.1, [[4.0, 3.7, 3.5, float("-inf")]], "torch"),          # a wrong score: never used
    (1.0, 0.1, [[4.0, 3.5, 3.5, 1.0]], "torch"),                    # a seen item let through
])
def test_auto_keeps_the_faster_kernel_once_per_key(torch_s, fused_s, fused_scores, want):
    calls = []

    def run_tiles():
        calls.append(1)
        return _result(TIES), torch_s

    def run_fused():
        return _result(fused_scores), fused_s

    with warnings.catch_warnings(record=True) as seen_warnings:
        warnings.simplefilter("always")
        for _ in range(2):
            assert dispatch.pick_fill_kernel(("k",), 10, run_tiles, run_fused,
                                             rel_tol=dispatch.AUTO_TOLERANCE["float32"]) == want
    assert len(calls) == 1  # decided once per key
    assert dispatch.kernel_choices()[("k",)]["kernel"] == want
    disagreed = dispatch.kernel_choices()[("k",)]["reason"] == "fused disagreed"
    assert disagreed == any("disagreed" in str(w.message) for w in seen_warnings)


def test_auto_falls_back_to_tiles_when_the_kernel_fails():
    def run_fused():
        raise RuntimeError("out of resources: shared memory")

    with pytest.warns(UserWarning, match="failed its trial"):
        assert dispatch.pick_fill_kernel(("k",), 10, lambda: (_result(TIES), 0.5), run_fused,
                                         rel_tol=1e-5) == "torch"
    got = dispatch.kernel_choices()[("k",)]
    assert got["reason"] == "fused failed: RuntimeError" and got["torch_s"] == 0.5

    # an error of the tiles is not the fused kernel's: it propagates, and nothing is decided
    def run_tiles():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        dispatch.pick_fill_kernel(("k2",), 10, run_tiles, lambda: (_result(TIES), 0.1),
                                  rel_tol=1e-5)
    assert ("k2",) not in dispatch.kernel_choices()


def _dyadic_problem(seed, U, I, d, full_users=()):
    from reference import random_csr

    g = torch.Generator().manual_seed(seed)
    P = torch.randint(-2, 3, (U, d), generator=g).float()
    Q = torch.randint(-2, 3, (I, d), generator=g).float()
    bu = torch.randint(-4, 5, (U,), generator=g).float() / 2
    bi = torch.randint(-4, 5, (I,), generator=g).float() / 2
    return P, Q, bu, bi, 3.5, random_csr(U, I, g, full_rows=full_users)


def test_auto_trial_through_the_real_dispatch(monkeypatch):
    """The whole auto path of fill_topk with the Triton kernel standing in on the CPU (its
    interpreter): the trial runs both on the first users, the result equals the tiles'
    either way, and the decision is recorded with both timings."""
    pytest.importorskip("triton", reason="triton is not installed")
    from svdfill.kernels.triton_fill import fill_topk_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "AUTO_MIN_USERS", 8)
    monkeypatch.setattr(dispatch, "AUTO_TRIAL_USERS", 16)
    monkeypatch.setattr(dispatch, "fused_fill", lambda device: fill_topk_triton)
    # dyadic inputs: many exact ties, a user who has seen everything
    P, Q, bu, bi, mu, seen = _dyadic_problem(5, 40, 23, 6, full_users=(3,))
    want = _fill_tiles(P, Q, bu, bi, mu, 5, seen, mode="float32")
    got = fill_topk(P, Q, bu, bi, mu, 5, seen)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (key, choice), = dispatch.kernel_choices().items()
    assert key == ("cpu", 6, 5, "float32", True) and choice["kernel"] in ("torch", "triton")
    assert choice["torch_s"] > 0 and choice["triton_s"] > 0
    monkeypatch.setenv("SVDFILL_FILL_KERNEL", "triton")  # forced: no trial, same answer
    got = fill_topk(P, Q, bu, bi, mu, 5, seen)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_no_trial_below_the_minimum_and_with_explicit_tiles(monkeypatch):
    """Small calls and explicit tile sizes never reach the trial."""
    trials = []
    monkeypatch.setattr(dispatch, "fused_fill", lambda device: pytest.fail("fused called"))
    monkeypatch.setattr(dispatch, "pick_fill_kernel", lambda *a, **k: trials.append(a) or "torch")
    P, Q, bu, bi, mu, seen = _dyadic_problem(1, 12, 9, 3)
    fill_topk(P, Q, bu, bi, mu, 3, seen, user_block=4, item_tile=5)  # explicit tiles: no dispatch
    monkeypatch.setattr(dispatch, "fused_fill", lambda device: (lambda *a, **k: pytest.fail("ran")))
    fill_topk(P, Q, bu, bi, mu, 3, seen)  # 12 users < AUTO_MIN_USERS: the tiles, no trial
    assert trials == [] and dispatch.kernel_choices() == {}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_auto_kernel_on_cuda_decides_and_agrees(cuda, monkeypatch, dtype):
    """On the GPU: the first call of a shape records a decision with both timings (or why
    the fused kernel was refused), and the answer agrees with the torch tiles."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("SVDFILL_FILL_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(11)
    P, Q = torch.randn(3000, 64, generator=g), torch.randn(700, 64, generator=g)
    bu, bi = 0.3 * torch.randn(3000, generator=g), 0.3 * torch.randn(700, generator=g)
    from reference import random_csr

    seen = random_csr(3000, 700, g, max_per_row=400)
    P, Q, bu, bi = (t.to(cuda) for t in (P, Q, bu, bi))
    seen = (seen[0].to(cuda), seen[1].to(cuda))
    got_s, got_i = fill_topk(P, Q, bu, bi, 3.6, 50, seen, dtype=dtype)
    (key, choice), = dispatch.kernel_choices().items()
    assert key[1:] == (64, 50, dtype or "float32", True)
    assert choice["kernel"] in ("torch", "triton") and choice["reason"], choice
    # the fused kernel compiled, ran and agreed: a failure or disagreement would fall back
    # to the tiles and still give the right answer, so only the record shows it
    assert choice["triton_s"] is not None and not choice["reason"].startswith("fused"), choice
    want_s, _ = _fill_tiles(P, Q, bu, bi, 3.6, 50, seen, mode=dtype or "float32")
    fin = torch.isfinite(want_s)
    assert torch.equal(torch.isneginf(got_s), torch.isneginf(want_s))
    tol = dispatch.AUTO_TOLERANCE[dtype or "float32"] * float(want_s[fin].abs().max())
    assert float((got_s - want_s)[fin].abs().max()) <= tol


# --------------------------------------------------------------------------- training

def test_torch_kernel_is_the_torch_twin():
    from svdfill.kernels.row_optim import accumulate_gradients, apply_adagrad, apply_adam
    from svdfill.kernels.sgd import sgd_step, sgd_step_split

    ops = dispatch.training_ops("sgd", "cpu", "torch")
    assert (ops.impl, ops.reason, ops.step, ops.step_split) == ("torch", "", sgd_step, sgd_step_split)
    ops = dispatch.training_ops("sparse_adam", "cpu")
    assert ops.accumulate is accumulate_gradients and ops.apply is apply_adam
    assert dispatch.training_ops("adagrad", "cpu").apply is apply_adagrad
    with pytest.raises(ValueError, match="no step functions"):
        dispatch.training_ops("als", "cpu")


def test_fused_without_cuda_falls_back_once_with_the_reason():
    with pytest.warns(RuntimeWarning, match="needs CUDA and triton"):
        ops = dispatch.training_ops("sgd", "cpu", "fused")
    assert ops.impl == "torch" and "device is cpu" in ops.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        assert dispatch.training_ops("adagrad", "cpu", "fused").impl == "torch"


def test_probe_launches_a_kernel_once_per_device(monkeypatch):
    """The real probe: under the interpreter it compiles, launches and checks a tiny kernel
    and says None; the answer is cached per device."""
    pytest.importorskip("triton", reason="triton is not installed")
    from svdfill.kernels import triton_sgd

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = triton_sgd.probe
    monkeypatch.setattr(triton_sgd, "probe", lambda d: calls.append(d) or real(d))
    assert dispatch.probe_fused("cpu") is None
    assert dispatch.probe_fused(torch.device("cpu")) is None
    assert calls == ["cpu"]


def test_probe_failure_gives_the_torch_twin_with_the_reason(monkeypatch):
    """A device where the mode check passes but the first launch fails (as when Triton
    cannot build its launcher: no gcc or Python.h). On this CPU the mode check is told to
    pass and the probe really runs and really fails (no TRITON_INTERPRET: no kernel can
    launch); training gets the torch twin, one warning, the reason in ``ops.reason``."""
    pytest.importorskip("triton", reason="triton is not installed")
    from svdfill.kernels.sgd import sgd_step

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "fused_unavailable", lambda device: None)
    with pytest.warns(RuntimeWarning, match="do not build or run") as rec:
        ops = dispatch.training_ops("sgd", "cpu", "fused")
    assert len(rec) == 1
    assert ops.impl == "torch" and ops.step is sgd_step
    assert "RuntimeError" in ops.reason and "TRITON_INTERPRET" in ops.reason
    assert dispatch.probe_fused("cpu") == ops.reason[ops.reason.index("(") + 1: ops.reason.rindex(")")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.training_ops("sparse_adam", "cpu", "fused").impl == "torch"


def test_probe_error_message_names_the_exception(monkeypatch):
    """What the trainer prints when the launcher build fails: the exception's type and the
    first line of its message (the seam patched here is the probe itself)."""
    from svdfill.kernels import triton_sgd

    def no_compiler(device):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\n"
                           "more lines")

    monkeypatch.setattr(triton_sgd, "probe", no_compiler)
    assert dispatch.probe_fused("cuda:3") == ("RuntimeError: Failed to find C compiler. Please "
                                              "specify via CC environment variable.")
    monkeypatch.setattr(dispatch, "fused_unavailable", lambda device: None)
    with pytest.warns(RuntimeWarning, match="C compiler"):
        ops = dispatch.training_ops("adagrad", "cuda:3", "fused")
    assert ops.impl == "torch" and "cuda:3" in ops.reason


def test_fused_training_ops_on_cuda(cuda, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from svdfill.kernels.triton_sgd import fused_sgd_step

    ops = dispatch.training_ops("sgd", cuda, "fused")
    assert ops.impl == "triton" and ops.step is fused_sgd_step and ops.reason == ""
    assert dispatch.probe_fused(cuda) is None
