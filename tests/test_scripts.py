import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True).stdout


def test_bench_moe_quick():
    out = run("scripts/bench_moe.py", "--tokens", "256", "--dim", "32", "--hidden", "64", "--experts", "4", "--top-k", "1", "2", "--reps", "1", "--no-deepspeed", "--memory-scaling")
    rows = [line for line in out.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2 * 6  # dense, vlmoe (auto, bmm, grouped_mm, loop), one-hot einsum for two top-k
    assert "DeepSpeed MoE: skipped" in out and out.startswith("malloc: glibc default")
    mem = {int(r.split("|")[1]): (float(r.split("|")[2]), float(r.split("|")[3])) for r in out.splitlines() if r.startswith("| ") and r.split("|")[1].strip().isdigit() and len(r.split("|")) == 5}
    assert sorted(mem) == [1024, 2048, 4096, 8192]
    assert mem[8192][0] / mem[1024][0] < 10  # linear (8x tokens)
    assert mem[8192][1] / mem[1024][1] > 20  # the one-hot einsum is quadratic


def test_bench_moe_designs_quick():
    out = run("scripts/bench_moe.py", "--designs", "--tokens", "256", "--dim", "32", "--hidden", "64", "--reps", "1", "--malloc", "keep")
    assert out.startswith("malloc: glibc keeps freed blocks")
    rows = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines() if line.startswith("| ") and "---" not in line
            and "layer" not in line}
    assert list(rows) == ["dense MLP", "Soft MoE, E=8, 1 slot each", "fine-grained m=4: E=32, top-4, h/4", "E=32, top-1"]
    assert rows["dense MLP"] == 1.0 and all(r > 0 for r in rows.values())


@pytest.mark.parametrize("malloc", ["default", "keep"])
def test_bench_moe_page_faults(malloc):
    """The page-fault benchmark at its own size (32 MiB blocks = 8192 pages): a weight gradient
    or fill into fresh memory faults in every page under glibc's default allocator (blocks over
    its mmap threshold are unmapped on free), none into reused memory; with `--malloc keep` the
    fresh block is reused memory too. Counted with getrusage, not timed."""
    out = run("scripts/bench_moe.py", "--page-faults", "--reps", "1", "--malloc", malloc)
    rows = {line.split("|")[1].strip(): (float(line.split("|")[2]), int(line.split("|")[3])) for line in out.splitlines()
            if line.startswith("| ") and "---" not in line and "operation" not in line}
    assert list(rows) == ["expert weight grad, fresh memory", "expert weight grad, reused memory", "dense weight grad (same FLOPs)",
                          "fill a fresh block", "fill a reused block"]
    assert "(32 MiB blocks = 8192 pages, E=32, C=128, d=256, h=1024" in out  # 32 x 256 x 1024 floats
    faults = {n: f for n, (_, f) in rows.items()}
    for fresh in ("expert weight grad, fresh memory", "fill a fresh block"):
        assert (faults[fresh] >= 8192) if malloc == "default" else (faults[fresh] < 100), (fresh, faults)
    assert faults["expert weight grad, reused memory"] < 100 and faults["fill a reused block"] < 100


def test_bench_ep_quick():
    out = run("scripts/bench_ep.py", "--tokens", "128", "--dim", "32", "--hidden", "64", "--configs", "4x1,4x2", "--reps", "1")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2
    for r in rows:
        measured, formula = float(r[9]), float(r[10])
        assert 0 < measured <= 2 * formula  # at most every choice leaves the rank (P=2: twice the uniform figure)
    # the bytes on the wire are exactly what the routing implies (4 crossings per off-rank row)
    exact = [line for line in out.splitlines() if line.startswith("E=4 ")]
    assert len(exact) == 2
    for line in exact:
        sent, routed = (float(v) for v in re.findall(r"(?:ranks|routing) (\d+)", line))
        assert sent == routed > 0, line


