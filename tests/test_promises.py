"""Tests that pin what the README promises (issue #16). Each test names, in its docstring,
the one-line bug it was checked against: the bug was planted, the test failed, the bug was
removed. Expected values are computed here by hand or by a reference loop, not by the code
under test."""
import math
import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import vlmoe
from vlmoe.data import ClipDataModule, ShardWriter, make_dataset
from vlmoe.data.pipeline import _rank_worker_seed
from vlmoe.models.checkpoint import load_state_dict_strict
from vlmoe.moe import SparseMoE, losses
from vlmoe.moe.routing import expert_choice_route
from vlmoe.train import LIMoEModule


def constant_experts(moe: SparseMoE, value: float = 1.0) -> None:
    """Every expert outputs `value` in every feature, so a token's output is the sum of its
    kept combine weights times `value`."""
    with torch.no_grad():
        moe.experts.w1.zero_()
        moe.experts.b1.zero_()
        moe.experts.w2.zero_()
        moe.experts.b2.fill_(value)


def expert_out(moe, e, x):
    ex = moe.experts
    return ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


# -- the table of planted bugs ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval per_example", "eval batch"])
def test_per_modality_statistics_count_real_tokens_only(mode):
    """Planted: statistics from padded counts (n_tokens = mask.numel()), and capacity from the
    padded length (`n_valid = S`, issue #24). 11 real tokens of 16, all routed to expert 0,
    multiple_of=1: capacity ceil(11 / 4) = 3 (the 16 positions would give 4), kept 3,
    dropped 8/11 of the real choices; in training, per-example and batch evaluation alike."""
    moe = SparseMoE(4, 8, num_experts=4, capacity_factor=1.0, multiple_of=1, noise_scale=0.0,
                    eval_routing="batch" if mode == "eval batch" else "per_example").train(mode == "train")
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0  # expert 0 wins for every token with x[0] > 0
    x = torch.zeros(1, 16, 4)
    x[..., 0] = 1.0
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :11] = True
    moe(x, mask=mask, modality="text")
    st = moe.aux["text"].stats
    assert float(st["capacity"]) == 3
    assert st["tokens_per_expert"].tolist() == [3.0, 0.0, 0.0, 0.0]
    assert float(st["num_tokens"]) == 11
    assert float(st["dropped_frac"]) == pytest.approx(8 / 11)
    assert float(st["dropped_token_frac"]) == pytest.approx(8 / 11)
    assert st["expert_load"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_router_noise_std_is_noise_scale_over_num_experts(monkeypatch):
    """Planted: noise std not divided by E. With a zero router and the noise replaced by a
    unit push on expert 0, the training gate of expert 0 is softmax([s, 0, ..., 0])[0] with
    s = noise_scale / E = 0.125 (E=8); the eval gate is 1/8."""
    moe = SparseMoE(4, 8, num_experts=8, capacity_factor=None, noise_scale=1.0)
    constant_experts(moe)
    with torch.no_grad():
        moe.router.weight.zero_()

    def push(t):
        z = torch.zeros_like(t)
        z[:, 0] = 1.0
        return z

    monkeypatch.setattr(torch, "randn_like", push)
    x = torch.randn(5, 4)
    s = 1.0 / 8
    expected = math.exp(s) / (math.exp(s) + 7)
    torch.testing.assert_close(moe.train()(x), torch.full((5, 4), expected))
    torch.testing.assert_close(moe.eval()(x), torch.full((5, 4), 1 / 8))


def test_gshard_keeps_the_second_expert_with_probability_2_g2_over_g1_plus_g2():
    """Planted: the keep probability halved (351 instead of ~500 kept). Gates g1 = 3 g2 for
    every token: the second expert is kept with probability 2 * 1/4 = 0.5, so of 4096 tokens
    2048 +- 32 (one std) second choices are kept."""
    torch.manual_seed(0)
    moe = SparseMoE(4, 8, num_experts=4, router="gshard", capacity_factor=None).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = math.log(3.0)
        moe.router.weight[2, 0] = -30.0
        moe.router.weight[3, 0] = -30.0
    x = torch.zeros(4096, 4)
    x[:, 0] = 1.0
    moe(x)
    counts = moe.aux[None].stats["tokens_per_expert"]
    assert counts[0] == 4096  # every first choice
    assert abs(float(counts[1]) - 2048) < 5 * 32, counts


def _mixtral_case():
    """E=4, S=8, K=2, cf 0.5, multiple_of 1: capacity ceil(8*2*0.5/4) = 2. Token i prefers
    expert i%4, then (i+1)%4: the top-1 choices fill every expert, so every second choice is
    dropped."""
    torch.manual_seed(0)
    moe = SparseMoE(8, 16, num_experts=4, top_k=2, capacity_factor=0.5, multiple_of=1, gate="topk_softmax",
                    noise_scale=0.0).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8))
    x = torch.randn(8, 8) * 0.1
    for i in range(8):
        x[i, :4] = -3.0
        x[i, i % 4], x[i, (i + 1) % 4] = 2.0, 1.0
    return moe, x


