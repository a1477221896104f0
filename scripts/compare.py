"""Comparison report: N seeds of each variant, paired by seed (same seed: same data order,
the same initialisation where the architectures agree), so a claimed difference is measured.

* LIMoE vs CLIP at the same active compute: the mean per-seed difference in zero-shot top-1
  with its 95% t-interval (`vlmoe.eval.paired`), and how many seeds favour LIMoE;
* joint routing (LIMoE's: image and text tokens in one routing group) vs per-modality;
* collapse: the effective number of experts exp(H(p)) per MoE layer and modality, with and
  without the LIMoE entropy losses, against the thresholds exp(tau) they ask for;
* Batch Prioritized Routing vs vanilla routing at capacity factor 0.5 and 1.0.

    python scripts/compare.py --seeds 0 1 2 3 4 --steps 250 --out outputs/compare
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

from vlmoe.moe.config import EVAL_ROUTING

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "digits"
NO_ENTROPY = {"local_entropy_weight": 0.0, "global_entropy_weight": 0.0}
JOINT = {"routing_groups": "joint"}

VARIANTS = {
    "clip-tiny": ("clip-tiny", None),
    "limoe-tiny": ("limoe-tiny", None),
    "limoe-tiny, joint": ("limoe-tiny", {"moe": JOINT}),
    "limoe-tiny, joint, no entropy losses": ("limoe-tiny", {"moe": {**JOINT, **NO_ENTROPY}}),
    "limoe-tiny, joint, text tau log 4": ("limoe-tiny", {"moe": {**JOINT, "text": {"global_entropy_threshold": math.log(4)}}}),
    "limoe-tiny, no entropy losses": ("limoe-tiny", {"moe": NO_ENTROPY}),
    "limoe-tiny, vanilla, cf 1.0": ("limoe-tiny", {"moe": {"batch_priority": False}}),
    "limoe-tiny, BPR, cf 0.5": ("limoe-tiny", {"moe": {"capacity_factor": 0.5}}),
    "limoe-tiny, vanilla, cf 0.5": ("limoe-tiny", {"moe": {"capacity_factor": 0.5, "batch_priority": False}}),
    # the routing designs since V-MoE (issue #15), each its own config
    "limoe-tiny-soft": ("limoe-tiny-soft", None),
    "limoe-tiny-auxfree": ("limoe-tiny-auxfree", None),
    "limoe-tiny-auxfree-modality": ("limoe-tiny-auxfree-modality", None),
    # DeepSeek-V3's rate (1e-3) moves the bias at most 0.25 in 250 steps: too little to flip softmax gates
    "limoe-tiny-auxfree, rate 0.01": ("limoe-tiny-auxfree", {"moe": {"bias_update_rate": 0.01}}),
    "limoe-tiny-auxfree-modality, rate 0.01": ("limoe-tiny-auxfree-modality", {"moe": {"bias_update_rate": 0.01}}),
    "limoe-tiny-shared": ("limoe-tiny-shared", None),
    "limoe-tiny-fine": ("limoe-tiny-fine", None),
    "clip-tiny-single": ("clip-tiny-single", None),
}


def _joint(tau_text: int | None = None, text_local: bool = True) -> dict:
    text = {} if tau_text is None else {"global_entropy_threshold": math.log(tau_text)}
    if not text_local:
        text["local_entropy_weight"] = 0.0
    return {"moe": {**JOINT, **({"text": text} if text else {})}}


# Issue #27: LIMoE's recipe. Both joint designs (two towers sharing the MoE layers; the paper's
# one transformer, limoe-tiny-single), the text threshold tau_text = log 2, 4, 8 (at least 2, 4,
# 8 experts) and text's local entropy loss on and off. --recipe varies one at a time from the
# configs' (tau_text log 2, local on); the combinations are variants too, for a later run.
RECIPE = ["clip-tiny", "limoe-tiny", "limoe-tiny, joint", "limoe-tiny-single, joint", "clip-tiny-single"]
for _name in ("limoe-tiny", "limoe-tiny-single"):
    for _tau in (2, 4, 8):
        for _local in (True, False):
            _label = f"{_name}, joint" + (f", text tau log {_tau}" if _tau != 2 else "") + ("" if _local else ", no text local entropy")
            VARIANTS[_label] = (_name, _joint(_tau if _tau != 2 else None, _local))
            if _label not in RECIPE and (_tau == 2 or _local):
                RECIPE.append(_label)
EVAL_ROUTINGS = EVAL_ROUTING  # the layer's own list of evaluation routings
DESIGNS = ["limoe-tiny-soft", "limoe-tiny-auxfree", "limoe-tiny-auxfree-modality", "limoe-tiny-shared", "limoe-tiny-fine"]
DEFAULT_VARIANTS = ["clip-tiny", "limoe-tiny", "limoe-tiny, joint", "limoe-tiny, joint, no entropy losses"]
METRICS = [("zeroshot_top1", "zero-shot top-1", 100, "{:.1f}%"), ("retrieval_i2t_R@1", "R@1 i->t", 100, "{:.1f}%"),
           ("retrieval_t2i_R@1", "R@1 t->i", 100, "{:.1f}%"), ("samples_per_sec", "samples/s", 1, "{:.0f}")]
# (a, b) pairs reported as paired differences, when both variants ran
PAIRS = [("limoe-tiny", "clip-tiny"), ("limoe-tiny, joint", "clip-tiny"), ("limoe-tiny, joint", "limoe-tiny"),
         ("limoe-tiny, joint", "limoe-tiny, joint, no entropy losses"),
         ("limoe-tiny, joint, text tau log 4", "limoe-tiny, joint"), ("limoe-tiny", "limoe-tiny, no entropy losses"),
         ("limoe-tiny, BPR, cf 0.5", "limoe-tiny, vanilla, cf 0.5")] + [
    (d, b) for d in DESIGNS for b in ("limoe-tiny", "clip-tiny")] + [("limoe-tiny-auxfree-modality", "limoe-tiny-auxfree")] + [
    (f"{d}, rate 0.01", b) for d in ("limoe-tiny-auxfree", "limoe-tiny-auxfree-modality") for b in ("limoe-tiny", "clip-tiny", d)] + [
    ("limoe-tiny-auxfree-modality, rate 0.01", "limoe-tiny-auxfree, rate 0.01")] + [
    ("limoe-tiny-single, joint", "clip-tiny"), ("limoe-tiny-single, joint", "clip-tiny-single"),
    ("limoe-tiny-single, joint", "limoe-tiny"), ("limoe-tiny-single, joint", "limoe-tiny, joint"),
    ("clip-tiny-single", "clip-tiny")] + [
    # the threshold sweep and the local loss, against each design's log-2 default
    (v, base) for base in ("limoe-tiny, joint", "limoe-tiny-single, joint") for v in RECIPE
    if v.startswith(base + ",") and "text" in v] + [
    (v, "limoe-tiny") for v in RECIPE if ", joint, " in v] + [
    (v, "clip-tiny-single" if v.startswith("limoe-tiny-single") else "clip-tiny") for v in RECIPE if ", joint, " in v]
PAIRS = list(dict.fromkeys(PAIRS))  # each pair once, in order


def mean_std(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{fmt.format(m)} +- {fmt.format(s).rstrip('%')}"


def summarize(runs: list[dict], variants: list[str]) -> str:
    lines = ["| variant | seeds | " + " | ".join(m[1] for m in METRICS) + " | min expert share (image / text) "
             "| effective experts, mean over layers (image / text) | top-1 effective experts (image / text) "
             "| dropped at evaluation (image / text) |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|---|---|"]
    for v in variants:
        rs = [r for r in runs if r["model"] == v]
        cells = [mean_std([r[k] * scale for r in rs if r.get(k) is not None], fmt) for k, _, scale, fmt in METRICS]
        shares = []
        for mod in ("image", "text"):
            xs = [r["expert_usage"][mod]["min_share"] * 100 for r in rs if mod in r.get("expert_usage", {})]
            shares.append(mean_std(xs, "{:.1f}%") if xs else "-")
        eff, top1, drop = [], [], []
        for mod in ("image", "text"):
            us = [r["expert_usage"][mod] for r in rs if mod in r.get("expert_usage", {})]
            eff.append(mean_std([statistics.mean(u["effective_experts"]) for u in us], "{:.2f}") if us else "-")
            t1 = [statistics.mean(u["effective_experts_top1"]) for u in us if "effective_experts_top1" in u]
            top1.append(mean_std(t1, "{:.2f}") if t1 else "-")
            ds = [100 * u["dropped_frac"] for u in us if "dropped_frac" in u]
            drop.append(mean_std(ds, "{:.1f}%") if ds else "-")
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {shares[0]} / {shares[1]} | {eff[0]} / {eff[1]} "
                     f"| {top1[0]} / {top1[1]} | {drop[0]} / {drop[1]} |")
    return "\n".join(lines)


def paired_results(runs: list[dict], variants: list[str], metric: str = "zeroshot_top1") -> list[dict]:
    """Per pair of variants that both ran: the per-seed differences in `metric` (points) with
    their mean, 95% t-interval and the seeds that favour the first (vlmoe.eval.paired)."""
    from vlmoe.eval.paired import paired_difference

    by = {v: {r["seed"]: 100 * r[metric] for r in runs if r["model"] == v and r.get(metric) is not None} for v in variants}
    out = []
    for a, b in PAIRS:
        if a in by and b in by:
            d = paired_difference(by[a], by[b])
            if d["n"]:
                out.append({"a": a, "b": b, "metric": metric, **d})
    return out


def _interval(d: dict) -> str:
    return f"[{d['low']:+.1f}, {d['high']:+.1f}]" if d["low"] is not None else "- (one seed)"


def paired_table(results: list[dict]) -> str:
    lines = ["| A - B (zero-shot top-1, points) | seeds | mean | 95% interval | A better | per seed |", "|---|---|---|---|---|---|"]
    for d in results:
        ci = _interval(d)
        lines.append(f"| {d['a']} - {d['b']} | {d['n']} | {d['mean']:+.1f} | {ci} | {d['wins']}/{d['n']} | "
                     + " ".join(f"{x:+.1f}" for x in d["diffs"]) + " |")
    return "\n".join(lines)


def _thresholds(name: str, overrides: dict | None) -> dict:
    """exp(tau) per modality: the effective experts the global entropy loss asks for."""
    from vlmoe.models.factory import resolve_config

    moe = resolve_config(name, **(overrides or {})).get("moe") or {}
    if not moe.get("global_entropy_weight"):
        return {}
    out = {}
    for m in ("image", "text"):
        tau = (moe.get(m) or {}).get("global_entropy_threshold", moe.get("global_entropy_threshold"))
        if tau is not None:
            out[m] = math.exp(tau)
    return out


def collapse_table(runs: list[dict], variants: list[str]) -> str:
    """Per MoE variant, layer and modality: effective experts exp(H(p)) of the mean gate, the
    top expert's share of the modality's kept assignments, and the same two on the top-1
    choices (collapse on the assignments); means over seeds, min-max in brackets."""
    cols = (("effective_experts", 1, "{:.2f}", "effective experts"), ("top_expert_share", 100, "{:.0f}%", "top expert share"),
            ("effective_experts_top1", 1, "{:.2f}", "top-1 effective experts"),
            ("top1_top_expert_share", 100, "{:.0f}%", "top-1 share of the top expert"))
    lines = ["| variant | layer | " + " | ".join(f"{m}: {c[3]}" for c in cols for m in ("image", "text"))
             + " | target exp(tau) image / text |", "|---|---|" + "---|" * (2 * len(cols) + 1)]
    for v in variants:
        rs = [r for r in runs if r["model"] == v and r.get("expert_usage")]
        if not rs:
            continue
        target = _thresholds(*VARIANTS[v])
        goal = " / ".join(f"{target[m]:.1f}" if m in target else "-" for m in ("image", "text"))
        n_layers = len(rs[0]["expert_usage"]["image"]["effective_experts"])
        for layer in range(n_layers):
            cells = []
            for key, scale, fmt, _ in cols:
                for m in ("image", "text"):
                    xs = [r["expert_usage"][m][key][layer] * scale for r in rs if key in r["expert_usage"].get(m, {})]
                    cells.append(f"{fmt.format(statistics.mean(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})" if xs else "-")
            lines.append(f"| {v} | {layer} | " + " | ".join(cells) + f" | {goal} |")
    return "\n".join(lines)


def routing_table(runs: list[dict], variants: list[str]) -> str:
    """Per MoE variant: zero-shot top-1 under each evaluation routing (the same checkpoints),
    the fraction of image / text choices each dropped, and the paired differences dropless -
    per-example and batch - per-example (points, 95% interval, seeds where the first is better)."""
    from vlmoe.eval.paired import paired_difference

    lines = ["| variant | eval routing | seeds | zero-shot top-1 | dropped image | dropped text | minus per-example (points) |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        rs = [r for r in runs if r["model"] == v and r.get("eval_routing")]
        for how in EVAL_ROUTINGS:
            got = [r for r in rs if how in r["eval_routing"]]
            if not got:
                continue
            top1 = mean_std([100 * r["eval_routing"][how]["zeroshot_top1"] for r in got], "{:.1f}%")
            drops = [mean_std([100 * r["eval_routing"][how]["expert_usage"][m]["dropped_frac"] for r in got
                               if "dropped_frac" in r["eval_routing"][how]["expert_usage"].get(m, {})], "{:.1f}%") for m in ("image", "text")]
            diff = "-"
            if how != "per_example" and all("per_example" in r["eval_routing"] for r in got):
                d = paired_difference({r["seed"]: 100 * r["eval_routing"][how]["zeroshot_top1"] for r in got},
                                      {r["seed"]: 100 * r["eval_routing"]["per_example"]["zeroshot_top1"] for r in got})
                ci = f"[{d['low']:+.1f}, {d['high']:+.1f}]" if d["low"] is not None else "(one seed)"
                diff = f"{d['mean']:+.1f} {ci}, {d['wins']}/{d['n']}"
            lines.append(f"| {v} | {how} | {len(got)} | {top1} | {drops[0]} | {drops[1]} | {diff} |")
    return "\n".join(lines)


def routing_pairs(runs: list[dict], variants: list[str]) -> list[dict]:
    """Per pair of MoE variants in PAIRS and per evaluation routing both were tested under: the
    paired difference in zero-shot top-1 (points) when both checkpoints are scored that way. A
    difference that holds under every routing is not an artefact of how evaluation drops tokens."""
    from vlmoe.eval.paired import paired_difference

    out = []
    for a, b in PAIRS:
        if a not in variants or b not in variants:
            continue
        for how in EVAL_ROUTINGS:
            by = [{r["seed"]: 100 * r["eval_routing"][how]["zeroshot_top1"] for r in runs
                   if r["model"] == v and how in (r.get("eval_routing") or {})} for v in (a, b)]
            d = paired_difference(*by)
            if d["n"]:
                out.append({"a": a, "b": b, "eval_routing": how, **d})
    return out


def routing_pairs_table(results: list[dict]) -> str:
    lines = ["| A - B (zero-shot top-1, points) | eval routing | seeds | mean | 95% interval | A better |", "|---|---|---|---|---|---|"]
    for d in results:
        ci = _interval(d)
        lines.append(f"| {d['a']} - {d['b']} | {d['eval_routing']} | {d['n']} | {d['mean']:+.1f} | {ci} | {d['wins']}/{d['n']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--recipe", action="store_true", help="the variants of issue #27 (LIMoE's recipe; overrides --variants)")
    p.add_argument("--report-only", action="store_true", help="write the tables from the finished runs in --out, train nothing")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "compare")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--eval-routings", nargs="*", default=list(EVAL_ROUTINGS), choices=EVAL_ROUTINGS,
                   help="test each MoE checkpoint under these evaluation routings too (the report's routing table)")
    a = p.parse_args(argv)
    if a.recipe:
        a.variants = list(RECIPE)
    warnings.filterwarnings("ignore")
    from vlmoe.train.run import quiet_lightning, train_and_evaluate

    quiet_lightning()
    a.out.mkdir(parents=True, exist_ok=True)
    results_path = a.out / "runs.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    t0 = time.time()
    jobs = [(v, s) for s in a.seeds for v in a.variants]  # seeds outermost: partial results stay balanced
    for i, (v, seed) in enumerate(jobs, 1):
        if a.report_only or any(r["model"] == v and r["seed"] == seed and r["steps"] == a.steps for r in done):
            continue  # resumable: finished runs are kept in runs.jsonl
        name, overrides = VARIANTS[v]
        print(f"[{i}/{len(jobs)}] {v}, seed {seed} ({time.time() - t0:.0f}s so far)", file=sys.stderr, flush=True)
        r = train_and_evaluate(
            name, a.out / "runs", train_shards=str(DATA / "train-{000000..000003}.tar"), val_shards=str(DATA / "val-000000.tar"),
            zeroshot_shards=str(DATA / "test-000000.tar"), classnames=str(DATA / "classnames.txt"),
            templates=str(DATA / "templates.txt"), steps=a.steps, batch_size=a.batch_size, seed=seed,
            model_overrides=overrides, label=v, num_workers=a.num_workers, progress_every=max(a.steps // 2, 1),
            eval_routings=tuple(a.eval_routings),
        )
        done.append(r)
        with open(results_path, "a") as f:
            f.write(json.dumps(r) + "\n")
    runs = [r for r in done if r["steps"] == a.steps and r["seed"] in a.seeds]
    ran = sorted({r["seed"] for r in runs})
    partial = "" if ran == sorted(a.seeds) else f" (finished so far: seeds {', '.join(map(str, ran))}; see each row's count)"
    header = (f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}){partial}, {a.steps} steps x {a.batch_size}, bundled digits; "
              "mean +- std\n\n")
    paired = paired_results(runs, a.variants)
    by_routing = routing_pairs(runs, a.variants)
    table = "\n\n".join(t for t in (summarize(runs, a.variants), paired_table(paired), collapse_table(runs, a.variants),
                                     routing_table(runs, a.variants), routing_pairs_table(by_routing)) if t.count("\n") > 1)
    (a.out / "table.md").write_text(header + table + "\n")
    summary = {"steps": a.steps, "batch_size": a.batch_size, "seeds": a.seeds, "paired": paired, "paired_by_eval_routing": by_routing,
               "command": "python scripts/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(header + table)
    return runs


if __name__ == "__main__":
    main()
