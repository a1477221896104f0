"""Console scripts. Each behaves like a shell tool: status 0 on success; a user's mistake
(`vlmoe.errors.VLMoEError`) is one line on stderr with status 2 (`--debug` or VLMOE_DEBUG=1
keeps its traceback); a bug keeps its traceback; `--json` prints only JSON on stdout."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .errors import ConfigError, DataError, VLMoEError, check_number

__all__ = ["info_main", "cli_main", "zeroshot_main", "routing_main", "routing_console", "folder_labels", "vlmoe_console", "info_console", "zeroshot_console", "run_console"]


def one_line(exc: BaseException) -> str:
    """The message of a user-facing error on one line. An error re-raised by a DataLoader
    worker carries the worker's traceback in its message: keep only the original message."""
    msg = str(exc)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = re.sub(r"^[\w.]+(Error|Found): ", "", last.strip())
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are one ConfigError line (`PROG: error: ...`, status 2) instead
    of the usage followed by the error; the usage stays with --help."""

    def error(self, message):
        raise ConfigError(f"{message} (see: {self.prog} --help)")


def run_console(main, prog: str, argv: list[str] | None = None) -> int:
    """Run a console entry point and turn its outcome into an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VLMOE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except SystemExit as e:
        # Lightning's SIGTERMException is a SystemExit(None): not a success. Only a command
        # that imported Lightning can raise it; the others start without importing it.
        lightning_exc = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if lightning_exc is None or not isinstance(e, lightning_exc.SIGTERMException):
            raise
        import signal

        signum = getattr(e, "signum", signal.SIGTERM)  # vlmoe.train.module.SignalStop: SIGINT
        ckpt = getattr(e, "checkpoint", None)
        where = f" at step {e.step}" if hasattr(e, "step") else ""
        saved = f"; saved {ckpt} (resume with --ckpt_path {ckpt})" if ckpt else ("; nothing saved (no step had run)" if where else "")
        print(f"{prog}: stopped by {signal.Signals(signum).name}{where}{saved}", file=sys.stderr, flush=True)
        return 128 + int(signum)
    except VLMoEError as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


