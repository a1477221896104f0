"""Soft MoE against a loop over sequences and slots written out here, and its promises: one
sequence's output independent of the others, permutation equivariance over tokens, padding
without influence; in the models and under `vlmoe fit`."""
import math

import pytest
import torch

import vlmoe
from vlmoe.errors import ConfigError
from vlmoe.moe import SoftMoE

D, H, E = 8, 16, 4


def expert(moe, e, x):
    ex = moe.experts
    return ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def layer(s=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = SoftMoE(D, H, num_experts=E, slots_per_expert=s, **kw)
    with torch.no_grad():
        m.scale.fill_(1.7)  # not the initial 1: the scale must multiply the normalised slot parameters
    return m


def reference(moe, x_TD, s, real=None):
    """The paper's equations for one sequence, slot by slot and token by token."""
    T = x_TD.shape[0]
    real = torch.ones(T, dtype=torch.bool) if real is None else real
    phi = moe.router.weight.view(E, moe.slots_per_expert, D)[:, :s].reshape(E * s, D)
    xn = [x_TD[t] / x_TD[t].norm() for t in range(T)]
    pn = [moe.scale * phi[j] / phi[j].norm() for j in range(E * s)]
    logit = [[float(xn[t] @ pn[j]) for j in range(E * s)] for t in range(T)]
    ys = []
    for j in range(E * s):  # dispatch: softmax over the real tokens
        w = [math.exp(logit[t][j]) if real[t] else 0.0 for t in range(T)]
        slot = sum(w[t] / sum(w) * x_TD[t] for t in range(T))
        ys.append(expert(moe, j // s, slot.unsqueeze(0))[0])
    out = []
    for t in range(T):  # combine: softmax over the slots
        c = [math.exp(logit[t][j]) for j in range(E * s)]
        out.append(sum(c[j] / sum(c) * ys[j] for j in range(E * s)) if real[t] else torch.zeros(D))
    return torch.stack(out)


def test_soft_moe_equals_the_loop_over_sequences_and_slots():
    m = layer(s=2)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        y = m(x)
        for b in range(3):
            torch.testing.assert_close(y[b], reference(m, x[b], 2), rtol=1e-4, atol=1e-5)
        # a single sequence as [T, D]
        torch.testing.assert_close(m(x[1]), reference(m, x[1], 2), rtol=1e-4, atol=1e-5)


def test_each_sequence_alone_and_token_permutations():
    m = layer(s=3)
    x = torch.randn(4, 7, D)
    with torch.no_grad():
        y = m(x)
        for b in range(4):  # independent of the rest of the batch
            torch.testing.assert_close(m(x[b:b + 1])[0], y[b], rtol=1e-5, atol=1e-6)
        perm = torch.randperm(7)
        torch.testing.assert_close(m(x[:, perm]), y[:, perm], rtol=1e-5, atol=1e-6)


def test_padding_has_no_influence():
    m = layer(s=2)
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    with torch.no_grad():
        y = m(x, mask)
        x2 = x.clone()
        x2[0, 4:] = torch.randn(2, D) * 100  # other padding
        y2 = m(x2, mask)
        torch.testing.assert_close(y2[0, :4], y[0, :4], rtol=0, atol=0)
        assert y[0, 4:].abs().max() == 0  # padding gets output 0
        torch.testing.assert_close(y[0, :4], m(x[0, :4]), rtol=1e-5, atol=1e-6)  # = the sequence without its padding
        torch.testing.assert_close(y[0], reference(m, x[0], 2, mask[0]), rtol=1e-4, atol=1e-5)
        # through the routing context, as the text tower calls it
        from vlmoe.moe import routing_context

        with routing_context("text", mask):
            torch.testing.assert_close(m(x), y)


def test_per_modality_slots_use_the_first_slots_of_each_expert():
    m = layer(s={"image": 3, "text": 1})
    assert m.router.weight.shape == (E * 3, D)
    x = torch.randn(1, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x, modality="image")[0], reference(m, x[0], 3), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m(x, modality="text")[0], reference(m, x[0], 1), rtol=1e-4, atol=1e-5)
    assert m.aux["text"].stats["capacity"] == 1 and m.aux["image"].stats["capacity"] == 3


def test_statistics_by_hand():
    m = layer(s=1)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(E, D))
        m.scale.fill_(1.0)
    x = torch.zeros(1, 2, D)
    x[0, 0, 0] = 1.0  # token 0 = slot 0's direction, token 1 = slot 1's
    x[0, 1, 1] = 1.0
    m(x)
    st = m.aux[None].stats
    # logits: token t has 1 on slot t, 0 elsewhere
    disp = torch.tensor([[math.e, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # [slot, token], unnormalised
    disp = disp / disp.sum(1, keepdim=True)
    comb = torch.tensor([[math.e, 1, 1, 1], [1, math.e, 1, 1]]) / (math.e + 3)
    ent = lambda p: float(-(p * p.log()).sum(-1).mean())  # noqa: E731
    # slots 0 and 1 favour their own token; slots 2, 3 are even mixes
    disp[1] = disp[0].flip(0)
    assert float(st["dispatch_entropy"]) == pytest.approx(ent(disp), rel=1e-5)
    assert float(st["combine_entropy"]) == pytest.approx(ent(comb), rel=1e-5)
    assert float(st["slot_concentration"]) == pytest.approx(float(disp.max(1).values.mean()), rel=1e-5)
    torch.testing.assert_close(st["mean_gate"], comb.mean(0))
    assert float(st["dropped_frac"]) == 0 and st["tokens_per_expert"].tolist() == [1.0] * E
    # each token's "first choice": the expert whose slots give it the most combine weight
    assert st["top1_per_expert"].tolist() == [1.0, 1.0] + [0.0] * (E - 2)
    assert float(st["effective_experts_top1"]) == pytest.approx(2.0, rel=1e-6)


def test_bad_input_and_expert_parallelism_refused():
    for bad in (0, -1, 1.5, {"audio": 2}, {"image": 0}):
        with pytest.raises(ConfigError, match="slots_per_expert"):
            SoftMoE(D, H, num_experts=E, slots_per_expert=bad)
    with pytest.raises(ConfigError, match="capacity_factor=1.25 has no effect with router=.soft."):
        SoftMoE(D, H, num_experts=E, capacity_factor=1.25)
    with pytest.raises(ConfigError, match="expert parallelism is not supported"):
        layer().shard_experts(None)
    with pytest.raises(ConfigError, match="router='soft'"):
        vlmoe.create_model("limoe-tiny-soft", moe={"balance": "bias"})
    with pytest.raises(ConfigError, match="router='soft'"):  # not silently dropped
        vlmoe.create_model("limoe-tiny-soft", moe={"bias_per_modality": True})


@pytest.mark.parametrize("name", ["limoe-tiny-soft", "limoe-tiny-auxfree", "limoe-tiny-auxfree-modality", "limoe-tiny-shared",
                                  "limoe-tiny-fine"])
def test_design_configs_train_in_fit(shards, tmp_path, name):
    """Each design's config under `vlmoe fit` (bf16 autocast), with its own statistics logged."""
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import fit_args

    from vlmoe.cli import cli_main

    assert vlmoe.dense_baseline(name) == "clip-tiny"
    cli = cli_main(fit_args(shards, tmp_path, steps=3, extra=[f"--model.model_name={name}", "--trainer.precision=bf16-mixed",
                                                               "--model.moe_log_every_n_steps=1"]))
    layers = cli.model.model.moe_layers()
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    assert any(r.get("val/zeroshot_top1") for r in rows)
    if name.endswith("soft"):
        assert all(isinstance(l, SoftMoE) for l in layers)
        assert any(k.endswith("text/slot_concentration") for k in keys) and any(k.endswith("image/dispatch_entropy") for k in keys)
    elif "auxfree" in name:  # three optimizer steps moved the bias, by at most 3 x rate
        assert all(0 < float(l.expert_bias.abs().max()) <= 3 * 1e-3 + 1e-9 for l in layers)
        assert any(k.endswith("bias_max_abs") for k in keys)
        if name.endswith("modality"):  # one row per modality, each moved, each modality's balance logged
            assert all(l.expert_bias.shape == (2, 8) and (l.expert_bias.abs().sum(1) > 0).all() for l in layers)
            assert {m for m in ("image", "text") if any(k.endswith(f"load_max_over_mean/{m}") for k in keys)} == {"image", "text"}
    elif name.endswith("shared"):
        assert all(l.shared_experts is not None and l.hidden_dim == 256 for l in layers)
    else:
        assert all((l.num_experts, l.top_k, l.hidden_dim) == (32, 4, 128) for l in layers)
