"""Expert parallelism, the communication layer below SparseMoE: process groups and the
token exchange with torch.distributed's `all_to_all_single` (uneven splits; NCCL and gloo).
The model-walking helpers (sharding, gradient reduction, checkpoints) sit above the layer,
in `vlmoe.moe.parallel`.

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
from ..errors import ConfigError

__all__ = [
    "ExpertParallelGroups", "init_expert_parallel", "forget_expert_parallel", "all_to_all", "AllToAllMeter", "all_to_all_meter",
    "expert_parallel_apply",
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
        raise ConfigError(
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


def forget_expert_parallel() -> None:
    """Drop the cached EP / EDP groups (before `destroy_process_group`, which ends them)."""
    _GROUPS.clear()


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