def test_gpu_check_smoke_run_on_cpu(tmp_path, capsys):
    """Every section of the script the GPU machine runs (its main, in this process: a fresh
    interpreter would add its imports to a run that is mostly model building)."""
    import torch._dynamo

    try:
        load_script("gpu_check").main(["--tiny", "--reps", "1", "--device", "cpu", "--out", str(tmp_path),
                                       "--compile-backend", "eager"])
    finally:
        torch._dynamo.reset()  # the compiled step's graphs: not left to other tests in this process
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["correctness"]["grouped_mm_vs_loop_bf16_max_rel_diff"] < 0.05  # bf16 rounding only
    for routing_groups in ("per_modality", "joint", "soft", "auxfree", "auxfree-modality", "shared", "fine"):  # the same device: the same numbers
        assert report["correctness"][f"{routing_groups}_features_max_abs_diff"] == 0.0
    assert len(report["layer"]) == 4 and set(report["training_samples_per_s"]) == {"limoe-tiny", "clip-tiny"}
    assert "samples/s" in out
    c = report["compile"]  # section 4's code path (inductor on the GPU; dynamo alone here)
    assert c["backend"] == "eager" and c["dispatch_syncs"] == 0 and c["first_loss"]["eager"] == pytest.approx(c["first_loss"]["compiled"], rel=1e-2)


def test_vlmoe_info_json():
    from vlmoe.cli import info_main
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        info_main(["limoe-tiny", "--json"])
    rows = json.loads(buf.getvalue())
    assert set(rows) == {"limoe-tiny", "clip-tiny"}
    assert rows["limoe-tiny"]["total_params"] > rows["clip-tiny"]["total_params"]


def test_demo_code_path_shortened(tmp_path, capsys):
    results = load_script("demo").main(["--steps", "3", "--batch-size", "8", "--out", str(tmp_path), "--num-workers", "0"])
    assert [r["model"] for r in results] == ["limoe-tiny", "clip-tiny"]
    for r in results:
        assert 0 <= r["zeroshot_top1"] <= 1 and r["samples_per_sec"] > 0
    assert results[0]["total_params"] > results[1]["total_params"]
    assert set(results[0]["expert_usage"]) == {"image", "text"} and not results[1]["expert_usage"]
    table = (tmp_path / "table.md").read_text()
    assert "| limoe-tiny |" in table and "| clip-tiny |" in table
    assert (tmp_path / "routing_limoe-tiny.png").stat().st_size > 1000
    assert "| limoe-tiny |" in capsys.readouterr().out


def test_compare_report_is_resumable(tmp_path):
    compare = load_script("compare")
    args = ["--seeds", "0", "--steps", "2", "--batch-size", "8", "--variants", "clip-tiny", "limoe-tiny, BPR, cf 0.5",
            "--out", str(tmp_path), "--num-workers", "0"]
    runs = compare.main(args)
    assert len(runs) == 2 and {r["model"] for r in runs} == {"clip-tiny", "limoe-tiny, BPR, cf 0.5"}
    table = (tmp_path / "table.md").read_text()
    assert "+-" in table
    # issue #27: every MoE checkpoint tested under each evaluation routing, with dropped fractions
    moe = next(r for r in runs if r["model"] != "clip-tiny")
    assert next(r for r in runs if r["model"] == "clip-tiny")["eval_routing"] == {}
    routed = moe["eval_routing"]
    assert list(routed) == ["per_example", "batch", "dropless"]
    for m in ("image", "text"):
        assert routed["dropless"]["expert_usage"][m]["dropped_frac"] == 0.0
        assert routed["per_example"]["expert_usage"][m]["dropped_frac"] > 0.0  # capacity factor 0.5 binds
        assert len(routed["per_example"]["expert_usage"][m]["effective_experts_top1"]) == 2  # one per MoE layer
    assert moe["zeroshot_top1"] == routed["per_example"]["zeroshot_top1"]  # the configured routing, put back
    assert moe["expert_usage"] == routed["per_example"]["expert_usage"]
    for how in ("per_example", "batch", "dropless"):
        assert f"| limoe-tiny, BPR, cf 0.5 | {how} | 1 |" in table
    assert "top-1 effective experts" in table
    again = compare.main(args)  # nothing re-run: both runs are in runs.jsonl
    assert [r["fit_seconds"] for r in again] == [r["fit_seconds"] for r in runs]


