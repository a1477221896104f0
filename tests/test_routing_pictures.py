"""Routing pictures (issue #13, part 2): vlmoe-routing and the pictures written at each
validation; the per-token routing behind them is checked against the layer's own output."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmoe
from vlmoe.cli import routing_main
from vlmoe.errors import ConfigError
from vlmoe.eval.routing import capture_routing, gate_mass_of, routing_summary
from vlmoe.moe import SparseMoE


def test_captured_routing_is_what_the_layer_computed():
    """Top-1 expert = argmax of the router's softmax; a token is marked kept exactly when the
    layer gave it an output (top-1, capacity binding)."""
    torch.manual_seed(0)
    moe = SparseMoE(8, 16, num_experts=4, capacity_factor=0.5, noise_scale=0.0).eval()
    x = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with capture_routing(moe) as store, gate_mass_of([moe]) as gates:
        y = moe(x, mask=mask, modality="text")
    rec = store[0][0]
    assert rec["modality"] == "text" and rec["expert"].shape == (2, 10)
    expected = (x @ moe.router.weight.t()).softmax(-1).argmax(-1)
    assert torch.equal(rec["expert"][mask], expected[mask]) and (rec["expert"][~mask] == -1).all()
    assert torch.equal(rec["kept"], (y.abs().sum(-1) > 0))
    assert not rec["kept"].all() and moe.capture is None  # capacity bound; capture off after the block
    summary = routing_summary(store, [4], gates)["layer0"]["text"]
    assert summary["tokens"] == 16 and sum(summary["tokens_per_expert"]) == 16
    assert summary["dropped_frac"] == pytest.approx(1 - float(rec["kept"][mask].double().mean()))
    # issue #27: both collapse measures, recomputed from the real tokens' gates
    g = (x @ moe.router.weight.t()).double().softmax(-1)[mask]
    share = torch.bincount(g.argmax(-1), minlength=4).double() / 16
    share = share[share > 0]
    assert summary["effective_experts_top1"] == pytest.approx(float(torch.exp(-(share * share.log()).sum())), rel=1e-9)
    p = g.mean(0)
    assert summary["effective_experts"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    assert summary["effective_experts"] != pytest.approx(summary["effective_experts_top1"], rel=1e-3)


def test_vlmoe_routing_writes_the_promised_files(shards, tmp_path):
    torch.manual_seed(0)
    export = str(vlmoe.save_pretrained(vlmoe.create_model("limoe-tiny"), tmp_path / "m"))
    out = tmp_path / "pictures"
    summary = routing_main(["--model", export, "--data", shards["val"], "--out", str(out), "--samples", "12", "--num-pictures", "3"])
    assert sorted(p.name for p in out.iterdir()) == ["modality_bars.png", "patches.png", "routing.json", "tokens.html"]
    for png in ("modality_bars.png", "patches.png"):
        assert (out / png).stat().st_size > 5_000
    saved = json.loads((out / "routing.json").read_text())
    assert saved["patch_maps"]["shape"] == [3, 2, 8, 8]  # 3 images, 2 MoE layers, the 8x8 patch grid of limoe-tiny
    for layer in ("layer0", "layer1"):
        assert saved[layer]["image"]["tokens"] == 12 * 65 and set(saved[layer]) == {"image", "text"}
        assert all({"effective_experts", "effective_experts_top1"} <= set(saved[layer][m]) for m in ("image", "text"))
    html = (out / "tokens.html").read_text()
    assert html.count("<table>") == 3 and "MoE 1" in html and "e0" in html
    assert summary["files"]["tokens"] == "tokens.html"
    # labelled image-only shards: image pictures, no captions
    from helpers import png

    from vlmoe.data import ShardWriter

    with ShardWriter(str(tmp_path / "labels-%06d.tar")) as w:
        for i in range(4):
            w.write(f"{i}", png(), label=i % 2)
    out2 = tmp_path / "zs"
    routing_main(["--model", export, "--data", str(tmp_path / "labels-000000.tar"), "--out", str(out2), "--samples", "4"])
    assert (out2 / "patches.png").exists() and not (out2 / "tokens.html").exists()


def test_vlmoe_routing_refuses_a_dense_model(shards, tmp_path):
    with pytest.raises(ConfigError, match="has no MoE layers"):
        routing_main(["--model", "clip-tiny", "--data", shards["val"], "--out", str(tmp_path)])
    exe = Path(sys.executable).parent / "vlmoe-routing"
    p = subprocess.run([str(exe), "--model", "clip-tiny", "--data", shards["val"], "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "vlmoe-routing: error: clip-tiny has no MoE layers: there is no routing to show (a dense model?)"


def test_validation_writes_the_routing_pictures(shards, tmp_path):
    from vlmoe.cli import cli_main

    from helpers import train_args

    cli = cli_main(train_args(shards, tmp_path, steps=2))
    routing = Path(cli.trainer.log_dir) / "routing"
    names = sorted(p.name for p in routing.iterdir())
    assert "val_step0000002.png" in names and "val_step0000002_modalities.png" in names
    report = routing / "val_step0000002"
    assert {p.name for p in report.iterdir()} == {"modality_bars.png", "patches.png", "routing.json", "tokens.html"}
    assert json.loads((report / "routing.json").read_text())["title"] == "val routing at step 2"


def test_patch_mosaic_pixels_by_hand():
    """One image of 2 x 2 patches, two layers, 4-pixel cells: each patch is its expert's
    colour; a dropped patch is lightened halfway to white with both diagonals black; the
    image is upsampled beside them, with white gaps of 2 pixels between the panels."""
    from vlmoe.eval.pictures import patch_mosaic

    colors = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.6, 0.0)]
    image = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]] * 3)[None]  # [1, 3, 2, 2]
    maps = torch.tensor([[[[0, 1], [1, 0]], [[2, 2], [0, 1]]]])  # [1, 2 layers, 2, 2]
    kept = torch.tensor([[[[True, False], [True, True]], [[True, True], [True, False]]]])
    m = patch_mosaic(image, maps, kept, colors, cell=4)
    assert m.shape == (8, 3 * 8 + 2 * 2, 3)
    assert (m[:, 8:10] == 1).all() and (m[:, 18:20] == 1).all()  # the gaps
    assert torch.allclose(m[4:8, 0:4], torch.full((4, 4, 3), 0.3))  # the image, nearest upsampling
    first, second = m[:, 10:18], m[:, 20:28]
    assert (first[0:4, 0:4] == torch.tensor([1.0, 0.0, 0.0])).all()  # layer 0, patch (0,0): expert 0, kept
    dropped = first[0:4, 4:8]  # layer 0, patch (0,1): expert 1, dropped
    diag = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert (dropped[diag] == 0).all() and (dropped[~diag] == torch.tensor([0.5, 0.5, 1.0])).all()
    assert (second[0:4, 0:8] == torch.tensor([0.0, 0.6, 0.0])).all()  # layer 1, top row: expert 2, kept
    assert (second[4:8, 0:4] == torch.tensor([1.0, 0.0, 0.0])).all()
    assert (second[4:8, 4:8][diag] == 0).all() and (second[4:8, 4:8][~diag] == torch.tensor([0.5, 0.5, 1.0])).all()
