"""kernels.triton_fill, what only the fused kernel has: candidate-list overflow and its
exact re-run, the documented tf32/bf16 tolerances, its argument checks — on CPU through
Triton's interpreter and on CUDA compiled. The fill contract (exactness against the
float64 reference, ties, seen items, padding, shards) runs for this kernel and the torch
tiles alike in test_fill.py.

The interpreter is chosen per call from ``TRITON_INTERPRET`` (see kernels.triton_util), so
setting it in a fixture works whatever was imported before — including triton itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'svdfill[triton]'); "
                                     "the fused kernels and their tests need it")

from reference import assert_topk_exact, dyadic, random_csr, topk_reference  # noqa: E402
from svdfill.kernels.triton_fill import fill_topk_triton  # noqa: E402


@pytest.fixture
def device(kernel_device):
    """cpu (Triton's interpreter) and cuda (compiled): conftest.kernel_device."""
    return kernel_device


def problem(U, I, d, seed, *, seen=True, full_rows=(3,)):
    g = torch.Generator().manual_seed(seed)
    P, Q = dyadic((U, d), g), dyadic((I, d), g)
    bu, bi = dyadic((U,), g, scale=8), dyadic((I,), g, scale=8)
    csr = random_csr(U, I, g, full_rows=full_rows) if seen else None
    return P, Q, bu, bi, 3.5, csr


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# --------------------------------------------------------------------------- the re-run

def test_overflowing_rows_are_rerun_exactly(device):
    """A tiny candidate capacity forces the re-run path for most rows; still exact."""
    P, Q, bu, bi, mu, csr = problem(37, 101, 13, seed=11)
    stats: dict = {}
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), mu, 5, tuple(on(device, *csr)),
                            block_u=16, block_i=16, n_chunks=2, capacity=6, stats=stats)
    assert stats["rerun_rows"] > 10, stats
    assert_topk_exact((s, i), topk_reference(P, Q, bu, bi, mu, 5, csr))


def test_a_rerun_that_overflows_raises():
    """The re-run's count is checked against its capacity: a launch that emitted more than
    the first one counted (non-identical scores between launches) raises instead of
    dropping candidates."""
    from svdfill.kernels.triton_fill import check_rerun

    check_rerun(torch.tensor([3, 6, 0], dtype=torch.int32), 6)  # fits: fine
    check_rerun(torch.zeros(0, dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match="re-run emitted 7 candidates .* room for 6"):
        check_rerun(torch.tensor([3, 7], dtype=torch.int32), 6)


def test_the_rerun_path_checks_its_count(monkeypatch):
    """The check sits on the real path: a stand-in kernel launch that counts one more
    candidate on the re-run than on the first launch makes the fill raise."""
    from svdfill.kernels import triton_fill

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = triton_fill.launch
    launches = []

    def launch(fn, device, grid, *args, **kwargs):
        real(fn, device, grid, *args, **kwargs)
        launches.append(1)
        if len(launches) > 1:  # the re-run: pretend it found one key more than room
            cnt, cap = args[14], args[16]
            cnt.fill_(cap + 1)

    monkeypatch.setattr(triton_fill, "launch", launch)
    P, Q, bu, bi, mu, csr = problem(37, 101, 13, seed=11)
    with pytest.raises(RuntimeError, match="re-run emitted"):
        fill_topk_triton(P, Q, bu, bi, mu, 5, csr, block_u=16, block_i=16, n_chunks=2, capacity=6)


# --------------------------------------------------------------------------- tolerance

def _check_within(s, i, S64, k, tol):
    """Returned items: unseen, distinct, scores within tol of float64, descending, and no
    left-out unseen item beats the k-th returned one by more than tol."""
    s, i = s.cpu().double(), i.cpu()
    U = S64.shape[0]
    for u in range(U):
        valid = i[u] >= 0
        items = i[u][valid]
        assert items.unique().numel() == items.numel()
        true = S64[u, items]
        assert torch.isfinite(true).all(), "a seen item was returned"
        assert (s[u][valid] - true).abs().max() <= tol[u].max() if items.numel() else True
        assert (s[u][valid][1:] <= s[u][valid][:-1]).all()
        n_unseen = int(torch.isfinite(S64[u]).sum())
        assert items.numel() == min(k, n_unseen)
        rest = S64[u].clone()
        rest[items] = float("-inf")
        if items.numel() and torch.isfinite(rest).any():
            assert rest.max() <= true.min() + 2 * tol[u].max()


@pytest.mark.parametrize("dtype", [None, "tf32", torch.bfloat16])
def test_random_inputs_within_documented_tolerance(device, dtype):
    U, I, d, k = 29, 83, 24, 9
    g = torch.Generator().manual_seed(21)
    P, Q = torch.randn(U, d, generator=g), torch.randn(I, d, generator=g)
    bu, bi = torch.randn(U, generator=g), torch.randn(I, generator=g)
    csr = random_csr(U, I, g, full_rows=(0,))
    _, _, S64 = topk_reference(P, Q, bu, bi, 3.0, k, csr)
    mag = (P.abs().double() @ Q.abs().double().T + bi.abs().double()[None, :]).max(1).values
    # float32: a few ulps of the magnitudes summed; tf32/bf16: 2^-11 / 2^-8 relative
    rel = {None: 1e-6, "tf32": 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    tol = mag * rel + 1e-5
    s, i = fill_topk_triton(*on(device, P, Q, bu, bi), 3.0, k, tuple(on(device, *csr)),
                            dtype=dtype, block_u=16, block_i=32, n_chunks=2)
    _check_within(s, i, S64, k, tol)
    assert (i[0] == -1).all()


# --------------------------------------------------------------------------- API

def test_cpu_without_interpreter_raises_and_fill_topk_falls_back(monkeypatch):
    """No Triton mode here: the kernel says why instead of falling back itself; the one
    entry point (kernels.fill.fill_topk, through kernels.dispatch) runs the tiles."""
    from svdfill.kernels.fill import fill_topk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    P, Q, bu, bi, mu, csr = problem(40, 50, 6, seed=9)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET.*fill_topk runs the torch tiles"):
        fill_topk_triton(P, Q, bu, bi, mu, 4, csr)
    assert_topk_exact(fill_topk(P, Q, bu, bi, mu, 4, csr), topk_reference(P, Q, bu, bi, mu, 4, csr))


def test_bad_arguments(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    P, Q, bu, bi, mu, _ = problem(5, 6, 3, seed=0, seen=False)
    with pytest.raises(ValueError, match="k must be"):
        fill_topk_triton(P, Q, bu, bi, mu, 0)
    with pytest.raises(ValueError, match="same d"):
        fill_topk_triton(P, Q[:, :2], bu, bi, mu, 2)
    with pytest.raises(ValueError, match="dtype"):
        fill_topk_triton(P, Q, bu, bi, mu, 2, dtype="float16")
    with pytest.raises(ValueError, match="indptr"):
        fill_topk_triton(P, Q, bu, bi, mu, 2, (torch.zeros(3, dtype=torch.int64),
                                              torch.zeros(0, dtype=torch.int32)))
    with pytest.raises(ValueError, match="block_i"):
        fill_topk_triton(P, Q, bu, bi, mu, 2, block_i=24)