def test_mixtral_weights_are_fixed_before_the_capacity_drop():
    """Planted: weights renormalised after the drop (the kept choice would weigh 1.0). The
    kept top-1 choice keeps its share of the softmax over the top-2 logits, e/(e+1)."""
    moe, x = _mixtral_case()
    w = math.e / (math.e + 1)  # softmax over logits (2, 1)
    expected = torch.stack([w * expert_out(moe, i % 4, x[i]) for i in range(8)])
    torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)
    assert float(moe.aux[None].stats["dropped_frac"]) == 0.5


def test_batch_priority_false_places_tokens_by_position():
    """Planted: the layer ignoring batch_priority=False. Every token prefers expert 0, with a
    gate that grows along the sequence; capacity 2. BPR keeps the two last (highest gate)
    tokens, position order the two first."""
    def kept(bpr):
        moe = SparseMoE(4, 8, num_experts=2, capacity_factor=1.0, multiple_of=1, batch_priority=bpr, noise_scale=0.0).eval()
        constant_experts(moe)
        with torch.no_grad():
            moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        x = torch.zeros(4, 4)
        x[:, 0] = torch.tensor([0.5, 1.0, 1.5, 2.0])
        return (moe(x)[:, 0] > 0).tolist()

    assert kept(False) == [True, True, False, False]
    assert kept(True) == [False, False, True, True]


def test_moebert_split_ranks_neurons_by_an_independent_importance():
    """Planted: the importance negated, or its gradients ignored. The shared neurons must be
    the top ones by sum |w * dL/dw| computed here with autograd on the dense model (and by
    ||w_in|| * ||w_out|| without batches)."""
    from open_clip.loss import ClipLoss

    from test_moe_designs import _shared, _small_clip

    clip = _small_clip()
    torch.manual_seed(3)
    images, text = torch.randn(4, 3, 32, 32), torch.randint(1, 999, (4, 12))
    mlp = clip.visual.transformer.resblocks[0].mlp
    clip.zero_grad()
    ClipLoss()(clip.encode_image(images, normalize=True), clip.encode_text(text, normalize=True), clip.logit_scale.exp()).backward()
    score = ((mlp.c_fc.weight * mlp.c_fc.weight.grad).abs().sum(1) + (mlp.c_proj.weight * mlp.c_proj.weight.grad).abs().sum(0)
             + (mlp.c_fc.bias * mlp.c_fc.bias.grad).abs()).detach()
    clip.zero_grad()
    m = vlmoe.upcycle_open_clip(clip, num_experts=4, moe_layers="all", method="split",
                                importance_batches=[(images, text)], num_shared_neurons=8)
    assert set(_shared(m, 0)) == set(score.argsort(descending=True)[:8].tolist())
    magnitude = (mlp.c_fc.weight.norm(dim=1) * mlp.c_proj.weight.norm(dim=0)).detach()
    m = vlmoe.upcycle_open_clip(_small_clip(), num_experts=4, moe_layers="all", method="split", num_shared_neurons=8)
    assert set(_shared(m, 0)) == set(magnitude.argsort(descending=True)[:8].tolist())


def _gates_by_layer_and_modality(model, images, texts):
    """Router probabilities of every MoE call, captured with forward hooks on the routers."""
    from vlmoe.moe import current_routing_context

    seen = []

    def grab(mod, inp):
        x = inp[0].reshape(-1, mod.dim).detach().float()
        modality, mask = current_routing_context()
        g = (x @ mod.router.weight.detach().float().t()).softmax(-1)
        seen.append((modality, g if mask is None else g[mask.reshape(-1)]))

    hooks = [m.register_forward_pre_hook(grab) for m in model.moe_layers()]
    out = model(images, texts)
    for h in hooks:
        h.remove()
    return out, seen


