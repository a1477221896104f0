"""Comparison report: N seeds of each variant, mean +- std of every metric, so a claimed
difference is measured. The default variants answer the package's questions:

* limoe-tiny vs clip-tiny (same active compute, data, steps and seeds);
* LIMoE entropy losses on vs off (expert usage per modality);
* Batch Prioritized Routing vs vanilla routing at capacity factor 0.5 and 1.0.

    python scripts/compare.py --seeds 0 1 2 --steps 250 --out outputs/compare
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "digits"
NO_ENTROPY = {"moe": {"local_entropy_weight": 0.0, "global_entropy_weight": 0.0}}

VARIANTS = {
    "clip-tiny": ("clip-tiny", None),
    "limoe-tiny": ("limoe-tiny", None),
    "limoe-tiny, no entropy losses": ("limoe-tiny", NO_ENTROPY),
    "limoe-tiny, vanilla, cf 1.0": ("limoe-tiny", {"moe": {"batch_priority": False}}),
    "limoe-tiny, BPR, cf 0.5": ("limoe-tiny", {"moe": {"capacity_factor": 0.5}}),
    "limoe-tiny, vanilla, cf 0.5": ("limoe-tiny", {"moe": {"capacity_factor": 0.5, "batch_priority": False}}),
}
METRICS = [("zeroshot_top1", "zero-shot top-1", 100, "{:.1f}%"), ("retrieval_i2t_R@1", "R@1 i->t", 100, "{:.1f}%"),
           ("retrieval_t2i_R@1", "R@1 t->i", 100, "{:.1f}%"), ("samples_per_sec", "samples/s", 1, "{:.0f}")]


def mean_std(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{fmt.format(m)} +- {fmt.format(s).rstrip('%')}" + ("" if not fmt.endswith("%") else "")


def summarize(runs: list[dict], variants: list[str]) -> str:
    lines = ["| variant | seeds | " + " | ".join(m[1] for m in METRICS) + " | min expert share (image / text) |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for v in variants:
        rs = [r for r in runs if r["model"] == v]
        cells = [mean_std([r[k] * scale for r in rs if r.get(k) is not None], fmt) for k, _, scale, fmt in METRICS]
        shares = []
        for mod in ("image", "text"):
            xs = [r["expert_usage"][mod]["min_share"] * 100 for r in rs if mod in r.get("expert_usage", {})]
            shares.append(mean_std(xs, "{:.1f}%") if xs else "-")
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {shares[0]} / {shares[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "compare")
    p.add_argument("--num-workers", type=int, default=1)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from vlmoe.train.run import quiet_lightning, train_and_evaluate

    quiet_lightning()
    a.out.mkdir(parents=True, exist_ok=True)
    results_path = a.out / "runs.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    t0 = time.time()
    jobs = [(v, s) for s in a.seeds for v in a.variants]  # seeds outermost: partial results stay balanced
    for i, (v, seed) in enumerate(jobs, 1):
        if any(r["model"] == v and r["seed"] == seed and r["steps"] == a.steps for r in done):
            continue  # resumable: finished runs are kept in runs.jsonl
        name, overrides = VARIANTS[v]
        print(f"[{i}/{len(jobs)}] {v}, seed {seed} ({time.time() - t0:.0f}s so far)", file=sys.stderr, flush=True)
        r = train_and_evaluate(
            name, a.out / "runs", train_shards=str(DATA / "train-{000000..000003}.tar"), val_shards=str(DATA / "val-000000.tar"),
            zeroshot_shards=str(DATA / "test-000000.tar"), classnames=str(DATA / "classnames.txt"),
            templates=str(DATA / "templates.txt"), steps=a.steps, batch_size=a.batch_size, seed=seed,
            model_overrides=overrides, label=v, num_workers=a.num_workers, progress_every=max(a.steps // 2, 1),
        )
        done.append(r)
        with open(results_path, "a") as f:
            f.write(json.dumps(r) + "\n")
    runs = [r for r in done if r["steps"] == a.steps and r["seed"] in a.seeds]
    table = summarize(runs, a.variants)
    header = f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}), {a.steps} steps x {a.batch_size}, bundled digits; mean +- std\n\n"
    (a.out / "table.md").write_text(header + table + "\n")
    print(header + table)
    return runs


if __name__ == "__main__":
    main()
