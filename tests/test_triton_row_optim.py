"""kernels.triton_row_optim: the fused lazy-Adam and Adagrad kernels against the float64
definition / torch.optim.Adagrad and their torch twins, on CPU through Triton's interpreter
and on CUDA compiled; ragged d, repeated and untouched rows, several programs per launch;
the sm_90 compile (no spills)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'svdfill[triton]'); "
                                     "the fused kernels and their tests need it")

from svdfill.kernels.sgd import RowSparseAdam  # noqa: E402
from svdfill.kernels.row_optim import (  # noqa: E402
    accumulate_gradients,
    apply_adagrad,
    apply_adam,
    model_sides,
)
from svdfill.kernels.triton_row_optim import (  # noqa: E402
    compile_specs,
    fused_accumulate_gradients,
    fused_apply_adagrad,
    fused_apply_adam,
)
from reference import lazy_adam_reference as reference  # noqa: E402
from test_row_optim import ATOL_VS_FLOAT64, HP, batches, model  # noqa: E402


@pytest.fixture
def device(kernel_device):
    """cpu (Triton's interpreter) and cuda (compiled): conftest.kernel_device."""
    return kernel_device


def run(m, data, device, *, lr, scale, fused=True, block_n=None, block_r=None, idx=torch.int32):
    m = m.to(device)
    opt = RowSparseAdam(list(m.parameters()), lr=lr)
    sides = model_sides(m, opt)
    for u, i, r in data:
        u, i, r = u.to(device, idx), i.to(device, idx), r.to(device)
        if fused:
            fused_accumulate_gradients(*sides, float(m.global_mean), u, i, r, scale=scale,
                                       block_n=block_n, **HP)
        else:
            accumulate_gradients(*sides, float(m.global_mean), u, i, r, scale=scale, **HP)
        step = opt.advance()
        for side in sides:
            if fused:
                fused_apply_adam(side, lr=lr, step=step, block_r=block_r)
            else:
                apply_adam(side, lr=lr, step=step)
    return m, opt, sides


@pytest.mark.parametrize("d,U,I,n,block_n,block_r", [
    (5, 13, 9, 40, 16, None),     # ragged d, 3 programs of ratings
    (16, 37, 21, 300, 32, 16),    # d = BLOCK_D (vector path), ragged row blocks
    (64, 50, 8, 257, None, None),  # the benchmark's d, one program, n not a power of two
])
@pytest.mark.parametrize("hot", [False, True])
def test_fused_steps_equal_the_float64_definition(device, d, U, I, n, block_n, block_r, hot):
    data = batches(U, I, n, 4, seed=d + hot, hot=hot)
    m0 = model(U, I, d, seed=d)
    want = reference(m0, data, lr=0.03, scale=1 / n, **HP)
    m, _, sides = run(m0, data, device, lr=0.03, scale=1 / n, block_n=block_n, block_r=block_r)
    for k, w in want.items():
        torch.testing.assert_close(getattr(m, k).detach().double().cpu(), w, rtol=2e-5,
                                   atol=ATOL_VS_FLOAT64, msg=k)
    for side in sides:  # scratch clean for the next step, without a memset
        assert not side.factors_grad.any() and not side.bias_grad.any()
        assert not side.touched.any()


def test_fused_equals_the_torch_twin_moments_included(device):
    """Interpreted, the kernels add in the twin's order: equal to rounding. Compiled, the
    atomic adds come in any order and multiply-adds fuse, and the hot rows' gradient sums
    nearly cancel, so an ulp of a term moves a small moment by more than 1e-9: there the
    tolerances follow the float64 tests' (ATOL_VS_FLOAT64) and each moment's own scale."""
    data = batches(23, 11, 120, 3, seed=7, hot=True)
    a, opt_a, _ = run(model(23, 11, 12, seed=1), data, device, lr=0.02, scale=0.01, block_n=16)
    b, opt_b, _ = run(model(23, 11, 12, seed=1), data, torch.device("cpu"), lr=0.02, scale=0.01,
                      fused=False, idx=torch.int64)
    compiled = device.type == "cuda"
    for k in ("user_factors", "item_factors", "user_bias", "item_bias"):
        pa, pb = getattr(a, k), getattr(b, k)
        torch.testing.assert_close(pa.detach().cpu(), pb.detach(), rtol=1e-5,
                                   atol=ATOL_VS_FLOAT64 if compiled else 1e-7, msg=k)
        for s in ("exp_avg", "exp_avg_sq"):
            want = opt_b.state[pb][s]
            atol = 1e-4 * float(want.abs().max()) if compiled else 1e-9
            torch.testing.assert_close(opt_a.state[pa][s].cpu(), want, rtol=1e-5, atol=atol,
                                       msg=f"{k}.{s}")


@pytest.mark.parametrize("d,block_r", [(5, 16), (16, None), (64, 16)])
def test_fused_adagrad_equals_its_torch_twin(device, d, block_r):
    data = batches(29, 11, 150, 4, seed=d, hot=True)
    out = []
    for fused, dev in ((True, device), (False, torch.device("cpu"))):
        m = model(29, 11, d, seed=2).to(dev)
        opt = torch.optim.Adagrad(list(m.parameters()), lr=0.05, lr_decay=0.01)
        sides = model_sides(m, opt)
        for t, (u, i, r) in enumerate(data, start=1):
            u, i, r = u.to(dev), i.to(dev), r.to(dev)
            if fused:
                fused_accumulate_gradients(*sides, 3.2, u.int(), i.int(), r, scale=1 / 150,
                                           **HP)
            else:
                accumulate_gradients(*sides, 3.2, u, i, r, scale=1 / 150, **HP)
            for side in sides:
                (fused_apply_adagrad(side, lr=0.05, step=t, lr_decay=0.01, block_r=block_r)
                 if fused else apply_adagrad(side, lr=0.05, step=t, lr_decay=0.01))
        out.append((m, opt, sides))
    (a, opt_a, sides_a), (b, opt_b, _) = out
    for k in ("user_factors", "item_factors", "user_bias", "item_bias"):
        pa, pb = getattr(a, k), getattr(b, k)
        torch.testing.assert_close(pa.detach().cpu(), pb.detach(), rtol=1e-5, atol=1e-7, msg=k)
        torch.testing.assert_close(opt_a.state[pa]["sum"].cpu(), opt_b.state[pb]["sum"],
                                   rtol=1e-5, atol=1e-9, msg=f"{k}.sum")
    for side in sides_a:
        assert not side.factors_grad.any() and not side.touched.any()


def test_empty_batch_and_int64_ids(device):
    m, _, sides = run(model(), [(torch.tensor([], dtype=torch.long),) * 2 + (torch.tensor([]),)],
                      device, lr=0.1, scale=1.0, idx=torch.int64)
    before = model()
    torch.testing.assert_close(m.user_factors.detach().cpu(), before.user_factors.detach())
    data = batches(13, 9, 30, 2, seed=3)
    want = reference(model(), data, lr=0.1, scale=1 / 30, **HP)
    got, _, _ = run(model(), data, device, lr=0.1, scale=1 / 30, idx=torch.int64)
    torch.testing.assert_close(got.item_bias.detach().double().cpu(), want["item_bias"],
                               rtol=2e-5, atol=ATOL_VS_FLOAT64)


def test_bad_block_size_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = model()
    sides = model_sides(m, RowSparseAdam(list(m.parameters()), lr=0.1))
    u = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        fused_accumulate_gradients(*sides, 3.0, u, u, torch.tensor([4.0]), scale=1.0,
                                   block_n=24, **HP)


@pytest.mark.parametrize("d", [8, 64, 128])
def test_every_cuda_variant_compiles_for_hopper_without_spills(d):
    """Ahead-of-time sm_90 compile (no GPU involved): registers fit, no stack (spills), and
    the factor rows are moved with 16-byte vector loads."""
    from svdfill.kernels.triton_util import compile_report

    for label, fn, sig, constexprs, warps in compile_specs(d):
        rep = compile_report(fn, sig, constexprs, num_warps=warps)
        assert rep["stack"] == 0, (label, rep)
        assert 0 < rep["regs"] <= 255, (label, rep)
        assert rep["ldg128"] > 0, (label, rep)
