"""kernels.triton_util: when the fused kernels run and how; and an ahead-of-time compile of
every CUDA variant for Hopper (sm_90) — no GPU needed — so CI catches code that only the
interpreter accepts, and reports spills and tensor-core instructions."""

from __future__ import annotations

import pytest
import torch

from svdfill.kernels import triton_util

try:  # a kernel body below needs `tl` as a global
    import triton.language as tl
except ImportError:  # pragma: no cover - the tests that use it skip
    tl = None


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


def test_compiled_kernels_need_triton_3_5(monkeypatch):
    """Compiled tensor atomics return 0 to duplicate threads up to triton 3.4, and the fused
    fill reads them: an older triton never compiles the kernels (the torch twins run, and
    the reason says why); its interpreter, which had no such bug, still may."""
    pytest.importorskip("triton", reason="triton is not installed")
    assert len(triton_util.triton_version()) == 2 and triton_util.triton_version() >= (3, 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_util, "triton_version", lambda: (3, 4))
    assert triton_util.triton_mode("cuda") is None
    assert "older than 3.5" in triton_util.unavailable_reason("cuda")
    from svdfill.kernels import dispatch

    assert dispatch.fused_fill(torch.device("cuda")) is None  # auto: the tiles, with no trial
    monkeypatch.setattr(triton_util, "triton_version", lambda: (3, 6))
    assert triton_util.triton_mode("cuda") == "compiled"
    monkeypatch.setattr(triton_util, "triton_version", lambda: (3, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_util.triton_mode("cuda") == "interpret"


def test_next_pow2():
    assert [triton_util.next_pow2(n) for n in (0, 1, 2, 3, 13, 16, 17, 100)] == \
        [1, 1, 2, 4, 16, 16, 32, 128]


def test_launch_refuses_without_a_mode(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_util.launch(lambda: None, "cpu", (1,))


def test_launch_enters_the_tensors_device(monkeypatch):
    """Every launch runs inside device_guard(device): on CUDA that is
    torch.cuda.device(device), so tensors on cuda:1 launch on GPU 1 whatever the current
    device. Checked here on the interpreter path with a recording guard, and on the guard
    itself (constructing a torch.cuda.device needs no GPU)."""
    pytest.importorskip("triton", reason="triton is not installed")
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(triton_util, "device_guard", Recorder)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(64)
    triton_util.launch(_chunked_ones, x.device, (2,), x, 50, 32, B=16)
    assert entered == [torch.device("cpu"), "exit"] and float(x.sum()) == 4.0
    monkeypatch.undo()
    guard = triton_util.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(triton_util.device_guard("cpu"), torch.cuda.device)


@pytest.mark.cuda
def test_launch_on_a_second_gpu_from_the_first(cuda, monkeypatch):
    """The real case: current device 0, tensors on cuda:1 (skipped with fewer GPUs)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.cuda.set_device(0)
    x = torch.zeros(64, device="cuda:1")
    triton_util.launch(_chunked_ones, x.device, (2,), x, 50, 32, B=16)
    assert float(x.sum()) == 4.0 and torch.cuda.current_device() == 0


def _chunked_ones(X, n, chunk, B: tl.constexpr):
    """Program c writes 1.0 at every B-th index of its chunk [c·chunk, min((c+1)·chunk, n))."""
    c0 = tl.program_id(0) * chunk
    c1 = tl.minimum(c0 + chunk, n)
    for t in range(c0, c1, B):  # runtime loop bounds, as the fill kernel's item loop has
        tl.store(X + t, 1.0)


def test_interpreted_range_over_runtime_bounds_on_older_triton(monkeypatch):
    """The device image's triton 3.6 interpreter turned a scalar (a shape-(1,) array) into a
    loop bound with int(array), which numpy >= 2.4 refuses: every interpreted fill failed
    there. Reproduce that conversion on this triton and check the launch route fixes it."""
    pytest.importorskip("triton", reason="triton is not installed")
    from triton.runtime import interpreter

    real = interpreter._patch_lang_tensor

    def as_in_triton_3_6(tensor, scope):
        real(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", as_in_triton_3_6)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expect = torch.zeros(64)
    expect[[0, 16, 32, 48]] = 1.0
    if np_refuses_1d_int():
        with pytest.raises(Exception, match="0-dimensional"):  # the failure being fixed
            triton_util.build_kernel(_chunked_ones, interpret=True)[(2,)](
                torch.zeros(64), 50, 32, B=16)
    x = torch.zeros(64)
    triton_util.launch(_chunked_ones, "cpu", (2,), x, 50, 32, B=16)
    assert torch.equal(x, expect)
    assert interpreter._patch_lang_tensor is as_in_triton_3_6  # put back after the launch


def np_refuses_1d_int() -> bool:
    import numpy as np

    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


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
