"""webdataset pipelines for image-text (and labelled image) shards.

Bad samples (corrupt or truncated image, missing/empty/undecodable caption) are skipped and
counted, never raised; a shard that cannot be read is logged by name and skipped. The count
travels with the next good sample (`skipped`) so it survives DataLoader workers.
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

from .shards import IMAGE_KEYS

__all__ = ["decode_samples", "make_dataset", "equalize_stream", "log_and_continue"]

log = logging.getLogger("vlmoe.data")


def log_and_continue(exn: Exception) -> bool:
    """webdataset handler: name the shard that failed and go on."""
    url = next((a for a in getattr(exn, "args", ()) if isinstance(a, str) and (".tar" in a or a.startswith("pipe:"))), None)
    log.warning("skipping unreadable shard data%s: %s", f" in {url}" if url else "", exn)
    return True


def _decode_image(sample: dict) -> Image.Image | None:
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            try:
                img = Image.open(io.BytesIO(data))
                img.load()  # force full decode: truncated files fail here, not later
                return img.convert("RGB")
            except Exception:  # noqa: BLE001 - any decoding failure makes the sample bad
                return None
    return None


def _decode_text(sample: dict) -> str | None:
    data = sample.get("txt")
    if data is None:
        return None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def decode_samples(
    src: Iterator[dict],
    image_transform: Callable,
    tokenizer: Callable | None,
    need_text: bool = True,
    need_label: bool = False,
) -> Iterator[dict]:
    """Raw webdataset samples -> {"image", "text"?, "label"?, "skipped"}."""
    skipped = 0
    for sample in src:
        image = _decode_image(sample)
        text = _decode_text(sample) if need_text else None
        label = None
        if need_label:
            try:
                label = int(sample["cls"].decode().strip())
            except Exception:  # noqa: BLE001 - missing or malformed label
                label = None
        if image is None or (need_text and text is None) or (need_label and label is None):
            skipped += 1
            continue
        out = {"image": image_transform(image), "skipped": skipped, "key": sample.get("__key__", "")}
        skipped = 0
        if need_text:
            out["text"] = tokenizer([text])[0]
        if need_label:
            out["label"] = label
        yield out
    if skipped:
        # Bad samples at the very end of a worker's stream: report them with an empty marker.
        yield {"skipped": skipped, "image": None}


def make_dataset(
    urls: list[str],
    image_transform: Callable,
    tokenizer: Callable | None,
    train: bool,
    need_text: bool = True,
    need_label: bool = False,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    samples_per_worker: int | None = None,
    shard_counts: list[int] | None = None,
    stand_in: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> wds.DataPipeline:
    """Training: resampled shards (seeded per rank and worker, so no node split is needed),
    shuffle buffer, endless unless `samples_per_worker`. Evaluation: each shard once, split
    across ranks and DataLoader workers, in order; with `shard_counts` (samples per shard)
    and a `stand_in` sample, every rank's stream is padded to the same length (see
    `equalize_stream`). `rank` / `world_size` are the caller's: DataLoader workers started
    with spawn do not see torch.distributed, so webdataset would take every rank for rank 0."""
    stages: list = []
    if train:
        worker_seed = functools.partial(_rank_worker_seed, rank=rank)
        stages += [wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=worker_seed)]
    else:
        stages += [wds.SimpleShardList(urls), functools.partial(split_by_rank, rank=rank, world_size=world_size),
                   wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=log_and_continue)]
    if train and shuffle_buffer > 1:
        stages += [wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed)]
    stages += [
        # partials, not lambdas: DataLoader workers started with spawn pickle the pipeline
        functools.partial(decode_samples, image_transform=image_transform, tokenizer=tokenizer,
                          need_text=need_text, need_label=need_label),
    ]
    if shard_counts is not None and not train:
        stages += [functools.partial(equalize_stream, shard_counts=shard_counts, stand_in=stand_in,
                                     rank=rank, world_size=world_size)]
    pipeline = wds.DataPipeline(*stages)
    if samples_per_worker:
        pipeline = pipeline.with_epoch(samples_per_worker)
    return pipeline


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _rank_worker_seed(rank: int) -> int:
    """A distinct shard-resampling seed per rank and DataLoader worker."""
    return rank * 1000 + _worker()[0]


def split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """Every world_size-th shard, from `rank` on (webdataset's split_by_node, with the
    rank given rather than looked up)."""
    yield from itertools.islice(src, rank, None, world_size)


def equalize_stream(
    src: Iterator[dict], shard_counts: list[int], stand_in: dict, rank: int, world_size: int
) -> Iterator[dict]:
    """Evaluation under expert parallelism, where every MoE forward is a collective: each
    rank must run the same number of batches. This worker's stream is padded with
    `stand_in` samples (flagged `pad`) to the largest number of samples any rank's worker
    of the same index can hold (from the shard sizes, +1 for a marker of bad samples), so
    every rank yields the same number of batches whatever was skipped. Bad-sample markers
    become stand-ins carrying their count."""
    worker, num_workers = _worker()
    bound = max(sum(shard_counts[r::world_size][worker::num_workers]) for r in range(world_size)) + 1
    n = 0
    for sample in src:
        if sample["image"] is None:
            sample = {**stand_in, "skipped": sample["skipped"], "pad": True}
        n += 1
        if n > bound:
            raise RuntimeError(
                f"evaluation shards yielded more samples ({n}) than their tar headers list ({bound - 1}); "
                f"a shard changed while reading? rewrite the shards"
            )
        yield sample
    for _ in range(bound - n):
        yield {**stand_in, "skipped": 0, "pad": True}


def collate(samples: list[dict]) -> dict:
    """Stack a batch; `skipped` sums the bad samples seen since the previous batch, markers
    (bad samples at the end of a stream) included. Padding stand-ins (`equalize_stream`)
    are left out; a batch of nothing but stand-ins keeps one, with `valid` all False."""
    good = [s for s in samples if s["image"] is not None and not s.get("pad")]
    out = {"skipped": torch.tensor(sum(int(s["skipped"]) for s in samples))}
    pads = [s for s in samples if s.get("pad")]
    if pads:
        out["valid"] = torch.ones(len(good) or 1, dtype=torch.bool)
        if not good:
            good = pads[:1]
            out["valid"][0] = False
    if not good:
        return out
    out["image"] = torch.stack([s["image"] for s in good])
    if "text" in good[0]:
        out["text"] = torch.stack([s["text"] for s in good])
    if "label" in good[0]:
        out["label"] = torch.tensor([s["label"] for s in good])
    return out
