"""Sharded data parallelism with torch FSDP2 (`fully_shard`): each process holds a 1/N shard of the
policy's parameters, gradients and optimizer state, and gathers one decoder layer at a time for
its forward and backward passes.

`shard_policy` shards every decoder layer (the classes the model lists in `_no_split_modules`) and
then the `PolicyModel` itself (embeddings, final norm, LM head, value head). A `Learner` given a
sharded module hands only the optimizer to accelerate: FSDP2 reduce-scatters the gradients itself
(mean over processes), so the update is the same as data parallelism over the union of the
processes' rollouts. This path runs on CPUs (gloo) as well as GPUs; accelerate's own FSDP2 plugin
does not (accelerate turns FSDP on only for GPU-like devices and keeps DDP for multi-process CPU).

Whole runs (`train.fsdp=true`): sampling and evaluation need every weight, token after token, and
each process samples a different number of tokens, so a per-layer all-gather at every forward would
deadlock. The weights are therefore gathered once after each update (`gather_full`) and kept whole
for the rollout, the scoring and the evaluation, then released (`release_full`) when the next update
starts: the gradients and the optimizer state (3x the weights with AdamW) stay sharded throughout,
the weights are sharded during the update. Checkpoints hold each process's shards of the weights
and optimizer state (safetensors, one file per process); `final/` is written by the main process from the gathered weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from cory.errors import UsageError


def shard_policy(module: nn.Module, mesh=None) -> nn.Module:
    """Shards a `PolicyModel` in place (needs an initialised process group); returns it."""
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
    return isinstance(module, FSDPModule)


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def gather_full(module: nn.Module) -> None:
    """Every process: all-gathers every shard and keeps the weights whole until `release_full`
    (forwards then run no collective, so processes may run different numbers of them)."""
    modules = fsdp_modules(module)
    # Initialise the root before any layer runs on its own (sampling calls the LM, not the root),
    # or that layer would take itself for the root.
    modules[0]._get_fsdp_state()._lazy_init()
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()


def release_full(module: nn.Module) -> None:
    """Every process: frees the whole weights; forwards gather them one layer at a time again."""
    for m in fsdp_modules(module):
        m.reshard()
        m.set_reshard_after_forward(True, recurse=False)


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state from weights held whole by `gather_full`, without any collective (so the
    main process alone may save it). module.state_dict() would return the shards."""
    state = dict(module.named_parameters(remove_duplicate=False))
    for prefix, m in module.named_modules(remove_duplicate=False):
        for name, buf in m._buffers.items():  # persistent buffers only, as state_dict() has them
            if buf is not None and name not in m._non_persistent_buffers_set:
                state[f"{prefix}.{name}" if prefix else name] = buf
    if any(isinstance(v, DTensor) for v in state.values()):
        raise RuntimeError("gathered_state_dict needs the weights gathered (gather_full) first")
    return {k: v.detach() for k, v in state.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def save_sharded(folder, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each process writes its shards of the weights and of the optimizer state to
    `folder/rank{r}.safetensors` (no pickles: torch's distributed checkpoint reads its metadata
    with pickle). Resuming needs the same number of processes."""
    tensors = {f"param/{n}": _local(p.detach()) for n, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{i}/{key}"] = _local(value.detach())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / f"rank{rank}.safetensors"),
              metadata={"world_size": str(world)})


def load_sharded(folder, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The inverse of `save_sharded`, into the same sharding (same number of processes)."""
    path = Path(folder) / f"rank{dist.get_rank()}.safetensors"
    with safe_open(str(path), "pt") as fh:
        world = int(fh.metadata()["world_size"])
    if world != dist.get_world_size():
        raise UsageError(f"this FSDP checkpoint was written by {world} processes; resume it with {world}, not {dist.get_world_size()}")
    tensors = load_file(str(path))
    with torch.no_grad():
        for n, p in module.named_parameters():
            _local(p).copy_(tensors[f"param/{n}"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        prefix = f"optim/{i}/"
        state = {}
        for key in [k[len(prefix):] for k in tensors if k.startswith(prefix)]:
            saved = tensors[prefix + key]
            if key == "step":  # AdamW's step count is a plain scalar tensor
                state[key] = saved.clone()
            else:  # moments are sharded like their parameter
                state[key] = torch.zeros_like(p.detach())
                _local(state[key]).copy_(saved)
        if state:
            optimizer.state[p] = state
