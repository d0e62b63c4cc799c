"""kernels.triton_util: when the fused kernels run and how; and an ahead-of-time compile of
every CUDA variant for Hopper (sm_90) — no GPU needed — so CI catches code that only the
interpreter accepts, and reports spills and tensor-core instructions."""

from __future__ import annotations

import pytest
import torch

from svdfill.kernels import triton_util


def test_mode_follows_the_environment_at_call_time(monkeypatch):
    if not triton_util.triton_available():
        assert triton_util.triton_mode("cpu") is None
        assert "not installed" in triton_util.unavailable_reason("cpu")
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_util.triton_mode("cpu") is None
    assert "TRITON_INTERPRET" in triton_util.unavailable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_util.triton_mode("cpu") == "interpret"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_util.triton_mode("cpu") is None
    expected = "compiled" if torch.cuda.is_available() else None
    assert triton_util.triton_mode("cuda") == expected


def test_next_pow2():
    assert [triton_util.next_pow2(n) for n in (0, 1, 2, 3, 13, 16, 17, 100)] == \
        [1, 1, 2, 4, 16, 16, 32, 128]


def test_launch_refuses_without_a_mode(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_util.launch(lambda: None, "cpu", (1,))


@pytest.mark.slow
def test_every_cuda_variant_compiles_for_hopper():
    """Triton compiles each kernel for sm_90 with its bundled ptxas: no GPU involved."""
    pytest.importorskip("triton", reason="triton is not installed")
    from svdfill.kernels import triton_fill, triton_sgd

    specs = triton_sgd.compile_specs(64)[:1] + triton_fill.compile_specs(100, 128)[:1]
    for label, sig, const, warps in specs:
        try:
            rep = triton_util.compile_report(
                {"sgd": triton_sgd._sgd_kernel, "fill": triton_fill._fill_kernel}[label.split()[0]],
                sig, const, num_warps=warps)
        except FileNotFoundError as e:  # a triton build without the NVIDIA tools
            pytest.skip(f"no NVIDIA backend tools in this triton install: {e}")
        assert rep["cubin_bytes"] > 0 and rep["regs"] > 0, (label, rep)
        if label.startswith("fill"):
            assert rep["gmma"] > 0, f"{label}: no Hopper wgmma in the SASS ({rep})"
