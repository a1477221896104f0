import math

import pytest
import torch
from timm.layers import Mlp

from vlmoe.moe import SparseMoE, collect_aux, routing_context
from vlmoe.moe import losses
import torch.nn.functional as F
from vlmoe.moe.routing import expert_choice_route
from helpers import constant_experts, expert_out


def make(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_experts", 4)
    return SparseMoE(16, 32, **kw)


def per_token_reference(moe: SparseMoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Dense per-token loop: out = sum_k w_k * expert_k(x) over the token's top-k (dropless)."""
    gates = moe.router_logits(x_TD).softmax(-1)
    out = torch.zeros_like(x_TD)
    ex = moe.experts
    for t in range(x_TD.shape[0]):
        w, idx = torch.sort(gates[t], descending=True, stable=True)
        w, idx = w[: moe.top_k], idx[: moe.top_k]
        if moe.normalize_combine_weights:
            w = w / w.sum()
        for wk, e in zip(w, idx):
            h = ex.act(x_TD[t] @ ex.w1[e] + ex.b1[e])
            out[t] += wk * (h @ ex.w2[e] + ex.b2[e])
    return out


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, False), (2, True), (3, True)])
def test_dropless_equals_per_token_loop(top_k, normalize):
    moe = make(top_k=top_k, capacity_factor=None, normalize_combine_weights=normalize).eval()
    x = torch.randn(2, 7, 16)
    y = moe(x)
    torch.testing.assert_close(y.reshape(-1, 16), per_token_reference(moe, x.reshape(-1, 16)), atol=1e-5, rtol=1e-5)


def test_one_expert_equals_dense_mlp():
    torch.manual_seed(0)
    mlp = Mlp(16, 32)
    moe = SparseMoE(16, 32, num_experts=1, top_k=1, capacity_factor=None, normalize_combine_weights=True).eval()
    with torch.no_grad():
        moe.experts.w1[0].copy_(mlp.fc1.weight.t())
        moe.experts.b1[0].copy_(mlp.fc1.bias)
        moe.experts.w2[0].copy_(mlp.fc2.weight.t())
        moe.experts.b2[0].copy_(mlp.fc2.bias)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x), mlp(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "expert_choice"])
@pytest.mark.parametrize("capacity_factor,group_size", [(1.0, None), (1.0, 10), (None, None)])
def test_bmm_grouped_mm_and_loop_agree(router, capacity_factor, group_size):
    if router == "expert_choice" and capacity_factor is None:
        pytest.skip("expert choice always has a capacity")
    x = torch.randn(4, 9, 16, requires_grad=True)
    outs, grads = [], []
    for impl in ("bmm", "grouped_mm", "loop"):
        moe = make(router=router, implementation=impl, capacity_factor=capacity_factor, group_size=group_size, top_k=None).eval()
        y = moe(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters()} | {"x": x.grad.clone()})
        x.grad = None
    assert outs[0].abs().sum() > 0
    for i in (1, 2):
        torch.testing.assert_close(outs[0], outs[i], atol=1e-5, rtol=1e-5)
        for k in grads[0]:
            torch.testing.assert_close(grads[0][k], grads[i][k], atol=1e-5, rtol=1e-5, msg=k)


def test_gradients_reach_router_and_every_used_expert():
    moe = make(top_k=2, capacity_factor=2.0).train()
    x = torch.randn(8, 16, 16)
    y = moe(x)
    loss = y.square().mean() + collect_aux(moe)[0]
    loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = moe.aux[None].stats["tokens_per_expert"] > 0
    per_expert = moe.experts.w1.grad.abs().sum((1, 2))
    assert used.all() and (per_expert[used] > 0).all()


def test_capacity_and_dropped_tokens_get_zero_output():
    moe = make(num_experts=4, capacity_factor=0.25, batch_priority=True).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # push every token towards expert 0
    x = torch.randn(1, 40, 16).abs()
    y = moe(x)
    stats = moe.aux[None].stats
    cap = int(stats["capacity"])
    assert cap == 4 and stats["tokens_per_expert"].max() <= cap
    zero_rows = (y[0].abs().sum(-1) == 0).sum().item()
    assert zero_rows == 40 - int(stats["tokens_per_expert"].sum())
    assert stats["dropped_token_frac"].item() == pytest.approx(zero_rows / 40)


