"""Routing: which (token, expert) pairs are kept, in which buffer slot, with which weight.

Shape legend (used as suffixes on tensor names in this package's MoE code):
    G routing groups, S tokens per group, E experts, K choices per token (top-k),
    C capacity (buffer slots per expert and group), N = G*S*K assignments,
    M kept assignments, T tokens (all groups), D model dim, H expert hidden dim.

Semantics follow google-research/vmoe (`get_top_experts_per_item_dispatcher` and
`get_top_items_per_expert_dispatcher`): all top-1 choices are placed before any top-2
choice; with Batch Prioritized Routing (BPR) tokens are ordered by their top-1 gate,
descending, ties keeping position order; a choice that overflowed its expert still
occupies a position in that expert's running count, so later choices see it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ..errors import ConfigError

__all__ = ["Routing", "compute_capacity", "route", "route_unchecked", "expert_choice_route", "expert_choice_unchecked", "top_k_gates"]


def compute_capacity(
    group_size: int | torch.Tensor,
    num_experts: int,
    top_k: int = 1,
    capacity_factor: float = 1.0,
    multiple_of: int | None = 4,
) -> int | torch.Tensor:
    """Buffer slots per expert: ceil(group_size * top_k * capacity_factor / num_experts),
    rounded up to a multiple of `multiple_of` (vmoe's `compute_capacity`). A tensor of group
    sizes (one per group, e.g. each example's real tokens; 0 counts as 1) gives a tensor of
    capacities by the same rule, without a host sync."""
    per_group = torch.is_tensor(group_size)
    if (not per_group and group_size < 1) or num_experts < 1 or top_k < 1:
        raise ConfigError(
            f"compute_capacity needs group_size, num_experts and top_k >= 1; "
            f"got group_size={group_size}, num_experts={num_experts}, top_k={top_k}"
        )
    number = isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
    if not (number and capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ConfigError(
            f"capacity_factor must be a positive finite number (or None for dropless routing "
            f"in SparseMoE); got {capacity_factor!r}"
        )
    if per_group:
        capacity = torch.ceil(group_size.clamp_min(1).double() * top_k * capacity_factor / num_experts).long()
    else:
        capacity = math.ceil(group_size * top_k * capacity_factor / num_experts)  # >= 1: all factors are positive
    if multiple_of and multiple_of > 0:
        capacity = capacity + (-capacity) % multiple_of
    return capacity


@dataclass
class Routing:
    """Result of top-k routing. All tensors are [..., S, K] (leading G if the gates had it).

    expert_index: chosen expert per (token, choice).
    slot: position in that expert's buffer, -1 where the choice was dropped (over capacity,
        masked token, or rejected by GShard random routing).
    combine_weight: gate value of a kept choice (renormalized if asked), 0 where dropped.
    """

    expert_index: torch.Tensor
    slot: torch.Tensor
    combine_weight: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        return self.slot >= 0


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: max |t| propagates NaN and inf (one reduction, no
    bool tensor of t's size)."""
    return t.numel() == 0 or bool(torch.isfinite(t.abs().amax()))


def _check_gates(gates: torch.Tensor, name: str = "gates") -> torch.Tensor:
    if gates.ndim not in (2, 3):
        raise ConfigError(f"{name} must be [S, E] or [G, S, E]; got shape {tuple(gates.shape)}")
    if not gates.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of probabilities; got {gates.dtype}")
    if not _all_finite(gates):
        raise ConfigError(
            f"{name} contain non-finite values (NaN or inf): check the router input and "
            f"weights, or lower the learning rate"
        )
    return gates if gates.ndim == 3 else gates.unsqueeze(0)


def top_k_gates(gates_GSE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gate values and experts, in descending order, ties broken towards the lower
    expert index (as jax.lax.top_k does), which `torch.topk` does not promise.

    Up to 4 choices: k rounds of argmax (which returns the first maximum), each masking the
    expert it found; more: a stable descending sort. Either way the result is the stable
    sort's, with static shapes and no host sync."""
    if top_k > 4:
        values, index = torch.sort(gates_GSE, dim=-1, descending=True, stable=True)
        return values[..., :top_k], index[..., :top_k]
    picks, rest = [], gates_GSE.detach()
    for k in range(top_k):
        pick = rest.argmax(-1, keepdim=True)
        picks.append(pick)
        if k + 1 < top_k:
            rest = rest.scatter(-1, pick, -math.inf)
    index = picks[0] if top_k == 1 else torch.cat(picks, -1)
    return gates_GSE.gather(-1, index), index


def route(
    gates: torch.Tensor,
    top_k: int,
    capacity: int | None,
    batch_priority: bool = True,
    mask: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    renormalize: bool = False,
    selection_bias: torch.Tensor | None = None,
) -> Routing:
    """Top-k experts per token with a per-expert capacity (V-MoE's routing).

    Args:
        gates: [S, E] or [G, S, E] routing probabilities; each group is routed independently.
        top_k: experts chosen per token (K).
        capacity: buffer slots per expert and group (an int, or a tensor: one value, or one
            per group [G]); None keeps every choice (dropless).
        batch_priority: BPR (priority by top-1 gate) instead of priority by position.
        mask: [S] or [G, S] bool, False for tokens (e.g. text padding) that take no capacity.
        keep: [S, K] or [G, S, K] bool, False for choices that are not dispatched at all
            (GShard's random second-expert routing); they take no capacity.
        renormalize: divide the kept weights of each token by their sum (sum to 1).
        selection_bias: [E] (or one row per token, gates' shape) added to the gates to choose
            each token's experts only (auxiliary-loss-free balancing, DeepSeek-V3); the combine
            weights and the BPR priority stay the unbiased gates of the chosen experts.
    """
    squeeze = gates.ndim == 2
    gates_GSE = _check_gates(gates)
    G, S, E = gates_GSE.shape
    if not 1 <= top_k <= E:
        raise ConfigError(f"top_k must be in [1, num_experts={E}]; got top_k={top_k}")
    if torch.is_tensor(capacity):  # one capacity per group (per-example evaluation)
        if capacity.numel() not in (1, G) or bool((capacity < 1).any()):
            raise ConfigError(f"a per-group capacity needs {G} values >= 1; got {capacity.tolist()}")
    elif capacity is not None and capacity < 1:
        raise ConfigError(f"capacity must be >= 1 (or None for dropless); got {capacity}")
    if selection_bias is not None and selection_bias.shape != (E,) and selection_bias.shape != gates.shape:
        raise ConfigError(f"selection_bias must have one value per expert ({E}) or the gates' shape {tuple(gates.shape)}; "
                          f"got shape {tuple(selection_bias.shape)}")
    out = route_unchecked(gates_GSE, top_k, capacity, batch_priority, _valid_choices(G, S, top_k, mask, keep, gates.device),
                          renormalize, selection_bias)
    if squeeze:
        out = Routing(out.expert_index[0], out.slot[0], out.combine_weight[0])
    return out


def route_unchecked(gates_GSE: torch.Tensor, top_k: int, capacity, batch_priority: bool, valid_GSK: torch.Tensor,
                    renormalize: bool = False, selection_bias: torch.Tensor | None = None) -> Routing:
    """`route` on [G, S, E] gates without the input checks (which read values back to the
    host): the layer's path, whose inputs are its own. capacity: an int, a tensor of one
    value or one per group ([G]), or None; valid_GSK: the choices that may take capacity."""
    G, S, E = gates_GSE.shape
    K = top_k
    if torch.is_tensor(capacity):
        capacity = capacity.reshape(-1, 1).to(gates_GSE.device)
    if selection_bias is None:
        combine_GSK, expert_GSK = top_k_gates(gates_GSE, K)
    else:
        bias = selection_bias.to(gates_GSE.dtype)
        _, expert_GSK = top_k_gates(gates_GSE + (bias.reshape(gates_GSE.shape) if bias.ndim > 1 else bias), K)
        combine_GSK = gates_GSE.gather(-1, expert_GSK)

    if batch_priority:
        # Stable descending sort: equal top-1 gates keep their position order.
        order_GS = torch.sort(combine_GSK[..., 0], dim=-1, descending=True, stable=True).indices
        expert_ord_GSK = expert_GSK.gather(1, order_GS.unsqueeze(-1).expand(-1, -1, K))
        valid_ord_GSK = valid_GSK.gather(1, order_GS.unsqueeze(-1).expand(-1, -1, K))
    else:
        expert_ord_GSK, valid_ord_GSK = expert_GSK, valid_GSK

    # K-major flattening puts every top-1 choice ahead of every top-2 choice.
    expert_GN = expert_ord_GSK.transpose(1, 2).reshape(G, K * S)
    valid_GN = valid_ord_GSK.transpose(1, 2).reshape(G, K * S)
    position_GN = _running_count(expert_GN, valid_GN, E)
    kept_GN = valid_GN if capacity is None else valid_GN & (position_GN < capacity)
    slot_GN = torch.where(kept_GN, position_GN, torch.full_like(position_GN, -1))
    slot_ord_GSK = slot_GN.reshape(G, K, S).transpose(1, 2)
    if batch_priority:
        slot_GSK = torch.empty_like(slot_ord_GSK)
        slot_GSK.scatter_(1, order_GS.unsqueeze(-1).expand(-1, -1, K), slot_ord_GSK)
    else:
        slot_GSK = slot_ord_GSK.contiguous()

    kept_GSK = slot_GSK >= 0
    combine_GSK = torch.where(kept_GSK, combine_GSK, torch.zeros_like(combine_GSK))
    if renormalize:
        denom_GS1 = combine_GSK.sum(-1, keepdim=True)
        combine_GSK = combine_GSK / torch.where(denom_GS1 > 0, denom_GS1, torch.ones_like(denom_GS1))
    return Routing(expert_GSK, slot_GSK, combine_GSK)


def _valid_choices(G: int, S: int, K: int, mask, keep, device) -> torch.Tensor:
    """[G, S, K] bool: the choices that may take capacity (a real token's, not rejected)."""
    valid_GSK = torch.ones(G, S, K, dtype=torch.bool, device=device)
    if mask is not None:
        mask_GS = mask.reshape(G, S) if mask.numel() == G * S else None
        if mask_GS is None or mask.dtype != torch.bool:
            raise ConfigError(f"mask must be a bool tensor with {G}x{S} elements; got {tuple(mask.shape)} {mask.dtype}")
        valid_GSK &= mask_GS.unsqueeze(-1)
    if keep is not None:
        if keep.numel() != G * S * K or keep.dtype != torch.bool:
            raise ConfigError(f"keep must be a bool tensor with {G}x{S}x{K} elements; got {tuple(keep.shape)}")
        valid_GSK &= keep.reshape(G, S, K)
    return valid_GSK


def _running_count(expert_GN: torch.Tensor, valid_GN: torch.Tensor, E: int) -> torch.Tensor:
    """For each valid choice n, how many valid choices before it in its group picked the
    same expert (its position in that expert's queue); arbitrary where not valid.

    A stable sort by expert (invalid choices last) lines each expert's choices up in order:
    a choice's position is its rank minus the rank of its expert's first choice. O(N log N),
    where a running one-hot count is O(N E)."""
    G, N = expert_GN.shape
    key_GN = torch.where(valid_GN, expert_GN, torch.full_like(expert_GN, E))
    key_sorted_GN, perm_GN = torch.sort(key_GN, dim=1, stable=True)
    count_GE = torch.zeros(G, E + 1, dtype=torch.long, device=expert_GN.device)
    count_GE.scatter_add_(1, key_GN, torch.ones_like(key_GN))
    first_GE = count_GE.cumsum(1) - count_GE  # rank of each expert's first choice
    rank_GN = torch.arange(N, device=expert_GN.device).expand(G, N)
    position_sorted_GN = rank_GN - first_GE.gather(1, key_sorted_GN)
    return torch.empty_like(position_sorted_GN).scatter_(1, perm_GN, position_sorted_GN)


def expert_choice_route(
    gates: torch.Tensor, capacity: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert Choice routing (Zhou et al. 2022): every expert takes its top-`capacity`
    tokens by gate value (ties towards the lower position).

    Returns token_index [..., E, C] and combine_weight [..., E, C]; masked tokens are
    never chosen (their entries get weight 0 and index -1)."""
    squeeze = gates.ndim == 2
    gates_GSE = _check_gates(gates)
    G, S, E = gates_GSE.shape
    if capacity < 1:
        raise ConfigError(f"capacity must be >= 1; got {capacity}")
    if mask is not None and (mask.numel() != G * S or mask.dtype != torch.bool):
        raise ConfigError(f"mask must be a bool tensor with {G}x{S} elements; got {tuple(mask.shape)}")
    token_GEC, weight_GEC = expert_choice_unchecked(gates_GSE, capacity, None if mask is None else mask.reshape(G, S))
    if squeeze:
        return token_GEC[0], weight_GEC[0]
    return token_GEC, weight_GEC


def expert_choice_unchecked(gates_GSE: torch.Tensor, capacity: int, mask_GS: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_choice_route` on [G, S, E] gates without the input checks (the layer's path)."""
    G, S, E = gates_GSE.shape
    C = min(capacity, S)
    scores_GES = gates_GSE.transpose(1, 2)
    if mask_GS is not None:
        scores_GES = scores_GES.masked_fill(~mask_GS.reshape(G, 1, S), -1.0)
    values_GEC, token_GEC = torch.sort(scores_GES, dim=-1, descending=True, stable=True)
    values_GEC, token_GEC = values_GEC[..., :C], token_GEC[..., :C]
    chosen_GEC = values_GEC >= 0
    weight_GEC = torch.where(chosen_GEC, gates_GSE.transpose(1, 2).gather(2, token_GEC), 0.0)
    token_GEC = torch.where(chosen_GEC, token_GEC, torch.full_like(token_GEC, -1))
    return token_GEC, weight_GEC
