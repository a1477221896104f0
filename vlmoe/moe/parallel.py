"""Expert parallelism: each SparseMoE's experts sharded over a process group, tokens
exchanged with torch.distributed's `all_to_all_single` (uneven splits; NCCL and gloo).

Ranks: the world of W ranks is cut into W / P expert-parallel (EP) groups of P consecutive
ranks (consecutive so that, with P <= GPUs per node, the all-to-all stays inside a node).
EP rank r of a group holds experts [r * E/P, (r+1) * E/P) of every MoE layer. The ranks
with the same EP rank in different groups hold the same experts: they form an
expert-data-parallel (EDP) group of size W / P, in which expert gradients are summed.

Legend: M routed rows on this rank (sorted by expert), R rows received, P EP size,
E experts in the layer, L = E / P local experts, D model dim.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "ExpertParallelGroups", "init_expert_parallel", "all_to_all", "AllToAllMeter", "all_to_all_meter",
    "expert_parallel_apply", "shard_experts", "unshard_experts", "sharded_expert_modules",
    "reduce_expert_gradients", "clip_grad_norm_", "gather_expert_state_dict", "gather_expert_optimizer_state",
    "slice_expert_optimizer_state",
]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the expert-parallel layout (see the module docstring)."""

    world_size: int
    ep_size: int  # P: ranks sharing one copy of the experts
    ep_rank: int
    ep_group: object  # torch.distributed ProcessGroup
    edp_size: int  # W / P: copies of each expert shard
    edp_rank: int
    edp_group: object


_GROUPS: dict[tuple[int, int, int], ExpertParallelGroups] = {}


def init_expert_parallel(ep_size: int) -> ExpertParallelGroups:
    """Create (once per process group and size) the EP and EDP groups. Collective: every
    rank must call it, in the same order as its other `new_group` calls."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "expert parallelism needs an initialised torch.distributed process group; launch with "
            "torchrun / a Lightning DDP strategy (ExpertParallelStrategy does this for you)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(
            f"expert_parallel_size={ep_size!r} must be a positive divisor of the world size {world}; "
            f"choose one of {[p for p in range(1, world + 1) if world % p == 0]}"
        )
    key = (id(dist.group.WORLD), world, ep_size)
    if key in _GROUPS:
        return _GROUPS[key]
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # every rank creates every group, in the same order
        ranks = list(range(start, start + ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for r in range(ep_size):
        ranks = list(range(r, world, ep_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            edp_group = g
    groups = ExpertParallelGroups(
        world_size=world, ep_size=ep_size, ep_rank=rank % ep_size, ep_group=ep_group,
        edp_size=world // ep_size, edp_rank=rank // ep_size, edp_group=edp_group,
    )
    _GROUPS[key] = groups
    return groups


class AllToAllMeter:
    """Wall time, bytes sent to other ranks and calls of the expert all-to-alls (forward
    and backward), plus the rows this rank sent to each EP rank: the load per rank. On
    CUDA the timing synchronises the device after each exchange (`sync_cuda`), because
    NCCL returns before the data has moved; turn it off to take that sync out of a step."""

    def __init__(self):
        self.sync_cuda = True
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.bytes_sent = 0
        self.calls = 0
        self.rows_to_rank: torch.Tensor | None = None

    def add(self, seconds: float, bytes_sent: int) -> None:
        self.seconds += seconds
        self.bytes_sent += bytes_sent
        self.calls += 1

    def add_rows(self, rows_P: list[int]) -> None:
        rows_P = torch.tensor(rows_P, dtype=torch.float64)
        self.rows_to_rank = rows_P if self.rows_to_rank is None else self.rows_to_rank + rows_P


all_to_all_meter = AllToAllMeter()


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if x.is_cuda and all_to_all_meter.sync_cuda:
        torch.cuda.synchronize(x.device)
    row_bytes = x.element_size() * (x.shape[1:].numel() if x.ndim > 1 else 1)
    me = dist.get_rank(group)
    all_to_all_meter.add(time.perf_counter() - t0, (sum(in_splits) - in_splits[me]) * row_bytes)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single: send rows `in_splits[r]` to rank r of `group`,
    receive `out_splits[r]` rows from rank r (uneven splits allowed)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def expert_parallel_apply(experts, x_MD: torch.Tensor, counts_E: torch.Tensor, groups: ExpertParallelGroups) -> torch.Tensor:
    """Run rows sorted by (global) expert on the experts that own them and bring the
    results back in the same order. `experts` holds this rank's L = E / P experts;
    counts_E are this rank's row counts for all E experts."""
    P, L = groups.ep_size, experts.num_experts
    send_PL = counts_E.view(P, L)
    recv_PL = torch.empty_like(send_PL)
    # Tell each rank how many rows it gets for each of its experts (one small exchange;
    # its .tolist() is the only host sync of the layer).
    dist.all_to_all_single(recv_PL.view(-1), send_PL.reshape(-1).contiguous(), group=groups.ep_group)
    in_splits, out_splits = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()
    all_to_all_meter.add_rows(in_splits)
    x_RD = all_to_all(x_MD, out_splits, in_splits, groups.ep_group)
    # Rows arrive by (source rank, local expert); the experts want them by local expert.
    local_R = torch.repeat_interleave(
        torch.arange(L, device=x_RD.device).repeat(P), recv_PL.reshape(-1), output_size=x_RD.shape[0]
    )
    order_R = torch.sort(local_R, stable=True).indices
    y_RD = experts(x_RD.index_select(0, order_R), recv_PL.sum(0))
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return all_to_all(y_RD.index_select(0, inverse_R), in_splits, out_splits, groups.ep_group)


# -- model-level helpers ----------------------------------------------------------------
def _moe_layers(module: nn.Module):
    from .layer import SparseMoE

    seen = set()
    for m in module.modules():  # modules() visits a shared layer once
        if isinstance(m, SparseMoE) and id(m) not in seen:
            seen.add(id(m))
            yield m


def sharded_expert_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every path (shared modules under each of their names) -> a sharded Experts."""
    from .experts import Experts

    return {
        name: m for name, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, Experts) and m.is_sharded
    }


def shard_experts(module: nn.Module, groups: ExpertParallelGroups, broadcast_from: int | None = 0) -> list[str]:
    """Keep on this rank only its EP rank's experts of every SparseMoE in `module`.

    The full experts are first broadcast from global rank `broadcast_from` (None: skip), so
    every rank shards the same model. Returns the names of the sharded parameters and
    buffers (every alias of a shared layer): what DDP must leave alone. Collective."""
    for moe in _moe_layers(module):
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
    for moe in _moe_layers(module):
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
                    raise ValueError(
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