def test_aux_loss_sums_every_layer_and_modality_with_their_own_weights_and_thresholds():
    """Planted: aux losses not summed over layers and modalities (0.0175 instead of 0.1023),
    the per-modality global_entropy_threshold not applied, a per-loss weight not applied.
    Recomputed here from the routers' probabilities: importance CV^2 and the entropies."""
    torch.manual_seed(0)
    model = vlmoe.create_model("limoe-tiny", moe={"noise_scale": 0.0, "importance_weight": 0.003,
                                                  "local_entropy_weight": 0.02, "global_entropy_weight": 0.05}).train()
    images = torch.randn(3, 3, 32, 32)
    texts = vlmoe.get_tokenizer(model)(["a cat", "two dogs on a red sofa", "x"])
    out, gates = _gates_by_layer_and_modality(model, images, texts)
    # call order: image tower (MoE blocks 1, 3), then text tower (1, 3); text without padding
    assert [m for m, _ in gates] == ["image", "image", "text", "text"]
    assert gates[2][1].shape[0] == int((texts != 0).sum())
    tau = {"image": 1.386294, "text": 0.693147}
    total = 0.0
    for modality, g in gates:
        imp = g.sum(0)
        cv2 = imp.var(unbiased=False) / imp.mean() ** 2
        h_tok = -(g * g.clamp_min(1e-20).log()).sum(-1).mean()
        p = g.mean(0)
        h_mean = -(p * p.clamp_min(1e-20).log()).sum()
        total += 0.003 * cv2 + 0.02 * h_tok + 0.05 * max(0.0, tau[modality] - float(h_mean))
    assert float(out["aux_loss"]) == pytest.approx(float(total), rel=1e-5, abs=1e-7)


MASKED_LOSSES = {
    "load": lambda g, l, m: losses.load_loss(l, l + 0.2 * torch.arange(l.shape[-1]), 0.5, 1, m),
    "balance": lambda g, l, m: losses.balance_loss(g, m),
    "z": lambda g, l, m: losses.z_loss(l, m),
    "importance": lambda g, l, m: losses.importance_loss(g, m),
    "local_entropy": lambda g, l, m: losses.local_entropy_loss(g, m),
    "global_entropy": lambda g, l, m: losses.global_entropy_loss(g, m),
}


