"""The test-time capacity sweep of vlmoe-zeroshot (issue #13, part 1): rows per capacity and
BPR setting, drops and active FLOPs on the rows the experts computed, overrides that do not
outlive the evaluation."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmoe
from vlmoe.cli import zeroshot_main
from vlmoe.errors import ConfigError
from vlmoe.eval.sweep import RoutingMeter, eval_overrides, expert_flops_per_row, image_flops_without_experts


def _export(tmp_path, name="limoe-tiny"):
    torch.manual_seed(0)
    model = vlmoe.create_model(name)
    with torch.no_grad():  # a skewed router: drops at every capacity below dropless
        for layer in model.moe_layers():
            layer.router.weight.mul_(4.0)
    return str(vlmoe.save_pretrained(model, tmp_path / name))


def test_sweep_rows_drops_and_flops(shards, tmp_path):
    limoe, clip = _export(tmp_path), _export(tmp_path, "clip-tiny")
    plot = tmp_path / "sweep.png"
    rows = zeroshot_main(["--model", limoe, "--model", clip, "--data", shards["zeroshot"], "--classnames", shards["classnames"],
                          "--templates", shards["templates"], "--capacity-factor", "0.25", "0.5", "1", "2",
                          "--batch-priority", "on", "off", "--plot", str(plot), "--num-workers", "0", "--json"])
    moe = [r for r in rows if r["model"] == limoe]
    assert [(r["capacity_factor"], r["batch_priority"]) for r in moe] == [(cf, bpr) for bpr in (True, False) for cf in (0.25, 0.5, 1, 2)]
    for bpr in (True, False):
        curve = [r for r in moe if r["batch_priority"] is bpr]
        drops = [r["dropped_frac"] for r in curve]
        flops = [r["gflops_per_image"] for r in curve]
        assert drops == sorted(drops, reverse=True) and drops[0] > drops[-1]  # more capacity, fewer drops
        assert flops == sorted(flops) and flops[0] < flops[-1]  # and more compute
        assert all(r["eval_capacity_factor_image"] == r["capacity_factor"] for r in curve)
    dense = [r for r in rows if r["model"] == clip]
    assert len(dense) == 1 and dense[0]["capacity_factor"] is None and dense[0]["note"] == "dense: no capacity to sweep"
    assert dense[0]["dropped_frac"] == 0.0
    assert plot.stat().st_size > 10_000


def test_a_soft_moe_model_gets_one_row_and_refuses_evaluation_routing(shards, tmp_path, capsys):
    """Soft MoE has no capacity: a sweep gives one row noted as such (it printed rows labelled
    cf 0.1 and cf 4 with identical top-1), and evaluation-routing flags are refused (they were
    written into the JSON as if used)."""
    soft = _export(tmp_path, "limoe-tiny-soft")
    args = ["--model", soft, "--data", shards["zeroshot"], "--classnames", shards["classnames"], "--templates",
            shards["templates"], "--num-workers", "0"]
    rows = zeroshot_main([*args, "--capacity-factor", "0.1", "4", "--batch-priority", "on"])
    assert len(rows) == 1 and rows[0]["capacity_factor"] is None and rows[0]["note"] == "Soft MoE: no capacity to sweep"
    assert "per_example (Soft MoE: no capacity to sweep)" in capsys.readouterr().out
    for flag in (["--eval-capacity-factor", "2"], ["--eval-routing", "batch"]):
        with pytest.raises(ConfigError, match="has no effect on Soft MoE"):
            zeroshot_main([*args, *flag])


def test_overrides_leave_the_model_as_it_was():
    """Planted: the override not restored (the model keeps the last swept capacity)."""
    model = vlmoe.create_model("limoe-tiny", moe={"text": {"capacity_factor": 2.0}}).eval()
    before = [(copy.deepcopy(m.options), copy.deepcopy(m.modality_options), m.eval_routing) for m in model.moe_layers()]
    config = copy.deepcopy(model.config)
    with eval_overrides(model, capacity_factor=0.25, batch_priority=False, eval_routing="batch"):
        layer = model.moe_layers()[0]
        assert layer.options_for("text").eval_capacity_factor == 0.25 and layer.options_for("image").batch_priority is False
    assert [(m.options, m.modality_options, m.eval_routing) for m in model.moe_layers()] == before
    assert model.config == config
    with pytest.raises(ConfigError, match="a capacity factor must be a finite number > 0; got 0"):
        with eval_overrides(model, capacity_factor=0):
            pass


@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_gflops_count_the_kept_rows_as_torch_counts_them(cf):
    """The active FLOPs per image equal torch's FLOP counter on the per-expert loop (which
    computes exactly the kept rows), for a batch at a binding capacity."""
    torch.manual_seed(0)
    model = vlmoe.create_model("limoe-tiny", moe={"implementation": "loop"}).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.mul_(4.0)
    images = torch.randn(6, 3, 32, 32)
    base = image_flops_without_experts(model)
    with eval_overrides(model, capacity_factor=cf), torch.enable_grad():
        with RoutingMeter(model, "image") as meter, FlopCounterMode(display=False) as counter:
            model.encode_image(images)
    assert meter.dropped_frac > 0
    assert base * 6 + meter.expert_flops == counter.get_total_flops()
    layer = model.moe_layers()[0]
    assert expert_flops_per_row(layer) == 4 * layer.dim * layer.hidden_dim


def test_bad_sweep_input_is_refused(shards):
    common = ["--data", shards["zeroshot"], "--classnames", shards["classnames"], "--templates", shards["templates"], "--num-workers", "0"]
    with pytest.raises(ConfigError, match="a capacity factor must be a finite number > 0; got -1"):
        zeroshot_main(["--model", "limoe-tiny", "--capacity-factor", "1", "-1", *common])
    with pytest.raises(ConfigError, match="a capacity sweep needs capacity"):
        zeroshot_main(["--model", "limoe-tiny", "--capacity-factor", "1", "--eval-routing", "dropless", *common])
