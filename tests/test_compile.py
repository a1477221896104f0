"""torch.compile: the MoE layer compiles as one graph (fullgraph=True) in training and
evaluation and matches eager; the LIMoE model's forward breaks its graph no more often than
the dense CLIP's; `vlmoe fit --model.compile true` trains a compiled model."""
from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

from vlmoe import create_model
from vlmoe.moe import SparseMoE
from helpers import CONFIGS, QUIET, ROOT, console, data_args, last_line, script
from vlmoe.cli import cli_main

D, E = 16, 4
CASES = {
    "topk": dict(router="topk", noise_scale=0.0, z_loss_weight=0.01, local_entropy_weight=0.01, global_entropy_weight=0.01),
    "topk-k2-bias": dict(router="topk", top_k=2, noise_scale=0.0, balance="bias", bias_per_modality=True),
    "switch-shared": dict(router="switch", num_shared_experts=1, shared_expert_gate=True),
    "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, D, generator=g)
    mask = torch.arange(9) < torch.tensor([[2], [9], [4]])
    return x, mask


def _run(layer, x, mask, joint: bool, compile_with: str | None = None, fullgraph: bool = True):
    layer.aux = {}  # only this call's records (as VLMoEModel.forward does)
    x = x.clone().requires_grad_(True)
    if joint:
        fn = layer.forward_joint
        fn = torch.compile(fn, fullgraph=fullgraph, backend=compile_with) if compile_with else fn
        out = fn({"image": (x, None), "text": (x * 0.5, mask)})
        y = out["image"] + out["text"]
    else:
        fn = torch.compile(layer, fullgraph=fullgraph, backend=compile_with) if compile_with else layer
        y = fn(x, mask=mask, modality="text")
    loss = y.square().sum() + sum(a.loss for a in layer.aux.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    stats = {k: v.detach().clone() for m, a in layer.aux.items() for k, v in a.stats.items() if k == "dropped_frac"}
    return y.detach(), x.grad, grads, stats


@pytest.mark.parametrize("joint", [False, True], ids=["per_modality", "joint"])
@pytest.mark.parametrize("name", list(CASES))
def test_layer_compiles_as_one_graph_and_matches_eager(name, joint):
    """fullgraph=True (a graph break is an error) in training and in evaluation (per-example
    routing), with the text padding mask; outputs, input and parameter gradients and the
    dropped fraction as eager's. aot_eager traces forward and backward through AOTAutograd
    without generating kernels (the inductor case below generates them)."""
    torch.manual_seed(0)
    layer = SparseMoE(D, 32, E, **CASES[name])
    x, mask = _data()
    for training in (True, False):
        layer.train(training)
        torch._dynamo.reset()
        want = _run(layer, x, mask, joint)
        with torch._dynamo.config.patch(error_on_recompile=False):
            got = _run(layer, x, mask, joint, compile_with="aot_eager")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it compiled


def test_layer_compiled_by_inductor_matches_eager():
    """The default backend (generated kernels): a training forward + backward, top-2 with BPR
    and the text mask (evaluation is traced above; generating its kernels too would double
    this test's time)."""
    torch.manual_seed(0)
    layer = SparseMoE(D, 32, E, noise_scale=0.0, top_k=2).train()
    x, mask = _data()
    torch._dynamo.reset()
    torch.testing.assert_close(_run(layer, x, mask, False, compile_with="inductor"), _run(layer, x, mask, False),
                               rtol=1e-4, atol=1e-5)


def test_dropless_layer_compiles_with_breaks_and_matches_eager():
    """Dropless routing sizes its rows from the data: it compiles with graph breaks (not
    errors) and matches eager; output, input and parameter gradients. Planted: the layer's
    sync-free buffers used without a capacity (a wrong, not a slower, result)."""
    torch.manual_seed(0)
    layer = SparseMoE(D, 32, E, capacity_factor=None, noise_scale=0.0).train()
    x, mask = _data()
    torch._dynamo.reset()
    want = _run(layer, x, mask, False)
    got = _run(layer, x, mask, False, compile_with="aot_eager", fullgraph=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _graph_breaks(name: str, **overrides) -> int:
    torch.manual_seed(0)
    model = create_model(name, **overrides).train()
    image = torch.randn(2, 3, *model.image_size)
    text = torch.randint(1, 400, (2, model.context_length))
    text[:, 5:] = 0
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(image, text).graph_break_count


def test_limoe_breaks_its_graph_no_more_often_than_clip():
    """Planted: the routing context back on a ContextVar (a break at every `with`), or an
    `.item()` in the routing (a break in every MoE layer)."""
    dense = _graph_breaks("clip-tiny")
    assert _graph_breaks("limoe-tiny") <= dense
    assert _graph_breaks("limoe-tiny", moe={"routing_groups": "joint"}) <= dense
    assert dense == 0


def test_compile_setting_is_a_bool_or_a_backend():
    from vlmoe.errors import ConfigError
    from vlmoe.train import LIMoEModule

    for bad in ("maybe", 1, None):
        with pytest.raises(ConfigError, match=r"compile must be true, false or a torch.compile backend \(.*aot_eager"):
            LIMoEModule("clip-tiny", compile=bad)
    assert LIMoEModule("clip-tiny", compile="aot_eager").hparams.compile == "aot_eager"


def test_vlmoe_fit_with_model_compile(shards, tmp_path, capsys):
    """`vlmoe fit --model.compile aot_eager`, the installed script: the model is compiled with
    the backend named (dynamo captures the forward and AOTAutograd the backward, as with
    inductor; inductor's own code generation is `test_layer_compiled_by_inductor_matches_eager`
    and gpu_check's), training finishes, and the checkpoint has the eager model's keys. A bad
    value is one line and exit 2 (through the same run_console, in this process)."""
    small = json.dumps({"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 2}})
    r = script("vlmoe", "fit", "--config", "configs/limoe_tiny.yaml", *data_args(shards), "--trainer.max_steps=2",
               "--data.batch_size=8", "--data.val_batch_size=8", "--data.samples_per_epoch=16",
               f"--trainer.default_root_dir={tmp_path}", f"--model.model_overrides={small}", "--model.compile=aot_eager",
               "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", *QUIET, cwd=str(ROOT), timeout=600,
               env={"TORCH_LOGS": "graph_code"})  # dynamo prints each graph it captured
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiling the model (torch.compile, backend aot_eager)" in r.stderr
    assert "TRACED GRAPH" in r.stderr and "experts" in r.stderr  # the forward, MoE layers included, was captured
    ckpt = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    model = create_model("limoe-tiny", **json.loads(small))
    assert set(state) == {f"model.{k}" for k in model.state_dict()}
    bad = console(cli_main, "vlmoe", ["fit", "--config", CONFIGS / "limoe_tiny.yaml", *data_args(shards), "--model.compile=maybe",
                                       f"--trainer.default_root_dir={tmp_path}", *QUIET], capsys)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert last_line(bad.stderr).startswith("vlmoe: error: compile must be true, false or a torch.compile backend")
