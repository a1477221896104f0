"""Zero-shot top-1 of MoE checkpoints under each evaluation routing, at several evaluation
batch sizes: how much a number depends on the batch it was computed in.

    python scripts/eval_routing.py --model outputs/demo/runs/limoe-tiny/seed0/checkpoints/last.ckpt \\
        [--batch-sizes 16 64 256 500] [--routings per_example batch dropless]

Defaults: the bundled digits test split, its class names and templates. Prints a markdown
table (one row per model and routing; the spread is max - min over the batch sizes).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from vlmoe.cli import run_console, zeroshot_main

DATA = Path(__file__).resolve().parents[1] / "data" / "digits"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="as vlmoe-zeroshot --model; repeat to compare")
    p.add_argument("--data", default=str(DATA / "test-000000.tar"))
    p.add_argument("--classnames", default=str(DATA / "classnames.txt"))
    p.add_argument("--templates", default=str(DATA / "templates.txt"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256, 500])
    p.add_argument("--routings", nargs="+", default=["per_example", "batch", "dropless"])
    p.add_argument("--num-workers", type=int, default=0)
    a = p.parse_args(argv)
    rows = []
    for model in a.model:
        for routing in a.routings:
            top1 = []
            for bs in a.batch_sizes:
                print(f"{model}: {routing}, batch {bs}", file=sys.stderr, flush=True)
                with contextlib.redirect_stdout(io.StringIO()):  # keep its JSON out of the table
                    r = zeroshot_main(["--model", model, "--data", a.data, "--classnames", a.classnames, "--templates",
                                       a.templates, "--batch-size", str(bs), "--num-workers", str(a.num_workers),
                                       "--eval-routing", routing, "--json"])[0]
                top1.append(r["top1"])
            rows.append({"model": model, "routing": routing, "top1": top1})
    print("| model | eval routing | " + " | ".join(f"batch {b}" for b in a.batch_sizes) + " | spread |")
    print("|---|---|" + "---|" * (len(a.batch_sizes) + 1))
    for r in rows:
        spread = max(r["top1"]) - min(r["top1"])
        print(f"| {r['model']} | {r['routing']} | "
              + " | ".join(f"{t:.1%}" for t in r["top1"]) + f" | {spread * 100:.1f} pts |")
    return rows


if __name__ == "__main__":
    sys.exit(run_console(main, "eval_routing.py"))