def test_moe_demo(capsys):
    load_script("moe_demo").main()
    out = capsys.readouterr().out
    assert out.count("| BPR |") == 2 and out.count("| vanilla |") == 2 and "| 8 | 1 | vlmoe |" in out


def test_eval_routing_script_table(shards, capsys, tmp_path):
    """scripts/eval_routing.py (the README's evaluation-routing table): per-example routing
    gives one top-1 for every batch size."""
    import vlmoe

    export = str(vlmoe.save_pretrained(vlmoe.create_model("limoe-tiny"), tmp_path / "m"))
    rows = load_script("eval_routing").main(["--model", export, "--data", shards["zeroshot"], "--classnames", shards["classnames"],
                                               "--templates", shards["templates"], "--batch-sizes", "3", "24",
                                               "--routings", "per_example", "dropless"])
    assert [r["routing"] for r in rows] == ["per_example", "dropless"]
    assert len(set(rows[0]["top1"])) == 1 and len(set(rows[1]["top1"])) == 1
    out = capsys.readouterr().out
    assert out.startswith("| model | eval routing | batch 3 | batch 24 | spread |") and f"| {export} | per_example |" in out


def test_compare_pairs_by_evaluation_routing_by_hand():
    """issue #27: a pair of MoE variants compared under each evaluation routing, from the same
    checkpoints. Differences and the 95% interval by hand (t_0.975 with 2 df = 4.303); a dense
    variant (no evaluation routings) and a routing one side lacks give no row. Planted: `a` and
    `b` swapped, another routing's accuracy read, the seeds of `b` taken from `a` -> fails."""
    compare = load_script("compare")

    def run(model, seed, **top1):
        return {"model": model, "seed": seed, "eval_routing": {h: {"zeroshot_top1": v} for h, v in top1.items()}}

    runs = [run("limoe-tiny", 0, per_example=0.65, dropless=0.55, batch=0.40),
            run("limoe-tiny", 1, per_example=0.66, dropless=0.60, batch=0.41),
            run("limoe-tiny", 2, per_example=0.72, dropless=0.61),
            run("limoe-tiny, joint", 0, per_example=0.60, dropless=0.50, batch=0.30),
            run("limoe-tiny, joint", 1, per_example=0.62, dropless=0.70, batch=0.45),
            run("limoe-tiny, joint", 2, per_example=0.70, dropless=0.61, batch=0.50)]
    runs += [{"model": "clip-tiny", "seed": s, "eval_routing": {}} for s in range(3)]
    got = {(d["a"], d["b"], d["eval_routing"]): d for d in
           compare.routing_pairs(runs, ["clip-tiny", "limoe-tiny", "limoe-tiny, joint"])}
    assert set(got) == {("limoe-tiny, joint", "limoe-tiny", h) for h in ("per_example", "batch", "dropless")}
    pe = got["limoe-tiny, joint", "limoe-tiny", "per_example"]
    assert pe["diffs"] == pytest.approx([-5, -4, -2]) and pe["wins"] == 0 and pe["mean"] == pytest.approx(-11 / 3)
    half = 4.302653 * statistics.stdev([-5, -4, -2]) / math.sqrt(3)  # 1.5275 sd -> 3.795 points
    assert (pe["low"], pe["high"]) == pytest.approx((-11 / 3 - half, -11 / 3 + half), abs=1e-3)
    dl = got["limoe-tiny, joint", "limoe-tiny", "dropless"]
    assert dl["diffs"] == pytest.approx([-5, 10, 0]) and dl["wins"] == 1  # a tie is not a win
    bt = got["limoe-tiny, joint", "limoe-tiny", "batch"]
    assert bt["seeds"] == [0, 1] and bt["diffs"] == pytest.approx([-10, 4])  # seed 2 of limoe-tiny lacks "batch"
    table = compare.routing_pairs_table(list(got.values()))
    assert "| limoe-tiny, joint - limoe-tiny | per_example | 3 | -3.7 | [-7.5, +0.1] | 0/3 |" in table
