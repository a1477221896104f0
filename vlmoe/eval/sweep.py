"""Trading compute for accuracy at inference (V-MoE's capacity sweep): evaluation-only
overrides of every MoE layer's capacity factor and Batch Prioritized Routing, and what an
evaluation routed: the fraction of routed choices dropped and the active forward FLOPs per
image on the rows the experts actually computed."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import check_number
from ..moe import MoEBase, moe_layers
from ..moe.base import eval_settings_kept

__all__ = ["eval_overrides", "RoutingMeter", "expert_flops_per_row", "image_flops_without_experts", "short_label"]


@contextlib.contextmanager
def eval_overrides(model, capacity_factor: float | None = None, batch_priority: bool | None = None,
                   eval_routing: str | None = None):
    """Inside the block, eval-mode forwards of every MoE layer use this capacity factor
    (every modality), BPR setting and routing; the model's own settings are back afterwards.
    A layer that cannot use a setting (Soft MoE, expert choice and BPR) refuses it."""
    if capacity_factor is not None:
        check_number("a capacity factor", capacity_factor, 0.0, above=True)
    layers = moe_layers(model)
    with eval_settings_kept(layers):
        for m in layers:
            m.configure_eval(eval_routing, capacity_factor, batch_priority)
        yield


def expert_flops_per_row(layer) -> int:
    """Forward matmul FLOPs of one row through one expert (multiply-add = 2), as
    torch.utils.flop_counter counts them: x @ w1 and h @ w2."""
    _, D, H1 = layer.experts.w1.shape
    _, H, _ = layer.experts.w2.shape
    return 2 * D * H1 + 2 * H * D


class RoutingMeter:
    """Counts, over every MoE call inside the block (joint calls' per-modality parts too),
    the routed choices, the kept ones and the expert FLOPs of the kept rows, from each call's
    statistics (`num_choices`, `num_kept`: see vlmoe.moe.record)."""

    def __init__(self, model, modality: str | None = None):
        self.layers, self.modality = moe_layers(model), modality
        # a layer's name per modality: a layer shared by the towers is named in each tower
        self.names: dict[tuple[int, str | None], str] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            if isinstance(m, MoEBase):
                modality = "image" if name.startswith("visual.") else "text" if name.startswith("transformer.") else None
                self.names.setdefault((id(m), modality), name)
                self.names.setdefault((id(m), None), name)
        self.choices = self.kept = 0
        self.expert_flops = 0
        # per (layer name, modality): [tokens, choices, kept, tokens per expert, summed gates]
        self.per_layer: dict[tuple[str, str | None], list] = {}

    def _observe(self, layer, modality, aux) -> None:
        if modality == "joint" or (self.modality is not None and modality != self.modality):
            return  # a joint call's tokens are in its per-modality records too
        st = aux.stats
        n, choices, kept = int(st["num_tokens"]), int(st["num_choices"]), int(st["num_kept"])
        self.choices += choices
        self.kept += kept
        self.expert_flops += int(st["tokens_per_expert"].sum()) * expert_flops_per_row(layer)
        name = self.names.get((id(layer), modality), self.names[(id(layer), None)])
        acc = self.per_layer.setdefault((name, modality), [0, 0, 0, 0.0, 0.0, 0.0])
        acc[0] += n
        acc[1] += choices
        acc[2] += kept
        acc[3] = acc[3] + st["tokens_per_expert"].detach().float().cpu()
        acc[4] = acc[4] + st["mean_gate"].detach().float().cpu() * n
        acc[5] = acc[5] + st["top1_per_expert"].detach().float().cpu()

    def layer_summary(self) -> list[dict]:
        """Per MoE layer and modality: tokens routed, each expert's share of the kept
        assignments, the top expert's share, LIMoE's effective experts exp(H(mean gate)),
        the effective experts of the top-1 choices exp(H(share of first choices)) with the
        largest such share, and the dropped fraction."""
        from ..moe.losses import entropy

        rows = []
        for (name, modality), (n, choices, kept, counts, gates, top1) in sorted(self.per_layer.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
            share = counts / counts.sum().clamp_min(1)
            mean_gate = gates / max(n, 1)
            first = top1 / top1.sum().clamp_min(1)
            rows.append({"layer": name, "modality": modality, "tokens": n, "expert_share": [round(float(x), 6) for x in share],
                         "top_expert_share": float(share.max()), "effective_experts": float(torch.exp(entropy(mean_gate))),
                         "effective_experts_top1": float(torch.exp(entropy(first))), "top1_top_expert_share": float(first.max()),
                         "dropped_frac": 1.0 - kept / choices if choices else 0.0})
        return rows

    def modality_dropped(self) -> dict[str, float]:
        """Fraction of routed choices dropped, per modality, over every layer."""
        out: dict[str, list[int]] = {}
        for (_, modality), (_, choices, kept, *_) in self.per_layer.items():
            acc = out.setdefault(str(modality), [0, 0])
            acc[0], acc[1] = acc[0] + choices, acc[1] + kept
        return {m: 1.0 - k / c if c else 0.0 for m, (c, k) in out.items()}

    def __enter__(self):
        for m in self.layers:
            m.observers.append(self._observe)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.observers.remove(self._observe)

    @property
    def dropped_frac(self) -> float:
        """Fraction of routed (token, choice) pairs dropped (expert choice: tokens no expert took)."""
        return 1.0 - self.kept / self.choices if self.choices else 0.0


def image_flops_without_experts(model) -> int:
    """Forward FLOPs of one image with the expert matmuls taken out (attention, dense MLPs,
    routers, embeddings, projection), from torch's FLOP counter: add the kept rows' expert
    FLOPs to get the active compute at a capacity. Counted with grad enabled (under no_grad
    nn.MultiheadAttention takes a fused path the counter does not see) and with the
    per-expert loop (the padded buffers would count empty slots)."""
    was_training = model.training
    model.eval()
    layers = moe_layers(model)
    impls = [m.experts.implementation for m in layers]
    image = torch.randn(1, 3, *model.image_size, device=next(model.parameters()).device)
    try:
        for m in layers:
            m.experts.implementation = "loop"
        with torch.enable_grad(), RoutingMeter(model, "image") as meter, FlopCounterMode(display=False) as counter:
            model.encode_image(image)
    finally:
        for m, impl in zip(layers, impls):
            m.experts.implementation = impl
        model.train(was_training)
    return int(counter.get_total_flops()) - meter.expert_flops


def short_label(spec: str) -> str:
    """A label for a model spec: `runs/limoe-tiny/seed0/checkpoints/last.ckpt` ->
    `limoe-tiny/seed0/last.ckpt`, a path -> its name, a model name as it is."""
    parts = Path(spec).parts
    if "checkpoints" in parts:
        i = parts.index("checkpoints")
        return "/".join(parts[max(0, i - 2):i] + parts[-1:])
    return Path(spec).name if len(parts) > 1 else spec
