"""When the fused Triton kernels can run, and how they are built for a device.

The fused kernels (``kernels.triton_sgd``, ``kernels.triton_fill``) are written as plain
Python functions and turned into Triton kernels here, lazily and per mode:

- CUDA tensors: a compiled :class:`triton.runtime.jit.JITFunction`.
- CPU tensors with ``TRITON_INTERPRET=1`` in the environment *at call time*: an
  :class:`triton.runtime.interpreter.InterpretedFunction`, i.e. Triton's reference
  interpreter running the same kernel body with numpy (slow; tests use tiny shapes).
- Anything else (CPU without the variable, or no triton installed): no kernel; the
  public functions fall back to their exact torch twins.

Deciding at call time, instead of when ``@triton.jit`` runs at import, is deliberate: a
test suite that imported these modules before setting ``TRITON_INTERPRET`` (another test
importing the trainer, say) still gets the interpreter, and a process that set the
variable for a CPU test can still compile for CUDA tensors.

Nothing here imports triton at module level: ``import svdfill.kernels.triton_util`` works
without triton installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from typing import Callable

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
"""The environment variable Triton itself reads to run kernels in its interpreter."""

_BUILT: dict[tuple[Callable, bool], object] = {}

MIN_COMPILED_TRITON = (3, 5)
"""Oldest triton whose compiled kernels are used: up to 3.4 a tensor atomic returns the old
value to one thread only and 0 to the threads that hold copies of the same element
(triton-lang/triton#7402), and the fused fill reads those values (its candidate slots and
pruning bound). The interpreter never had the bug."""


@functools.lru_cache(maxsize=1)
def triton_version() -> tuple[int, ...] | None:
    """The installed triton's (major, minor), or None without triton."""
    if not triton_available():
        return None
    import triton

    parts = []
    for p in triton.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is the ``[triton]`` extra)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent: the torch path still works
        return False
    return True


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value in the environment right now."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in {"1", "true", "on", "yes"}


def triton_mode(device: torch.device | str) -> str | None:
    """How a fused kernel would run on ``device``: ``"compiled"``, ``"interpret"`` or None.

    ``"interpret"`` wins whenever ``TRITON_INTERPRET`` is set (also for CUDA tensors, which
    Triton's interpreter copies to the host and back), matching what Triton itself does.
    """
    if not triton_available():
        return None
    device = torch.device(device)
    if interpret_requested():
        return "interpret"
    if device.type == "cuda" and torch.cuda.is_available():
        return "compiled" if triton_version() >= MIN_COMPILED_TRITON else None
    return None


def unavailable_reason(device: torch.device | str) -> str:
    """One line saying why :func:`triton_mode` is None for ``device`` (for messages/skips)."""
    if not triton_available():
        return "triton is not installed (pip install 'svdfill[triton]')"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available in this process"
    if device.type == "cuda" and triton_version() < MIN_COMPILED_TRITON:
        want = ".".join(map(str, MIN_COMPILED_TRITON))
        return (f"triton {'.'.join(map(str, triton_version()))} is older than {want}, whose "
                f"atomics the fused kernels need (pip install 'triton>={want}')")
    return (f"fused Triton kernels need CUDA tensors (or {INTERPRET_ENV}=1 for the CPU "
            f"interpreter); got device {device}")


def build_kernel(fn: Callable, interpret: bool):
    """The Triton kernel for the plain Python kernel body ``fn``, compiled or interpreted.

    Cached per (function, mode), so a compiled kernel keeps Triton's own per-signature
    cache across calls.
    """
    key = (fn, bool(interpret))
    kernel = _BUILT.get(key)
    if kernel is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            kernel = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            kernel = JITFunction(fn)
        _BUILT[key] = kernel
    return kernel


