"""Console scripts."""
from __future__ import annotations

import argparse
import json

__all__ = ["info_main", "cli_main", "VLMoECLI"]


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class VLMoECLI(LightningCLI):
        """`vlmoe fit|validate|test --config ...`: LIMoEModule + ClipDataModule, with the
        data's image size and context length taken from `--model.model_name`."""

        def add_arguments_to_parser(self, parser):
            parser.link_arguments("model.model_name", "data.init_args.model_name" if self.subclass_mode_data else "data.model_name")

    return VLMoECLI


def cli_main(args: list[str] | None = None, run: bool = True):
    """Entry point of the `vlmoe` console script; `args` lets tests call it in-process."""
    from .data import ClipDataModule
    from .train import LIMoEModule

    return _cli_class()(
        LIMoEModule, ClipDataModule, args=args, run=run, seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"max_steps": 1000, "log_every_n_steps": 10},
    )


def __getattr__(name):
    if name == "VLMoECLI":
        return _cli_class()
    raise AttributeError(name)


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
