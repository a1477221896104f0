"""One training run from Python: fit, then test (retrieval + zero-shot), with the numbers the
demo and the comparison report need. The CLI (`vlmoe fit`) is the same machinery."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from ..data import ClipDataModule
from ..errors import ConfigError
from ..moe.config import EVAL_ROUTING
from ..eval.routing import effective_experts
from ..models.stats import model_stats
from .module import LIMoEModule

__all__ = ["train_and_evaluate", "ProgressPrinter", "quiet_lightning"]


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator info, tips) out of script output."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


class ProgressPrinter(L.Callback):
    """A line every `every` steps: loss and throughput (for logs and non-interactive runs)."""

    def __init__(self, label: str, every: int = 25, stream=None):
        self.label, self.every, self.stream = label, every, stream  # None: sys.stderr at print time
        self.rates: list[float] = []
        self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t
        if trainer.global_step > 2:  # skip warm-up steps
            self.rates.append(batch["image"].shape[0] * trainer.world_size / dt)
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every == 0 or step == total:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            rate = statistics.median(self.rates) if self.rates else float("nan")
            print(f"  [{self.label}] step {step}/{total}  loss {loss:.3f}  {rate:.0f} samples/s", file=self.stream or sys.stderr, flush=True)


def train_and_evaluate(
    model_name: str,
    out_dir: str | Path,
    train_shards: str,
    val_shards: str | None,
    zeroshot_shards: str | None,
    classnames: str | None,
    templates: str | None,
    steps: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    model_overrides: dict | None = None,
    lr: float = 1e-3,
    warmup_steps: int = 30,
    weight_decay: float = 0.1,
    num_workers: int = 1,
    label: str | None = None,
    progress_every: int = 25,
    eval_routings: tuple[str, ...] = (),
) -> dict:
    """Train `model_name` for `steps` steps on `train_shards`, then test it: retrieval on
    `val_shards`, zero-shot on `zeroshot_shards`. Returns metrics, parameter counts,
    training throughput and per-modality expert usage. An MoE model is also tested under each
    evaluation routing in `eval_routings` ("per_example", "batch", "dropless"), the same
    weights each time: `eval_routing` {routing: metrics and expert usage}; the top-level
    metrics are those of the model's configured evaluation routing."""
    for how in eval_routings:
        if how not in EVAL_ROUTING:
            raise ConfigError(f"eval_routings: {how!r} is not one of {', '.join(EVAL_ROUTING)}")
    label = label or model_name
    L.seed_everything(seed, workers=True, verbose=False)
    module = LIMoEModule(model_name, model_overrides=model_overrides, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, checkpoint_every_n_steps=max(steps, 1))
    dm = ClipDataModule(train_shards=train_shards, test_shards=val_shards, zeroshot_test_shards=zeroshot_shards,
                        classnames=classnames, templates=templates, model_name=model_name, batch_size=batch_size,
                        val_batch_size=min(256, batch_size * 4), num_workers=num_workers,
                        samples_per_epoch=steps * batch_size, seed=seed)
    progress = ProgressPrinter(label, progress_every)
    out_dir = Path(out_dir)
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, max_steps=steps,
        precision="32-true", gradient_clip_val=1.0, logger=CSVLogger(str(out_dir), name=label, version=f"seed{seed}"),
        callbacks=[progress], enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out_dir),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    routings = {}
    configured = module.model.eval_routing()
    if configured is not None and not module.model.moe_layers()[0].routes_tokens:
        configured = None  # Soft MoE: nothing to route otherwise
    if configured is not None:  # a token-routing model: the other routings first, the configured one last
        for how in [h for h in eval_routings if h != configured["eval_routing"]]:
            module.model.set_eval_routing(how)
            routings[how] = {**_test_metrics(trainer.test(module, datamodule=dm, verbose=False)[0]),
                             "expert_usage": expert_usage(module)}
        module.model.set_eval_routing(configured["eval_routing"])
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    usage = expert_usage(module)
    if configured is not None and configured["eval_routing"] in eval_routings:
        routings[configured["eval_routing"]] = {**_test_metrics(test), "expert_usage": usage}
    stats = model_stats(module.model)
    return {
        "model": label, "model_name": model_name, "seed": seed, "steps": steps, **_test_metrics(test),
        "eval_routing": {h: routings[h] for h in eval_routings if h in routings},
        "samples_per_sec": statistics.median(progress.rates) if progress.rates else None, "fit_seconds": fit_s,
        "total_params": stats["total_params"], "active_params_image": stats["active_params_image"],
        "active_params_text": stats["active_params_text"], "flops_image": stats["flops_image"],
        "expert_usage": usage, "routing_picture": str(module.last_routing_picture) if module.last_routing_picture else None,
        "skipped_samples": test.get("test/skipped_samples"),
    }


def _test_metrics(test: dict) -> dict:
    return {"zeroshot_top1": test.get("test/zeroshot_top1"), "zeroshot_top5": test.get("test/zeroshot_top5"),
            "retrieval_i2t_R@1": test.get("test/image_to_text_R@1"), "retrieval_t2i_R@1": test.get("test/text_to_image_R@1")}


def expert_usage(module: LIMoEModule) -> dict:
    """From the last evaluation, per modality: the smallest share of the modality's routed
    tokens that any expert of any MoE layer received, experts used (>= 2%) out of E, and per
    MoE layer LIMoE's effective number of experts exp(H(p)) (p: the modality's mean routing
    distribution) and the share of the modality's routed tokens that its top expert took; the
    same two on the top-1 choices (before capacity: collapse on the assignments,
    `effective_experts_top1`, `top1_top_expert_share`); the fraction of the modality's routed
    choices dropped over all layers."""
    out = {}
    drops: dict[str, torch.Tensor] = {}
    for (layer, modality), d in module.routing_dropped.items():
        drops[modality] = drops.get(modality, 0) + d
    for (layer, modality), counts in sorted(module.routing_counts.items()):
        share = counts.float() / counts.sum().clamp_min(1)
        entry = out.setdefault(modality, {"min_share": 1.0, "experts_2pct": [], "num_experts": int(counts.numel()),
                                          "effective_experts": [], "top_expert_share": [], "effective_experts_top1": [],
                                          "top1_top_expert_share": []})
        entry["min_share"] = min(entry["min_share"], float(share.min()))
        entry["experts_2pct"].append(int((share >= 0.02).sum()))
        entry["effective_experts"].append(effective_experts(module.routing_mean_gates[(layer, modality)]))
        entry["top_expert_share"].append(float(share.max()))
        top1 = module.routing_top1[(layer, modality)]
        entry["effective_experts_top1"].append(effective_experts(top1))
        entry["top1_top_expert_share"].append(float(top1.max() / top1.sum().clamp_min(1)))
    for modality, d in drops.items():
        if modality in out:
            out[modality]["dropped_frac"] = float(d[0] / d[1].clamp_min(1))
    return out
