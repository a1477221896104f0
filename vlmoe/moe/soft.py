"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Per sequence of T tokens X [T, D] and E*s slots with parameters Phi [E*s, D]:
    logits = l2norm(X) (scale * l2norm(Phi))^T          [T, E*s]
    dispatch = softmax over the tokens, per slot         (each slot a weighted average of tokens)
    combine  = softmax over the slots, per token         (each token a weighted average of slots)
    slots = dispatch^T X;  expert e runs on its s slots;  Y = combine (expert outputs)
No token is dropped and there is no balance loss. Every slot mixes every token of its sequence:
in a causal text tower that lets a token's output depend on later tokens of the caption (the
pooled end-of-text token sees them all anyway, but intermediate positions are no longer causal).
Text padding (the routing context's mask) gets no dispatch weight and output 0, so it cannot
influence real tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .base import MoEBase
from .config import LayerConfig
from .record import MoEAux, top1_stats
from ..errors import ConfigError

__all__ = ["SoftMoE"]


class SoftMoE(MoEBase):
    """Soft MoE MLP: `forward(x) -> x` for x [B, T, D] (B sequences) or [T, D] (one).

    Args:
        dim, hidden_dim, num_experts, act_layer, bias, expert_type, implementation,
        num_shared_experts, shared_expert_gate: as SparseMoE (the experts are the same stacked
            experts, run on per-expert slot buffers).
        slots_per_expert: s, slots each expert processes per sequence; or per modality,
            {"image": 8, "text": 2}: a layer shared by the towers then holds max(s) slot
            parameters per expert and a modality with s_m uses the first s_m of each expert's.
        normalize: the paper's normalisation of the inputs and the slot parameters (l2 over
            D, with a learned scalar scale starting at 1); needed at large widths.
        config: a LayerConfig with router="soft" instead of the keywords.

    Any token-routing setting (top_k, capacity, noise, loss weights, balancing, evaluation
    routing) is refused: Soft MoE has none of them.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, num_experts: int = 8, slots_per_expert: int | dict = 1, *,
                 act_layer: type[nn.Module] = nn.GELU, bias: bool = True, normalize: bool = True,
                 config: LayerConfig | None = None, **settings):
        if config is None:
            settings.pop("router", None) if settings.get("router") == "soft" else None
            config = LayerConfig(router="soft", num_experts=num_experts, slots_per_expert=slots_per_expert, **settings)
        cfg = config.resolve()
        per_modality = dict(cfg.slots_per_expert) if isinstance(cfg.slots_per_expert, dict) else {None: cfg.slots_per_expert}
        for v in per_modality.values():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"slots_per_expert must be an integer >= 1 (or {{modality: integer}}); got {cfg.slots_per_expert!r}")
        if not per_modality or set(per_modality) - {None, "image", "text"}:
            raise ConfigError(f"slots_per_expert per modality takes 'image' and 'text'; got {cfg.slots_per_expert!r}")
        # A top-k-sized router first, initialised and then replaced by the slot parameters:
        # the random numbers are drawn in the order SoftMoE drew them as a SparseMoE subclass,
        # so a seed gives the same model.
        super().__init__(dim, hidden_dim or 4 * dim, cfg.num_experts, router=nn.Linear(dim, cfg.num_experts, bias=False),
                         act_layer=act_layer, bias=bias, implementation=cfg.implementation, expert_type=cfg.expert_type,
                         num_shared_experts=cfg.num_shared_experts, shared_expert_gate=cfg.shared_expert_gate)
        self.config = cfg
        self.eval_routing = "per_example"
        self.slots = per_modality
        self.slots_per_expert = max(per_modality.values())  # slot parameters per expert
        self.normalize = normalize
        self.init_weights()
        # Phi: one row per slot (expert-major: slots e*s ... e*s+s-1 belong to expert e)
        self.router = nn.Linear(dim, cfg.num_experts * self.slots_per_expert, bias=False)
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(dim))

    def init_weights(self) -> None:
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.dim))
        self.experts.init_weights()
        self.init_shared()

    @property
    def routes_tokens(self) -> bool:
        return False

    def configure_eval(self, eval_routing=None, eval_capacity_factor=None, batch_priority=None) -> None:
        """Soft MoE evaluates as it trains: every setting is refused (None: nothing to change)."""
        given = {k: v for k, v in (("eval_routing", eval_routing), ("eval_capacity_factor", eval_capacity_factor),
                                   ("batch_priority", batch_priority)) if v is not None}
        if given:
            raise ConfigError(f"{sorted(given)} has no effect on Soft MoE (router='soft'): it drops no token and mixes "
                              f"each sequence's tokens alone, in training and evaluation alike")

    def active_fraction(self, modality: str | None = None) -> float:
        """One expert's share per token (a slot is one expert row, E*s slots per sequence)."""
        return 1.0 / self.num_experts

    def extra_repr(self) -> str:
        slots = self.slots[None] if None in self.slots else self.slots
        return (f"router=soft, num_experts={self.num_experts}, slots_per_expert={slots}, "
                f"normalize={self.normalize}" + (f", num_shared_experts={self.num_shared_experts}" if self.num_shared_experts else ""))

    def shard_experts(self, groups) -> None:
        raise ConfigError(
            "Soft MoE under expert parallelism is not supported: its experts run on slots (weighted mixes of a "
            "sequence's tokens), which would travel instead of tokens; train it data-parallel (DDP), or use a "
            "top-k router for expert parallelism"
        )

    def slots_for(self, modality: str | None) -> int:
        return self.slots.get(modality, self.slots.get(None, self.slots_per_expert))

    def slot_logits(self, x_BTD: torch.Tensor, s: int | None = None) -> torch.Tensor:
        """[B, T, E*s] logits in float32 (normalised as the paper does), for the first s slots
        of each expert (default: all)."""
        phi = self.router.weight
        if s is not None and s != self.slots_per_expert:
            phi = phi.view(self.num_experts, self.slots_per_expert, self.dim)[:, :s].reshape(-1, self.dim)
        with torch.autocast(x_BTD.device.type, enabled=False):
            x, phi = x_BTD.float(), phi.float()
            if self.normalize:
                x = F.normalize(x, dim=-1, eps=1e-6)
                phi = self.scale.float() * F.normalize(phi, dim=-1, eps=1e-6)
            return x @ phi.t()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, modality: str | None = None) -> torch.Tensor:
        mask, modality = self._context(mask, modality)
        x_TD, mask_T = self._flat(x, mask)  # validates shapes
        B = x.shape[0] if x.ndim >= 3 else 1
        x_BTD, mask_BT = x_TD.view(B, -1, self.dim), mask_T.view(B, -1)
        E, s = self.num_experts, self.slots_for(modality)
        logits_BTN = self.slot_logits(x_BTD, s)
        self._note_finite(logits_BTN)
        real_BT1 = mask_BT.unsqueeze(-1)
        # dispatch: softmax over the sequence's real tokens, per slot (a sequence with no real
        # token gets all-zero weights, not NaN)
        dispatch_BTN = torch.softmax(logits_BTN.masked_fill(~real_BT1, float("-inf")), dim=1)
        dispatch_BTN = torch.nan_to_num(dispatch_BTN, nan=0.0)
        combine_BTN = torch.softmax(logits_BTN, dim=-1) * real_BT1
        dtype = x_BTD.dtype if not torch.is_autocast_enabled(x_BTD.device.type) else torch.get_autocast_dtype(x_BTD.device.type)
        slots_BND = torch.einsum("btn,btd->bnd", dispatch_BTN.to(dtype), x_BTD.to(dtype))
        buf_ECD = slots_BND.view(B, E, s, self.dim).transpose(0, 1).reshape(E, B * s, self.dim)
        y_ECD = self.experts.forward_buffers(buf_ECD)
        y_BND = y_ECD.view(E, B, s, self.dim).transpose(0, 1).reshape(B, E * s, self.dim)
        out_BTD = torch.einsum("btn,bnd->btd", combine_BTN.to(y_BND.dtype), y_BND).to(x.dtype)
        out_TD = self._add_shared(out_BTD.reshape(-1, self.dim), x_TD)
        if self.capture is not None:  # each token's expert: the one its combine weights favour most
            expert_T = combine_BTN.view(B, -1, E, s).sum(-1).argmax(-1).reshape(-1)
            self._capture_one(modality, x.shape[:-1], expert_T, mask_T.clone(), mask_T)
        self._record(modality, self._soft_aux(dispatch_BTN, combine_BTN, mask_BT, logits_BTN, s))
        return out_TD.reshape(x.shape)

    @torch.no_grad()
    def _soft_aux(self, dispatch_BTN, combine_BTN, mask_BT, logits_BTN, s: int) -> MoEAux:
        """No loss; statistics: the slots' dispatch entropy (nats over tokens), the tokens'
        combine entropy (nats over slots), slot concentration (mean over slots of the largest
        dispatch weight: 1 = a slot copies one token, 1/T = an even mix), each expert's share
        of the combine weight (mean_gate) and exp(H) of it (effective experts)."""
        B, T, N = dispatch_BTN.shape
        E = self.num_experts
        n_tokens = mask_BT.sum()
        has_tokens_B = mask_BT.any(1)
        slot_entropy_BN = L.entropy(dispatch_BTN.transpose(1, 2))
        n_slots = (has_tokens_B.sum() * N).clamp_min(1)
        token_entropy_BT = L.entropy(combine_BTN) * mask_BT
        mean_gate = combine_BTN.view(B, T, E, s).sum(-1).sum((0, 1)) / n_tokens.clamp_min(1)
        rows = (has_tokens_B.sum() * s).float().expand(E).clone()
        stats = {
            "tokens_per_expert": rows,  # rows each expert computed (its slots)
            "expert_load": rows / rows.sum().clamp_min(1),
            "mean_gate": mean_gate,
            "effective_experts": torch.exp(L.entropy(mean_gate)),
            # each token's "top-1": the expert whose slots give it the most combine weight
            **top1_stats(combine_BTN.view(B, T, E, s).sum(-1).argmax(-1).reshape(-1), mask_BT.reshape(-1), E),
            "num_tokens": n_tokens.float(),
            "num_choices": n_tokens.float(),  # every token reaches the experts through the slots
            "num_kept": n_tokens.float(),
            "dropped_frac": n_tokens.new_zeros((), dtype=torch.float32),
            "dropped_token_frac": n_tokens.new_zeros((), dtype=torch.float32),
            "capacity": torch.full((), float(s), device=mask_BT.device),
            "dispatch_entropy": (slot_entropy_BN * has_tokens_B.unsqueeze(-1)).sum() / n_slots,
            "combine_entropy": token_entropy_BT.sum() / n_tokens.clamp_min(1),
            "slot_concentration": (dispatch_BTN.amax(1) * has_tokens_B.unsqueeze(-1)).sum() / n_slots,
        }
        return MoEAux(logits_BTN.new_zeros(()), {}, stats)
