"""DistributedDataParallel over the replicated user table only.

Each rank owns an item shard, so its item rows and item biases see only its own
ratings and need no communication: they are hidden from DDP with DDP's
params-and-buffers-to-ignore mechanism. The user factors and biases are replicated and
DDP all-reduces their gradients every backward.

Gradient scale: DDP *averages* gradients over ranks. Each rank's loss covers a disjoint
slice of the global batch (its items' ratings), so the single-process gradient of a summed
loss is the *sum* of the ranks' user gradients and each rank's own item gradient. A gradient
hook on the user parameters multiplies by W before DDP's averaging, which makes one
W-process step the same update as one single-process step over the union of the W local
batches — for sum and per-rating losses alike, sparse or dense.

Sparse: gloo all-reduces sparse gradients (only the touched user rows travel); nccl has no
sparse all-reduce, so there the user table is synchronized densely.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from svdfill.kernels.model import ITEM_PARAMS, USER_PARAMS


class _UserSyncView(nn.Module):
    """What DDP wraps: the model as a child (DDP matches ignored names as
    ``f"{module_name}.{param_name}"``, which only lines up with ``named_parameters()`` for
    parameters of a child module, not of the root). With ``sparse``, the user parameters are
    also registered — shared, not copied — in ``nn.Embedding(sparse=True)`` modules listed
    before the model, so DDP expects sparse gradients for them (it decides by module type).
    The forward is the model's."""

    def __init__(self, model: nn.Module, sparse: bool):
        super().__init__()
        if sparse:
            # isinstance(module, nn.Embedding) and module.sparse: DDP's sparse test
            self.user_factors_emb = nn.Embedding(1, 1, sparse=True)
            self.user_factors_emb.weight = model.user_factors
            self.user_bias_emb = nn.Embedding(1, 1, sparse=True)
            self.user_bias_emb.weight = model.user_bias
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _scale_hook(factor: float):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * factor
    return hook


def wrap_user_ddp(model: nn.Module, device: torch.device, *, sparse: bool = False) -> nn.Module:
    """``model`` inside DDP, with item parameters and the ``global_mean`` buffer ignored.

    ``model`` is a :class:`svdfill.kernels.model.BiasedMF` whose item tables hold this rank's
    shard; the replicated user tables must start equal on every rank (DDP broadcasts rank 0's
    at construction). ``sparse=True`` only takes effect when the model's forward produces
    sparse user gradients (``model.sparse``); it is ignored on nccl (the caller decides).
    Returns the DDP module: call it as you would call ``model`` (``.module.model`` is ``model``).
    """
    import torch.distributed as dist

    names = {n for n, _ in model.named_parameters()}
    missing = [n for n in USER_PARAMS + ITEM_PARAMS if n not in names]
    if missing:
        raise TypeError(f"wrap_user_ddp needs a BiasedMF-like model; missing parameters {missing}")
    ignore = list(ITEM_PARAMS) + [n for n, _ in model.named_buffers()]
    world = dist.get_world_size()
    for n in USER_PARAMS:
        p = getattr(model, n)
        if not getattr(p, "_svdfill_scaled", False):
            p.register_hook(_scale_hook(float(world)))
            p._svdfill_scaled = True
    use_sparse = bool(sparse and getattr(model, "sparse", False))
    if bool(getattr(model, "sparse", False)) and not use_sparse:
        raise ValueError("the model makes sparse gradients but this backend all-reduces only "
                         "dense ones (nccl): build the model with sparse=False")
    module = _UserSyncView(model, use_sparse)
    DDP._set_params_and_buffers_to_ignore_for_model(module, [f"model.{n}" for n in ignore])
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(module, device_ids=device_ids, broadcast_buffers=False,
              find_unused_parameters=False)
    return ddp