def parse_device(spec: str, flag: str = "--device") -> str:
    """A device string torch knows and this machine has, or one ConfigError line."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag} {spec!r} is not a device name torch knows: use cpu, cuda, cuda:N or mps") from None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(device.type, getattr(torch, device.type, None))
    if device.type != "cpu":
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"{flag} {spec}: this machine has no {device.type} device that torch can use; use {flag} cpu")
        count = getattr(backend, "device_count", None)
        if device.index is not None and count is not None and device.index >= count():
            raise ConfigError(f"{flag} {spec}: this machine has {count()} {device.type} device(s), numbered from 0")
    return spec


def vlmoe_console() -> None:
    """`vlmoe fit|validate|test ...`"""

    def main(argv):
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (and warns when given both)
        cli_main(None)

    sys.exit(run_console(main, "vlmoe"))


def info_console() -> None:
    sys.exit(run_console(info_main, "vlmoe-info"))


def zeroshot_console() -> None:
    sys.exit(run_console(zeroshot_main, "vlmoe-zeroshot"))


def benchmark_console() -> None:
    """`vlmoe-benchmark eval|build ...`: CLIP_benchmark's CLI with --model_type vlmoe."""

    def main(argv):
        from .eval.benchmark import main as benchmark_main

        benchmark_main(argv)

    sys.exit(run_console(main, "vlmoe-benchmark"))


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

    p = ArgParser(prog="vlmoe-info", description=info_main.__doc__)
    p.add_argument("models", nargs="*", help="model names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the model names and exit")
    p.add_argument("--no-baseline", action="store_true", help="don't add each model's dense baseline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(list_models()))
        return
    from .models.factory import get_model_config

    names = []
    for n in a.models:
        get_model_config(n)  # an unknown name is named as such, with the known ones
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


def folder_labels(folders: list[str], classnames: list[str], where: str = "the ImageFolder") -> list[int]:
    """The label of each ImageFolder class folder (in ImageFolder's sorted order). A folder
    named like a class name (case and `_` for spaces aside) gets that name's label; folders
    named 0..C-1 are label indices. Anything else is refused: sorted folder order says
    nothing about the class-names file's order."""
    norm = lambda n: n.replace("_", " ").strip().casefold()  # noqa: E731
    by_name = {norm(c): i for i, c in enumerate(classnames)}
    if all(norm(f) in by_name for f in folders):
        return [by_name[norm(f)] for f in folders]
    if all(f.isdigit() and int(f) < len(classnames) for f in folders):
        return [int(f) for f in folders]
    unmatched = [f for f in folders if norm(f) not in by_name]
    raise DataError(
        f"the class folders of {where} do not match the {len(classnames)} class names ({len(unmatched)} of {len(folders)} "
        f"folders unmatched, e.g. {unmatched[:3]}; names e.g. {classnames[:3]}): name each folder after its class "
        f"(spaces as _) or by its label index 0..{len(classnames) - 1}"
    )


def _zeroshot_loader(data: str, image_size, batch_size: int, num_workers: int, classnames: list[str]):
    """Labelled batches from a torchvision ImageFolder or from `cls`-labelled shards."""
    from pathlib import Path

    import open_clip
    from torch.utils.data import DataLoader

    from .data import collate, expand_shards, make_dataset

    transform = open_clip.image_transform(image_size, is_train=False)
    if Path(data).is_dir():
        from torchvision.datasets import ImageFolder

        try:
            ds = ImageFolder(data, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{data} is not a usable ImageFolder ({data}/<class>/<image>): {e}") from None
        ds.target_transform = folder_labels(ds.classes, classnames, data).__getitem__
        # torch's BatchSampler allocates a list of batch_size entries up front: --batch-size 1e10
        # on an ImageFolder ran out of memory. No batch needs more than the whole folder.
        batch_size = max(1, min(batch_size, len(ds)))

        def to_dict(items):
            return collate([{"image": x, "label": y, "skipped": 0} for x, y in items])

        return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=to_dict)
    ds = make_dataset(expand_shards(data, "zero-shot shards"), transform, None, train=False, need_text=False, need_label=True)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def zeroshot_main(argv: list[str] | None = None) -> list[dict]:
    """vlmoe-zeroshot: zero-shot classification of one or more models, side by side."""
    import torch

    from .data.text import load_classnames, load_templates
    from .eval.pictures import plot_sweep

    p = ArgParser(prog="vlmoe-zeroshot", description=zeroshot_main.__doc__)
    p.add_argument("--model", action="append", required=True,
                   help="a vlmoe export, a .ckpt from vlmoe fit, ARCH@PATH for an open_clip checkpoint, or a model name; repeat to compare")
    p.add_argument("--data", required=True, help="shards with `cls` labels (brace patterns allowed) or an ImageFolder directory")
    p.add_argument("--classnames", required=True, help="file (one name per line, label order) or built-in: digits, imagenet")
    p.add_argument("--templates", required=True, help="file (one per line, with {}) or built-in: digits, openai_imagenet, simple_imagenet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--per-class", action="store_true", help="also report per-class accuracy")
    p.add_argument("--eval-routing", choices=["per_example", "batch", "dropless"],
                   help="override the models' evaluation routing (default: each model's own, per_example unless configured)")
    p.add_argument("--eval-capacity-factor", type=float, help="override the models' evaluation capacity factor")
    p.add_argument("--capacity-factor", type=float, nargs="+", metavar="CF",
                   help="capacity sweep: evaluate each MoE model at each capacity factor (every MoE layer, every modality, "
                        "for this evaluation only); a dense model gives one row")
    p.add_argument("--batch-priority", choices=["on", "off"], nargs="+",
                   help="Batch Prioritized Routing at inference, on and/or off (default: each model's own)")
    p.add_argument("--plot", metavar="FILE.png", help="draw top-1 against active GFLOPs per image")
    p.add_argument("--json", action="store_true", help="print only a JSON list, one object per model (and setting)")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {a.batch_size}")
    if a.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0 (0: load in this process); got {a.num_workers}")
    parse_device(a.device)
    if a.eval_routing == "dropless" and a.eval_capacity_factor is not None:
        raise ConfigError("--eval-capacity-factor has no effect with --eval-routing dropless (dropless routing has no "
                          "capacity): drop one of them")
    for cf in [a.eval_capacity_factor, *(a.capacity_factor or [])]:
        if cf is not None:
            check_number("a capacity factor", cf, 0.0, above=True)
    if a.capacity_factor and a.eval_routing == "dropless":
        raise ConfigError("a capacity sweep needs capacity: use --eval-routing per_example or batch, not dropless")
    classnames, templates = load_classnames(a.classnames), load_templates(a.templates)
    results = [row for spec in a.model for row in _zeroshot_rows(a, spec, classnames, templates)]
    if a.plot:
        plot_sweep(results, a.plot)
    if a.json:
        print(json.dumps(results))
        return results
    _print_zeroshot(results, a.per_class, classnames)
    return results


def _zeroshot_rows(a, spec: str, classnames: list[str], templates: list[str]) -> list[dict]:
    """One model's rows: one, or one per capacity factor and BPR setting of a sweep."""
    import sys

    from tqdm import tqdm

    from .eval.sweep import RoutingMeter, eval_overrides, image_flops_without_experts
    from .eval.zeroshot import build_classifier, evaluate_zeroshot
    from .models import get_tokenizer
    from .models.factory import load_model, warn_random_weights

    results = []
    warn_random_weights("vlmoe-zeroshot", spec)
    model = load_model(spec).to(a.device).eval()
    model.set_eval_routing(a.eval_routing, a.eval_capacity_factor)
    if a.capacity_factor and model.moe_config is not None and model.moe_layers()[0].eval_routing == "dropless":
        model.set_eval_routing("per_example")  # a sweep needs capacity
    base_flops = image_flops_without_experts(model)
    dense = model.moe_config is None
    fixed = dense or not model.moe_layers()[0].routes_tokens  # nothing to sweep: dense, or Soft MoE
    settings = [(None, None)] if fixed or not a.capacity_factor and not a.batch_priority else [
        (cf, None if bpr is None else bpr == "on") for bpr in (a.batch_priority or [None]) for cf in (a.capacity_factor or [None])]
    for cf, bpr in settings:
        with eval_overrides(model, capacity_factor=cf, batch_priority=bpr):
            classifier = build_classifier(model, get_tokenizer(model), classnames, templates, device=a.device)
            loader = _zeroshot_loader(a.data, model.image_size, a.batch_size, a.num_workers, classnames)
            label = spec + ("" if cf is None else f" cf {cf:g}") + ("" if bpr is None else f" BPR {'on' if bpr else 'off'}")
            bar = (lambda it: tqdm(it, desc=f"zero-shot {label}", unit="batch", file=sys.stderr, leave=False))
            with RoutingMeter(model, "image") as meter:
                r = evaluate_zeroshot(model, loader, classifier, progress=bar)
            row = {"model": spec, "top1": r["top1"], "top5": r["top5"], "n": r["n"], "skipped": r["skipped"]}
            # how the number was obtained: the evaluation routing and capacity (None: dense)
            row.update(model.eval_routing() or {"eval_routing": None})
            row.update(capacity_factor=cf, batch_priority=bpr, dropped_frac=meter.dropped_frac,
                       gflops_per_image=(base_flops + meter.expert_flops / r["n"]) / 1e9)
            if fixed and (a.capacity_factor or a.batch_priority):
                row["note"] = ("dense" if dense else "Soft MoE") + ": no capacity to sweep"
        if a.per_class:
            row["per_class"] = dict(zip(classnames, r["per_class"]))
        results.append(row)
    return results


def _print_zeroshot(results: list[dict], per_class: bool, classnames: list[str]) -> None:
    print("| model | top-1 | top-5 | images | skipped | eval routing | dropped | GFLOPs / image |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        how = r["eval_routing"] or r.get("note") or "dense"
        if r["eval_routing"] not in (None, "dropless"):
            caps = {r["eval_capacity_factor_image"], r["eval_capacity_factor_text"]} if r["capacity_factor"] is None else {r["capacity_factor"]}
            caps.discard(None)  # Soft MoE: no capacity
            if caps:
                how += ", cf " + "/".join(f"{c:g}" for c in sorted(caps))
            if r.get("note"):
                how += f" ({r['note']})"
            if r["batch_priority"] is not None:
                how += f", BPR {'on' if r['batch_priority'] else 'off'}"
        print(f"| {r['model']} | {r['top1']:.2%} | {r['top5']:.2%} | {r['n']} | {r['skipped']} | {how} | "
              f"{r['dropped_frac']:.1%} | {r['gflops_per_image']:.4f} |")
    if per_class:
        print("\n| class | " + " | ".join(r["model"] for r in results) + " |")
        print("|---|" + "---|" * len(results))
        for c in classnames:
            print(f"| {c} | " + " | ".join(f"{r['per_class'][c]:.1%}" for r in results) + " |")
    return results



def routing_main(argv: list[str] | None = None) -> dict:
    """vlmoe-routing: pictures of what a MoE model's experts do on some data: each expert's
    tokens by modality, each image patch and caption token coloured by its expert, and the
    numbers behind them (routing.json)."""
    import itertools

    import open_clip
    import torch

    from .data import collate, expand_shards, make_dataset
    from .eval.routing import write_routing_report
    from .eval.sweep import short_label
    from .models import get_tokenizer
    from .models.factory import load_model, warn_random_weights

    p = ArgParser(prog="vlmoe-routing", description=routing_main.__doc__)
    p.add_argument("--model", required=True, help="as vlmoe-zeroshot --model")
    p.add_argument("--data", required=True, help="image-text shards (captions in `txt`); labelled image-only shards give image pictures")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", type=int, default=64, help="samples routed (one evaluation batch)")
    p.add_argument("--num-pictures", type=int, default=8, help="images and captions drawn")
    p.add_argument("--eval-routing", choices=["per_example", "batch", "dropless"], help="override the model's evaluation routing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.samples < 1 or a.num_pictures < 1:
        raise ConfigError(f"--samples and --num-pictures must be >= 1; got {a.samples} and {a.num_pictures}")
    from pathlib import Path

    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ConfigError(f"--out {a.out} is a file: vlmoe-routing writes a folder of pictures and routing.json; name a folder")
    parse_device(a.device)
    model = load_model(a.model).to(a.device).eval()
    if model.moe_config is None:
        raise ConfigError(f"{a.model} has no MoE layers: there is no routing to show (a dense model?)")
    warn_random_weights("vlmoe-routing", a.model)
    model.set_eval_routing(a.eval_routing)
    urls = expand_shards(a.data, "shards")
    transform = open_clip.image_transform(model.image_size, is_train=False)
    tokenizer = get_tokenizer(model)
    samples = []
    for need_text in (True, False):  # image-text pairs, else images alone (a labelled set)
        ds = make_dataset(urls, transform, tokenizer, train=False, need_text=need_text)
        samples = [s for s in itertools.islice((s for s in ds if s["image"] is not None), a.samples)]
        if samples:
            break
    if not samples:
        raise DataError(f"no readable images in {a.data}")
    batch = collate(samples)
    texts = batch["text"].to(a.device) if "text" in batch else None
    summary = write_routing_report(model, batch["image"].to(a.device), texts, a.out, tokenizer, a.num_pictures,
                                   title=f"{short_label(a.model)}, {model.eval_routing()['eval_routing']} routing")
    print(f"wrote {', '.join(summary['files'].values())} and routing.json to {a.out}", file=sys.stderr)
    return summary


def routing_console() -> None:
    sys.exit(run_console(routing_main, "vlmoe-routing"))
