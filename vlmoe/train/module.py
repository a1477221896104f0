"""Contrastive training of LIMoE / CLIP models with Lightning."""
from __future__ import annotations

import math
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from open_clip.loss import ClipLoss

from ..eval.retrieval import retrieval_metrics
from ..eval.zeroshot import build_classifier, topk_correct
from ..models.factory import create_model
from ..errors import ConfigError
from ..moe import check_finite, update_biases
from ..moe.config import BIAS_MODALITIES
from .checkpointing import AtomicCheckpointIO, FinalCheckpoint, SignalStop
from .data_report import DataReport, summarise_data
from .routing_report import RoutingReport
from .settings import check_training_args

# checkpointing and the data report live in their own modules; imported here for code that
# imported them from this one
__all__ = ["LIMoEModule", "FinalCheckpoint", "AtomicCheckpointIO", "DataReport", "SignalStop"]

# Evaluation metrics are computed from every rank's gathered rows and logged once, by rank 0:
# Lightning's advice to sync them (one line per metric, every validation, on every run with
# more than one device) does not apply to them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/", category=PossibleUserWarning)


def _plain_hp(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _gather_rows(module: L.LightningModule, x: torch.Tensor | None) -> torch.Tensor | None:
    """all_gather for [n, d] tensors whose n differs across ranks; None where a rank has no
    rows (a rank can get no evaluation shard). Every rank must call it."""
    if module.trainer is None or module.trainer.world_size == 1:
        return x
    shape = torch.tensor([0, 0] if x is None else list(x.shape), device=module.device)
    shapes = module.all_gather(shape).view(-1, 2)
    n_max, dim = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    if n_max == 0:
        return None
    padded = torch.zeros(n_max, dim, device=module.device)
    if x is not None:
        padded[: x.shape[0]] = x
    gathered = module.all_gather(padded)
    return torch.cat([gathered[r, :s] for r, s in enumerate(shapes[:, 0].tolist())])


class LIMoEModule(L.LightningModule):
    """Contrastive (CLIP) training with the MoE auxiliary and LIMoE entropy losses.

    Args:
        model_name: a name from `vlmoe.list_models()` or an export folder.
        model_overrides: config overrides merged into the named config (e.g.
            {"moe": {"num_experts": 4}}).
        pretrained: weights to start from (export, Lightning .ckpt, state dict).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay; none on norms, biases, embeddings and logit scale.
        betas, eps: AdamW.
        warmup_steps: linear warmup, then cosine decay to `min_lr_ratio * lr` at max_steps.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        aux_loss_weight: multiplies the (already weighted) MoE auxiliary losses.
        grad_checkpointing: activation checkpointing per transformer block.
        checkpoint_every_n_steps: periodic checkpoints (plus `last.ckpt` at the end of fit).
        moe_log_every_n_steps: per-layer/per-modality expert load every this many steps
            (default: the trainer's log_every_n_steps).
        compile: compile the model's forward with `torch.compile` (in place, in
            `configure_model`, so checkpoints keep their keys); the training step's forward
            and backward then run as compiled graphs (the capacity path makes no host sync, see
            docs/benchmarks.md "Host syncs"); evaluation's `encode_*` calls stay eager. True
            uses inductor; a backend's name picks that backend (e.g. "aot_eager", to tell an
            inductor bug from a graph-capture one).

    NaN / inf router logits are noted by each MoE layer on the device and checked on every
    logging step (`log_every_n_steps`) and after each evaluation (`vlmoe.moe.check_finite`):
    a FloatingPointError that names the layers, without a host sync in every step.
    """

    def __init__(
        self,
        model_name: str = "limoe-tiny",
        model_overrides: dict | None = None,
        pretrained: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        aux_loss_weight: float = 1.0,
        grad_checkpointing: bool = False,
        checkpoint_every_n_steps: int = 1000,
        moe_log_every_n_steps: int | None = None,
        compile: bool | str = False,
    ):
        super().__init__()
        check_training_args(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, warmup_steps=warmup_steps,
                             min_lr_ratio=min_lr_ratio, aux_loss_weight=aux_loss_weight,
                             checkpoint_every_n_steps=checkpoint_every_n_steps, moe_log_every_n_steps=moe_log_every_n_steps,
                             compile=compile)
        self.save_hyperparameters()
        self.model = create_model(model_name, pretrained=pretrained, **(model_overrides or {}))
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self._compiled = False
        self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)
        self.skipped_samples = 0
        self.data_report = {"train": DataReport(), "val": DataReport(), "test": DataReport()}
        self._t_batch = None
        self.routing_report = RoutingReport()  # what the last evaluation routed

    # what the last evaluation routed, per (MoE layer, modality) (see RoutingReport)
    last_routing_picture = property(lambda self: self.routing_report.last_picture)
    routing_counts = property(lambda self: self.routing_report.counts)
    routing_mean_gates = property(lambda self: self.routing_report.mean_gates)
    routing_dropped = property(lambda self: self.routing_report.dropped)
    routing_top1 = property(lambda self: self.routing_report.top1)

    # -- setup ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default; a user's own stays
            strategy.checkpoint_io = AtomicCheckpointIO()
        world = self.trainer.world_size
        # local loss + gather with grad: each rank's loss covers its rows against the global
        # batch, and DDP's gradient average equals the single-process global-batch gradient.
        self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=self.global_rank, world_size=world)

    def configure_model(self) -> None:
        """Lightning's place for compiling: once, before the strategy wraps the model."""
        if self.hparams.get("compile", False) and not self._compiled:
            backend = self.hparams.compile if isinstance(self.hparams.compile, str) else "inductor"
            if self.global_rank == 0:
                print(f"vlmoe: compiling the model (torch.compile, backend {backend}): the first training and evaluation "
                      "steps take longer while the graphs are built", file=sys.stderr, flush=True)
            self.model.compile(backend=backend)  # nn.Module.compile: in place, the state-dict keys stay
            self._compiled = True

    def configure_callbacks(self):
        if self._trainer is not None and self.trainer.checkpoint_callback is None:
            return []  # the trainer was told enable_checkpointing=False
        return [
            ModelCheckpoint(filename="step{step:07d}", every_n_train_steps=self.hparams.checkpoint_every_n_steps,
                            save_top_k=-1, auto_insert_metric_name=False),
            FinalCheckpoint(),
        ]

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            exclude = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith((".bias", "experts.b1", "experts.b2")) or ".ln" in name or "norm" in name
            (no_decay if exclude else decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = max(1, int(self._trainer.estimated_stepping_batches)) if self._trainer is not None else 1

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "eps")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume with a changed lr, weight_decay, betas or eps: the checkpoint's optimizer
        and scheduler states (restored right after this hook, over what
        configure_optimizers built) take the new values, so the run does what the command
        line says. lr moves the schedule's base (the current multiplier is kept); weight
        decay changes the decayed group only. The schedule's shape (warmup, min_lr_ratio,
        max_steps) is rebuilt from the current settings anyway."""
        old = checkpoint.get("hyper_parameters") or {}
        hp = self.hparams
        changed = [k for k in self._OPTIMIZER_KEYS if k in old and _plain_hp(old[k]) != _plain_hp(hp[k])]
        if not changed or not checkpoint.get("optimizer_states"):
            return
        ratio = hp.lr / old["lr"] if "lr" in changed and old["lr"] else None
        for state in checkpoint["optimizer_states"]:
            for i, group in enumerate(state.get("param_groups", ())):
                if ratio is not None:
                    group["lr"], group["initial_lr"] = group["lr"] * ratio, hp.lr
                if "weight_decay" in changed and i == 0:  # group 0 decays, group 1 never (configure_optimizers)
                    group["weight_decay"] = hp.weight_decay
                if "betas" in changed:
                    group["betas"] = tuple(hp.betas)
                if "eps" in changed:
                    group["eps"] = hp.eps
        for sched in checkpoint.get("lr_schedulers") or ():
            if ratio is not None:
                sched["base_lrs"] = [hp.lr for _ in sched.get("base_lrs", ())]
                sched["_last_lr"] = [x * ratio for x in sched.get("_last_lr", ())]
        if self.global_rank == 0:
            print("vlmoe: the resumed optimizer takes " + ", ".join(f"{k}={_plain_hp(hp[k])} (was {_plain_hp(old[k])})" for k in changed),
                  file=sys.stderr, flush=True)

    def on_train_start(self) -> None:
        """Each group's lr from the schedule as it is now configured, at the restored step: a
        resume with another lr, warmup_steps, min_lr_ratio or max_steps takes its first step
        on the new schedule instead of the value the old run last set."""
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * fn(sched.last_epoch)
                sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    # -- training -------------------------------------------------------------------------
    def forward(self, images, texts):
        return self.model(images, texts)

    def on_train_batch_start(self, batch, batch_idx):
        self._t_batch = time.perf_counter()

    def training_step(self, batch, batch_idx):
        self.skipped_samples += int(batch["skipped"])
        self.data_report["train"].add(batch)
        out = self.model(batch["image"], batch["text"])
        clip_loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss = clip_loss + self.hparams.aux_loss_weight * out["aux_loss"]
        bs = batch["image"].shape[0]
        self.log_dict({"train/loss": loss, "train/clip_loss": clip_loss, "train/aux_loss": out["aux_loss"],
                       "train/logit_scale": out["logit_scale"]}, prog_bar=True, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        self.log("data/skipped_samples", float(self.skipped_samples), reduce_fx="sum", sync_dist=False, batch_size=bs)
        every = self.hparams.moe_log_every_n_steps or self.trainer.log_every_n_steps
        if out["moe_metrics"] and self.global_step % max(1, every) == 0:
            self.log_dict(self._moe_scalars(out["moe_metrics"]), batch_size=bs)
        return loss

    @staticmethod
    def _moe_scalars(metrics: dict) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in metrics.items():
            if k.endswith(("tokens_per_expert", "mean_gate", "top1_per_expert")):
                continue
            if v.ndim == 0:
                out[k] = v.float()
            else:  # expert_load: one scalar per expert; rank_load: one per EP rank
                tag = "r" if k.endswith("rank_load") else "e"
                for e, x in enumerate(v):
                    out[f"{k}/{tag}{e}"] = x.float()
        return out

    def on_before_optimizer_step(self, optimizer):
        """Auxiliary-loss-free balancing: each bias-balanced layer moves its expert bias once
        per optimizer step, from the loads of the step's forwards summed over every rank."""
        stats = {}
        layers = [(i, m) for i, m in enumerate(self.model.moe_layers()) if getattr(m, "balancer", None) is not None]
        loads = update_biases([m.balancer for _, m in layers])  # one all_reduce for every layer
        for (i, m), load in zip(layers, loads):
            if load.sum() > 0:
                stats[f"moe/layer{i}/bias_max_abs"] = m.expert_bias.abs().max()
                if load.ndim == 1:
                    stats[f"moe/layer{i}/load_max_over_mean"] = load.max() / load.mean()
                else:  # one row per modality (vlmoe.moe.layer.BIAS_MODALITIES)
                    for modality, row in zip(BIAS_MODALITIES, load):
                        if row.sum() > 0:
                            stats[f"moe/layer{i}/load_max_over_mean/{modality}"] = row.max() / row.mean()
        if stats:
            self.log_dict(stats, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():  # CLIP's clamp: temperature no lower than 1/100
            self.model.logit_scale.clamp_(0, math.log(100))
        trainer = self._trainer
        if trainer is None or trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            check_finite(self.model)  # one host read for every layer, on logging steps only
        if self._t_batch is not None:
            dt = time.perf_counter() - self._t_batch
            self.log("perf/samples_per_sec", batch["image"].shape[0] * self.trainer.world_size / max(dt, 1e-9), batch_size=1)

    # -- evaluation -----------------------------------------------------------------------
    def _eval_start(self):
        self._feats = {"image": [], "text": []}
        self._zs = {"n": 0, 1: 0, 5: 0}
        self._eval_skipped = 0
        self._classifier = None
        self.routing_report.start()
        dm = self.trainer.datamodule
        if dm is not None and getattr(dm, "classnames", None):
            self._classifier = build_classifier(self.model, dm.tokenizer, dm.classnames, dm.templates, device=self.device)

    def _eval_step(self, batch):
        self._eval_skipped += int(batch["skipped"])
        self.data_report["test" if self.trainer.testing else "val"].add(batch)
        if "image" not in batch:
            return
        for m in self.model.moe_layers():
            m.aux.clear()  # count only what this batch routed (a zero-shot batch has no text)
        # A stand-in batch (see vlmoe.data.equalize_stream) runs the model, because under
        # expert parallelism the other ranks need this rank in every forward, and is dropped.
        stand_in = "valid" in batch and not bool(batch["valid"].any())
        if "text" in batch:
            out = self.model(batch["image"], batch["text"])
            if stand_in:
                return
            # Pictures need one more forward on rank 0 alone: not where every forward is a collective.
            alone_ok = not getattr(self.trainer.strategy, "requires_equal_eval_batches", False) or self.trainer.world_size == 1
            report = self.routing_report
            if report.pairs is None and self.global_rank == 0 and alone_ok and self.model.moe_config is not None:
                report.pairs = (batch["image"][:8].detach(), batch["text"][:8].detach())
            self._feats["image"].append(out["image_features"].float())
            self._feats["text"].append(out["text_features"].float())
        elif "label" in batch:
            if self._classifier is None:
                raise ConfigError("labelled (zero-shot) shards need class names and templates in the data module")
            feats = self.model.encode_image(batch["image"], normalize=True)
            if stand_in:
                return
            hits = topk_correct(feats.float() @ self._classifier.float(), batch["label"])
            self._zs["n"] += batch["label"].numel()
            self._zs[1] += hits[1]
            self._zs[5] += hits[5]
        self.routing_report.record(self.model.moe_layers())

    def _eval_end(self, prefix: str):
        check_finite(self.model)
        metrics = {}
        img = _gather_rows(self, torch.cat(self._feats["image"]) if self._feats["image"] else None)
        txt = _gather_rows(self, torch.cat(self._feats["text"]) if self._feats["text"] else None)
        if img is not None:
            metrics.update({f"{prefix}/{k}": v for k, v in retrieval_metrics(img, txt).items()})
            metrics[f"{prefix}/retrieval_n"] = float(img.shape[0])
        zs = torch.tensor([self._zs["n"], self._zs[1], self._zs[5]], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            zs = self.all_gather(zs).sum(0)
        if zs[0] > 0:
            metrics[f"{prefix}/zeroshot_top1"] = float(zs[1] / zs[0])
            metrics[f"{prefix}/zeroshot_top5"] = float(zs[2] / zs[0])
            metrics[f"{prefix}/zeroshot_n"] = float(zs[0])
        metrics[f"{prefix}/skipped_samples"] = float(self._eval_skipped)
        how = self.model.eval_routing()
        if how is not None:  # the routing the numbers were obtained with
            metrics[f"{prefix}/eval_routing/{how['eval_routing']}"] = 1.0
            for modality in ("image", "text"):
                cf = how[f"eval_capacity_factor_{modality}"]
                metrics[f"{prefix}/eval_capacity_factor/{modality}"] = -1.0 if cf is None else float(cf)
        if metrics:
            self.log_dict(metrics, sync_dist=False, rank_zero_only=True)
        self.routing_report.finish(self, prefix)

    # -- the end-of-run data summary --------------------------------------------------------
    def _summarise_data(self, what: str, keys: tuple[str, ...]) -> None:
        self.last_data_summary = summarise_data(self, self.data_report, what, keys)

    def on_fit_start(self):
        self.data_report["train"], self.data_report["val"] = DataReport(), DataReport()

    def on_fit_end(self):
        self._summarise_data("fit", ("train", "val"))

    def on_validation_start(self):
        if self.trainer.state.fn == "validate":
            self.data_report["val"] = DataReport()

    def on_validation_end(self):
        if self.trainer.state.fn == "validate":
            self._summarise_data("validate", ("val",))

    def on_test_start(self):
        self.data_report["test"] = DataReport()

    def on_test_end(self):
        self._summarise_data("test", ("test",))

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")
