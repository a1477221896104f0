"""No host sync in the capacity path: a training forward + backward and the per-example
evaluation forward read nothing back to the host, for every capacity router and both
routing modes (counted with vlmoe.syncs.HostSyncCounter, which sees on CPU what would stall
a GPU)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlmoe import create_model
from vlmoe.moe import SparseMoE, check_finite
from vlmoe.syncs import HostSyncCounter

D, E = 16, 4

# Each capacity router, with what the layer adds around it: BPR, noisy gating, shared experts,
# bias balancing (one bias per modality), the z and entropy losses.
ROUTERS = {
    "topk": dict(router="topk", noise_scale=1.0, z_loss_weight=0.01, local_entropy_weight=0.01,
                 global_entropy_weight=0.01, global_entropy_threshold=math.log(2)),
    "topk-k2-shared": dict(router="topk", top_k=2, num_shared_experts=1, shared_expert_gate=True),
    "switch": dict(router="switch"),
    "gshard": dict(router="gshard"),
    "mixtral-capacity": dict(router="topk", top_k=2, gate="topk_softmax", expert_type="swiglu", noise_scale=0.0),
    "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
    "bias-per-modality": dict(router="topk", balance="bias", bias_per_modality=True),
    "topk-grouped": dict(router="topk", group_size=8),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 9, D, generator=g, requires_grad=True)
    text = torch.randn(3, 7, D, generator=g, requires_grad=True)
    mask = torch.arange(7) < torch.tensor([[2], [7], [4]])  # padded captions
    return image, text, mask


def _train_step(layer, mode):
    image, text, mask = _inputs()
    if mode == "joint":
        out = layer.forward_joint({"image": (image, None), "text": (text, mask)})
        y = out["image"].square().sum() + out["text"].square().sum()
    else:
        y = layer(image, modality="image").square().sum() + layer(text, mask=mask, modality="text").square().sum()
    loss = y + sum(a.loss for a in layer.aux.values())
    loss.backward()
    return layer


@pytest.mark.parametrize("mode", ["per_modality", "joint"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_training_step_and_per_example_evaluation_make_no_host_sync(name, mode):
    """Planted: any `.item()` / `int(t)` / `bool(t)` / `nonzero` / boolean index / bincount in
    the routing, the buffers, the losses, the statistics or the bias count (e.g. the old
    capacity from `int(mask.sum(1).max())`, or `F.one_hot` in the balance loss)."""
    torch.manual_seed(0)
    layer = SparseMoE(D, 32, E, **ROUTERS[name]).train()
    with HostSyncCounter(stacks=True) as syncs:
        _train_step(layer, mode)
    assert syncs.total == 0, dict(syncs.where)
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    layer.eval()
    image, text, mask = _inputs()
    with torch.no_grad(), HostSyncCounter(stacks=True) as syncs:
        if mode == "joint":
            layer.forward_joint({"image": (image, None), "text": (text, mask)})
        else:
            layer(image, modality="image")
            layer(text, mask=mask, modality="text")
    assert syncs.total == 0, dict(syncs.where)


def test_dropless_and_ragged_paths_say_they_sync():
    """docs: dropless routing and an explicit grouped_mm / loop implementation size their rows
    from the data; the counter sees that (so the zero above is not a counter that sees nothing)."""
    image, _, _ = _inputs()
    for settings in (dict(capacity_factor=None), dict(implementation="grouped_mm")):
        layer = SparseMoE(D, 32, E, **settings).train()
        with HostSyncCounter() as syncs:
            layer(image).sum().backward()
        assert syncs.by_op["nonzero"] >= 1, settings


def test_counter_sees_each_kind_of_sync():
    """The counter itself: each kind once (a counter that missed one would pass the tests above)."""
    t = torch.tensor([0.0, 2.0, 0.0, 3.0])
    with HostSyncCounter() as syncs:
        t.sum().item()
        int(t.max())
        bool(t.any())
        t.nonzero()
        t[t > 1]
        torch.bincount(t.long())
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.unique(t)
        t.masked_select(t > 0)
        torch.nn.functional.one_hot(t.long(), 4)
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)  # size given: no sync
        t * 2  # no sync
    assert syncs.by_op["scalar read (.item() / int / bool)"] >= 3
    assert syncs.by_op["nonzero"] >= 1 and syncs.by_op["boolean indexing"] == 1
    assert syncs.by_op["bincount"] == 1 and syncs.by_op["unique"] == 1 and syncs.by_op["masked_select"] == 1
    assert syncs.by_op["repeat_interleave without output_size"] == 1


@pytest.mark.parametrize("routing_groups", ["per_modality", "joint"])
def test_limoe_tiny_training_step_makes_no_host_sync(routing_groups):
    """The whole model: limoe-tiny's forward (both towers, text padding) and backward of the
    CLIP + auxiliary loss, and its evaluation encoders, as scripts/count_syncs.py counts them."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = create_model("limoe-tiny", moe={"routing_groups": routing_groups}).train()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, *model.image_size, generator=g)
    text = torch.randint(1, 400, (4, model.context_length), generator=g)
    text[torch.arange(model.context_length) >= torch.tensor([[3], [5], [16], [9]])] = 0
    with HostSyncCounter(stacks=True) as syncs:
        out = model(image, text)
        (ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]) + out["aux_loss"]).backward()
    assert syncs.total == 0, dict(syncs.where)
    model.eval()
    with torch.no_grad(), HostSyncCounter(stacks=True) as syncs:
        model.encode_image(image)
        model.encode_text(text)
    assert syncs.total == 0, dict(syncs.where)


def test_nonfinite_logits_are_noted_on_the_device_and_raised_by_check_finite():
    """The finite check moved off the hot path: a NaN input makes no sync and no error in the
    call; check_finite names every layer that saw it (and only those), then starts afresh."""
    model = nn.Sequential(SparseMoE(D, 32, E), SparseMoE(D, 32, E))
    x = torch.randn(2, 5, D)
    x[0, 1, 3] = math.nan
    with HostSyncCounter() as syncs:
        model[0](torch.randn(2, 5, D))
        model[1](x)
    assert syncs.total == 0
    with pytest.raises(FloatingPointError, match=r"in 1 since the last check"):
        check_finite(model)
    check_finite(model)
