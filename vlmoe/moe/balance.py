"""Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, a buffer, added to the
gates to choose experts only, never to the combine weights, and moved once per optimizer step
by `rate` against the sign of each expert's load error.

`BiasBalance` owns the bias, the per-modality rows and the load count of one layer;
`update_biases` moves every layer's bias in one step with one collective.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import BIAS_MODALITIES
from ..errors import ConfigError

__all__ = ["BiasBalance", "update_biases"]


class BiasBalance(nn.Module):
    """The expert bias of one layer: [E], or [len(BIAS_MODALITIES), E] with one row per
    modality (each moved by its own modality's loads and applied to its own tokens)."""

    def __init__(self, num_experts: int, rate: float, per_modality: bool):
        super().__init__()
        self.num_experts, self.rate, self.per_modality = num_experts, float(rate), bool(per_modality)
        shape = (len(BIAS_MODALITIES), num_experts) if per_modality else (num_experts,)
        # Saved in checkpoints, never trained; the load is what this step's forwards chose.
        self.register_buffer("expert_bias", torch.zeros(shape))
        self.register_buffer("load", torch.zeros(shape), persistent=False)

    def row(self, modality: str | None) -> int:
        """The row a call's tokens use (per-modality bias only)."""
        if modality not in BIAS_MODALITIES:
            raise ConfigError(
                f"this layer balances by a bias per modality (bias_per_modality=True, rows {BIAS_MODALITIES}), so each "
                f"call needs its modality; got {modality!r}: call it under routing_context(modality=...) or pass modality="
            )
        return BIAS_MODALITIES.index(modality)

    def selection_bias(self, row, group) -> torch.Tensor:
        """The bias the tokens select with: [E], or per token [G, S, E] (row: an int or one
        per token [T]; `group` groups a [T] tensor as the gates are grouped)."""
        if not self.per_modality:
            return self.expert_bias
        return self.expert_bias[row if isinstance(row, int) else group(row)]

    @torch.no_grad()
    def count(self, a, mask_GS, row, group) -> None:
        """Add the load the routing asked of each expert: the choices of real tokens, dropped
        or not (per modality with a per-modality bias)."""
        E = self.num_experts
        chosen_N = mask_GS.reshape(-1).index_select(0, a.token_N)  # a real token's choice (fixed size)
        cell_N = a.expert_N
        if self.per_modality:
            r = row if isinstance(row, int) else group(row).reshape(-1).index_select(0, a.token_N)
            cell_N = r * E + cell_N
        self.load.view(-1).index_add_(0, cell_N, chosen_N.to(self.load.dtype))

    @torch.no_grad()
    def step(self, load_E: torch.Tensor) -> None:
        """Move each row's bias against the sign of its load error; a row no token used
        this step stays."""
        seen = load_E.sum(-1, keepdim=True) > 0
        self.expert_bias += self.rate * torch.sign(load_E.mean(-1, keepdim=True) - load_E) * seen


@torch.no_grad()
def update_biases(balances: list[BiasBalance], group=None) -> list[torch.Tensor]:
    """One balancing step for every layer: the loads since the last call, summed over the
    ranks of `group` (default: every process) in one all_reduce of all layers' loads, so the
    biases stay equal on every rank. Returns each layer's summed load."""
    if not balances:
        return []
    loads = [b.load.clone() for b in balances]
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        flat = torch.cat([x.reshape(-1) for x in loads])
        dist.all_reduce(flat, group=group)
        loads = [x.view_as(b.load) for x, b in zip(flat.split([b.load.numel() for b in balances]), balances)]
    for b, load in zip(balances, loads):
        b.load.zero_()
        b.step(load)
    return loads
