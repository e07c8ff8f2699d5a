"""Sharded data parallelism with torch FSDP2 (`fully_shard`): each process holds a 1/N shard of the
policy's parameters, gradients and optimizer state, and gathers one decoder layer at a time for
its forward and backward passes.

`shard_policy` shards every decoder layer (the classes the model lists in `_no_split_modules`) and
then the `PolicyModel` itself (embeddings, final norm, LM head, value head). A `Learner` given a
sharded module hands only the optimizer to accelerate: FSDP2 reduce-scatters the gradients itself
(mean over processes), so the update is the same as data parallelism over the union of the
processes' rollouts. This path runs on CPUs (gloo) as well as GPUs; accelerate's own FSDP2 plugin
is used only on GPUs (it keeps DDP for multi-process CPU training).
"""

from __future__ import annotations

import torch
from torch import nn


def shard_policy(module: nn.Module, mesh=None) -> nn.Module:
    """Shards a `PolicyModel` in place (needs an initialised process group); returns it."""
    from torch.distributed.fsdp import fully_shard

    lm = module.lm
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    layer_classes = set(getattr(inner, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(inner).__name__} does not name its decoder layers (_no_split_modules); cannot shard it")
    for m in list(module.modules()):
        if type(m).__name__ in layer_classes:
            fully_shard(m, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on every process (a collective: all processes must call it)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}
