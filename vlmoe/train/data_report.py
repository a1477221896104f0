"""What a run did with its data: samples skipped (by reason), shards that could not be read
and shards read, summed over ranks, and the one line that says so at the end of fit,
validate and test."""
from __future__ import annotations

import sys

import lightning as L
import torch

from ..data.pipeline import SKIP_REASONS

__all__ = ["DataReport", "summarise_data", "LOADERS"]

# the data module's loaders behind each report
LOADERS = {"train": ("train",), "val": ("val", "zeroshot"), "test": ("test", "zeroshot_test")}


class DataReport:
    """Samples skipped (by reason), shards that could not be read and shards read, over a
    run: what the one-line summary at the end of fit, validate and test says."""

    def __init__(self):
        self.reasons: dict[str, int] = {}
        self.unreadable: list[str] = []
        self.read: set[str] = set()

    def add(self, batch: dict) -> None:
        for k, v in batch.get("skip_reasons", {}).items():
            self.reasons[k] = self.reasons.get(k, 0) + int(v)
        for u in batch.get("unreadable", ()):
            if u not in self.unreadable:
                self.unreadable.append(u)
        self.read.update(batch.get("urls", ()))

    def reduced(self, module: L.LightningModule) -> "DataReport":
        """The report summed over ranks (a collective when there are several)."""
        trainer = module.trainer
        if trainer is None or trainer.world_size == 1:
            return self
        counts = torch.tensor([float(self.reasons.get(r, 0)) for r in SKIP_REASONS], device=module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        everyone = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, (self.unreadable, sorted(self.read)))
        out = DataReport()
        out.reasons = {r: int(c) for r, c in zip(SKIP_REASONS, counts.tolist()) if c}
        out.unreadable = list(dict.fromkeys(u for part, _ in everyone for u in part))
        out.read = {u for _, part in everyone for u in part}
        return out

    def line(self, what: str, shards: list[str] | None = None) -> str:
        """The summary; `shards` (the run's shard URLs, if known) lets it say whether every
        shard was read: a resampled training stream may never draw some of them."""
        n = sum(self.reasons.values())
        parts = [f"vlmoe: {what} data: " + (f"{n} samples skipped (" + ", ".join(
            f"{r} {self.reasons[r]}" for r in SKIP_REASONS if self.reasons.get(r)) + ")" if n else "no samples skipped")]
        expected = set(shards or ())
        seen = (self.read | set(self.unreadable)) & expected
        if self.unreadable:
            shown = ", ".join(self.unreadable[:5]) + (f" ... and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else "")
            parts.append(f"{len(self.unreadable)} unreadable shard(s): {shown}")
        elif expected and seen >= expected:
            parts.append("every shard read")
        elif expected:
            parts.append(f"{len(seen)} of {len(expected)} shards read, none unreadable (the other {len(expected - seen)} "
                         f"were never drawn, so not checked)")
        else:
            parts.append(f"none unreadable among the {len(self.read)} shards read")
        if self.unreadable and expected and not seen >= expected:
            parts.append(f"{len(seen)} of {len(expected)} shards read")
        return "; ".join(parts)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/skipped/{r.replace(' ', '_')}": float(self.reasons.get(r, 0)) for r in SKIP_REASONS}
        out[f"{prefix}/unreadable_shards"] = float(len(self.unreadable))
        out[f"{prefix}/shards_read"] = float(len(self.read))
        return out



def summarise_data(module: L.LightningModule, reports: dict[str, DataReport], what: str, keys: tuple[str, ...]) -> str:
    """Sum the reports of `keys` over ranks (a collective), and on rank 0 print the line and
    log its numbers. Returns the line."""
    report = DataReport()
    for k in keys:
        part = reports[k].reduced(module)
        report.add({"skip_reasons": part.reasons, "unreadable": part.unreadable, "urls": part.read})
    trainer = module.trainer
    urls = getattr(trainer.datamodule, "urls", None)
    shards = [u for k in keys for name in LOADERS[k] for u in urls.get(name, ())] if isinstance(urls, dict) else None
    line = report.line(what, shards)
    if module.global_rank == 0:
        print(line, file=sys.stderr, flush=True)
        for logger in trainer.loggers:
            logger.log_metrics(report.metrics(f"data/{what}"), step=module.global_step)
            logger.save()
    return line
