"""Auxiliary-loss-free balancing (DeepSeek-V3's expert bias), shared experts (DeepSeekMoE /
Qwen2-MoE) and fine-grained experts, each against a computation written out here."""
from datetime import timedelta

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import vlmoe
from helpers import free_port, init_gloo, start_ranks
from vlmoe.data import collate
from vlmoe.errors import ConfigError
from vlmoe.moe import SparseMoE
from vlmoe.moe.routing import route
from vlmoe.train import LIMoEModule

D, H, E = 8, 16, 4


def expert(moe, e, x):
    ex = moe.experts
    return ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def skewed_layer(rate=0.01, **kw):
    """A router whose logits are the first E input features plus a fixed skew towards expert 0."""
    torch.manual_seed(0)
    moe = SparseMoE(D, H, num_experts=E, noise_scale=0.0, capacity_factor=None, balance="bias", bias_update_rate=rate,
                    implementation="loop", **kw)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, D))
    return moe


def skewed_inputs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * 0.5
    x[:, 0] += 1.0  # expert 0 wins most tokens
    return x


def test_route_selection_bias_changes_the_choice_not_the_weights():
    gates = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.35, 0.25]])
    r = route(gates, 1, None, selection_bias=torch.tensor([-0.25, 0.0, 0.0]))
    # token 0: 0.25 < 0.3 -> expert 1; token 2: 0.15 < 0.35 -> expert 1
    assert r.expert_index[:, 0].tolist() == [1, 1, 1]
    torch.testing.assert_close(r.combine_weight[:, 0], torch.tensor([0.3, 0.6, 0.35]))
    # BPR orders tokens by their unbiased top gate: token 1 (0.6) first, then token 2 (0.35), then 0
    r = route(gates, 1, 2, batch_priority=True, selection_bias=torch.tensor([-0.25, 0.0, 0.0]))
    assert r.slot[:, 0].tolist() == [-1, 0, 1]
    with pytest.raises(ConfigError, match="one value per expert"):
        route(gates, 1, None, selection_bias=torch.zeros(2))


def test_bias_brings_the_load_ratio_down_and_never_touches_the_combine_weights():
    moe = skewed_layer(rate=0.02).train()
    x = skewed_inputs()
    ratios = []
    for step in range(60):
        bias = moe.expert_bias.clone()
        y = moe(x)
        load = moe.update_bias()
        ratios.append(float(load.max() / load.min().clamp_min(1)))
        if step in (0, 59):  # the output: unbiased softmax weights of the experts the biased scores chose
            with torch.no_grad():
                gates = F.softmax(x @ torch.eye(E, D).t(), -1)
                chosen = (gates + bias).argmax(-1)
                ref = torch.stack([gates[t, chosen[t]] * expert(moe, int(chosen[t]), x[t:t + 1])[0] for t in range(len(x))])
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        if step == 0:
            assert moe.expert_bias.abs().max() == pytest.approx(0.02)  # one step of +-rate
    assert ratios[0] > 4 and ratios[-1] < 1.6, ratios[::10]
    # the update rule: +rate for under-loaded experts, -rate for over-loaded ones
    before = moe.expert_bias.clone()
    moe(x)
    load = moe.balancer.load.clone()
    moe.update_bias()
    torch.testing.assert_close(moe.expert_bias - before, 0.02 * torch.sign(load.mean() - load))
    # evaluation forwards neither count loads nor move the bias
    moe.eval()(x)
    assert moe.balancer.load.sum() == 0


