"""Auxiliary routing losses, each a pure function of gates or logits.

Every function takes [S, E] or [G, S, E] inputs, computes the loss per routing group and
returns the mean over groups. An optional `mask` ([S] or [G, S], bool) drops tokens (text
padding) from the loss. Legend as in routing.py.
"""
from __future__ import annotations

import math

import torch
from ..errors import ConfigError

__all__ = [
    "importance_loss",
    "load_loss",
    "balance_loss",
    "z_loss",
    "local_entropy_loss",
    "global_entropy_loss",
    "entropy",
    "cv_squared",
]


def _groups(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim not in (2, 3):
        raise ConfigError(f"expected [S, E] or [G, S, E]; got shape {tuple(x.shape)}")
    x_GSE = x if x.ndim == 3 else x.unsqueeze(0)
    G, S, _ = x_GSE.shape
    if mask is None:
        w_GS = torch.ones(G, S, dtype=x_GSE.dtype, device=x_GSE.device)
    else:
        if mask.numel() != G * S:
            raise ConfigError(f"mask must have {G}x{S} elements; got shape {tuple(mask.shape)}")
        w_GS = mask.reshape(G, S).to(x_GSE.dtype)
    return x_GSE, w_GS


def _mean_over_groups(v_G: torch.Tensor, w_GS: torch.Tensor) -> torch.Tensor:
    """Mean of a per-group loss over the groups that hold at least one real token: a group
    of nothing but padding (possible with `group_size`) must not dilute the loss."""
    real_G = (w_GS.sum(1) > 0).to(v_G.dtype)
    return (v_G * real_G).sum() / real_G.sum().clamp_min(1.0)


def _masked_mean_tokens(v_GSE: torch.Tensor, w_GS: torch.Tensor) -> torch.Tensor:
    """Per-group mean over valid tokens: [G, S, E] -> [G, E]."""
    n_G1 = w_GS.sum(1, keepdim=True).clamp_min(1.0)
    return (v_GSE * w_GS.unsqueeze(-1)).sum(1) / n_G1


def cv_squared(v_GE: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation over the last axis (population variance)."""
    mean = v_GE.mean(-1)
    var = v_GE.var(-1, unbiased=False)
    return var / (mean.square() + eps)


def importance_loss(gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """V-MoE importance loss: CV^2 of the per-expert sum of (clean) gate probabilities."""
    gates_GSE, w_GS = _groups(gates, mask)
    importance_GE = (gates_GSE * w_GS.unsqueeze(-1)).sum(1)
    return _mean_over_groups(cv_squared(importance_GE), w_GS)


def _erfc(x: torch.Tensor) -> torch.Tensor:
    """torch.erfc, with the arguments where it underflows to 0 (forward and gradient) set to
    0 directly: torch's CPU erfc takes ~5x longer on them, and noisy top-k's z values (gaps
    scaled by E / noise) mostly lie there. Past sqrt(-ln(smallest subnormal)) + 0.1, erfc(x)
    < exp(-x^2) and its derivative 2/sqrt(pi) exp(-x^2) are below half the smallest
    subnormal, so both round to 0: the result is torch.erfc's, bit for bit."""
    zero = math.sqrt(-math.log(torch.finfo(x.dtype).smallest_normal * torch.finfo(x.dtype).eps)) + 0.1
    small = x < zero
    return torch.where(small, torch.erfc(torch.where(small, x, 0.0)), 0.0)


def load_loss(
    logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    noise_std: float,
    top_k: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """V-MoE load loss: CV^2 of the per-expert mean probability that the expert would be in
    the token's top-k if the noise were resampled,
    P = 1 - Phi((k-th largest noisy logit - clean logit) / noise_std)."""
    if noise_std <= 0:
        raise ConfigError(f"load_loss needs noise_std > 0 (noisy gating); got {noise_std}")
    if logits.shape != noisy_logits.shape:
        raise ConfigError(f"logits {tuple(logits.shape)} and noisy_logits {tuple(noisy_logits.shape)} differ in shape")
    logits_GSE, w_GS = _groups(logits, mask)
    noisy_GSE = noisy_logits if noisy_logits.ndim == 3 else noisy_logits.unsqueeze(0)
    if not 1 <= top_k <= logits_GSE.shape[-1]:
        raise ConfigError(f"top_k must be in [1, {logits_GSE.shape[-1]}]; got {top_k}")
    threshold_GS1 = noisy_GSE.topk(top_k, dim=-1).values[..., -1:]
    z_GSE = (threshold_GS1 - logits_GSE) / noise_std
    p_GSE = 0.5 * _erfc(z_GSE / math.sqrt(2.0))  # 1 - Phi(z), accurate in the tails
    return _mean_over_groups(cv_squared(_masked_mean_tokens(p_GSE, w_GS)), w_GS)


def balance_loss(gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer / GShard balance loss: E * sum_e f_e * P_e, with f_e the fraction
    of tokens whose top-1 expert is e and P_e the mean gate of e (1.0 when balanced)."""
    gates_GSE, w_GS = _groups(gates, mask)
    E = gates_GSE.shape[-1]
    # one-hot of the top-1 expert by comparison (F.one_hot reads the indices' range back to the host)
    top1_GSE = (gates_GSE.argmax(-1, keepdim=True) == torch.arange(E, device=gates_GSE.device)).to(gates_GSE.dtype)
    f_GE = _masked_mean_tokens(top1_GSE, w_GS)
    p_GE = _masked_mean_tokens(gates_GSE, w_GS)
    return _mean_over_groups(E * (f_GE * p_GE).sum(-1), w_GS)


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    logits_GSE, w_GS = _groups(logits, mask)
    z_GS = torch.logsumexp(logits_GSE.float(), dim=-1).square()
    w_GS = w_GS.to(z_GS.dtype)
    return _mean_over_groups((z_GS * w_GS).sum(1) / w_GS.sum(1).clamp_min(1.0), w_GS)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last axis."""
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1)


def local_entropy_loss(gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LIMoE local entropy: mean over a modality's tokens of H(p(experts | token)).
    Minimising it makes each token's routing confident."""
    gates_GSE, w_GS = _groups(gates, mask)
    h_GS = entropy(gates_GSE)
    return _mean_over_groups((h_GS * w_GS).sum(1) / w_GS.sum(1).clamp_min(1.0), w_GS)


def global_entropy_loss(
    gates: torch.Tensor, mask: torch.Tensor | None = None, threshold: float | None = None
) -> torch.Tensor:
    """LIMoE global entropy: -H(mean routing distribution of the modality's tokens).
    Minimising it spreads the modality over experts. With `threshold` tau the loss is
    max(0, tau - H): tau = log(S) asks for a soft minimum of S experts and no more."""
    gates_GSE, w_GS = _groups(gates, mask)
    neg_h_G = -entropy(_masked_mean_tokens(gates_GSE, w_GS))
    if threshold is not None:
        neg_h_G = torch.clamp_min(threshold + neg_h_G, 0.0)
    return _mean_over_groups(neg_h_G, w_GS)
