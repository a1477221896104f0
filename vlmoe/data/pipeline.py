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
import math
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..errors import DataError
from .shards import IMAGE_KEYS
from . import watch as _watch  # noqa: F401 - registers the pipe: opener that no child outlives (DataLoader workers too)

__all__ = ["decode_samples", "make_dataset", "equalize_stream", "log_and_continue", "StreamGuard", "SKIP_REASONS", "to_rgb"]

log = logging.getLogger("vlmoe.data")

# Why a sample was skipped; the order is the order of the end-of-run summary.
SKIP_REASONS = ("corrupt image", "no image", "missing caption", "empty caption", "undecodable caption", "bad label")

# Shards that failed in this process since the last sample handed on, and how often each
# failed (for rate-limited warnings). Module-level because webdataset's handler is a plain
# function; each DataLoader worker is its own process with its own copy.
_UNREADABLE: list[str] = []
_FAILURES: dict[str, int] = {}


def _url_of(exn: Exception) -> str | None:
    return next((a for a in getattr(exn, "args", ()) if isinstance(a, str) and (".tar" in a or a.startswith("pipe:"))), None)


def log_and_continue(exn: Exception) -> bool:
    """webdataset handler: name the shard that failed and go on. Warnings for the same shard
    are rate-limited (1st, 10th, 100th... failure), so a resampled stream over a broken
    shard does not flood the log."""
    url = _url_of(exn) or "?"
    n = _FAILURES[url] = _FAILURES.get(url, 0) + 1
    if url not in _UNREADABLE:
        _UNREADABLE.append(url)
    if n == 1 or math.log10(n).is_integer():
        again = f" (failed {n} times)" if n > 1 else ""
        log.warning("skipping unreadable shard data in %s%s: %s", url, again, str(exn).splitlines()[0] if str(exn) else type(exn).__name__)
    return True


