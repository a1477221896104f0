"""vlmoe-benchmark: LAION's CLIP_benchmark command line (`eval`, `build`, every flag) with one
addition, `--model_type vlmoe`, and a `moe` object in each result JSON (expert usage per
layer and modality, dropped fractions, active GFLOPs per image; empty for dense models).

CLIP_benchmark is used as it is: vlmoe registers a model type in its table of loaders
(`clip_benchmark.models.TYPE2FUNC`) and adds the `moe` object where the result is written.
Two defects of clip-benchmark 1.6.2 are handled at install time by the `[benchmark]` extra
(README, "Evaluating with CLIP_benchmark"): it imports `requests` without declaring it, and
its `accuracy()` raises TypeError under numpy >= 2.4; the extra pins `numpy<2.4`. If that pin
is overridden, this command says so before any model is loaded.
"""
from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

from ..errors import ConfigError, DataError, NotFound

__all__ = ["load_vlmoe", "BenchmarkSession", "check_accuracy_works", "main"]

_DEFAULT_TAG = "laion400m_e32"  # CLIP_benchmark's default --pretrained, an open_clip tag


class BenchmarkSession:
    """What one evaluation routed: a RoutingMeter over every MoE call, images counted at the
    image tower, and the model's non-expert FLOPs per image measured before the run."""

    def __init__(self, model):
        from .sweep import RoutingMeter, image_flops_without_experts

        self.model = model
        self.dense = model.moe_config is None
        self.images = 0
        if self.dense:
            return
        self.base_flops = image_flops_without_experts(model)  # before the meter exists: its probe forward is not counted
        self.meter = RoutingMeter(model).__enter__()
        self.image_meter = RoutingMeter(model, "image").__enter__()
        self._count = model.visual.register_forward_pre_hook(self._count_images)

    def _count_images(self, module, args):
        self.images += int(args[0].shape[0])

    def close(self) -> None:
        if not self.dense:
            self.meter.__exit__(None, None, None)
            self.image_meter.__exit__(None, None, None)
            self._count.remove()

    def summary(self) -> dict:
        """The result JSON's `moe` object ({} for a dense model)."""
        if self.dense:
            return {}
        cfg = self.model.moe_config.resolve()  # the router's defaults filled in
        routing = self.model.eval_routing() or {}
        per_image = self.image_meter.expert_flops / self.images if self.images else 0.0
        return {
            "num_experts": cfg.num_experts, "top_k": cfg.top_k, "router": cfg.router, **routing,
            "images": self.images,
            "dropped_frac": self.meter.modality_dropped(),
            "gflops_per_image": (self.base_flops + per_image) / 1e9,
            "layers": self.meter.layer_summary(),
        }


_SESSIONS: list[BenchmarkSession] = []


def load_vlmoe(model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device="cpu"):
    """CLIP_benchmark's loader contract for `--model_type vlmoe`: (model, transform, tokenizer).
    `model_name` is anything vlmoe-zeroshot --model takes; `pretrained` a checkpoint for a
    named model, or "none"."""
    import open_clip

    from ..models import create_model, get_tokenizer
    from ..models.factory import load_model

    if pretrained in (None, "", "none", "None"):
        from ..models.factory import warn_random_weights

        warn_random_weights("vlmoe-benchmark", model_name)
        model = load_model(model_name)
    elif pretrained == _DEFAULT_TAG and not Path(pretrained).exists():
        raise ConfigError(
            f"--pretrained is {_DEFAULT_TAG!r} (CLIP_benchmark's default, an open_clip tag): with --model_type vlmoe pass "
            f"--pretrained none, or a checkpoint (.ckpt from vlmoe fit, export, .safetensors) for the named --model"
        )
    else:
        model = create_model(model_name, pretrained=pretrained)
    model = model.to(device).eval()
    while _SESSIONS:
        _SESSIONS.pop().close()
    _SESSIONS.append(BenchmarkSession(model))
    return model, open_clip.image_transform(model.image_size, is_train=False), get_tokenizer(model)


def _import_clip_benchmark():
    try:
        return importlib.import_module("clip_benchmark.cli")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "clip_benchmark":
            raise ConfigError("CLIP_benchmark is not installed: pip install 'vlmoe[benchmark]' (or -e '.[benchmark]' in a checkout)") from None
        raise ConfigError(
            f"CLIP_benchmark could not be imported: it needs {e.name!r}, which it does not declare; "
            f"pip install 'vlmoe[benchmark]' installs it (or pip install {e.name})"
        ) from None