@pytest.mark.parametrize("name", sorted(MASKED_LOSSES))
def test_every_loss_ignores_masked_tokens(name):
    """Planted: load, balance and z-loss ignoring the token mask. Padding with extreme
    logits must not change the loss of the real tokens."""
    torch.manual_seed(0)
    real = torch.randn(1, 6, 4)
    pad = torch.full((1, 3, 4), -20.0)
    pad[..., 1] = 25.0  # padding that would dominate expert 1 if it counted
    logits = torch.cat([real, pad], 1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    fn = MASKED_LOSSES[name]
    torch.testing.assert_close(fn(logits.softmax(-1), logits, mask), fn(real.softmax(-1), real, None))


def test_strict_loading_lists_missing_unexpected_and_mismatched_keys():
    """Planted: the error without the 'missing' list."""
    model = vlmoe.create_model("clip-tiny")
    sd = dict(model.state_dict())
    del sd["logit_scale"], sd["positional_embedding"]
    sd["extra.weight"] = torch.zeros(1)
    sd["text_projection"] = torch.zeros(3, 3)
    with pytest.raises(vlmoe.models.CheckpointError) as e:
        load_state_dict_strict(model, sd, source="ckpt")
    lines = str(e.value).splitlines()
    assert "  missing (2): logit_scale, positional_embedding" in lines
    assert "  unexpected (1): extra.weight" in lines
    assert any(line.startswith("  mismatched (1): text_projection: checkpoint (3, 3) vs model (") for line in lines)


def test_arch_at_path_loads_the_weights_in_path(tmp_path):
    """Planted: ARCH@PATH ignoring PATH (random weights evaluated)."""
    from safetensors.torch import save_file

    from vlmoe.models.factory import load_model

    torch.manual_seed(5)
    src = vlmoe.create_model("clip-tiny")
    path = tmp_path / "oc.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    loaded = load_model(f"clip-tiny@{path}")
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_expert_choice_capacity_above_the_group_size():
    """Planted: expert choice without min(capacity, S). Python's slicing clips the same way,
    so that mutant computes the same thing; what is pinned is the contract: with C > S every
    expert takes every real token, once, and never a masked one."""
    gates = torch.rand(2, 5, 3).softmax(-1)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    token, weight = expert_choice_route(gates, capacity=9, mask=mask)
    assert token.shape == (2, 3, 5)
    for g in range(2):
        for e in range(3):
            chosen = sorted(t for t in token[g, e].tolist() if t >= 0)
            assert chosen == [t for t in range(5) if mask[g, t]]


# -- promises in the README that no test checked -----------------------------------------------------
def test_auto_implementation_rule(monkeypatch):
    """README: `auto` takes the capacity buffers for top-1 routing at >= 85% fill, else the
    ragged path. Planted: the threshold ignored (always ragged)."""
    calls = []
    moe = SparseMoE(8, 16, num_experts=4, capacity_factor=1.0, multiple_of=1, noise_scale=0.0).eval()
    monkeypatch.setattr(moe.experts, "forward_buffers", lambda buf: calls.append("bmm") or torch.zeros_like(buf))
    real_forward = moe.experts.forward
    monkeypatch.setattr(moe.experts, "forward", lambda x, c: calls.append("ragged") or real_forward(x, c))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = torch.eye(4) * 5
    full = torch.zeros(8, 8)
    for i in range(8):
        full[i, i % 4] = 1.0  # 2 tokens per expert, capacity 2: 100% fill
    moe(full)
    skewed = torch.zeros(8, 8)
    skewed[:, 0] = 1.0  # all to expert 0: 2 of 8 slots used
    moe(skewed)
    moe.top_k = 2
    moe(full)
    assert calls == ["bmm", "ragged", "ragged"]


def test_upcycled_router_starts_near_zero():
    from test_moe_designs import _small_clip

    m = vlmoe.upcycle_open_clip(_small_clip(), num_experts=4, moe_layers="all", router_init_std=1e-3)
    for layer in m.moe_layers():
        std = float(layer.router.weight.std())
        assert 0.5e-3 < std < 1.5e-3, std


def test_learning_rate_is_linear_warmup_then_cosine():
    """README: linear warmup + cosine to min_lr_ratio * lr at max_steps. Planted: the
    warmup off by one step, the cosine without its min_lr floor."""
    module = LIMoEModule("clip-tiny", lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=14)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.25, 0.5, 0.75, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    assert lrs == pytest.approx(expected)


def _keys_of(ds, n):
    out = []
    for s in ds:
        out.append(s["key"])
        if len(out) == n:
            return out


def test_training_shards_resampled_with_a_seed_per_rank_and_worker(tmp_path, monkeypatch):
    """README: each rank and DataLoader worker draws its own shard sequence (and the same
    one again for the same rank, worker and seed). Planted: the rank left out of the seed."""
    for i in range(8):
        with ShardWriter(str(tmp_path / f"s{i}-%06d.tar")) as w:
            from test_first_contact import png

            w.write(f"shard{i}", png(), caption="x")
    urls = [str(tmp_path / f"s{i}-000000.tar") for i in range(8)]

    def keys(rank, seed=0):
        ds = make_dataset(urls, lambda im: im, lambda t: torch.zeros(1, 2), train=True, shuffle_buffer=0, seed=seed, rank=rank)
        return _keys_of(ds, 12)

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and keys(0) != keys(0, seed=1)
    assert _rank_worker_seed(rank=1) != _rank_worker_seed(rank=0)
    first_worker = keys(0)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: types.SimpleNamespace(id=1, num_workers=2))
    assert keys(0) != first_worker  # the second DataLoader worker of rank 0 draws its own sequence
    assert _rank_worker_seed(rank=0) == 1 and _rank_worker_seed(rank=1) == 1001


