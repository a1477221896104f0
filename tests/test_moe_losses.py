import math

import pytest
import torch

from vlmoe.moe import (
    balance_loss,
    global_entropy_loss,
    importance_loss,
    load_loss,
    local_entropy_loss,
    z_loss,
)
import vlmoe
from vlmoe.moe import losses


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_importance_loss_hand_computed():
    gates = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # importance = [1.5, 0.5]: mean 1, population variance 0.25 -> CV^2 = 0.25
    assert importance_loss(gates).item() == pytest.approx(0.25)
    assert importance_loss(torch.full((4, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-7)
    # per group then averaged
    g2 = torch.stack([gates, torch.full((2, 2), 0.5)])
    assert importance_loss(g2).item() == pytest.approx(0.125)
    # masked token ignored
    assert importance_loss(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-7)


def test_load_loss_hand_computed():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]])
    noisy = torch.tensor([[1.2, 0.1, -0.9], [0.3, 1.5, 0.7]])
    std = 0.5
    for k in (1, 2):
        p = []
        for s in range(2):
            thr = sorted(noisy[s].tolist(), reverse=True)[k - 1]
            p.append([1 - phi((thr - float(logits[s, e])) / std) for e in range(3)])
        pm = [(p[0][e] + p[1][e]) / 2 for e in range(3)]
        mean = sum(pm) / 3
        var = sum((v - mean) ** 2 for v in pm) / 3
        assert load_loss(logits, noisy, std, k).item() == pytest.approx(var / mean**2, rel=1e-5)
    with pytest.raises(ValueError, match="noise_std"):
        load_loss(logits, noisy, 0.0, 1)


def test_balance_and_z_loss():
    gates = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # f = [0.5, 0.5], P = [0.55, 0.45] -> 2 * (0.275 + 0.225) = 1.0
    assert balance_loss(gates).item() == pytest.approx(1.0)
    gates = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    # f = [1, 0], P = [0.85, 0.15] -> 2 * 0.85 = 1.7
    assert balance_loss(gates).item() == pytest.approx(1.7)
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_losses():
    E = 4
    uniform = torch.full((3, E), 1 / E)
    assert local_entropy_loss(uniform).item() == pytest.approx(math.log(E))
    onehot = torch.eye(E)
    assert local_entropy_loss(onehot).item() == pytest.approx(0.0, abs=1e-6)
    # every token sure, but of a different expert: global entropy is maximal
    assert global_entropy_loss(onehot).item() == pytest.approx(-math.log(E))
    # all tokens on expert 0: global entropy 0; threshold log(2) asks for >= 2 experts
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 4)
    assert global_entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    assert global_entropy_loss(collapsed, threshold=math.log(2)).item() == pytest.approx(math.log(2))
    assert global_entropy_loss(onehot, threshold=math.log(2)).item() == pytest.approx(0.0)
    # mask: padding tokens count in no loss
    mixed = torch.cat([onehot[:1], uniform[:1]])
    assert local_entropy_loss(mixed, torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_have_gradients():
    logits = torch.randn(2, 8, 4, requires_grad=True)
    g = logits.softmax(-1)
    total = importance_loss(g) + local_entropy_loss(g) + global_entropy_loss(g) + z_loss(logits) + balance_loss(g)
    total = total + load_loss(logits, logits.detach() + 0.1 * torch.randn_like(logits), 0.25, 2)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_load_loss_erfc_is_torch_erfc_bit_for_bit(dtype):
    # the fast path (0 where erfc underflows) must not change a value or a gradient
    from vlmoe.moe.losses import _erfc

    x = torch.cat([torch.linspace(-6, 40, 20001, dtype=torch.float64), torch.randn(5000, dtype=torch.float64) * 15]).to(dtype)
    x.requires_grad_()
    fast, ref = _erfc(x), torch.erfc(x)
    assert torch.equal(fast, ref)
    assert torch.equal(torch.autograd.grad(fast.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
    assert (ref == 0).sum() > 1000 and (ref > 0).sum() > 1000  # both regions are covered


# -- moved from test_promises (issues #11, #16) ------------------------------------------------------


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
