"""LightningDataModule for image-text shards in img2dataset's layout."""
from __future__ import annotations

import logging

import lightning as L
import open_clip
import torch

from ..models.factory import resolve_config
from .pipeline import collate, make_dataset
from .watch import WatchedLoader
from .shards import count_samples, expand_shards
from .text import load_classnames, load_templates
from ..errors import ConfigError, DataError, check_int, check_number

__all__ = ["ClipDataModule", "model_input_spec"]

log = logging.getLogger("vlmoe.data")


def model_input_spec(model_name: str) -> tuple[int, int]:
    """(image_size, context_length) of a named model or an export folder."""
    cfg = resolve_config(model_name)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size), int(cfg["text_cfg"].get("context_length", 77))


class ClipDataModule(L.LightningDataModule):
    """Image-text shards for contrastive training, retrieval validation and zero-shot
    classification.

    Args:
        train_shards: brace-expanded shard URLs (`data/train-{000000..000099}.tar`, sources
            joined with `::`, `pipe:` commands allowed); samples as img2dataset writes them.
        val_shards: held-out image-text shards for retrieval metrics (optional).
        zeroshot_shards: labelled shards (`cls`) for zero-shot classification (optional).
        test_shards, zeroshot_test_shards: the same for `vlmoe test`.
        classnames: class-names file (one per line, in label order) or a built-in set
            ("digits", "imagenet").
        templates: templates file (one per line with `{}`) or a built-in set ("digits",
            "openai_imagenet", "simple_imagenet").
        model_name: the model the data is for (image size, context length); linked to
            `model.model_name` by the CLI.
        batch_size: per-device training batch size.
        val_batch_size: per-device evaluation batch size (default: batch_size).
        num_workers: DataLoader workers per device.
        samples_per_epoch: training samples per epoch, all devices together.
        shuffle_buffer: training shuffle buffer (samples per worker).
        seed: data seed (shard resampling and shuffling).
        timeout: seconds without a batch before the run stops with an error naming the
            shards (a stalled `pipe:` command, a hung mount); a note is printed every
            min(60, timeout / 4) s while waiting.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        zeroshot_shards: str | None = None,
        test_shards: str | None = None,
        zeroshot_test_shards: str | None = None,
        classnames: str | None = None,
        templates: str | None = None,
        model_name: str = "limoe-tiny",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int = 100_000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        timeout: float = 600.0,
    ):
        super().__init__()
        check_number("--data.timeout", timeout, 0.0, above=True, hint="(seconds)")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size), ("num_workers", num_workers),
                            ("samples_per_epoch", samples_per_epoch), ("shuffle_buffer", shuffle_buffer)):
            if value is not None or name != "val_batch_size":
                check_int(f"--data.{name}", value, 0 if name in ("num_workers", "shuffle_buffer") else 1)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers, self.samples_per_epoch = num_workers, samples_per_epoch
        self.shuffle_buffer, self.seed, self.timeout = shuffle_buffer, seed, float(timeout)
        self.image_size, self.context_length = model_input_spec(model_name)
        # Everything a user can get wrong about the data is checked here, before any work.
        self.urls = {}
        for name, spec in (("train", train_shards), ("val", val_shards), ("zeroshot", zeroshot_shards),
                           ("test", test_shards), ("zeroshot_test", zeroshot_test_shards)):
            if spec:
                self.urls[name] = expand_shards(spec, f"{name} shards")
        for name in ("val", "zeroshot", "test", "zeroshot_test"):
            if name in self.urls:
                n = count_samples(self.urls[name])
                if n is not None and n < self.val_batch_size:
                    raise DataError(
                        f"val_batch_size={self.val_batch_size} is larger than the {n} samples in the {name} shards; "
                        f"lower --data.val_batch_size (or --data.batch_size)"
                    )
        if "train" in self.urls:
            self._check_epoch(world_size=1)
        self.classnames = self.templates = None
        if "zeroshot" in self.urls or "zeroshot_test" in self.urls:
            if not classnames or not templates:
                raise DataError("zero-shot shards need --data.classnames and --data.templates (files or built-in names)")
            self.classnames, self.templates = load_classnames(classnames), load_templates(templates)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        self.train_transform = open_clip.image_transform(self.image_size, is_train=True)
        self.eval_transform = open_clip.image_transform(self.image_size, is_train=False)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, ds, batch_size, train, name):
        what = {"train": "training", "val": "validation", "zeroshot": "zero-shot validation"}.get(name, name.replace("_", " "))
        return WatchedLoader(
            ds, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate,
            drop_last=train, persistent_workers=False, pin_memory=False,
            what=what, sources=self.urls[name], timeout_s=self.timeout,
        )

    def _check_epoch(self, world_size: int) -> int:
        """Samples per DataLoader worker per epoch. Each worker batches its own stream, so a
        worker with fewer samples than a batch makes no step at all: an epoch of 0 steps,
        which Lightning would repeat forever."""
        workers = world_size * max(1, self.num_workers)
        per_worker = self.samples_per_epoch // workers
        if per_worker < self.batch_size:
            raise ConfigError(
                f"--data.samples_per_epoch={self.samples_per_epoch} gives each of the {workers} data streams "
                f"({world_size} device(s) x {max(1, self.num_workers)} worker(s)) {per_worker} samples per epoch, fewer "
                f"than --data.batch_size={self.batch_size}: an epoch would have no step. Use samples_per_epoch >= "
                f"{self.batch_size * workers}"
            )
        return per_worker

    def train_dataloader(self):
        if "train" not in self.urls:
            raise DataError("fit needs training shards: pass --data.train_shards")
        per_worker = self._check_epoch(self._world())
        # A resumed run continues with fresh shard draws instead of replaying the first ones.
        step = self.trainer.global_step if self.trainer is not None else 0
        ds = make_dataset(self.urls["train"], self.train_transform, self.tokenizer, train=True,
                          shuffle_buffer=self.shuffle_buffer, seed=self.seed + step, samples_per_worker=per_worker,
                          **self._rank())
        return self._loader(ds, self.batch_size, True, "train")

    def _rank(self) -> dict:
        return {"rank": self.trainer.global_rank if self.trainer is not None else 0, "world_size": self._world()}

    def _equalizer(self, name: str, labelled: bool) -> dict:
        """Under a strategy whose every forward is a collective (expert parallelism), the
        evaluation streams are padded so that all ranks run the same number of batches."""
        strategy = getattr(self.trainer, "strategy", None)
        if self._world() == 1 or not getattr(strategy, "requires_equal_eval_batches", False):
            return {}
        counts = [count_samples([u]) for u in self.urls[name]]
        remote = [u for u, c in zip(self.urls[name], counts) if c is None]
        if remote:
            raise DataError(
                f"expert-parallel evaluation pads every rank to the same number of batches, which needs "
                f"each shard's sample count; {remote[0]} is not a local file. Copy the {name} shards to local "
                f"disk (or evaluate without expert parallelism)"
            )
        # The stand-in has the keys of the real samples, so it takes the same path in the model.
        stand_in = {"image": torch.zeros(3, self.image_size, self.image_size)}
        stand_in.update({"label": 0} if labelled else {"text": torch.zeros(self.context_length, dtype=torch.long)})
        return {"shard_counts": counts, "stand_in": stand_in}

    def _eval_loaders(self, retrieval: str, zeroshot: str):
        loaders = []
        if retrieval in self.urls:
            ds = make_dataset(self.urls[retrieval], self.eval_transform, self.tokenizer, train=False,
                              **self._rank(), **self._equalizer(retrieval, labelled=False))
            loaders.append(self._loader(ds, self.val_batch_size, False, retrieval))
        if zeroshot in self.urls:
            ds = make_dataset(self.urls[zeroshot], self.eval_transform, None, train=False, need_text=False,
                              need_label=True, **self._rank(), **self._equalizer(zeroshot, labelled=True))
            loaders.append(self._loader(ds, self.val_batch_size, False, zeroshot))
        return loaders

    def val_dataloader(self):
        return self._eval_loaders("val", "zeroshot")

    def test_dataloader(self):
        loaders = self._eval_loaders("test", "zeroshot_test")
        if not loaders:
            raise DataError("test needs --data.test_shards and/or --data.zeroshot_test_shards")
        return loaders
