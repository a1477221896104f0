"""What one MoE call routed (`RoutingRecord`), and what is read from it: the auxiliary
losses and the statistics (`MoEAux`), the per-token routing for pictures, and the layers of a
model. Meters, the capacity sweep, the training module, model stats and pictures read these
statistics instead of re-deriving counts:

- `num_choices`: the tokens' routed choices (tokens x K; expert choice and Soft MoE: tokens);
- `num_kept`: of those, the ones computed (expert choice: tokens some expert took);
- `dropped_frac` = 1 - num_kept / num_choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import losses as L
from .config import RoutingOptions
from .routers import Assignment, Router

__all__ = ["MoEAux", "RoutingRecord", "group_tokens", "record_key", "is_modality_key", "UNION_LOSSES", "MODALITY_LOSSES"]

# Joint routing: the losses over the union of modalities, and those per modality.
UNION_LOSSES = frozenset({"importance", "load", "balance", "z"})
MODALITY_LOSSES = frozenset({"local_entropy", "global_entropy"})
_WEIGHT_OF = {"importance": "importance_weight", "load": "load_weight", "balance": "balance_weight",
              "z": "z_loss_weight", "local_entropy": "local_entropy_weight", "global_entropy": "global_entropy_weight"}


@dataclass
class MoEAux:
    """What one MoE call leaves for the training loop."""

    loss: torch.Tensor  # weighted sum of the auxiliary losses (differentiable)
    losses: dict[str, torch.Tensor]  # each unweighted loss (differentiable)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached statistics


def group_tokens(t_T: torch.Tensor, S: int, fill) -> torch.Tensor:
    """[T, ...] -> [G, S, ...], the last group padded with `fill`."""
    T = t_T.shape[0]
    pad = (-T) % S
    if pad:
        t_T = torch.cat([t_T, t_T.new_full((pad, *t_T.shape[1:]), fill)])
    return t_T.reshape(-1, S, *t_T.shape[1:])


@dataclass
class RoutingRecord:
    """One routing pass over T tokens in groups of S: the router's logits and gates, and the
    assignment it made."""

    logits_TE: torch.Tensor
    noisy_logits_TE: torch.Tensor
    clean_gates_TE: torch.Tensor
    gates_TE: torch.Tensor
    noise_std: float  # of the noise actually added (0 when none)
    assignment: Assignment

    def aux(self, router: Router, mask_T: torch.Tensor, S: int, opts: RoutingOptions, losses=None, rows=None,
            ep_size: int | None = None) -> MoEAux:
        """The auxiliary losses (`losses`: names to compute, default all with a weight) and
        statistics, over all the tokens or only `rows` (one modality of a joint call)."""
        T = mask_T.numel()
        logits, noisy, clean, gates = self.logits_TE, self.noisy_logits_TE, self.clean_gates_TE, self.gates_TE
        a = self.assignment
        kept_N = a.kept_N.long()
        # tokens index the grouped list (G*S entries): fixed sizes, no host sync
        P = a.padded_tokens
        kept_per_token = torch.zeros(P, dtype=torch.long, device=mask_T.device).index_add_(0, a.token_N, kept_N)[:T]
        if rows is not None:
            member = torch.zeros(P, dtype=torch.long, device=mask_T.device).index_fill_(0, rows, 1)
            kept_N = kept_N * member.index_select(0, a.token_N)
            logits, noisy = logits.index_select(0, rows), noisy.index_select(0, rows)
            clean, gates = clean.index_select(0, rows), gates.index_select(0, rows)
            mask_T, kept_per_token = mask_T.index_select(0, rows), kept_per_token.index_select(0, rows)
        counts_E = torch.zeros(clean.shape[-1], dtype=torch.long, device=mask_T.device).index_add_(0, a.expert_N, kept_N)
        out = self._losses(router, opts, losses, S, mask_T, logits, noisy, clean, gates)
        total = sum((getattr(opts, _WEIGHT_OF[k]) * v for k, v in out.items()), logits.new_zeros(()))
        with torch.no_grad():
            stats = _stats(router, counts_E, kept_per_token, mask_T, clean, gates, a.route_capacity, ep_size)
        return MoEAux(total, out, stats)

    def _losses(self, router, opts, names, S, mask_T, logits, noisy, clean, gates) -> dict[str, torch.Tensor]:
        def on(k):
            return getattr(opts, _WEIGHT_OF[k]) and (names is None or k in names)

        def group(t):
            return group_tokens(t, S, 0.0)

        mask_GS = group_tokens(mask_T, S, False)
        out: dict[str, torch.Tensor] = {}
        if on("importance"):
            out["importance"] = L.importance_loss(group(clean), mask_GS)
        if on("load") and self.noise_std > 0:  # expert choice: refused by its configuration
            out["load"] = L.load_loss(group(logits), group(noisy), self.noise_std, router.choices_per_token, mask_GS)
        if on("balance"):
            out["balance"] = L.balance_loss(group(gates), mask_GS)
        if on("z"):
            out["z"] = L.z_loss(group(logits), mask_GS)
        if on("local_entropy"):
            out["local_entropy"] = L.local_entropy_loss(group(clean), mask_GS)
        if on("global_entropy"):
            out["global_entropy"] = L.global_entropy_loss(group(clean), mask_GS, opts.global_entropy_threshold)
        return out

    @torch.no_grad()
    def top1_kept(self, router: Router, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each routed token's top-1 expert and whether that choice was computed."""
        return router.top1_kept(self.gates_TE, self.assignment, T)