def kernel_for(fn: Callable, device: torch.device | str):
    """The kernel for ``fn`` on ``device``, or raise RuntimeError saying why there is none."""
    mode = triton_mode(device)
    if mode is None:
        raise RuntimeError(unavailable_reason(device))
    return build_kernel(fn, interpret=(mode == "interpret"))


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _interpreter_fixes():
    """Two fixes to Triton's interpreter, active for one interpreted launch.

    1. Let an interpreted kernel call ``@triton.jit`` helpers that were compiled-mode objects.

    ``tl.sum``, ``tl.max``, ``tl.sort``… are ``@triton.jit`` functions created when triton is
    imported; if that happened before ``TRITON_INTERPRET=1`` was set, they are
    ``JITFunction`` objects whose ``__call__`` refuses to run outside a compiled kernel.
    For the duration of one interpreted launch, such calls are routed through the
    interpreter (exactly what they would be had the variable been set before import), and
    every language patch a call makes is undone when it returns.
    2. Runtime scalars work as ``range`` bounds on older triton + newer numpy (below).

    Process-global while active, hence the lock; only ever used in interpret mode.
    """
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    cache: dict[Callable, InterpretedFunction] = {}
    patch_lang = getattr(interpreter, "_patch_lang", None)

    def call(self, *args, **kwargs):
        fn = cache.get(self.fn)
        if fn is None:
            fn = cache[self.fn] = InterpretedFunction(self.fn)
        if patch_lang is None:  # another triton layout: its own device-call path
            return fn(*args, **kwargs)
        # InterpretedFunction.__call__ patches triton.language for the helper and never
        # undoes it (triton 3.9), which broke later *compiles* in the same process (a
        # tensor method left in interpreter form). Same steps, with the patch undone on the
        # way out, nested inside the launch's own patch.
        scope = patch_lang(self.fn)
        try:
            return fn.rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    # Scalars are 1-element arrays in the interpreter; before triton 3.7 it turned them into
    # loop bounds with int(array), which numpy >= 2.4 refuses for shape (1,) — so under the
    # device image's triton 3.6 + numpy 2.5 every `range(c0, c1, …)` with runtime bounds
    # failed. Same conversion as triton 3.9's (squeeze first), installed after the
    # interpreter's own tensor patch and undone with it.
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    with _PATCH_LOCK:
        saved = JITFunction.__call__
        JITFunction.__call__ = call
        if patch_tensor is not None:
            interpreter._patch_lang_tensor = patch_tensor_with_scalar_index
        try:
            yield
        finally:
            JITFunction.__call__ = saved
            if patch_tensor is not None:
                interpreter._patch_lang_tensor = patch_tensor


def launch(fn: Callable, device: torch.device | str, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Run the kernel body ``fn`` over ``grid`` on ``device`` (compiled or interpreted).

    ``kwargs`` carry the constexprs and launch options (``num_warps``, ``num_stages``).
    ``device`` must be the tensors' device: the launch runs under :func:`device_guard`.
    Raises RuntimeError (with the reason) when :func:`triton_mode` is None.
    """
    mode = triton_mode(device)
    if mode is None:
        raise RuntimeError(unavailable_reason(device))
    kernel = build_kernel(fn, interpret=(mode == "interpret"))
    # Triton launches on the *current* CUDA device: with tensors on cuda:1 and the current
    # device 0 the kernel would run on GPU 0 with GPU 1 pointers (an illegal address that
    # poisons the process). Enter the tensors' device for the launch.
    with device_guard(device):
        if mode == "interpret":
            with _interpreter_fixes():
                kernel[grid](*args, **kwargs)
        else:
            kernel[grid](*args, **kwargs)


def device_guard(device: torch.device | str):
    """The context :func:`launch` runs a kernel in: ``torch.cuda.device(device)`` for a
    CUDA device (current device switched for the launch, restored after), a no-op context
    otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def compile_report(fn: Callable, signature: dict[str, str], constexprs: dict, *,
                   num_warps: int = 4, num_stages: int = 3, arch: int = 90) -> dict:
    """Compile the kernel body ``fn`` ahead of time for an NVIDIA GPU of compute capability
    ``arch`` — no GPU needed — and read its resources off the cubin.

    Returns ``{"regs", "stack", "shared", "ldg128", "gmma", "hmma", "cubin_bytes"}``:
    registers per thread, stack frame bytes (non-zero = spills to local memory), static
    shared memory, and the counts of 16-byte global loads, Hopper warpgroup MMA (``*GMMA``)
    and older ``HMMA`` instructions in the SASS — the checks HOPPER.md asks for, available
    before any device time is spent. Pointers and ``stride*`` arguments are compiled as
    16-divisible, as a launch with aligned torch tensors specializes them.
    ``signature`` maps each non-constexpr parameter to a Triton type (``"*fp32"``, ``"i32"``…).
    """
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 warning only
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    jit = JITFunction(fn)
    # what a launch specializes on: torch allocations are 16-byte aligned, and row strides
    # like 64 or 128 are multiples of 16 (the JIT marks such arguments divisible by 16)
    hinted = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")]
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    src = ASTSource(jit, sig, dict(constexprs), attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = kernel.asm["cubin"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(path)], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", str(path)], check=True,
                              capture_output=True, text=True).stdout

    def field(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    return {"regs": field("REG"), "stack": field("STACK"), "shared": field("SHARED"),
            "ldg128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
            "gmma": len(re.findall(r"\b[HQ]GMMA\b", sass)),
            "hmma": len(re.findall(r"\bHMMA\b", sass)), "cubin_bytes": len(cubin)}


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ n (≥ 1); Triton block shapes must be powers of two."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
