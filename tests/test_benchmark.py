"""vlmoe-benchmark: CLIP_benchmark's own command line with --model_type vlmoe, on a labelled set
written in CLIP_benchmark's local wds layout by scripts/make_shards.py. Run as installed
scripts, as a user would; CLIP_benchmark's numbers are checked against vlmoe-zeroshot's."""
import csv
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmoe
from helpers import console, load_script
from vlmoe.errors import ConfigError

pytest.importorskip("clip_benchmark", reason="the [benchmark] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 300


def run(args, cwd, env=None):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def layout(shards, tmp_path_factory):
    """The fixture's labelled colour shards in CLIP_benchmark's layout, via make_shards."""
    out = tmp_path_factory.mktemp("wds") / "colors"
    p = run([sys.executable, ROOT / "scripts" / "make_shards.py", "benchmark", "--shards", shards["zeroshot"],
             "--classnames", shards["classnames"], "--templates", shards["templates"], "--out", out, "--max-count", "10"],
            cwd=out.parent)
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A LIMoE whose image capacity binds (so drops happen) and a dense CLIP, as exports."""
    root = tmp_path_factory.mktemp("bench-models")
    torch.manual_seed(0)
    moe = vlmoe.create_model("limoe-tiny", moe={"eval_capacity_factor": 0.5})
    torch.manual_seed(1)
    dense = vlmoe.create_model("clip-tiny")
    return {"moe": vlmoe.save_pretrained(moe, root / "limoe"), "dense": vlmoe.save_pretrained(dense, root / "clip")}


def test_make_shards_writes_clip_benchmarks_layout(layout, shards):
    assert (layout / "test" / "nshards.txt").read_text().strip() == "3"  # 24 samples, 10 per shard
    assert sorted(p.name for p in (layout / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    assert (layout / "classnames.txt").read_text().split("\n")[:4] == Path(shards["classnames"]).read_text().split("\n")[:4]
    assert (layout / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a {c} shape.", "a photo of something {c}."]
    # CLIP_benchmark's own reader takes it
    from clip_benchmark.datasets.builder import build_wds_dataset

    ds = build_wds_dataset("wds/colors", transform=lambda x: x, split="test", data_dir=str(layout))
    items = list(ds)
    assert len(items) == 24 and ds.classes == ["red", "green", "blue", "yellow"] and ds.templates[0] == "a {c} shape."
    # labels carried over in order: the fixture labels sample i with colour (i + 2) % 4
    assert [int(y) for _, y in items] == [(i + 2) % 4 for i in range(24)]


def _bench(model, layout, out, *extra):
    return run([BIN / "vlmoe-benchmark", "eval", "--model_type", "vlmoe", "--model", model, "--pretrained", "none",
                "--dataset", "wds/colors", "--dataset_root", layout, "--num_workers", "0", "--batch_size", "7", "--no_amp",
                "--output", out, *extra], cwd=out.parent)


def _zeroshot(model, layout):
    """vlmoe-zeroshot's result for the same data (in this process: the installed script is
    test_console_scripts')."""
    from vlmoe.cli import zeroshot_main

    return zeroshot_main([str(a) for a in ("--model", model, "--data", f"{layout}/test/{{0..2}}.tar", "--classnames",
                                           layout / "classnames.txt", "--templates",
                                           layout / "zeroshot_classification_templates.txt", "--per-class",
                                           "--num-workers", "0")])[0]


@pytest.fixture(scope="module")
def results(layout, models, tmp_path_factory):
    """One vlmoe-benchmark run per model: {kind: result JSON path}."""
    root = tmp_path_factory.mktemp("bench-results")
    out = {}
    for kind, model in models.items():
        out[kind] = root / f"{kind}.json"
        p = _bench(model, layout, out[kind])
        assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_clip_benchmark_acc1_equals_vlmoe_zeroshot_top1(layout, models, results, tmp_path):
    for kind, model in models.items():
        result = json.loads(results[kind].read_text())
        assert {"dataset", "model", "pretrained", "task", "metrics", "language", "moe"} <= set(result)
        assert result["task"] == "zeroshot_classification" and result["dataset"] == "wds/colors"
        ref = _zeroshot(model, layout)
        assert ref["n"] == 24
        assert result["metrics"]["acc1"] == pytest.approx(ref["top1"], abs=1e-9), kind
        # balanced accuracy = the mean of the per-class accuracies (4 classes of 6 images)
        per_class = list(ref["per_class"].values())
        assert result["metrics"]["mean_per_class_recall"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-6)  # float32 per class
        moe = result["moe"]
        if kind == "dense":
            assert moe == {}
            continue
        assert moe["images"] == 24 and moe["num_experts"] == 8 and moe["eval_routing"] == "per_example"
        assert moe["dropped_frac"]["image"] == pytest.approx(ref["dropped_frac"], abs=1e-9) and moe["dropped_frac"]["image"] > 0
        assert moe["gflops_per_image"] == pytest.approx(ref["gflops_per_image"], rel=1e-9)
        # tokens routed, counted independently: 24 images x (8x8 patches + class token) per image
        # layer; the prompts' real tokens (4 classes x 2 templates) per text layer
        tok = vlmoe.get_tokenizer(16)
        prompts = [t.format(c) for c in ("red", "green", "blue", "yellow") for t in ("a {} shape.", "a photo of something {}.")]
        real = int((tok(prompts) != 0).sum())
        layers = {(r["layer"], r["modality"]): r for r in moe["layers"]}
        assert {m for _, m in layers} == {"image", "text"}
        ref_text = _reference_text_routing(model, prompts)
        assert sorted(n for n, m in layers if m == "text") == sorted(ref_text)
        for (name, modality), r in layers.items():
            assert name.startswith("visual." if modality == "image" else "transformer.")
            assert r["tokens"] == (24 * 65 if modality == "image" else real)
            if modality == "text":  # issue #24: text numbers against a routing recomputed by hand
                counts, n, dropped, mean_gate, first = ref_text[name]
                assert n == r["tokens"]
                assert r["expert_share"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)
                assert r["dropped_frac"] == pytest.approx(dropped / n, abs=1e-9)
                assert r["effective_experts"] == pytest.approx(math.exp(-(mean_gate * mean_gate.log()).sum().item()), rel=1e-5)
                # issue #27: collapse on the top-1 choices (before capacity: not the kept share)
                share = first[first > 0] / n
                assert r["effective_experts_top1"] == pytest.approx(math.exp(-(share * share.log()).sum().item()), rel=1e-6)
                assert r["top1_top_expert_share"] == pytest.approx(float(share.max()), rel=1e-6)
        all_text = [ref_text[k] for k in ref_text]
        text_dropped = sum(d for _, _, d, _, _ in all_text) / sum(n for _, n, _, _, _ in all_text)
        assert text_dropped > 0  # the capacity binds for text too, so a wrong count would show
        assert moe["dropped_frac"]["text"] == pytest.approx(text_dropped, abs=1e-9)


def _reference_text_routing(model_dir, prompts):
    """Each text MoE layer's routing of the prompts, recomputed by hand from the layer's input:
    top-1 softmax gates, per-example capacity ceil(n_real * cf / E) rounded up to 4, Batch
    Prioritized Routing (higher gate first) within each example. {layer name: (kept per
    expert, real tokens, dropped, mean gate, top-1 choices per expert before capacity)}."""
    from vlmoe.moe import SparseMoE
    from vlmoe.moe.layer import current_routing_context

    model = vlmoe.create_model(str(model_dir)).eval()
    captured = {}

    def grab(name):
        def hook(module, args):
            modality, mask = current_routing_context()
            if modality == "text":
                captured[name] = (args[0].detach(), mask)
        return hook

    text_names = {}  # a layer shared by the towers has a name in each: the text tower's
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, SparseMoE) and name.startswith("transformer."):
            text_names.setdefault(id(m), (m, name))
    for m, name in text_names.values():
        m.register_forward_pre_hook(grab(name))
    with torch.no_grad():
        model.encode_text(vlmoe.get_tokenizer(model)(prompts))
    out = {}
    for name, (x, mask) in captured.items():
        layer = model.get_submodule(name)
        E = layer.num_experts
        opts = layer.options_for("text")
        cf = opts.eval_capacity_factor if opts.eval_capacity_factor is not None else opts.capacity_factor
        assert x.shape[:2] == mask.shape and layer.top_k == 1
        gates = torch.softmax(x.double() @ layer.router.weight.double().T, -1)
        counts, n, dropped, gate_sum = torch.zeros(E), 0, 0, torch.zeros(E, dtype=torch.float64)
        first = torch.zeros(E, dtype=torch.float64)
        for b in range(x.shape[0]):
            g = gates[b][mask[b]]
            cap = math.ceil(len(g) * cf / E)
            cap = -(-cap // 4) * 4
            top, expert = g.max(-1)
            first += torch.bincount(expert, minlength=E).double()
            used = [0] * E  # this example's slots taken, per expert
            for i in sorted(range(len(g)), key=lambda i: -float(top[i])):
                e = int(expert[i])
                if used[e] < cap:
                    used[e] += 1
                else:
                    dropped += 1
            counts += torch.tensor(used, dtype=torch.float32)
            n += len(g)
            gate_sum += g.sum(0)
        out[name] = (counts, n, dropped, (gate_sum / n).float(), first)
    return out


def test_build_and_bad_input(layout, models, results, tmp_path, capsys):
    out = results["moe"]
    p = run([BIN / "vlmoe-benchmark", "build", out, "--output", tmp_path / "bench.csv"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert len(rows) == 1 and float(rows[0]["acc1"]) == json.loads(out.read_text())["metrics"]["acc1"] and rows[0]["moe"]
    # CLIP_benchmark's default --pretrained is an open_clip tag: said in one line, exit 2
    from vlmoe.eval.benchmark import main

    p = console(main, "vlmoe-benchmark", ["eval", "--model_type", "vlmoe", "--model", models["moe"], "--dataset", "wds/colors",
                                          "--dataset_root", layout, "--output", tmp_path / "x.json"], capsys)
    assert p.returncode == 2 and "--pretrained none" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_named_model_with_a_checkpoint_as_pretrained(layout, models, results, tmp_path, capsys):
    """--model NAME --pretrained CHECKPOINT: the weights of the checkpoint in the named
    architecture (in this process: the results fixture runs the installed script)."""
    from vlmoe.eval.benchmark import main

    weights = models["dense"] / "model.safetensors"
    out = tmp_path / "named.json"
    p = console(main, "vlmoe-benchmark", ["eval", "--model_type", "vlmoe", "--model", "clip-tiny", "--pretrained", weights,
                                          "--dataset", "wds/colors", "--dataset_root", layout, "--num_workers", "0", "--no_amp",
                                          "--output", out], capsys)
    assert p.returncode == 0, p.stderr[-2000:]
    named, export = json.loads(out.read_text()), json.loads(results["dense"].read_text())
    assert named["metrics"] == export["metrics"] and named["pretrained"] == str(weights)


def test_numpy_and_requests_defects_are_named(monkeypatch, tmp_path):
    from clip_benchmark.metrics import zeroshot_classification as zc

    from vlmoe.eval import benchmark

    def broken(output, target, topk=(1,)):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(zc, "accuracy", broken)
    with pytest.raises(ConfigError, match=r"numpy<2\.4"):
        benchmark.check_accuracy_works()
    monkeypatch.undo()
    benchmark.check_accuracy_works()  # the installed numpy is the extra's
    # clip-benchmark imports requests without declaring it: without requests, the error says so
    code = ("import sys; sys.modules['requests'] = None\n"
            "from vlmoe.cli import run_console\nfrom vlmoe.eval.benchmark import main\n"
            "sys.exit(run_console(main, 'vlmoe-benchmark', ['eval', '--help']))")
    p = run([sys.executable, "-c", code], cwd=tmp_path)
    assert p.returncode == 2 and "requests" in p.stderr and "vlmoe[benchmark]" in p.stderr, p.stderr


def test_make_shards_benchmark_from_an_image_folder(tmp_path, capsys):
    """The script as a user runs it for the layout; its two refusals through the same
    run_console in this process (each a fresh interpreter otherwise)."""
    from conftest import make_image

    make_shards = load_script("make_shards").main

    for cls, n in (("dark_red", 2), ("blue", 3)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "imgs" / cls / f"{i}.jpg").write_bytes(make_image("red" if cls == "dark_red" else "blue", "square", seed=i))
    (tmp_path / "imgs" / "blue" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "layout"
    p = console(make_shards, "make_shards.py", ["benchmark", "--images", tmp_path / "imgs", "--templates", "a photo of a {}.",
                                                 "--out", out], capsys)
    assert p.returncode == 2 and "templates" in p.stderr  # not a file nor a built-in set
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    p = run([sys.executable, ROOT / "scripts" / "make_shards.py", "benchmark", "--images", tmp_path / "imgs", "--templates",
             tmp_path / "t.txt", "--out", out], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "broken.jpg" in p.stderr and "skipped 1" in p.stderr
    assert (out / "classnames.txt").read_text().splitlines() == ["blue", "dark red"]  # sorted folders, _ as space
    from clip_benchmark.datasets.builder import build_wds_dataset

    labels = [int(y) for _, y in build_wds_dataset("wds/x", transform=lambda x: x, split="test", data_dir=str(out))]
    assert labels == [0, 0, 0, 1, 1]
    # a second run into the same folder is refused, unless --overwrite
    p = console(make_shards, "make_shards.py", ["benchmark", "--images", tmp_path / "imgs", "--templates", tmp_path / "t.txt",
                                                 "--out", out], capsys)
    assert p.returncode == 2 and "--overwrite" in p.stderr
