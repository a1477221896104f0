"""What the experts do, as LIMoE's figures show it: each expert's tokens split by modality,
each image patch coloured by its expert, each caption token coloured by its expert, and the
numbers behind the pictures as JSON. One fixed colour per expert in every picture."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..errors import ConfigError
from ..moe import MoEBase, moe_layers
from ..moe.losses import entropy
from .pictures import expert_colors, modality_bars, patch_maps, token_table

__all__ = ["capture_routing", "gate_mass_of", "routing_summary", "effective_experts", "expert_colors", "modality_bars", "patch_maps", "token_table",
           "write_routing_report"]


def _layers(model) -> list[MoEBase]:
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("the model has no MoE layers: there is no routing to show (a dense model?)")
    return layers


@contextlib.contextmanager
def capture_routing(model):
    """Inside the block every MoE call records its per-token routing; yields
    {layer index: [records]} (a record: modality, top-1 expert per token, kept, mask)."""
    layers = _layers(model)
    store = {i: [] for i in range(len(layers))}
    for i, m in enumerate(layers):
        m.capture = store[i]
    try:
        yield store
    finally:
        for m in layers:
            m.capture = None


def effective_experts(p: torch.Tensor) -> float:
    """exp(H(p)) of a distribution over experts: 1 when all mass is on one expert, E when
    it is uniform. With p a modality's mean routing distribution, LIMoE's measure of
    whether the modality collapsed onto few experts."""
    p = p.double()
    return float(torch.exp(entropy(p / p.sum().clamp_min(1e-300))))


def routing_summary(store: dict, num_experts: list[int], gate_mass: dict | None = None) -> dict:
    """Per layer and modality: tokens per expert (top-1 choices), share, dropped fraction of the
    top-1 choices, the top expert's share, and two effective numbers of experts: of the top-1
    assignments, exp(H(share)) (`effective_experts_top1`), and LIMoE's, exp(H(mean gate))
    (`effective_experts`, when `gate_mass` {(layer, modality): summed gates} is given)."""
    out = {}
    for i, records in store.items():
        E = num_experts[i]
        layer = {}
        for modality in sorted({r["modality"] or "all" for r in records}):
            mine = [r for r in records if (r["modality"] or "all") == modality]
            experts = torch.cat([r["expert"][r["mask"]].reshape(-1) for r in mine])
            kept = torch.cat([r["kept"][r["mask"]].reshape(-1) for r in mine])
            counts = torch.bincount(experts, minlength=E).double()
            share = counts / counts.sum().clamp_min(1)
            entry = {
                "tokens": int(counts.sum()), "tokens_per_expert": counts.long().tolist(), "share": share.tolist(),
                "dropped_frac": float(1 - kept.double().mean()) if kept.numel() else 0.0,
                "effective_experts_top1": effective_experts(share) if counts.sum() else 1.0, "top_expert_share": float(share.max()),
            }
            gates = (gate_mass or {}).get((i, modality))
            if gates is not None:
                entry["effective_experts"] = effective_experts(gates)
            layer[modality] = entry
        out[f"layer{i}"] = layer
    return out


@contextlib.contextmanager
def gate_mass_of(layers: list[MoEBase]):
    """Inside the block, sums each layer's gates per modality from its calls' statistics;
    yields {(layer index, modality): gate mass over experts}."""
    mass: dict = {}
    index = {id(m): i for i, m in enumerate(layers)}

    def observe(layer, modality, aux):
        if str(modality).startswith("joint"):
            return  # a joint call's tokens are in its per-modality records too
        key = (index[id(layer)], (modality or "all").split("#")[0])
        st = aux.stats
        mass[key] = mass.get(key, 0) + (st["mean_gate"] * st["num_tokens"]).detach().double().cpu()

    for m in layers:
        m.observers.append(observe)
    try:
        yield mass
    finally:
        for m in layers:
            m.observers.remove(observe)


@torch.no_grad()
def write_routing_report(model, images: torch.Tensor, texts: torch.Tensor | None, out: str | Path, tokenizer=None,
                         num_pictures: int = 8, title: str = "routing") -> dict:
    """Route `images` (and `texts`) through the model in eval mode and write
    `modality_bars.png`, `patches.png`, `tokens.html` (with texts) and `routing.json` into
    `out`. Returns the JSON's content."""
    layers = _layers(model)
    was_training = model.training
    model.eval()
    out = Path(out)
    try:
        with capture_routing(model) as store, gate_mass_of(layers) as gates:
            model.encode_image(images)
            if texts is not None:
                model.encode_text(texts)
    finally:
        model.train(was_training)
    E = [m.num_experts for m in layers]
    summary = routing_summary(store, E, gates)
    modality_bars(summary, out / "modality_bars.png", title)
    grid = tuple(getattr(model.visual, "grid_size", None) or ())
    files = {"modality_bars": "modality_bars.png"}
    if grid and any(r["modality"] == "image" for recs in store.values() for r in recs):
        n = min(num_pictures, images.shape[0])
        small = {i: [{**r, "expert": r["expert"][:n], "kept": r["kept"][:n], "mask": r["mask"][:n]} for r in recs if r["modality"] == "image"]
                 for i, recs in store.items()}
        maps = patch_maps(images[:n], small, grid, max(E), out / "patches.png", title)
        files["patches"] = "patches.png"
        summary["patch_maps"] = {"grid": list(grid), "images": n, "shape": list(maps.shape)}
    if texts is not None and tokenizer is not None:
        n = min(num_pictures, texts.shape[0])
        small = {i: [{**r, "expert": r["expert"][:n], "kept": r["kept"][:n], "mask": r["mask"][:n]} for r in recs if r["modality"] == "text"]
                 for i, recs in store.items()}
        token_table(texts[:n], small, max(E), tokenizer, out / "tokens.html", title)
        files["tokens"] = "tokens.html"
    summary["files"] = files
    summary["title"] = title
    (out / "routing.json").write_text(json.dumps(summary, indent=2))
    return summary