def top1_stats(top1_T: torch.Tensor, mask_T: torch.Tensor, E: int) -> dict[str, torch.Tensor]:
    """Collapse on the assignments: how many real tokens make each expert their top-1 choice
    (before capacity), and exp(H) of that share (1: every token's first choice is one expert;
    E: first choices spread evenly). The soft measure exp(H(mean gate)) can read 5.8 of 8
    while 69% of the tokens pick one expert first; this one cannot."""
    counts_E = torch.zeros(E, dtype=torch.float32, device=mask_T.device).index_add_(0, top1_T, mask_T.float())
    share_E = counts_E / counts_E.sum().clamp_min(1)
    return {"top1_per_expert": counts_E, "effective_experts_top1": torch.exp(L.entropy(share_E))}


def _stats(router, counts_E, kept_per_token, mask_T, clean_gates_TE, gates_TE, capacity, ep_size) -> dict[str, torch.Tensor]:
    n_tokens = mask_T.sum()
    n_choices = n_tokens * router.choices_per_token
    n_kept = counts_E.sum()
    kept = router.kept_choices(n_kept, kept_per_token, mask_T)
    mean_gate = (clean_gates_TE * mask_T.unsqueeze(-1)).sum(0) / n_tokens.clamp_min(1)
    stats = {
        "tokens_per_expert": counts_E.detach().float(),
        "expert_load": counts_E.float() / n_kept.clamp_min(1),
        "mean_gate": mean_gate,
        # exp(H(mean gate)): how many experts the tokens' mean routing spreads over (1..E)
        "effective_experts": torch.exp(L.entropy(mean_gate)),
        # the same on the routing's top-1 choices (noisy gates in training)
        **top1_stats(gates_TE.argmax(-1), mask_T, gates_TE.shape[-1]),
        "num_tokens": n_tokens.float(),
        "num_choices": n_choices.float(),
        "num_kept": kept.float(),
        # Fraction of routed choices dropped; for expert choice: of tokens unrouted. No
        # token: nothing was dropped (0, not 1).
        "dropped_frac": (n_choices - kept).float() / n_choices.clamp_min(1),
        "dropped_token_frac": ((kept_per_token == 0) & mask_T).sum().float() / n_tokens.clamp_min(1),
        # the capacity routing enforced (from real tokens; per-example evaluation: the largest)
        "capacity": capacity.amax().float() if capacity is not None else torch.full((), -1.0, device=mask_T.device),
    }
    if ep_size is not None:  # share of this rank's kept rows computed by each EP rank
        stats["rank_load"] = counts_E.view(ep_size, -1).sum(1).float() / n_kept.clamp_min(1)
    return stats


def record_key(records: dict, modality: str | None, every_call: bool) -> str | None:
    """The key a call's record goes under: its modality, or, for a layer that runs several
    times per forward (WideNet: `every_call`), "text", "text#1", ... until the owner clears
    the records."""
    if not every_call or modality not in records:
        return modality
    return f"{modality}#{sum(1 for k in records if is_modality_key(k, modality))}"


def is_modality_key(key, modality: str) -> bool:
    """Whether a record key belongs to `modality` ("text", "text#1", ...)."""
    return key == modality or str(key).startswith(f"{modality}#")
