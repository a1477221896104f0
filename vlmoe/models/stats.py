"""Parameter and FLOP accounting: total parameters, active parameters per token and
forward FLOPs per image / per text, the numbers that make "same active compute" checkable."""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..moe import SparseMoE

__all__ = ["model_stats"]


@contextlib.contextmanager
def _dropless(model):
    """Every token goes through exactly its top-k experts (what "active" means), via the
    per-expert loop so the counter sees plain matmuls."""
    saved = []
    for m in {id(m): m for m in model.modules() if isinstance(m, SparseMoE)}.values():
        saved.append((m, m.options, dict(m.modality_options), m.experts.implementation, m.training))
        if m.router_name != "expert_choice":
            m.options = replace(m.options, capacity_factor=None)
            m.modality_options = {k: replace(v, capacity_factor=None) for k, v in m.modality_options.items()}
        m.experts.implementation = "loop"
    try:
        yield
    finally:
        for m, opts, mopts, impl, _ in saved:
            m.options, m.modality_options, m.experts.implementation = opts, mopts, impl


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_stats(model) -> dict[str, float]:
    """{"total_params", "active_params_image", "active_params_text", "flops_image",
    "flops_text"}: active parameters count the router and top-k experts of each MoE layer
    (K/E of its experts); FLOPs are one forward pass of one image / one full-length text
    (multiply-adds counted as 2)."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}  # shared parameters once
    total = sum(p.numel() for _, p in params.values())

    moe_params: dict[int, float] = {}
    for m in model.modules():
        if isinstance(m, SparseMoE):
            frac = (m.top_k / m.num_experts) if m.router_name != "expert_choice" else 1.0
            for p in m.experts.parameters():
                moe_params[id(p)] = frac

    def active(prefixes: tuple[str, ...]) -> float:
        seen = set()
        count = 0.0
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen or not n.startswith(prefixes):
                continue
            seen.add(id(p))
            count += p.numel() * moe_params.get(id(p), 1.0)
        return count

    text_prefixes = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection", "logit_scale")
    image_prefixes = ("visual.", "logit_scale")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image = torch.randn(1, 3, *model.image_size, device=device)
    text = torch.randint(1, 1000, (1, model.context_length), device=device)
    text[0, -1] = model.vocab_size - 1
    with _dropless(model):
        flops_image = _count(lambda: model.encode_image(image))
        flops_text = _count(lambda: model.encode_text(text))
    model.train(was_training)
    return {
        "total_params": float(total),
        "active_params_image": active(image_prefixes),
        "active_params_text": active(text_prefixes),
        "flops_image": float(flops_image),
        "flops_text": float(flops_text),
    }
