"""Console scripts."""
from __future__ import annotations

import argparse
import json
from .errors import DataError

__all__ = ["info_main", "cli_main", "zeroshot_main"]


def cli_main(args: list[str] | None = None, run: bool = True):
    """Entry point of the `vlmoe` console script; `args` lets tests call it in-process."""
    from .data import ClipDataModule
    from .train import LIMoEModule
    from .train.lightning_cli import VLMoECLI

    return VLMoECLI(
        LIMoEModule, ClipDataModule, args=args, run=run, seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"max_steps": 1000, "log_every_n_steps": 10},
    )



def info_main(argv: list[str] | None = None) -> None:
    """vlmoe-info: parameters, active parameters and FLOPs of named models, beside their
    dense baselines."""
    from .models import create_model, dense_baseline, list_models
    from .models.stats import model_stats

    p = argparse.ArgumentParser(prog="vlmoe-info", description=info_main.__doc__)
    p.add_argument("models", nargs="*", help="model names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the model names and exit")
    p.add_argument("--no-baseline", action="store_true", help="don't add each model's dense baseline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(list_models()))
        return
    names = []
    for n in a.models or list_models():
        for m in (n,) if a.no_baseline else (n, dense_baseline(n)):
            if m not in names:
                names.append(m)
    rows = {}
    for n in names:
        rows[n] = model_stats(create_model(n))
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | params | active params / image token | active params / text token | GFLOPs / image | GFLOPs / text |")
    print("|---|---|---|---|---|---|")
    for n, s in rows.items():
        print(f"| {n} | {s['total_params'] / 1e6:.1f}M | {s['active_params_image'] / 1e6:.1f}M | {s['active_params_text'] / 1e6:.1f}M "
              f"| {s['flops_image'] / 1e9:.2f} | {s['flops_text'] / 1e9:.3f} |")


def _zeroshot_loader(data: str, image_size, batch_size: int, num_workers: int, classnames: list[str]):
    """Labelled batches from a torchvision ImageFolder or from `cls`-labelled shards."""
    from pathlib import Path

    import open_clip
    from torch.utils.data import DataLoader

    from .data import collate, expand_shards, make_dataset

    transform = open_clip.image_transform(image_size, is_train=False)
    if Path(data).is_dir():
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(data, transform=transform)
        if len(ds.classes) != len(classnames):
            raise DataError(f"{data} has {len(ds.classes)} class folders but the class-names file lists {len(classnames)} names")

        def to_dict(items):
            return collate([{"image": x, "label": y, "skipped": 0} for x, y in items])

        return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=to_dict)
    ds = make_dataset(expand_shards(data, "zero-shot shards"), transform, None, train=False, need_text=False, need_label=True)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def zeroshot_main(argv: list[str] | None = None) -> list[dict]:
    """vlmoe-zeroshot: zero-shot classification of one or more models, side by side."""
    import sys

    import torch
    from tqdm import tqdm

    from .data.text import load_classnames, load_templates
    from .eval.zeroshot import build_classifier, evaluate_zeroshot
    from .models import get_tokenizer
    from .models.factory import load_model

    p = argparse.ArgumentParser(prog="vlmoe-zeroshot", description=zeroshot_main.__doc__)
    p.add_argument("--model", action="append", required=True,
                   help="a vlmoe export, a .ckpt from vlmoe fit, ARCH@PATH for an open_clip checkpoint, or a model name; repeat to compare")
    p.add_argument("--data", required=True, help="shards with `cls` labels (brace patterns allowed) or an ImageFolder directory")
    p.add_argument("--classnames", required=True, help="file (one name per line, label order) or built-in: digits, imagenet")
    p.add_argument("--templates", required=True, help="file (one per line, with {}) or built-in: digits, openai_imagenet, simple_imagenet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--per-class", action="store_true", help="also report per-class accuracy")
    p.add_argument("--json", action="store_true", help="print only a JSON list, one object per model")
    a = p.parse_args(argv)
    classnames, templates = load_classnames(a.classnames), load_templates(a.templates)
    results = []
    for spec in a.model:
        model = load_model(spec).to(a.device).eval()
        classifier = build_classifier(model, get_tokenizer(model), classnames, templates, device=a.device)
        loader = _zeroshot_loader(a.data, model.image_size, a.batch_size, a.num_workers, classnames)
        bar = (lambda it: tqdm(it, desc=f"zero-shot {spec}", unit="batch", file=sys.stderr, leave=False))
        r = evaluate_zeroshot(model, loader, classifier, progress=bar)
        row = {"model": spec, "top1": r["top1"], "top5": r["top5"], "n": r["n"], "skipped": r["skipped"]}
        if a.per_class:
            row["per_class"] = dict(zip(classnames, r["per_class"]))
        results.append(row)
    if a.json:
        print(json.dumps(results))
        return results
    print("| model | top-1 | top-5 | images | skipped |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['top1']:.2%} | {r['top5']:.2%} | {r['n']} | {r['skipped']} |")
    if a.per_class:
        print("\n| class | " + " | ".join(r["model"] for r in results) + " |")
        print("|---|" + "---|" * len(results))
        for c in classnames:
            print(f"| {c} | " + " | ".join(f"{r['per_class'][c]:.1%}" for r in results) + " |")
    return results