def test_token_mask_takes_no_capacity_and_no_loss():
    """7 real tokens of 12 positions in one group (eval_routing='batch'), E=4, cf=1,
    multiple_of=1: capacity ceil(7 / 4) = 2 from the real tokens (3 from the 12 positions)."""
    moe = make(local_entropy_weight=0.1, global_entropy_weight=0.1, eval_routing="batch", multiple_of=1).eval()  # one group
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
    y = moe(x, mask=mask)
    assert (y[~mask] == 0).all()
    stats = moe.aux[None].stats
    assert stats["num_tokens"].item() == 7 and float(stats["capacity"]) == 2
    assert stats["tokens_per_expert"].max().item() <= 2
    # the same real tokens alone give the same outputs and losses
    y2 = moe(x[mask].unsqueeze(0))
    assert float(moe.aux[None].stats["capacity"]) == 2
    torch.testing.assert_close(y[mask], y2[0])
    aux_masked = {k: v.item() for k, v in moe.aux[None].losses.items()}
    moe(x, mask=mask)
    for k, v in moe.aux[None].losses.items():
        assert v.item() == pytest.approx(aux_masked[k], rel=1e-5), k


def test_routing_context_sets_modality_and_mask():
    moe = make(modality_overrides={"text": {"capacity_factor": None}})
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    with routing_context("text", mask):
        y = moe(x)
    with routing_context("image"):
        moe(x)
    assert set(moe.aux) == {"text", "image"}
    assert moe.aux["text"].stats["num_tokens"] == 6 and moe.aux["text"].stats["capacity"] == -1
    assert moe.aux["image"].stats["capacity"] > 0
    assert (y[:, 3:] == 0).all()
    total, metrics = collect_aux(moe)
    assert "moe/layer/text/tokens_per_expert" in metrics and "moe/layer/image/load_loss" in metrics
    assert total.requires_grad


def test_noisy_gating_train_vs_eval():
    moe = make(noise_scale=1.0)
    x = torch.randn(4, 8, 16)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    assert "load" not in moe.aux[None].losses  # load loss needs noise
    moe.train()
    torch.manual_seed(1)
    a = moe(x)
    assert "load" in moe.aux[None].losses
    torch.manual_seed(2)
    assert not torch.equal(a, moe(x))


def test_gshard_random_second_expert():
    moe = make(router="gshard", capacity_factor=None).train()
    x = torch.randn(4, 64, 16)
    moe(x)
    kept = moe.aux[None].stats["tokens_per_expert"].sum().item()
    assert 256 < kept < 512  # every first choice, only some second choices
    moe.eval()
    moe(x)
    assert moe.aux[None].stats["tokens_per_expert"].sum().item() == 512
    # eval combine weights are the top-2 gates normalised over the two
    y = moe(x[:1, :3])
    ref = per_token_reference(make(router="gshard", capacity_factor=None, normalize_combine_weights=True).eval(), x[0, :3])
    torch.testing.assert_close(y[0], ref, atol=1e-5, rtol=1e-5)


def test_switch_and_expert_choice():
    moe = make(router="switch")
    moe(torch.randn(2, 8, 16))
    assert set(moe.aux[None].losses) == {"balance"}
    ec = make(router="expert_choice", capacity_factor=1.0)
    ec(torch.randn(2, 8, 16))
    assert ec.aux[None].stats["tokens_per_expert"].tolist() == [4.0] * 4


def test_groups():
    moe = make(group_size=5, eval_routing="batch").eval()  # the training grouping at eval
    x = torch.randn(1, 12, 16)
    y = moe(x)  # groups of 5, 5, 2 (padded)
    parts = [moe(x[:, i : i + 5]) for i in (0, 5, 10)]
    torch.testing.assert_close(y, torch.cat(parts, 1))


def test_autocast_bf16():
    moe = make(top_k=2)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        assert moe.router_logits(x.reshape(-1, 16)).dtype == torch.float32
    assert y.dtype == torch.float32
    y.sum().backward()
    assert moe.experts.w1.grad is not None