def test_pipe_urls_webp_and_json_fields(tmp_path):
    """README: `pipe:` commands and img2dataset's webp / json fields."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, format="WEBP", lossless=True)
    with ShardWriter(str(tmp_path / "w-%06d.tar")) as w:
        w.write("a", buf.getvalue(), caption="a green square", image_ext="webp", meta={"url": "http://x", "width": 20})
    path = str(tmp_path / "w-000000.tar")
    plain = list(make_dataset([path], lambda im: torch.tensor(list(im.getpixel((5, 5)))), lambda t: torch.zeros(1, 2), train=False))
    piped = list(make_dataset([f"pipe:cat {path}"], lambda im: torch.tensor(list(im.getpixel((5, 5)))), lambda t: torch.zeros(1, 2), train=False))
    assert len(plain) == len(piped) == 1
    assert plain[0]["image"].tolist() == piped[0]["image"].tolist() == [10, 200, 30]


def test_routing_picture_goes_to_tensorboard_when_the_logger_has_one(shards, tmp_path):
    """README: the routing picture is a PNG in <log_dir>/routing and is sent to TensorBoard
    (any logger whose experiment has add_figure)."""
    from lightning.pytorch.loggers import CSVLogger

    figures = []

    class FigureLogger(CSVLogger):
        @property
        def experiment(self):
            exp = super().experiment
            exp.add_figure = lambda tag, fig, step: figures.append((tag, step, fig.axes[0].get_title()))
            return exp

    module = LIMoEModule("limoe-tiny")
    dm = ClipDataModule(val_shards=shards["val"], batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=FigureLogger(str(tmp_path)), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(module, datamodule=dm)
    assert figures == [("val/routing", 0, "val routing at step 0")]
    assert module.last_routing_picture.is_file() and module.last_routing_picture.parent.name == "routing"


def test_expert_load_and_mean_gate_values():
    """README: statistics per call. Planted: mean_gate over padded tokens, expert_load not
    normalised by the kept choices. Hand computation on 3 real tokens."""
    moe = SparseMoE(3, 8, num_experts=3, capacity_factor=None, noise_scale=0.0).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    x = torch.tensor([[[2.0, 0, 0], [0, 1.0, 0], [3.0, 0, 0], [0, 0, 9.0]]])
    mask = torch.tensor([[True, True, True, False]])
    moe(x, mask=mask)
    st = moe.aux[None].stats
    g = F.softmax(x[0, :3], -1)
    torch.testing.assert_close(st["mean_gate"], g.mean(0))
    assert st["expert_load"].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_bf16_and_activation_checkpointing_are_active_in_the_fit_that_claims_them(shards, tmp_path, monkeypatch):
    """README: --trainer.precision bf16-mixed and --model.grad_checkpointing true. Planted:
    grad_checkpointing not applied by the module."""
    from vlmoe.cli import cli_main

    from test_train import fit_args

    calls = {"checkpoint": 0, "bf16": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls["checkpoint"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    orig_forward = SparseMoE.forward

    def record(self, x, *a, **k):
        calls["bf16"] += x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
        return orig_forward(self, x, *a, **k)

    monkeypatch.setattr(SparseMoE, "forward", record)
    cli = cli_main(fit_args(shards, tmp_path, steps=1, extra=["--trainer.precision=bf16-mixed", "--model.grad_checkpointing=true",
                                                               "--data.val_shards=null", "--data.zeroshot_shards=null"]))
    assert cli.trainer.global_step == 1
    assert calls["checkpoint"] >= 8  # 4 image + 4 text blocks of limoe-tiny, one training step
    assert calls["bf16"] >= 4  # every MoE call of the step ran under bf16 autocast


def test_expert_parallel_refuses_remote_evaluation_shards(shards):
    """README: EP evaluation needs each shard's sample count; a remote shard is refused."""
    dm = ClipDataModule(val_shards=f"{shards['val']}::pipe:cat {shards['val']}", batch_size=8, num_workers=0)
    dm.trainer = types.SimpleNamespace(world_size=2, global_rank=0, strategy=types.SimpleNamespace(requires_equal_eval_batches=True))
    with pytest.raises(vlmoe.VLMoEError, match="is not a local file. Copy the val shards to local disk"):
        dm.val_dataloader()


def test_log_all_to_all_false_drops_the_timing_sync(monkeypatch):
    """README: `log_all_to_all=false` removes the CUDA sync of the all-to-all timing (and the
    monitor callback). Only the strategy's own part of setup runs here (no process group)."""
    from lightning.pytorch.strategies import DDPStrategy

    from vlmoe.moe.comm import all_to_all_meter
    from vlmoe.train import ExpertParallelMonitor, ExpertParallelStrategy

    monkeypatch.setattr(DDPStrategy, "setup", lambda self, trainer: None)
    old = all_to_all_meter.sync_cuda
    try:
        for flag in (False, True):
            trainer = types.SimpleNamespace(callbacks=[])
            ExpertParallelStrategy(expert_parallel_size=2, log_all_to_all=flag).setup(trainer)
            assert all_to_all_meter.sync_cuda is flag
            assert any(isinstance(c, ExpertParallelMonitor) for c in trainer.callbacks) is flag
    finally:
        all_to_all_meter.sync_cuda = old
