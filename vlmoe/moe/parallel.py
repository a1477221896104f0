"""Expert parallelism over a whole model: each SparseMoE's experts sharded over a process
group (the exchange itself is in `vlmoe.moe.comm`, below the layer; these helpers walk the
model's layers, so they sit above it). Everything needed without Lightning is importable from
here: `init_expert_parallel`, `shard_experts`, `reduce_expert_gradients`, `clip_grad_norm_`,
`gather_expert_state_dict`, `unshard_experts`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import ConfigError
from .comm import (
    AllToAllMeter,
    ExpertParallelGroups,
    all_to_all,
    all_to_all_meter,
    expert_parallel_apply,
    forget_expert_parallel,
    init_expert_parallel,
)
from .experts import Experts
from .base import moe_layers

__all__ = [
    "ExpertParallelGroups", "init_expert_parallel", "forget_expert_parallel", "all_to_all", "AllToAllMeter", "all_to_all_meter",
    "expert_parallel_apply", "shard_experts", "unshard_experts", "sharded_expert_modules",
    "reduce_expert_gradients", "clip_grad_norm_", "gather_expert_state_dict", "gather_expert_optimizer_state",
    "slice_expert_optimizer_state",
]


def sharded_expert_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every path (shared modules under each of their names) -> a sharded Experts."""
    return {
        name: m for name, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, Experts) and m.is_sharded
    }


def shard_experts(module: nn.Module, groups: ExpertParallelGroups, broadcast_from: int | None = 0) -> list[str]:
    """Keep on this rank only its EP rank's experts of every SparseMoE in `module`.

    The full experts are first broadcast from global rank `broadcast_from` (None: skip), so
    every rank shards the same model. Returns the names of the sharded parameters and
    buffers (every alias of a shared layer): what DDP must leave alone. Collective."""
    for moe in moe_layers(module):
        if moe.experts.is_sharded:
            if moe.ep is not groups:
                raise RuntimeError("this model's experts are already sharded over another process group; unshard_experts first")
            continue
        if broadcast_from is not None:
            for t in [*moe.experts.parameters(), *moe.experts.buffers()]:
                dist.broadcast(t.data, src=broadcast_from)
        moe.shard_experts(groups)
    names = []
    for path, experts in sharded_expert_modules(module).items():
        prefix = f"{path}." if path else ""
        names += [prefix + n for n, _ in experts.named_parameters(recurse=False)]
        names += [prefix + n for n, _ in experts.named_buffers(recurse=False)]
    return names


def _gather_experts(t: torch.Tensor, groups: ExpertParallelGroups) -> torch.Tensor:
    """[L, ...] shards of the EP group -> [E, ...] (equal shards, in EP-rank order)."""
    parts = [torch.empty_like(t) for _ in range(groups.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=groups.ep_group)
    return torch.cat(parts)


def unshard_experts(module: nn.Module) -> None:
    """Gather every sharded SparseMoE's experts back onto each rank. Collective."""
    for moe in moe_layers(module):
        if moe.experts.is_sharded:
            full = {n: _gather_experts(p.data, moe.ep) for n, p in moe.experts.named_parameters(recurse=False)}
            moe.unshard_experts(full)


def gather_expert_state_dict(state_dict: dict, module: nn.Module) -> dict:
    """A copy of `state_dict` (from `module.state_dict()`) with each sharded expert tensor
    gathered to all E experts: the layout of a single-device model. Collective."""
    out = dict(state_dict)
    gathered: dict[int, torch.Tensor] = {}
    for path, experts in sharded_expert_modules(module).items():
        prefix = f"{path}." if path else ""
        for n, p in experts.named_parameters(recurse=False):
            key = prefix + n
            if key not in out:
                continue
            if id(p) not in gathered:
                gathered[id(p)] = _gather_experts(out[key].detach(), experts.groups)
            out[key] = gathered[id(p)]
    return out


def _indexed_params(optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _expert_param_owner(module: nn.Module) -> dict[int, nn.Module]:
    return {id(p): e for e in sharded_expert_modules(module).values() for p in e.parameters(recurse=False)}


def gather_expert_optimizer_state(state: dict, optimizer, module: nn.Module) -> dict:
    """`optimizer.state_dict()` with the per-parameter state of sharded experts (Adam's
    moments...) gathered to all E experts. Collective; the live state is not touched."""
    owner = _expert_param_owner(module)
    out = {**state, "state": dict(state["state"])}
    for i, p in enumerate(_indexed_params(optimizer)):
        if id(p) not in owner or i not in out["state"]:
            continue
        groups = owner[id(p)].groups
        out["state"][i] = {
            k: _gather_experts(v, groups) if torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in out["state"][i].items()
        }
    return out


def slice_expert_optimizer_state(state: dict, optimizer, module: nn.Module) -> dict:
    """The inverse of `gather_expert_optimizer_state`: keep this rank's experts' rows of
    full-size expert state (as written by any EP size, 1 included)."""
    owner = _expert_param_owner(module)
    out = {**state, "state": dict(state["state"])}
    for i, p in enumerate(_indexed_params(optimizer)):
        if id(p) not in owner or i not in out["state"]:
            continue
        experts = owner[id(p)]
        entry = {}
        for k, v in out["state"][i].items():
            if torch.is_tensor(v) and v.ndim and v.shape[1:] == p.shape[1:] and v.shape[0] != p.shape[0]:
                if v.shape[0] != experts.num_total_experts:
                    raise ConfigError(
                        f"optimizer state {k!r} of an expert parameter has {v.shape[0]} experts; the model has "
                        f"{experts.num_total_experts}: the checkpoint belongs to a different model"
                    )
                v = v.narrow(0, experts.expert_offset, experts.num_experts).clone()
            entry[k] = v
        out["state"][i] = entry
    return out


def reduce_expert_gradients(module: nn.Module, groups: ExpertParallelGroups) -> None:
    """Sum each sharded expert gradient over its EDP group and divide by the world size:
    with losses averaged over ranks (what DDP does for the dense parameters) this is the
    gradient of the global loss. Missing gradients (no rows reached an expert shard) count
    as zero. Collective over the EDP group."""
    params = {id(p): p for e in sharded_expert_modules(module).values() for p in e.parameters(recurse=False)}
    grads = []
    for p in params.values():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    if groups.edp_size > 1:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = _flatten_dense_tensors(same)
            dist.all_reduce(flat, group=groups.edp_group)
            for g, r in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(r)
    for g in grads:
        g.div_(groups.world_size)


def clip_grad_norm_(parameters, max_norm: float, module: nn.Module, groups: ExpertParallelGroups, eps: float = 1e-6) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) over the whole model although its experts
    are sharded: the expert shards' squared norms are summed over the EP group, so every
    rank computes the same norm and applies the same scale. Call after the gradients are
    reduced. Collective over the EP group."""
    expert_ids = set(_expert_param_owner(module))
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    dense = [p.grad for p in params if id(p) not in expert_ids]
    expert = [p.grad for p in params if id(p) in expert_ids]
    device = grads[0].device if grads else torch.device("cpu")
    sq = lambda gs: sum((g.detach().float().pow(2).sum() for g in gs), torch.zeros((), device=device))  # noqa: E731
    expert_sq = sq(expert)
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = (sq(dense) + expert_sq).sqrt()
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