def test_bias_is_a_saved_buffer_not_a_parameter(tmp_path):
    moe = skewed_layer()
    moe.train()(skewed_inputs())
    moe.update_bias()
    assert "balancer.expert_bias" in moe.state_dict() and "balancer.load" not in moe.state_dict()
    assert all("bias" not in n or n.endswith(("b1", "b2")) for n, _ in moe.named_parameters())
    model = vlmoe.create_model("limoe-tiny", moe={"balance": "bias"})
    with torch.no_grad():
        for m in model.moe_layers():
            m.expert_bias.copy_(torch.linspace(-1, 1, m.num_experts))
    again = vlmoe.create_model(vlmoe.save_pretrained(model, tmp_path / "export"))
    for a, b in zip(model.moe_layers(), again.moe_layers()):
        torch.testing.assert_close(a.expert_bias, b.expert_bias)
    # the optimizer never sees it
    module = LIMoEModule("limoe-tiny", model_overrides={"moe": {"balance": "bias"}})
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(m.expert_bias) in in_opt for m in module.model.moe_layers())
    # V-MoE's balance losses are off by default under bias balancing, given ones are kept
    assert moe.options.importance_weight == 0.0 and moe.options.load_weight == 0.0
    assert SparseMoE(D, H, num_experts=E, balance="bias", importance_weight=0.1).options.importance_weight == 0.1


def test_checkpointed_recompute_is_not_counted_twice():
    loads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = vlmoe.create_model("limoe-tiny", moe={"balance": "bias", "noise_scale": 0.0}).train()
        model.set_grad_checkpointing(ckpt)
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        texts = vlmoe.get_tokenizer(16)(["a b c", "d e", "f g h i", "j"])
        out = model(images, texts)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
        loads.append([m.balancer.load.clone() for m in model.moe_layers()])
    for a, b in zip(*loads):
        torch.testing.assert_close(a, b)
        assert a.sum() > 0


def test_bad_balance_settings():
    with pytest.raises(ConfigError, match="expert choice"):
        SparseMoE(D, H, num_experts=E, router="expert_choice", balance="bias")
    with pytest.raises(ConfigError, match="bias_update_rate"):
        SparseMoE(D, H, num_experts=E, balance="bias", bias_update_rate=0.0)
    with pytest.raises(ConfigError, match="unknown balance"):
        SparseMoE(D, H, num_experts=E, balance="aux-free")
    with pytest.raises(ConfigError, match="expert choice"):
        vlmoe.create_model("limoe-tiny", moe={"balance": "bias", "router": "expert_choice"})


