"""The demo: LIMoE-tiny against the dense CLIP-tiny of the same active compute, trained on the
bundled MNIST digit shards with the same data, steps and seed, then evaluated zero-shot on
the held-out digits and by image-text retrieval. Writes the table, the numbers and LIMoE's
routing picture to --out.

    python scripts/demo.py                 # about 6 minutes on 2 CPU cores
    python scripts/demo.py --steps 400     # longer
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "digits"


def usage_cell(r: dict, modality: str) -> str:
    u = r["expert_usage"].get(modality)
    if not u:
        return "-"
    return f"min {u['min_share']:.1%}, >=2%: {'/'.join(str(x) for x in u['experts_2pct'])} of {u['num_experts']}"


def format_table(results: list[dict]) -> str:
    lines = [
        "| model | zero-shot top-1 | retrieval R@1 (i->t / t->i) | params | active params (image / text) | train samples/s | image expert usage | text expert usage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['zeroshot_top1']:.1%} | {r['retrieval_i2t_R@1']:.1%} / {r['retrieval_t2i_R@1']:.1%} "
            f"| {r['total_params'] / 1e6:.2f}M | {r['active_params_image'] / 1e6:.2f}M / {r['active_params_text'] / 1e6:.2f}M "
            f"| {r['samples_per_sec']:.0f} | {usage_cell(r, 'image')} | {usage_cell(r, 'text')} |"
        )
    return "\n".join(lines)


SUMMARY = ROOT / "docs" / "compare" / "recipe" / "summary.json"  # the paired multi-seed report (scripts/compare.py --recipe)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def seed_context(results: list[dict], summary_path: Path = SUMMARY) -> str:
    """What this single-seed run can and cannot show, with the paired multi-seed result of
    the comparison report beside it."""
    by = {r["model"]: r for r in results}
    if "limoe-tiny" not in by or "clip-tiny" not in by:
        return ""
    seed, steps = by["limoe-tiny"]["seed"], by["limoe-tiny"]["steps"]
    d = 100 * (by["limoe-tiny"]["zeroshot_top1"] - by["clip-tiny"]["zeroshot_top1"])
    lines = [f"This run is one seed ({seed}): LIMoE - CLIP = {d:+.1f} points of zero-shot top-1. One seed shows that "
             "both models train and how they route; it cannot say which is better, because the difference moves by "
             "several points from seed to seed. The same seed also prints other numbers on another CPU type (the "
             "matmuls round differently, and 250 steps amplify it): if yours differ from docs/results.md, that is why. "
             "The paired result is the one to read."]
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        for p in summary["paired"]:  # the demo's own pair: limoe-tiny as configured, against clip-tiny
            if (p["a"], p["b"]) == ("limoe-tiny", "clip-tiny") and p["low"] is not None:
                lines.append(
                    f"Paired over {p['n']} seeds ({summary['steps']} steps x {summary['batch_size']}, "
                    f"{_shown(summary_path.parent)}/): LIMoE - CLIP = {p['mean']:+.1f} points, 95% interval "
                    f"[{p['low']:+.1f}, {p['high']:+.1f}], LIMoE ahead on {p['wins']} of {p['n']} seeds"
                    f"{' (seed ' + str(seed) + ': ' + format(p['diffs'][p['seeds'].index(seed)], '+.1f') + ')' if seed in p['seeds'] and summary['steps'] == steps else ''}.")
        lines.append("An interval that contains 0 means the report does not show a difference at this length.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    p.add_argument("--models", nargs="+", default=["limoe-tiny", "clip-tiny"])
    p.add_argument("--num-workers", type=int, default=1)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from vlmoe.train.run import quiet_lightning, train_and_evaluate

    quiet_lightning()

    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.time()
    for i, name in enumerate(a.models, 1):
        print(f"[{i}/{len(a.models)}] training {name} for {a.steps} steps of {a.batch_size} (seed {a.seed})", file=sys.stderr, flush=True)
        r = train_and_evaluate(
            name, a.out / "runs", train_shards=str(DATA / "train-{000000..000003}.tar"), val_shards=str(DATA / "val-000000.tar"),
            zeroshot_shards=str(DATA / "test-000000.tar"), classnames=str(DATA / "classnames.txt"),
            templates=str(DATA / "templates.txt"), steps=a.steps, batch_size=a.batch_size, seed=a.seed, num_workers=a.num_workers,
        )
        print(f"  [{name}] zero-shot top-1 {r['zeroshot_top1']:.1%}, trained in {r['fit_seconds']:.0f}s", file=sys.stderr, flush=True)
        if r["routing_picture"]:
            shutil.copy(r["routing_picture"], a.out / f"routing_{name}.png")
        results.append(r)
    table = format_table(results)
    header = (f"Zero-shot on {DATA.relative_to(ROOT)}/test (500 held-out digits, 10 classes), retrieval on val (500 pairs); "
              f"{a.steps} steps x {a.batch_size}, seed {a.seed}; {time.time() - t0:.0f}s in all\n\n")
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    context = seed_context(results)
    (a.out / "table.md").write_text(header + table + "\n" + ("\n" + context + "\n" if context else ""))
    print("\n" + header + table)
    if context:
        print("\n" + context)
    print(f"\nwrote {a.out / 'table.md'}, {a.out / 'results.json'} and the routing pictures (routing_*.png)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
