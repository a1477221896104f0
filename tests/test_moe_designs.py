"""Mixtral routing and SwiGLU experts, WideNet (one MoE across depths), save/load."""
import pytest
import torch
from timm.layers import SwiGLU

import vlmoe
from vlmoe.models.stats import model_stats
from vlmoe.moe import SparseMoE
from helpers import shared_neurons, small_clip


def test_mixtral_weights_are_a_softmax_over_the_top_k_logits():
    torch.manual_seed(0)
    moe = SparseMoE(8, 16, num_experts=4, top_k=2, capacity_factor=None, gate="topk_softmax", noise_scale=0.0,
                    implementation="loop").eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8))  # logits = the first 4 input features
    x = torch.zeros(1, 8)
    x[0, :4] = torch.tensor([1.0, 3.0, 2.0, -1.0])
    # hand computation: top-2 logits 3 (expert 1) and 2 (expert 2); softmax over them
    w1, w2 = torch.exp(torch.tensor(3.0)), torch.exp(torch.tensor(2.0))
    expected = (w1 * expert(moe, 1, x) + w2 * expert(moe, 2, x)) / (w1 + w2)
    torch.testing.assert_close(moe(x), expected)
    # weights sum to 1 for every token
    xs = torch.randn(20, 8)
    ones = torch.ones(20, 8)
    for e in range(4):  # make every expert the identity-ish constant map: output = its weight sum
        with torch.no_grad():
            moe.experts.w1[e].zero_()
            moe.experts.b1[e].fill_(0.0)
            moe.experts.w2[e].zero_()
            moe.experts.b2[e].fill_(1.0)
    torch.testing.assert_close(moe(xs), ones)


def expert(moe, e, x):
    ex = moe.experts
    return ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def test_swiglu_experts_match_a_reference_swiglu_mlp():
    torch.manual_seed(0)
    ref = SwiGLU(16, 24)  # timm: fc2(drop(norm(silu(fc1_g(x)) * fc1_x(x))))
    moe = SparseMoE(16, 24, num_experts=1, top_k=1, capacity_factor=None, expert_type="swiglu",
                    normalize_combine_weights=True).eval()
    with torch.no_grad():
        moe.experts.w1[0].copy_(torch.cat([ref.fc1_g.weight.t(), ref.fc1_x.weight.t()], dim=1))
        moe.experts.b1[0].copy_(torch.cat([ref.fc1_g.bias, ref.fc1_x.bias]))
        moe.experts.w2[0].copy_(ref.fc2.weight.t())
        moe.experts.b2[0].copy_(ref.fc2.bias)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["bmm", "grouped_mm", "loop"])
def test_swiglu_and_topk_softmax_work_with_capacity_bpr_and_losses(impl):
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, top_k=2, capacity_factor=1.0, gate="topk_softmax", expert_type="swiglu",
                    implementation=impl, balance_weight=0.01, z_loss_weight=0.001).train()
    x = torch.randn(2, 12, 16, requires_grad=True)
    y = moe(x)
    (y.square().mean() + moe.aux[None].loss).backward()
    assert {"importance", "load", "balance", "z"} <= set(moe.aux[None].losses)
    assert moe.router.weight.grad.abs().sum() > 0 and moe.experts.w1.grad.abs().sum() > 0
    assert moe.aux[None].stats["tokens_per_expert"].max() <= moe.aux[None].stats["capacity"]


def test_widenet_has_one_set_of_experts_and_every_depth_trains_it():
    model = vlmoe.create_model("limoe-tiny-widenet")
    layers = model.moe_layers()
    assert len(layers) == 1  # shared across depths and across the two towers
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    assert all(b.mlp is layers[0] for b in blocks)
    # each block keeps its own norms
    assert model.visual.transformer.resblocks[0].ln_2 is not model.visual.transformer.resblocks[1].ln_2
    per_tower = vlmoe.create_model("limoe-tiny-widenet", sharing="none")
    assert len(per_tower.moe_layers()) == 2

    outputs = []
    handle = layers[0].register_forward_hook(lambda m, i, o: outputs.append(o))
    images = torch.randn(2, 3, 32, 32)
    text = vlmoe.get_tokenizer(model)(["a photo of a seven", "handwritten 1"])
    out = model(images, text)
    handle.remove()
    assert len(outputs) == 8  # 4 image depths + 4 text depths
    assert sorted(layers[0].aux) == ["image", "image#1", "image#2", "image#3", "text", "text#1", "text#2", "text#3"]
    loss = (out["image_features"] @ out["text_features"].t()).sum() + out["aux_loss"]
    grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)  # every depth's MoE output feeds the loss
    loss.backward()
    assert layers[0].experts.w1.grad.abs().sum() > 0

    s = model_stats(model)
    d = model_stats(vlmoe.create_model("clip-tiny"))
    assert s["total_params"] == pytest.approx(d["total_params"], rel=0.01)  # 8 experts instead of 8 dense MLPs
    assert s["flops_image"] == pytest.approx(d["flops_image"], rel=0.01)