def two_modality_inputs():
    """Image patches leaning to expert 0 and fewer text tokens leaning to expert 1 (a shared layer's
    two modalities, the patches ~5x the text tokens)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(256, D, generator=g) * 0.5
    img[:, 0] += 1.0
    txt = torch.randn(48, D, generator=g) * 0.5
    txt[:, 1] += 1.0
    return img, txt


def test_bias_per_modality_balances_each_modality_where_one_bias_leaves_text_collapsed():
    img, txt = two_modality_inputs()
    ratio = {}
    for per_modality in (False, True):
        moe = skewed_layer(rate=0.02, bias_per_modality=per_modality).train()
        for _ in range(80):
            moe(img, modality="image")
            moe(txt, modality="text")
            moe.update_bias()
        loads = {m: moe.aux[m].stats["tokens_per_expert"] for m in ("image", "text")}
        ratio[per_modality] = {m: float(v.max() / v.min().clamp_min(1)) for m, v in loads.items()}
    assert ratio[False]["text"] > 10 and ratio[True]["text"] < 2 and ratio[True]["image"] < 2, ratio
    # each row moves by its own modality's loads only: after an image-only step the text row stays
    moe = skewed_layer(rate=0.02, bias_per_modality=True).train()
    moe(img, modality="image")
    load = moe.balancer.load.clone()
    assert load[1].sum() == 0 and load[0].sum() == len(img)
    moe.update_bias()
    torch.testing.assert_close(moe.expert_bias[0], 0.02 * torch.sign(load[0].mean() - load[0]))
    assert moe.expert_bias[1].abs().sum() == 0


def test_bias_per_modality_selects_with_the_tokens_own_row_also_in_joint_routing():
    img, txt = two_modality_inputs()
    moe = skewed_layer(bias_per_modality=True).train()
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([[-0.3, 0.0, 0.1, 0.0], [0.0, -0.3, 0.0, 0.2]]))
    gates = {m: F.softmax(x @ torch.eye(E, D).t(), -1) for m, x in (("image", img), ("text", txt))}

    def reference(m, x):  # the unbiased weight of the expert the modality's biased gates choose
        chosen = (gates[m] + moe.expert_bias[("image", "text").index(m)]).argmax(-1)
        return torch.stack([gates[m][t, chosen[t]] * expert(moe, int(chosen[t]), x[t:t + 1])[0] for t in range(len(x))])

    with torch.no_grad():
        ref = {"image": reference("image", img), "text": reference("text", txt)}
        for m, x in (("image", img), ("text", txt)):
            torch.testing.assert_close(moe(x, modality=m), ref[m], rtol=1e-5, atol=1e-6)
        joint = moe.forward_joint({"image": (img, None), "text": (txt, None)})  # dropless: = per modality
        for m in ("image", "text"):
            torch.testing.assert_close(joint[m], ref[m], rtol=1e-5, atol=1e-6)
    moe.balancer.load.zero_()  # the training-mode forwards above counted too
    moe.forward_joint({"image": (img, None), "text": (txt, None)})  # counted per modality in joint calls too
    counts = torch.stack([torch.bincount((gates[m] + moe.expert_bias[i]).argmax(-1), minlength=E)
                          for i, m in enumerate(("image", "text"))]).float()
    torch.testing.assert_close(moe.balancer.load, counts)


def test_bias_per_modality_in_models_checkpoints_and_errors(tmp_path):
    model = vlmoe.create_model("limoe-tiny", moe={"balance": "bias", "bias_per_modality": True})
    with torch.no_grad():
        for m in model.moe_layers():
            assert m.expert_bias.shape == (2, m.num_experts)
            m.expert_bias.copy_(torch.randn(2, m.num_experts))
    again = vlmoe.create_model(vlmoe.save_pretrained(model, tmp_path / "export"))
    for a, b in zip(model.moe_layers(), again.moe_layers()):
        torch.testing.assert_close(a.expert_bias, b.expert_bias)
    images, texts = torch.randn(2, 3, 32, 32), vlmoe.get_tokenizer(16)(["a b", "c"])
    torch.testing.assert_close(model.eval()(images, texts)["text_features"], again.eval()(images, texts)["text_features"])
    with pytest.raises(ConfigError, match="needs balance='bias'"):
        SparseMoE(D, H, num_experts=E, bias_per_modality=True)
    with pytest.raises(ConfigError, match="routing_context"):
        skewed_layer(bias_per_modality=True)(torch.randn(4, D))  # no modality: which row?


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.texts = vlmoe.get_tokenizer(16)([f"caption {i} " + "word " * (i % 4) for i in range(n)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "text": self.texts[i], "skipped": 0}


class HalfPerRank(torch.utils.data.Sampler):
    """Samples 8k..8k+7 for step k: all of them in one process, rank r's half of them
    (8k + 4r ... 8k + 4r + 3) under 2-process DDP, so every step sees the same 8 samples."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return iter(range(self.n))
        r = dist.get_rank()
        return iter([i for k in range(0, self.n, 8) for i in range(k + 4 * r, k + 4 * r + 4)])

    def __len__(self):
        import torch.distributed as dist

        return self.n // (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)


class SaveBias(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save([m.expert_bias.clone() for m in pl_module.model.moe_layers()], f"{self.path}.rank{trainer.global_rank}")


def _fit_bias(devices, per_device_batch, path, steps=2, accumulate=1, per_modality=False):
    torch.manual_seed(0)
    moe = {"balance": "bias", "bias_update_rate": 0.01, "noise_scale": 0.0, "bias_per_modality": per_modality}
    module = LIMoEModule("limoe-tiny", model_overrides={"moe": moe},
                         warmup_steps=1, lr=0.0)
    strategy = (L.pytorch.strategies.DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60))
                if devices > 1 else "auto")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, accumulate_grad_batches=accumulate,
                        default_root_dir=str(path.parent), callbacks=[SaveBias(path)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    n = 8 * steps * accumulate
    trainer.fit(module, train_dataloaders=DataLoader(PairDataset(n), batch_size=per_device_batch, sampler=HalfPerRank(n),
                                                     collate_fn=collate))
    return [torch.load(f"{path}.rank{r}", weights_only=True) for r in range(devices)]


def test_bias_is_the_same_on_every_rank_and_equals_one_process(tmp_path):
    """Each of 2 gloo ranks routes half of every batch; the loads are summed before the update,
    so both ranks hold the bias one process computes from the whole batch (the selection does
    not depend on how the batch is split: no capacity, no noise, lr 0). One bias per modality:
    `update_biases` sums every layer's loads in one all_reduce whatever their shape, so the
    [E] bias takes the same path (its single-process updates are tested above); a 2-rank
    Lightning launch costs half a minute here."""
    single = _fit_bias(1, 8, tmp_path / "single", steps=3, per_modality=True)[0]
    ranks = _fit_bias(2, 4, tmp_path / "ddp", steps=3, per_modality=True)
    for layer in range(len(single)):
        assert single[layer].shape == (2, 8)
        torch.testing.assert_close(ranks[0][layer], ranks[1][layer], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][layer], single[layer], rtol=0, atol=0)
        assert single[layer].abs().max() > 0