class StreamGuard:
    """Stops an endless (resampled) training stream that cannot yield a sample, instead of
    spinning forever: empty, zero-byte or non-tar shards, failing `pipe:` commands, shards
    whose every sample is corrupt.

    * `shards` (after the shard list) raises once every shard has been read since the last
      raw sample came out (or after 10 x shards + 10 reads);
    * `samples` (right after tar reading, before the shuffle buffer, which would delay the
      signal) notes which shards gave raw samples;
    * `decoded` (after decoding) raises only when at least `min_run` samples in a row were
      skipped AND every shard has given a skipped sample (or no sample at all) since the last
      good one. A run of 64 bad samples in a stream with a share p of bad ones has
      probability p**64 (1e-64 at p = 10%), so mostly-good shards never stop; all-corrupt
      ones stop after at most a few hundred samples. It also takes the skip markers out of
      the stream, carrying their counts on the next good sample, so no training batch is
      ever made of markers alone."""

    min_run = 64

    def __init__(self, urls: list[str]):
        self.urls = list(dict.fromkeys(urls))
        self.reads = 0
        self.read_since_sample: set[str] = set()
        self.opened: set[str] = set()
        self.gave: set[str] = set()

    def _names(self) -> str:
        shown = ", ".join(self.urls[:3]) + (f" ... ({len(self.urls)} shards)" if len(self.urls) > 3 else "")
        return shown

    def shards(self, src: Iterator[dict]) -> Iterator[dict]:
        bound = 10 * len(self.urls) + 10
        for item in src:
            if len(self.read_since_sample) >= len(self.urls) or self.reads >= bound:
                raise DataError(
                    f"the training shards yield no samples: {len(self.read_since_sample)} of {len(self.urls)} shards read "
                    f"{self.reads} times without one sample ({self._names()}); they are empty, not tar files, or their "
                    f"pipe: command fails. Check --data.train_shards"
                )
            self.reads += 1
            self.read_since_sample.add(item["url"])
            self.opened.add(item["url"])
            yield item

    def samples(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            self.reads = 0
            self.read_since_sample.clear()
            self.gave.add(sample.get("__url__"))
            yield sample

    def decoded(self, src: Iterator[dict]) -> Iterator[dict]:
        pending: dict = {"skipped": 0, "skip_reasons": {}, "unreadable": [], "urls": []}
        bad_since_good: set[str] = set()
        for sample in src:
            if sample.get("image") is None:  # a marker: counted, carried on, never yielded
                _merge_report(pending, sample)
                bad_since_good.update(sample.get("bad_urls", ()))
                unusable = bad_since_good | (self.opened - self.gave)
                if pending["skipped"] >= self.min_run and unusable >= set(self.urls):
                    why = ", ".join(f"{k} {v}" for k, v in pending["skip_reasons"].items())
                    raise DataError(
                        f"the training shards hold no usable sample: every sample read from all {len(self.urls)} shards "
                        f"was skipped ({why}) ({self._names()}). Check the images and captions in --data.train_shards"
                    )
                continue
            if pending["skipped"] or pending["unreadable"] or pending["urls"]:
                _merge_report(sample, pending)
                pending = {"skipped": 0, "skip_reasons": {}, "unreadable": [], "urls": []}
            bad_since_good.clear()
            yield sample


def _merge_report(into: dict, other: dict) -> None:
    """Add `other`'s skip counts, unreadable shards and shards read to `into`."""
    into["skipped"] = into.get("skipped", 0) + other.get("skipped", 0)
    reasons = into["skip_reasons"] = dict(into.get("skip_reasons", {}))
    for k, v in other.get("skip_reasons", {}).items():
        reasons[k] = reasons.get(k, 0) + v
    into["unreadable"] = list(dict.fromkeys([*into.get("unreadable", ()), *other.get("unreadable", ())]))
    into["urls"] = sorted({*into.get("urls", ()), *other.get("urls", ())})


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. High-bit-depth grayscale (16-bit PNG: mode I;16 / I, float: F) is scaled to
    0..255 first: PIL's own convert("RGB") clips it, which turns a 16-bit image white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and a.max(initial=0) <= 255 and a.min(initial=0) >= 0:
            scale = 1.0  # 8-bit values stored as 32-bit
        else:
            scale = 255.0 / 65535.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _decode_image(sample: dict) -> tuple[Image.Image | None, str | None]:
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            try:
                img = Image.open(io.BytesIO(data))
                img.load()  # force full decode: truncated files fail here, not later
                return to_rgb(img), None
            except Exception:  # noqa: BLE001 - any decoding failure makes the sample bad
                return None, "corrupt image"
    return None, "no image"


def _decode_text(sample: dict) -> tuple[str | None, str | None]:
    data = sample.get("txt")
    if data is None:
        return None, "missing caption"
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "undecodable caption"
    return (text, None) if text else (None, "empty caption")


def decode_samples(
    src: Iterator[dict],
    image_transform: Callable,
    tokenizer: Callable | None,
    need_text: bool = True,
    need_label: bool = False,
) -> Iterator[dict]:
    """Raw webdataset samples -> {"image", "text"?, "label"?, "skipped", "skip_reasons",
    "unreadable", "urls"}: each good sample carries the bad samples (by reason), the
    unreadable shards and the shards read since the previous one, so the counts survive
    DataLoader workers. Runs of bad samples come out as markers (`image` None) when they
    span shards, every 256 bad samples, and at the end of the stream."""
    reasons: dict[str, int] = {}
    bad_urls: set[str] = set()

    def report(out: dict, url: str | None = None) -> dict:
        out["skipped"] = sum(reasons.values())
        out["skip_reasons"] = dict(reasons)
        out["unreadable"] = list(_UNREADABLE)
        out["urls"] = sorted(bad_urls | ({url} if url else set()))
        _UNREADABLE.clear()
        return out

    for sample in src:
        image, why = _decode_image(sample)
        text = None
        if why is None and need_text:
            text, why = _decode_text(sample)
        label = None
        if why is None and need_label:
            try:
                label = int(sample["cls"].decode().strip())
            except Exception:  # noqa: BLE001 - missing or malformed label
                why = "bad label"
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
            bad_urls.add(sample.get("__url__", "?"))
            if len(bad_urls) > 1 or sum(reasons.values()) % 256 == 0:
                # Let the stream guard see a run of bad samples spanning shards.
                yield {**report({"image": None}), "bad_urls": sorted(bad_urls)}
                reasons, bad_urls = {}, set()
            continue
        out = report({"image": image_transform(image), "key": sample.get("__key__", "")}, sample.get("__url__"))
        reasons, bad_urls = {}, set()
        if need_text:
            out["text"] = tokenizer([text])[0]
        if need_label:
            out["label"] = label
        yield out
    if reasons or _UNREADABLE:
        # Bad samples or unreadable shards at the very end of a stream: an empty marker.
        yield {**report({"image": None}), "bad_urls": sorted(bad_urls)}


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
    guard = StreamGuard(urls) if train else None  # an endless stream must not spin on nothing
    if train:
        worker_seed = functools.partial(_rank_worker_seed, rank=rank)
        stages += [wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=worker_seed), guard.shards]
    else:
        stages += [wds.SimpleShardList(urls), functools.partial(split_by_rank, rank=rank, world_size=world_size),
                   wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=log_and_continue)]
    if train:
        stages += [guard.samples]
    if train and shuffle_buffer > 1:
        stages += [functools.partial(shuffle_per_stream, bufsize=shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed, rank=rank)]
    stages += [
        # partials and bound methods, not lambdas: DataLoader workers started with spawn pickle the pipeline
        functools.partial(decode_samples, image_transform=image_transform, tokenizer=tokenizer,
                          need_text=need_text, need_label=need_label),
    ]
    if train:
        stages += [guard.decoded]
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


