"""webdataset pipelines for image-text (and labelled image) shards.

Bad samples (corrupt or truncated image, missing/empty/undecodable caption) are skipped and
counted, never raised; a shard that cannot be read is logged by name and skipped. The count
travels with the next good sample (`skipped`) so it survives DataLoader workers.
"""
from __future__ import annotations

import io
import logging
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

from .shards import IMAGE_KEYS

__all__ = ["decode_samples", "make_dataset", "log_and_continue"]

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
) -> wds.DataPipeline:
    """Training: resampled shards (seeded per rank and worker, so no node split is needed),
    shuffle buffer, endless unless `samples_per_worker`. Evaluation: each shard once, split
    across ranks and DataLoader workers, in order."""
    stages: list = []
    if train:
        stages += [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages += [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=log_and_continue)]
    if train and shuffle_buffer > 1:
        stages += [wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed)]
    stages += [
        lambda src: decode_samples(src, image_transform, tokenizer, need_text, need_label),
    ]
    pipeline = wds.DataPipeline(*stages)
    if samples_per_worker:
        pipeline = pipeline.with_epoch(samples_per_worker)
    return pipeline


def collate(samples: list[dict]) -> dict:
    """Stack a batch; `skipped` sums the bad samples seen since the previous batch, markers
    (bad samples at the end of a stream) included."""
    good = [s for s in samples if s["image"] is not None]
    out = {"skipped": torch.tensor(sum(int(s["skipped"]) for s in samples))}
    if not good:
        return out
    out["image"] = torch.stack([s["image"] for s in good])
    if "text" in good[0]:
        out["text"] = torch.stack([s["text"] for s in good])
    if "label" in good[0]:
        out["label"] = torch.tensor([s["label"] for s in good])
    return out