def test_bad_input():
    with pytest.raises(ValueError, match="unknown router"):
        SparseMoE(16, 32, 4, router="hash")
    with pytest.raises(ValueError, match="top_k"):
        SparseMoE(16, 32, 4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoE(16, 32, 4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="unknown routing option"):
        SparseMoE(16, 32, 4, modality_overrides={"text": {"capacity": 2}})
    moe = make()
    with pytest.raises(ValueError, match="expects"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match="mask"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(2, 4, dtype=torch.bool))
    # Non-finite router logits are noted on the device (no host sync in the step) and
    # raised by check_finite, which names the layer and then starts afresh.
    from vlmoe.moe import check_finite

    model = torch.nn.Sequential(make(), moe)
    model(torch.randn(2, 3, 16))
    check_finite(model)  # finite so far: nothing raised
    with torch.no_grad():
        moe.router.weight[0, 0] = math.inf
    model(torch.randn(2, 3, 16))
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN/inf\) in 1 since"):
        check_finite(model)
    check_finite(model)  # reset: the same NaN is not reported twice


def _all_to_expert_0(moe: SparseMoE) -> None:
    """Expert 0 wins every token whose x[0] > 0 (the next experts tie at 0: lowest index)."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0


@pytest.mark.parametrize("router,k", [("topk", 1), ("switch", 1), ("gshard", 2), ("expert_choice", 1)])
@pytest.mark.parametrize("mode", ["train", "eval batch"])
def test_batch_level_capacity_comes_from_real_tokens(router, k, mode):
    """Issue #24: planted `n_valid = S` in the batch-level capacity (training, and
    eval_routing='batch'). 4 captions of 16 positions, 3 real tokens each, form one group
    of 64 positions with 12 real tokens. E=4, cf=1, multiple_of=1: capacity
    ceil(12 k / 4) = 3k from the real tokens, 16k from the padded length. Every real token
    prefers expert 0, so expert 0 keeps exactly the capacity (expert choice: each expert
    takes C = 3 of the 12 real tokens)."""
    moe = SparseMoE(4, 8, num_experts=4, capacity_factor=1.0, router=router, multiple_of=1, noise_scale=0.0,
                    eval_routing="batch").train(mode == "train")
    _all_to_expert_0(moe)
    x = torch.zeros(4, 16, 4)
    x[..., 0] = 1.0
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :3] = True
    moe(x, mask=mask, modality="text")
    st = moe.aux["text"].stats
    if router == "expert_choice":
        assert st["tokens_per_expert"].tolist() == [3.0] * 4
    else:
        assert float(st["capacity"]) == 3 * k
        assert float(st["tokens_per_expert"][0]) == 3 * k
    assert float(st["num_tokens"]) == 12


@pytest.mark.parametrize("router", ["topk", "switch", "gshard"])
def test_layer_losses_never_see_what_padding_holds(router):
    """Issue #24: planted, the layer calling the load loss or the z-loss (or any other) without
    the token mask. In training, with noisy gating and every loss weighted, two batches that
    differ only in what their padding positions hold (same shapes, same noise draws) give
    the same losses, bit for bit; unmasked, the padding's logits would enter them."""
    weights = dict(importance_weight=0.1, load_weight=0.1, balance_weight=0.1, z_loss_weight=0.1,
                   local_entropy_weight=0.1, global_entropy_weight=0.1, global_entropy_threshold=1.0)
    moe = make(router=router, noise_scale=1.0, **weights).train()
    x = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, :4] = True
    x_other = x.clone()
    x_other[~mask] = 30 * torch.randn(int((~mask).sum()), 16)
    out = []
    for inp in (x, x_other):
        torch.manual_seed(1)
        moe(inp, mask=mask, modality="text")
        out.append({k: v.detach().clone() for k, v in moe.aux["text"].losses.items()})
    assert set(out[0]) == {"importance", "load", "balance", "z", "local_entropy", "global_entropy"}
    for name in out[0]:
        assert torch.equal(out[0][name], out[1][name]), (name, out[0][name], out[1][name])
    assert out[0]["z"] > 0 and out[0]["load"] > 0


# -- moved from test_first_contact (issues #11, #16) -------------------------------------------------


