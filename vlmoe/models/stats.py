"""Parameter and FLOP accounting: total parameters, active parameters per token and
forward FLOPs per image / per text, the numbers that make "same active compute" checkable."""
from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..moe import moe_layers
from ..moe.base import eval_settings_kept

__all__ = ["model_stats"]


@contextlib.contextmanager
def _dropless(model):
    """Every token goes through exactly its top-k experts (what "active" means: dropless
    evaluation routing, whatever the model's capacity factors), via the per-expert loop so
    the counter sees plain matmuls. Expert choice keeps its capacity: it is its routing."""
    layers = moe_layers(model)
    saved = [(m, m.experts.implementation) for m in layers]
    with eval_settings_kept(layers):
        for m in layers:
            if m.routes_tokens and m.policy.dropless_ok():
                m.configure_eval(eval_routing="dropless")
            m.experts.implementation = "loop"
        try:
            yield
        finally:
            for m, impl in saved:
                m.experts.implementation = impl


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_stats(model) -> dict[str, float]:
    """{"total_params", "active_params_image", "active_params_text", "flops_image",
    "flops_text"}: active parameters count the router and top-k experts of each MoE layer
    (`active_fraction`: K/E of its experts; expert choice: eval capacity factor / E); FLOPs are one forward pass of one image / one full-length text
    (multiply-adds counted as 2)."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}  # shared parameters once
    total = sum(p.numel() for _, p in params.values())

    experts_of = {id(p): m for m in moe_layers(model) for p in m.experts.parameters()}

    def active(prefixes: tuple[str, ...], modality: str) -> float:
        seen = set()
        count = 0.0
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen or not n.startswith(prefixes):
                continue
            seen.add(id(p))
            layer = experts_of.get(id(p))
            count += p.numel() * (layer.active_fraction(modality) if layer is not None else 1.0)
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
        "active_params_image": active(image_prefixes, "image"),
        "active_params_text": active(text_prefixes, "text"),
        "flops_image": float(flops_image),
        "flops_text": float(flops_text),
    }
