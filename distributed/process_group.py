"""Starting and ending the torch.distributed process group.

Two ways in: ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment; :func:`init_from_env` calls ``init_process_group``) and Ray Train's TorchTrainer
(the group already exists when the worker function starts;
:func:`svdfill.distributed.ray_train.ray_train_world` only reads it). nccl needs one GPU per rank; gloo
runs anywhere and is the one backend with sparse all-reduce.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → nccl on CUDA, gloo otherwise; nccl without CUDA is an error."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; expected auto, gloo or nccl")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend nccl needs CUDA devices (set train.device = \"cuda\" or use gloo)")
    return backend


def local_device(requested: str | torch.device, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:<local_rank>`` (one GPU per rank)."""
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def shared_gpu(requested: str | torch.device, local_world_size: int) -> str | None:
    """Why the ``local_world_size`` ranks of this node would share a GPU (an explicit
    ``cuda:N`` for all of them, or more ranks than GPUs), or None."""
    dev = torch.device(requested)
    if dev.type != "cuda" or local_world_size <= 1:
        return None
    if dev.index is not None:
        return f"all {local_world_size} ranks of this node were given {dev}"
    n = torch.cuda.device_count()
    if local_world_size > n:
        return f"{local_world_size} ranks on this node and {n} GPU(s)"
    return None


def launched_by_torchrun() -> bool:
    """True when every variable torchrun sets is present."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_from_env(device: str | torch.device = "cpu", backend: str = "auto",
                  timeout_s: float = 600.0) -> tuple[int, int, torch.device, str]:
    """Join the group described by torchrun's environment.

    Returns ``(rank, world_size, device, backend)``. Without torchrun's variables this is
    a one-process world: no group is created (``dist.is_initialized()`` stays False).
    """
    if not launched_by_torchrun():
        dev = local_device(device, 0)
        return 0, 1, dev, resolve_backend(backend, dev)
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = local_device(device, local_rank)
    be = resolve_backend(backend, dev)
    why = shared_gpu(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if be == "nccl" and why is not None:
        # NCCL fails at communicator init when two ranks of one group share a GPU
        if backend == "nccl":
            raise ValueError(f"backend nccl needs one GPU per rank: {why}; use backend gloo "
                             "or one process per GPU")
        import warnings

        warnings.warn(f"{why}: NCCL needs one GPU per rank, so the ranks talk over gloo "
                      "(tensors go through host memory)", RuntimeWarning, stacklevel=2)
        be = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if be == "nccl" else {}
        dist.init_process_group(be, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dist.get_rank(), dist.get_world_size(), dev, dist.get_backend()


def shutdown() -> None:
    """Leave the group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