def check_accuracy_works() -> None:
    """clip-benchmark 1.6.2's accuracy() converts a 1-element array with float(), which numpy
    >= 2.4 refuses (TypeError): every zero-shot classification would fail after the whole
    evaluation. Probe it on a tiny input first."""
    import numpy as np
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zc

    try:
        zc.accuracy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), topk=(1,))
    except TypeError as e:
        raise ConfigError(
            f"CLIP_benchmark's accuracy() fails under numpy {np.__version__} ({e}): install numpy<2.4, which the "
            f"[benchmark] extra pins (pip install 'numpy<2.4')"
        ) from None


def _model_slug(spec: str) -> str:
    from .sweep import short_label

    return short_label(spec).replace("/", "_").replace(":", "_")


def _dump_with_moe(obj, fp, *args, **kwargs):
    if isinstance(obj, dict) and "metrics" in obj and "moe" not in obj:
        obj = dict(obj, moe=_SESSIONS[-1].summary() if _SESSIONS else {})
    return json.dump(obj, fp, *args, **kwargs)


def _check_wds_root(root: str, split: str) -> None:
    """A local --dataset_root for a wds/ dataset must hold CLIP_benchmark's layout (what
    scripts/make_shards.py benchmark writes): ROOT/SPLIT/*.tar beside ROOT/classnames.txt."""
    if "://" in root:
        return  # a remote root (Hugging Face, https): CLIP_benchmark reads it
    folder = Path(root)
    hint = "write one with: python scripts/make_shards.py benchmark --shards ... --templates ... --out ROOT"
    if not folder.is_dir():
        raise NotFound(f"--dataset_root {root}: no such folder ({hint})")
    if not list((folder / split).glob("*.tar")):
        raise DataError(f"--dataset_root {root} has no shards in {folder / split} (expected {split}/0.tar ...; {hint})")
    if not (folder / "classnames.txt").is_file():
        raise DataError(f"--dataset_root {root} has no classnames.txt ({hint})")


def _check_result_file(path: Path) -> None:
    """`build` reads result JSONs (files, or folders of them) written by `eval`."""
    if path.is_dir():
        for f in sorted(path.glob("*.json")):
            _check_result_file(f)
        return
    if not path.is_file():
        raise NotFound(f"build: result file not found: {path} (the JSON that vlmoe-benchmark eval --output wrote)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"build: {path} is not a JSON result file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict) or "model" not in data:
        raise DataError(f"build: {path} is not a result of vlmoe-benchmark eval (no 'model' and 'metrics')")


def _install(cli) -> None:
    """Register the vlmoe model type and the `moe` object in CLIP_benchmark (once)."""
    models = importlib.import_module("clip_benchmark.models")
    if "vlmoe" not in models.MODEL_TYPES:
        models.MODEL_TYPES.append("vlmoe")  # the list the eval parser takes its --model_type choices from
        models.TYPE2FUNC["vlmoe"] = load_vlmoe
    if getattr(cli.run, "_vlmoe", False):
        return
    original = cli.run
    checked = []

    def run(args):
        from clip_benchmark.datasets.builder import get_dataset_default_task

        name = args.dataset[len("wds/"):] if args.dataset.startswith("wds/") else args.dataset
        if args.dataset.startswith("wds/"):
            _check_wds_root(args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-")), args.split)
        task = get_dataset_default_task(name) if args.task == "auto" else args.task
        if task == "zeroshot_classification" and not checked:  # the only task that calls accuracy()
            check_accuracy_works()
            checked.append(True)
        if args.model_type == "vlmoe":
            # model specs are paths and hub ids: keep them out of the output file's name
            args.output = args.output.replace("{model}", _model_slug(args.model))
        try:
            return original(args)
        finally:
            while _SESSIONS:
                _SESSIONS.pop().close()

    run._vlmoe = True
    cli.run = run
    build = cli.main_build

    def main_build(base):
        for path in base.files:
            _check_result_file(Path(path))
        return build(base)

    cli.main_build = main_build
    cli.json = types.SimpleNamespace(**{k: getattr(json, k) for k in ("load", "loads", "dumps")}, dump=_dump_with_moe)


def main(argv: list[str] | None = None) -> int:
    """vlmoe-benchmark: CLIP_benchmark with --model_type vlmoe."""
    cli = _import_clip_benchmark()
    _install(cli)
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    sys.argv = ["vlmoe-benchmark", *argv]  # CLIP_benchmark's parser reads sys.argv
    try:
        result = cli.main()
    finally:
        sys.argv = saved
    return int(result or 0)