def _update_biases_worker(rank, world, port, out):
    from vlmoe.moe.balance import BiasBalance, update_biases

    init_gloo(rank, world, port)
    try:
        plain, per_modality = BiasBalance(4, 0.01, False), BiasBalance(4, 0.01, True)
        plain.load.copy_(torch.tensor([[3.0, 0, 1, 0], [0, 0, 1, 4]][rank]))
        per_modality.load.copy_(torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 3.0], [0, 0, 0, 0]]][rank]))
        loads = update_biases([plain, per_modality])
        torch.save({"loads": loads, "bias": [plain.expert_bias, per_modality.expert_bias]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_update_biases_sums_every_layers_loads_over_the_ranks(tmp_path):
    """Two ranks, a [E] bias and a [modality, E] bias in one call: each rank steps with the
    loads summed over both ranks, worked out by hand. Planted: each rank stepping with its own
    loads (rank 0 alone would give [-1, +1, 0, +1] and, for the image row, [-1, +1, +1, +1])."""
    start_ranks(_update_biases_worker, 2, 2, free_port(), str(tmp_path))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loads"][0], torch.tensor([3.0, 0, 2, 4]))
        torch.testing.assert_close(got["loads"][1], torch.tensor([[1.0, 0, 0, 3], [0, 0, 0, 0]]))
        # mean 2.25 against [3, 0, 2, 4]; image row mean 1 against [1, 0, 0, 3]; text saw no token
        torch.testing.assert_close(got["bias"][0], 0.01 * torch.tensor([-1.0, 1, 1, -1]))
        torch.testing.assert_close(got["bias"][1], 0.01 * torch.tensor([[0.0, 1, 1, -1], [0, 0, 0, 0]]))


def test_bias_moves_once_per_optimizer_step_under_accumulation(tmp_path):
    bias = _fit_bias(1, 4, tmp_path / "acc", steps=2, accumulate=3)[0]
    for b in bias:  # 2 optimizer steps (6 micro-batches) of +-0.01 each: every entry within +-0.02
        steps = b / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-5) and steps.abs().max() <= 2 and steps.abs().max() > 0
    assert max(int((b / 0.01).round().abs().max()) for b in bias) == 2  # an expert off balance both times


# -- shared experts ---------------------------------------------------------------------------

def test_shared_expert_is_a_dense_mlp_added_to_the_routed_output():
    torch.manual_seed(0)
    kw = dict(num_experts=E, top_k=2, capacity_factor=1.0, noise_scale=0.0, implementation="loop")
    plain = SparseMoE(D, H, **kw).eval()
    shared = SparseMoE(D, H, num_shared_experts=2, **kw).eval()
    gated = SparseMoE(D, H, num_shared_experts=2, shared_expert_gate=True, **kw).eval()
    for m in (shared, gated):
        m.router.load_state_dict(plain.router.state_dict())
        m.experts.load_state_dict(plain.experts.state_dict())
        torch.nn.init.normal_(m.shared_experts.w1, std=0.3)
        torch.nn.init.normal_(m.shared_experts.b2, std=0.3)
    torch.nn.init.normal_(gated.shared_gate.weight)
    x = torch.randn(3, 5, D)
    routed = plain(x)

    def mlp(m, x):  # the dense MLP of width 2H, written out
        s = m.shared_experts
        return F.gelu(x @ s.w1[0] + s.b1[0]) @ s.w2[0] + s.b2[0]

    assert shared.shared_experts.w1.shape == (1, D, 2 * H)
    torch.testing.assert_close(shared(x), routed + mlp(shared, x))
    gate = torch.sigmoid(x @ gated.shared_gate.weight.t())
    torch.testing.assert_close(gated(x), routed + gate * mlp(gated, x))
    with torch.no_grad():  # a gate at 1 is the plain shared expert
        gated.shared_gate.weight.zero_()
        gated.shared_experts.load_state_dict(shared.shared_experts.state_dict())
    torch.testing.assert_close(gated(x), routed + 0.5 * mlp(shared, x))
    with pytest.raises(ConfigError, match="num_shared_experts"):
        SparseMoE(D, H, shared_expert_gate=True)


def test_shared_experts_in_joint_routing_and_in_models():
    torch.manual_seed(0)
    m = SparseMoE(D, H, num_experts=E, capacity_factor=None, noise_scale=0.0, num_shared_experts=1, implementation="loop").train()
    img, txt = torch.randn(2, 6, D), torch.randn(2, 4, D)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = m.forward_joint({"image": (img, None), "text": (txt, mask)})
    base = {k: m(v[0], v[1], k) for k, v in {"image": (img, None), "text": (txt, mask)}.items()}  # dropless: same routing
    torch.testing.assert_close(out["image"], base["image"])
    torch.testing.assert_close(out["text"][mask], base["text"][mask])
    model = vlmoe.create_model("limoe-tiny", moe={"num_shared_experts": 1, "shared_expert_gate": True})
    assert all(l.shared_experts is not None and l.shared_gate is not None for l in model.moe_layers())


# -- fine-grained experts ------------------------------------------------------------------------

def _flops(fn) -> int:
    with FlopCounterMode(display=False) as c:
        fn()
    return int(c.get_total_flops())


def test_granularity_keeps_the_active_flops():
    """m x the experts, m x top_k, each 1/m as wide: the expert matmul FLOPs of a dropless
    forward are those of m=1; only the router's E x D grows (2 T D (mE - E) more)."""
    T, dim, h = 64, 32, 128
    x = torch.randn(T, dim)
    flops = {}
    for m in (1, 4):
        torch.manual_seed(0)
        layer = SparseMoE(dim, h // m, num_experts=8 * m, top_k=1 * m, capacity_factor=None, implementation="loop").eval()
        flops[m] = _flops(lambda: layer(x))
    assert flops[4] - flops[1] == 2 * T * dim * (32 - 8)
    assert flops[1] == 2 * T * dim * 8 + T * (2 * dim * h + 2 * h * dim)  # router + one full-width expert per token
    # in the models: MoEConfig.granularity, and vlmoe-info's GFLOPs
    from vlmoe.models.stats import model_stats

    base, fine = vlmoe.create_model("limoe-tiny"), vlmoe.create_model("limoe-tiny", moe={"granularity": 4})
    layer = fine.moe_layers()[0]
    assert (layer.num_experts, layer.top_k, layer.hidden_dim) == (32, 4, 128)
    a, b = model_stats(base), model_stats(fine)
    image_tokens, text_tokens, layers = 65, 16, 2
    assert b["flops_image"] - a["flops_image"] == 2 * image_tokens * 128 * 24 * layers
    assert b["flops_text"] - a["flops_text"] == 2 * text_tokens * 128 * 24 * layers
    # 2 distinct layers (shared between towers), each 24 more router rows and 24 more output biases
    assert b["total_params"] - a["total_params"] == 2 * (24 * 128 + 24 * 128)
    with pytest.raises(ConfigError, match="granularity=3 must divide the expert width 512"):
        vlmoe.create_model("limoe-tiny", moe={"granularity": 3})
    with pytest.raises(ConfigError, match="granularity must be an integer"):
        vlmoe.create_model("limoe-tiny", moe={"granularity": 0})