def shuffle_per_stream(src: Iterator, bufsize: int, initial: int, seed: int, rank: int) -> Iterator:
    """webdataset's buffer shuffle with a generator of its own per rank and DataLoader worker.
    (`wds.shuffle(seed=...)` seeds every rank and worker alike: two streams that drew the same
    shard then yielded its samples in the same order.) Rank 0's first worker keeps the data
    seed itself, so single-stream runs are ordered as before."""
    import random

    stream = _rank_worker_seed(rank)
    rng = random.Random(seed) if stream == 0 else random.Random(f"{seed}/{stream}")
    yield from wds.filters._shuffle(src, bufsize, initial, rng=rng)


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
            sample = {**stand_in, **{k: sample[k] for k in ("skipped", "skip_reasons", "unreadable", "urls") if k in sample}, "pad": True}
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
    (bad samples at the end of a stream) included; `urls` lists the shards read and `keys`
    the samples' keys. Padding stand-ins (`equalize_stream`)
    are left out; a batch of nothing but stand-ins keeps one, with `valid` all False."""
    good = [s for s in samples if s["image"] is not None and not s.get("pad")]
    out = {"skipped": torch.tensor(sum(int(s.get("skipped", 0)) for s in samples))}
    reasons: dict[str, int] = {}
    for s in samples:
        for k, v in s.get("skip_reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    unreadable = [u for s in samples for u in s.get("unreadable", ())]
    urls = sorted({u for s in samples for u in s.get("urls", ())})
    if reasons:
        out["skip_reasons"] = reasons
    if unreadable:
        out["unreadable"] = unreadable
    if urls:
        out["urls"] = urls
    pads = [s for s in samples if s.get("pad")]
    if pads:
        out["valid"] = torch.ones(len(good) or 1, dtype=torch.bool)
        if not good:
            good = pads[:1]
            out["valid"][0] = False
    if not good:
        return out
    out["image"] = torch.stack([s["image"] for s in good])
    out["keys"] = [s.get("key", "") for s in good]  # sample keys (__key__), for tracing what a batch holds
    if "text" in good[0]:
        out["text"] = torch.stack([s["text"] for s in good])
    if "label" in good[0]:
        out["label"] = torch.tensor([s["label"] for s in good])
    return out
