"""What an evaluation routed, over the whole evaluation and every rank: kept assignments per
expert, gate mass, top-1 choices per expert and dropped choices per MoE layer and modality, read
from each call's statistics (`vlmoe.moe.record`), then the effective experts (of the mean gate,
LIMoE's, and of the top-1 assignments) in the logs and the routing
pictures (`vlmoe.eval.pictures`) in `<log_dir>/routing` and TensorBoard."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ..eval.pictures import close, modality_bars, routing_picture
from ..eval.routing import effective_experts, write_routing_report
from ..models.factory import get_tokenizer

__all__ = ["RoutingReport"]


class RoutingReport:
    """Tallies of one evaluation (`start`, `record` after each batch, `finish` at the end);
    `counts`, `mean_gates`, `top1` and `dropped` hold the last evaluation's, per (layer, modality)."""

    def __init__(self):
        self.counts: dict[tuple[int, str], torch.Tensor] = {}
        self.mean_gates: dict[tuple[int, str], torch.Tensor] = {}  # each sums to 1
        self.top1: dict[tuple[int, str], torch.Tensor] = {}  # real tokens whose first choice is each expert
        self.dropped: dict[tuple[int, str], torch.Tensor] = {}  # [dropped choices, choices]
        self.last_picture: Path | None = None
        self.start()

    def start(self) -> None:
        self._tally: dict[tuple[int, str], torch.Tensor] = {}  # [3, E]: kept per expert, gate mass, top-1 choices
        self._drops: dict[tuple[int, str], torch.Tensor] = {}
        self.pairs = None  # the first image-text batch, for the per-token pictures

    def record(self, layers) -> None:
        """Add what each layer's last calls routed (joint calls: their per-modality records)."""
        for i, m in enumerate(layers):
            for modality, aux in m.aux.items():
                if str(modality).startswith("joint"):
                    continue  # a joint call's tokens are in its per-modality records too
                key = (i, modality or "all")
                st = aux.stats
                both = torch.stack([st["tokens_per_expert"].detach(), (st["mean_gate"] * st["num_tokens"]).detach().float(),
                                    st["top1_per_expert"].detach()])
                self._tally[key] = self._tally.get(key, 0) + both
                drops = torch.stack([st["num_choices"] - st["num_kept"], st["num_choices"]]).float().detach()
                self._drops[key] = self._drops.get(key, 0) + drops

    def _reduce(self, module: L.LightningModule):
        """Every rank's tallies summed (collectives); None when nothing was routed."""
        trainer, keys = module.trainer, sorted(self._tally)
        if trainer.world_size > 1:  # a rank may have routed other modalities, or nothing
            everyone = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, keys)
            keys = sorted(set().union(*everyone))
        if not keys:
            return None
        layers = module.model.moe_layers()
        zeros = (lambda *shape: torch.zeros(*shape, device=module.device))
        both = torch.stack([self._tally[k].float() if k in self._tally else zeros(3, layers[k[0]].num_experts) for k in keys])
        drops = torch.stack([self._drops[k].float() if k in self._drops else zeros(2) for k in keys])
        if trainer.world_size > 1:
            both, drops = module.all_gather(both).sum(0), module.all_gather(drops).sum(0)
        return keys, both, drops

    def finish(self, module: L.LightningModule, prefix: str) -> None:
        """Sum over ranks, log the effective experts and, on rank 0, draw the pictures."""
        reduced = self._reduce(module)
        if reduced is None:
            return
        keys, both, drops = reduced
        counts, gate_mass, top1 = both[:, 0], both[:, 1], both[:, 2]
        self.dropped = {k: d.cpu() for k, d in zip(keys, drops)}
        self.counts = {k: c.cpu() for k, c in zip(keys, counts)}
        self.top1 = {k: c.cpu() for k, c in zip(keys, top1)}
        # LIMoE's measure of collapse: exp(H(p)), p the modality's mean routing distribution;
        # and the same of the share of tokens whose top-1 choice is each expert
        self.mean_gates = {k: (g / g.sum().clamp_min(1e-12)).cpu() for k, g in zip(keys, gate_mass)}
        metrics = {}
        for i, m in keys:
            metrics[f"{prefix}/effective_experts/layer{i}/{m}"] = effective_experts(self.mean_gates[(i, m)])
            metrics[f"{prefix}/effective_experts_top1/layer{i}/{m}"] = effective_experts(self.top1[(i, m)])
        module.log_dict(metrics, sync_dist=False, rank_zero_only=True)
        trainer = module.trainer
        log_dir = Path(trainer.log_dir or trainer.default_root_dir) / "routing"  # a collective
        if module.global_rank == 0:
            self._draw(module, log_dir, prefix, keys, counts)

    def _draw(self, module, log_dir: Path, prefix: str, keys, counts) -> None:
        step = module.global_step
        stem = log_dir / f"{prefix}_step{step:07d}"
        title = f"{prefix} routing at step {step}"
        fig = routing_picture(counts.cpu(), [f"MoE {i} {m}" for i, m in keys], title=title, path=f"{stem}.png")
        self.last_picture = Path(f"{stem}.png")
        # LIMoE's pictures: each expert's tokens by modality, and each patch / token by expert
        summary = {f"layer{i}": {} for i, _ in keys}
        for (i, m), c in self.counts.items():
            summary[f"layer{i}"][m] = {"tokens_per_expert": c.long().tolist()}
        modality_bars(summary, f"{stem}_modalities.png", title)
        if self.pairs is not None:
            images, texts = self.pairs
            write_routing_report(module.model, images, texts, stem, get_tokenizer(module.model.context_length), title=title)
        logger = module.logger
        if logger is not None and hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure(f"{prefix}/routing", fig, step)
        close(fig)