# -- 4, 5: padding takes no capacity, all-padding groups do not dilute the losses -------------------
@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "expert_choice"])
def test_padding_takes_no_capacity_under_every_router(router):
    """Defect 4 (expert choice sized capacity from the padded length); also issue #16's
    planted `n_valid = S` (capacity from the padded length for every router). With 8 real tokens of
    40 and E=4, cf=0.5, multiple_of=1 the capacity is 1 (top-1) from the real tokens, 5 from
    the padded length: padding would let more real tokens through."""
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, capacity_factor=0.5, router=router, multiple_of=1).eval()
    real = torch.randn(1, 8, 16)
    padded = torch.cat([real, torch.randn(1, 32, 16)], 1)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[:, :8] = True
    y_real = moe(real)
    cap_real = float(moe.aux[None].stats["capacity"]) if router != "expert_choice" else None
    y_pad = moe(padded, mask=mask)
    torch.testing.assert_close(y_pad[:, :8], y_real, atol=1e-6, rtol=1e-5)
    assert (y_pad[:, 8:] == 0).all()
    if cap_real is not None:
        assert float(moe.aux[None].stats["capacity"]) == cap_real
    assert float(moe.aux[None].stats["dropped_token_frac"]) > 0  # capacity binds, so the test can see a change


LOSSES = {
    "importance": lambda g, l, m: losses.importance_loss(g, m),
    "load": lambda g, l, m: losses.load_loss(l, l + 0.3, 0.5, 1, m),
    "balance": lambda g, l, m: losses.balance_loss(g, m),
    "z": lambda g, l, m: losses.z_loss(l, m),
    "local_entropy": lambda g, l, m: losses.local_entropy_loss(g, m),
    "global_entropy": lambda g, l, m: losses.global_entropy_loss(g, m, threshold=1.5),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_average_ignores_all_padding_groups(name):
    """Defect 5: groups holding only padding added zeros (or tau) to the per-group mean."""
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 4)
    gates = logits.softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    fn = LOSSES[name]
    with_empty = fn(gates, logits, mask)
    real_only = fn(gates[:2], logits[:2], mask[:2])
    torch.testing.assert_close(with_empty, real_only)
    # and the real groups are averaged: the mean of each group's own loss
    each = torch.stack([fn(gates[i:i + 1], logits[i:i + 1], mask[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(with_empty, each.mean())


def test_switch_and_gshard_place_tokens_by_position_by_default():
    """Defect 7: Switch and GShard drop by position; V-MoE's top-k keeps BPR."""
    assert SparseMoE(8, router="switch").options.batch_priority is False
    assert SparseMoE(8, router="gshard").options.batch_priority is False
    assert SparseMoE(8, router="topk").options.batch_priority is True
    assert SparseMoE(8, router="switch", batch_priority=True).options.batch_priority is True
    # Every token prefers expert 0; capacity 2: position keeps tokens 0 and 1, whatever their gates.
    moe = SparseMoE(4, 8, num_experts=2, router="switch", capacity_factor=1.0, multiple_of=1).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0], [4.0, 0, 0, 0]])
    moe(x)
    kept = moe(x).abs().sum(-1) > 0
    assert kept.tolist() == [True, True, False, False]


# -- moved from test_promises (issues #11, #16) ------------------------------------------------------


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
    """docs/layer.md: `auto` computes the capacity path on the static capacity buffers,
    whatever the fill or top_k (no host sync), and dropless routing on the ragged rows.
    Planted: the old fill threshold (ragged when the buffers are mostly empty, or for top-2)."""
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
    moe.configure_eval(eval_routing="dropless")
    moe(full)
    assert calls == ["bmm", "bmm", "bmm", "ragged"]


def test_top1_effective_experts_count_first_choices_of_real_tokens():
    """Issue #27's collapse measure: exp(H) of the share of real tokens whose top-1 choice is
    each expert, before capacity. Planted: padding counted, kept assignments counted instead of
    first choices, the mean gate's entropy instead. Hand computation on 4 real tokens."""
    moe = SparseMoE(3, 8, num_experts=3, capacity_factor=0.5, multiple_of=1, noise_scale=0.0).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    # first choices 0, 0, 0, 1 (nearly even gates); the padded token would pick expert 2
    x = torch.tensor([[[0.3, 0, 0], [0.2, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [0, 0, 9.0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    moe(x, mask=mask)
    st = moe.aux[None].stats
    assert st["top1_per_expert"].tolist() == [3.0, 1.0, 0.0]
    share = torch.tensor([0.75, 0.25])
    assert float(st["effective_experts_top1"]) == pytest.approx(float(torch.exp(-(share * share.log()).sum())), rel=1e-6)
    # capacity ceil(4 * 0.5 / 3) = 1: expert 0 keeps one of its three, so kept counts differ
    assert st["tokens_per_expert"].tolist() == [1.0, 1.0, 0.0]
    assert float(st["effective_experts"]) > 2.9  # the soft measure sees nearly even gates


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
