"""Routers: given the gates of a routing group, which (token, expert) pairs are kept, in
which buffer slot and with which weight. Two families behind one interface:

- `TokenChoice`: each token picks its top-k experts (V-MoE's "topk", Switch, GShard's top-2
  with random routing of the second expert, Mixtral's top-k softmax), and experts take them
  in priority order up to their capacity (BPR or position);
- `ExpertChoice`: each expert picks its top-C tokens (Zhou et al. 2022).

Both return an `Assignment` and say how many choices each token makes (`choices_per_token`)
and how the dropped share is counted, so nothing outside this file branches on the router.
The gate algebra itself is in `vlmoe.moe.routing` (vmoe's semantics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LayerConfig, RoutingOptions
from .routing import compute_capacity, expert_choice_unchecked, route_unchecked, top_k_gates

__all__ = ["Assignment", "Router", "TokenChoice", "ExpertChoice", "make_router"]


@dataclass
class Assignment:
    """Every choice of every group, flat over N = G*S*K (token choice) or G*E*C (expert
    choice). token_N indexes the padded token list (group g's tokens are g*S ... g*S+S-1).
    Every tensor has a shape known before the data is seen: dropped choices stay in the
    lists with slot -1 and weight 0."""

    token_N: torch.Tensor
    expert_N: torch.Tensor
    group_N: torch.Tensor
    slot_N: torch.Tensor  # position in its (expert, group) buffer; -1: dropped
    weight_N: torch.Tensor  # combine weight (0 where dropped)
    capacity: int | None  # buffer slots per expert and group, from the group length S (None: dropless)
    route_capacity: torch.Tensor | None  # the capacity routing enforced: from real tokens, per group ([G]) or one
    padded_tokens: int  # G*S: token_N < padded_tokens

    @property
    def kept_N(self) -> torch.Tensor:
        return self.slot_N >= 0


def _capacity(mask_GS, E: int, K: int, capacity_factor: float | None, multiple_of: int, per_group: bool):
    """(buffer capacity, routing capacity). The buffer is sized from the group length S,
    known before the data (static shapes, no host sync); the routing capacity, which decides
    what is dropped, comes from the real tokens, never from padding, as a tensor: each
    group's own ([G], per_group) or the fullest group's (one value)."""
    if capacity_factor is None:
        return None, None
    S = mask_GS.shape[1]
    buffer = compute_capacity(S, E, K, capacity_factor, multiple_of)
    n_valid = mask_GS.sum(1)
    if not per_group:
        n_valid = n_valid.amax().reshape(1)
    return buffer, compute_capacity(n_valid, E, K, capacity_factor, multiple_of)


class Router:
    """The interface: `assign`, `choices_per_token`, `dropped_frac`, `top1_kept`."""

    name: str
    choices_per_token: int

    def __init__(self, cfg: LayerConfig):
        self.num_experts, self.multiple_of = cfg.num_experts, cfg.multiple_of

    def assign(self, gates_GSE, mask_GS, opts: RoutingOptions, capacity_factor, per_group: bool, bias, training: bool
               ) -> Assignment:
        raise NotImplementedError

    def kept_choices(self, n_kept, kept_per_token, mask_T):
        """How many of the tokens' choices were computed (the numerator of 1 - dropped)."""
        return n_kept

    def top1_kept(self, gates_TE, a: Assignment, T: int):
        """Each routed token's top-1 expert and whether that choice was computed."""
        raise NotImplementedError

    def dropless_ok(self) -> bool:
        return True

    def prioritises(self) -> bool:
        """Whether tokens compete for an expert's capacity in an order (BPR or position)."""
        return True

    def active_fraction(self, num_experts: int, capacity_factor: float | None) -> float:
        """The share of the routed experts' parameters a token uses on average."""
        return self.choices_per_token / num_experts


class TokenChoice(Router):
    """Each token picks its top-k experts; an expert takes its choices up to its capacity."""

    def __init__(self, cfg: LayerConfig):
        super().__init__(cfg)
        self.name, self.choices_per_token = cfg.router, cfg.top_k
        self.gate, self.normalize = cfg.gate, cfg.normalize_combine_weights

    def assign(self, gates_GSE, mask_GS, opts, capacity_factor, per_group, bias, training):
        G, S, E = gates_GSE.shape
        K = self.choices_per_token
        capacity, route_capacity = _capacity(mask_GS, E, K, capacity_factor, self.multiple_of, per_group)
        keep_GSK = scale_GS1 = None
        if self.name == "gshard" or self.gate == "topk_softmax":
            # Weights normalised over the selected top-k before any is dropped: GShard's
            # g_k / (g1 + g2), and Mixtral's softmax over the top-k logits (the same thing).
            if bias is None:
                top_GSK, _ = top_k_gates(gates_GSE, K)
            else:  # the experts the bias selects, their unbiased gates
                top_GSK = gates_GSE.gather(-1, top_k_gates(gates_GSE + bias, K)[1])
            denom_GS1 = top_GSK.sum(-1, keepdim=True)
            scale_GS1 = 1.0 / denom_GS1
        if self.name == "gshard" and training:
            # GShard: the 2nd expert is used with probability min(1, 2 * g2 / (g1 + g2)).
            p2_GS = 2.0 * top_GSK[..., 1] / denom_GS1[..., 0]
            keep2_GS = torch.rand_like(p2_GS) < p2_GS
            keep_GSK = torch.stack([torch.ones_like(keep2_GS), keep2_GS], -1)
        valid_GSK = mask_GS.unsqueeze(-1).expand(G, S, K) if keep_GSK is None else mask_GS.unsqueeze(-1) & keep_GSK
        r = route_unchecked(gates_GSE, K, route_capacity, opts.batch_priority, valid_GSK, self.normalize, bias)
        weight_GSK = r.combine_weight
        if scale_GS1 is not None and not self.normalize:
            weight_GSK = weight_GSK * scale_GS1
        token_GSK = torch.arange(G * S, device=gates_GSE.device).view(G, S, 1).expand(G, S, K)
        group_GSK = torch.arange(G, device=gates_GSE.device).view(G, 1, 1).expand(G, S, K)
        return Assignment(token_GSK.reshape(-1), r.expert_index.reshape(-1), group_GSK.reshape(-1),
                          r.slot.reshape(-1), weight_GSK.reshape(-1), capacity, route_capacity, G * S)

    def top1_kept(self, gates_TE, a, T):
        return gates_TE.argmax(-1), a.slot_N.view(-1, self.choices_per_token)[:T, 0] >= 0


class ExpertChoice(Router):
    """Each expert takes its top-C tokens by gate; a token may be taken by several experts
    or by none. capacity_factor is the mean number of experts per token."""

    name, choices_per_token = "expert_choice", 1

    def assign(self, gates_GSE, mask_GS, opts, capacity_factor, per_group, bias, training):
        G, S, E = gates_GSE.shape
        device = gates_GSE.device
        capacity, route_capacity = _capacity(mask_GS, E, 1, capacity_factor, self.multiple_of, per_group)
        token_GEC, weight_GEC = expert_choice_unchecked(gates_GSE, capacity, mask_GS)
        C = token_GEC.shape[-1]
        # each group keeps its own top-C_g (the route sorted them by gate)
        beyond_GEC = torch.arange(C, device=device).view(1, 1, C) >= route_capacity.view(-1, 1, 1)
        token_GEC = token_GEC.masked_fill(beyond_GEC, -1)
        weight_GEC = weight_GEC.masked_fill(beyond_GEC, 0.0)
        expert_GEC = torch.arange(E, device=device).view(1, E, 1).expand(G, E, C)
        group_GEC = torch.arange(G, device=device).view(G, 1, 1).expand(G, E, C)
        slot_GEC = torch.arange(C, device=device).view(1, 1, C).expand(G, E, C)
        slot_GEC = torch.where(token_GEC >= 0, slot_GEC, -1)
        token_GEC = token_GEC.clamp_min(0) + S * group_GEC
        return Assignment(token_GEC.reshape(-1), expert_GEC.reshape(-1), group_GEC.reshape(-1), slot_GEC.reshape(-1),
                          weight_GEC.reshape(-1), C, route_capacity, G * S)

    def kept_choices(self, n_kept, kept_per_token, mask_T):
        """A token counts once if any expert took it (its one "choice" is being routed)."""
        return ((kept_per_token > 0) & mask_T).sum()

    def top1_kept(self, gates_TE, a, T):
        # kept choices are real tokens (< T); the clamp only keeps dropped entries in range
        taken_T = torch.zeros(T, dtype=torch.long, device=gates_TE.device).index_add_(
            0, a.token_N.clamp_max(T - 1), a.kept_N.long())
        return gates_TE.argmax(-1), taken_T > 0

    def dropless_ok(self) -> bool:
        return False

    def prioritises(self) -> bool:
        return False

    def active_fraction(self, num_experts: int, capacity_factor: float | None) -> float:
        """The experts take capacity_factor x tokens rows in all: cf / E per token (at most 1)."""
        return min(capacity_factor / num_experts, 1.0)


def make_router(cfg: LayerConfig) -> Router:
    """The router of a resolved config."""
    return ExpertChoice(cfg) if cfg.router == "expert_choice" else TokenChoice(cfg)