def test_widenet_and_mixtral_round_trip(tmp_path):
    for name in ("limoe-tiny-widenet", "limoe-tiny-mixtral"):
        torch.manual_seed(0)
        model = vlmoe.create_model(name).eval()
        images = torch.randn(2, 3, 32, 32)
        text = vlmoe.get_tokenizer(model)(["seven", "one"])
        ref = model(images, text)
        export = vlmoe.save_pretrained(model, tmp_path / name)
        again = vlmoe.create_model(export).eval()(images, text)
        assert torch.equal(ref["image_features"], again["image_features"])
        assert torch.equal(ref["text_features"], again["text_features"])
    mixtral = vlmoe.create_model("limoe-tiny-mixtral")
    m = mixtral.moe_layers()[0]
    assert (m.gate, m.experts.expert_type, m.top_k, m.hidden_dim) == ("topk_softmax", "swiglu", 2, 172)


def test_bad_input_for_the_designs():
    with pytest.raises(ValueError, match="unknown gate"):
        SparseMoE(8, 16, 4, gate="sigmoid")
    with pytest.raises(ValueError, match="expert_type"):
        SparseMoE(8, 16, 4, expert_type="relu2")
    from timm.layers import Mlp

    from vlmoe.models.towers import install_moe

    blocks = [torch.nn.Module(), torch.nn.Module()]  # depths of different widths
    blocks[0].mlp, blocks[1].mlp = Mlp(8, 32), Mlp(16, 64)
    with pytest.raises(ValueError, match="cannot share MoE layer 1 across depths"):
        install_moe(blocks, [0, 1], lambda d, h, a: SparseMoE(d, h, 4), share_across_depth=True)


def test_moebert_split_with_all_neurons_shared_reproduces_the_dense_model():
    from vlmoe.models.upcycle import upcycle_open_clip

    clip = small_clip()
    images, text = torch.randn(3, 3, 32, 32), torch.randint(1, 999, (3, 12))
    m = upcycle_open_clip(clip, num_experts=4, moe_layers="all", method="split", num_shared_neurons=1.0).eval()
    assert (m.encode_image(images) - clip.encode_image(images)).abs().max() <= 1e-5
    assert (m.encode_text(text) - clip.encode_text(text)).abs().max() <= 1e-5


def test_moebert_split_partitions_the_neurons_by_importance():
    from vlmoe.models.upcycle import neuron_importance, split_neurons, upcycle_open_clip

    clip = small_clip()
    images, text = torch.randn(4, 3, 32, 32), torch.randint(1, 999, (4, 12))
    batches = [(images, text)]
    m = upcycle_open_clip(clip, num_experts=4, moe_layers="all", method="split", importance_batches=batches,
                          num_shared_neurons=8).eval()
    moe = m.visual.transformer.resblocks[0].mlp
    dense = clip.visual.transformer.resblocks[0].mlp
    assert moe.hidden_dim == 8 + (128 - 8) // 4  # width 32 x mlp_ratio 4 = 128 neurons
    assert m.transformer.resblocks[0].mlp.hidden_dim == 8 + (192 - 8) // 4  # the text tower is wider
    # with 8 shared and the rest dealt out: experts together hold every neuron once, plus the shared 7 more times
    x = torch.randn(5, 32)
    ex = moe.experts
    total = sum(ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e] for e in range(4))
    shared_part = 3 * _partial_mlp(dense, x, torch.as_tensor(shared_neurons(m, 0)))
    torch.testing.assert_close(total - 3 * dense.c_proj.bias - shared_part, dense(x), atol=1e-5, rtol=1e-4)
    # the shared neurons are the most important ones
    scores = neuron_importance(clip, ["visual.transformer.resblocks.0.mlp"], batches)["visual.transformer.resblocks.0.mlp"]
    top8 = set(torch.sort(scores, descending=True, stable=True).indices[:8].tolist())
    assert set(shared_neurons(m, 0)) == top8
    # no importance batches: weight magnitude, and no shared neurons: a pure partition
    idx = split_neurons(torch.arange(10.0), 3, 0)
    assert idx.tolist() == [[9, 6, 3, 0], [8, 5, 2, -1], [7, 4, 1, -1]]


def _partial_mlp(mlp, x, neurons):
    h = mlp.gelu(x @ mlp.c_fc.weight[neurons].t() + mlp.c_fc.bias[neurons])
    return h @ mlp.c_proj.weight[:, neurons].t()


def test_moebert_bad_input():
    from vlmoe.models.upcycle import split_neurons, upcycle_open_clip

    with pytest.raises(ValueError, match="cannot split 10 hidden neurons into 16 experts"):
        split_neurons(torch.rand(10), 16, 0)
    clip = small_clip()
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
        upcycle_open_clip(clip, num_experts=4, method="split", importance_batches=[(torch.randn(2, 3, 16, 16), torch.ones(2, 12, dtype=torch.long))])
    with pytest.raises(ValueError, match="texts must be token ids"):
        upcycle_open_clip(clip, num_experts=4, method="split", importance_batches=[(torch.randn(2, 3, 32, 32), torch.randn(2, 12))])
    with pytest.raises(ValueError, match="method must be"):
        upcycle_open_clip(clip, method="prune")
