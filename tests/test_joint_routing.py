"""LIMoE's joint routing (moe.routing_groups="joint"): image patches and text tokens compete
for the shared experts in one routing group. Checked against hand computations and against
per-modality routing where the two must agree."""
import math
import os

import pytest
import torch
import torch.distributed as dist
from helpers import free_port, init_gloo
from helpers import start_ranks
from helpers import NO_AUX, run_ddp_step

import vlmoe
from vlmoe.errors import ConfigError
from vlmoe.moe import SparseMoE
from vlmoe.moe import parallel as par

D, E = 16, 4
QUIET = {"noise_scale": 0.0, "importance_weight": 0.0, "load_weight": 0.0}


def _model(routing_groups, seed=0, **moe):
    torch.manual_seed(seed)
    m = vlmoe.create_model("limoe-tiny", moe={"routing_groups": routing_groups, "noise_scale": 0.0, **moe})
    return m.train()


def _pairs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    text = vlmoe.get_tokenizer(16)([f"a photo of digit {i} on a mat" for i in range(n)])
    return images, text


@pytest.mark.parametrize("routing_groups,depends", [("joint", True), ("per_modality", False)])
def test_text_features_depend_on_the_batch_images_only_in_joint_routing(routing_groups, depends):
    model = _model(routing_groups, capacity_factor=0.5)  # capacity binds: tokens are dropped
    images, text = _pairs()
    with torch.no_grad():
        a = model(images, text)
        b = model(torch.randn_like(images) * 3, text)
    dropped = [v for k, v in a["moe_metrics"].items() if k.endswith("/dropped_frac")]
    assert dropped and max(float(v) for v in dropped) > 0.1
    same = torch.allclose(a["text_features"], b["text_features"], atol=1e-6)
    assert same != depends


def test_joint_dropless_renormalised_equals_per_modality_routing():
    kw = dict(capacity_factor=None, normalize_combine_weights=True)
    joint, apart = _model("joint", **kw), _model("per_modality", **kw)
    apart.load_state_dict(joint.state_dict())
    images, text = _pairs()
    a, b = joint(images, text), apart(images, text)
    for k in ("image_features", "text_features"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    (a["image_features"].sum() + a["text_features"].square().sum()).backward()
    (b["image_features"].sum() + b["text_features"].square().sum()).backward()
    grads = dict(apart.named_parameters())
    for n, p in joint.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def _layer(**kw):
    torch.manual_seed(0)
    return SparseMoE(D, 32, num_experts=E, top_k=1, **{**QUIET, **kw}).train()


def _parts(n=3, t_img=8, t_txt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, t_img, D, generator=g)
    txt = torch.randn(n, t_txt, D, generator=g)
    mask = torch.zeros(n, t_txt, dtype=torch.bool)
    for b, length in enumerate([6, 3, 1][:n]):
        mask[b, :length] = True
    return img, txt, mask


def test_per_modality_entropy_losses_and_union_importance_match_a_hand_computation():
    tau_img, tau_txt = math.log(4), math.log(3)
    layer = _layer(importance_weight=0.1, local_entropy_weight=0.3, global_entropy_weight=0.7,
                   modality_overrides={"image": {"global_entropy_threshold": tau_img},
                                       "text": {"global_entropy_threshold": tau_txt, "local_entropy_weight": 0.5}})
    img, txt, mask = _parts()
    layer.forward_joint({"image": (img, None), "text": (txt, mask)})
    W = layer.router.weight.detach()
    p_img = (img.reshape(-1, D) @ W.T).softmax(-1)
    p_txt = (txt[mask] @ W.T).softmax(-1)  # real text tokens only
    H = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    expect = {
        "image": {"local_entropy": H(p_img).mean(), "global_entropy": (tau_img - H(p_img.mean(0))).clamp_min(0)},
        "text": {"local_entropy": H(p_txt).mean(), "global_entropy": (tau_txt - H(p_txt.mean(0))).clamp_min(0)},
    }
    for m, losses in expect.items():
        got = layer.aux[m].losses
        assert set(got) == {"local_entropy", "global_entropy"}, m  # no union loss counted twice
        for k, v in losses.items():
            torch.testing.assert_close(got[k], v, msg=f"{m} {k}")
        assert float(layer.aux[m].stats["num_tokens"]) == (24 if m == "image" else 10)
        p = p_img if m == "image" else p_txt
        torch.testing.assert_close(layer.aux[m].stats["effective_experts"], torch.exp(H(p.mean(0))))
    importance = torch.cat([p_img, p_txt]).sum(0)  # over the union of real tokens, one group
    cv2 = importance.var(unbiased=False) / importance.mean().square()
    torch.testing.assert_close(layer.aux["joint"].losses["importance"], cv2)
    assert set(layer.aux["joint"].losses) == {"importance"}
    total = 0.1 * cv2 + 0.3 * expect["image"]["local_entropy"] + 0.7 * expect["image"]["global_entropy"] \
        + 0.5 * expect["text"]["local_entropy"] + 0.7 * expect["text"]["global_entropy"]
    torch.testing.assert_close(sum(a.loss for a in layer.aux.values()), total)


def test_padding_takes_no_capacity_and_gets_no_output():
    layer = _layer(capacity_factor=1.0, multiple_of=1)
    img, txt, mask = _parts()
    out = layer.forward_joint({"image": (img, None), "text": (txt, mask)})
    real = 24 + 10
    assert float(layer.aux["joint"].stats["capacity"]) == math.ceil(real / E)
    assert (out["text"][~mask] == 0).all() and out["text"][mask].abs().sum(-1).gt(0).any()
    # more padding (longer context): the same capacity and the same outputs for real tokens
    long_txt = torch.cat([txt, torch.randn(3, 5, D)], 1)
    long_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    out2 = layer.forward_joint({"image": (img, None), "text": (long_txt, long_mask)})
    assert float(layer.aux["joint"].stats["capacity"]) == math.ceil(real / E)
    torch.testing.assert_close(out2["image"], out["image"])
    torch.testing.assert_close(out2["text"][:, :6][mask], out["text"][mask])


def test_bpr_ranks_both_modalities_together():
    # capacity for a third of the tokens: which survive is decided by the gates over the union
    layer = _layer(capacity_factor=0.34, multiple_of=1)
    img, txt, mask = _parts()
    out = layer.forward_joint({"image": (img, None), "text": (txt, mask)})
    gates = (torch.cat([img.reshape(-1, D), txt[mask]]) @ layer.router.weight.detach().T).softmax(-1)
    expert, score = gates.argmax(-1), gates.max(-1).values
    C = int(layer.aux["joint"].stats["capacity"])
    kept = torch.zeros(len(score), dtype=torch.bool)
    for e in range(E):  # BPR: per expert, the C tokens with the highest top gate
        idx = (expert == e).nonzero().squeeze(1)
        kept[idx[score[idx].argsort(descending=True)[:C]]] = True
    got = torch.cat([out["image"].reshape(-1, D), out["text"][mask]]).abs().sum(-1) > 0
    assert torch.equal(got, kept) and 0 < int(kept.sum()) < len(kept)


def test_joint_routing_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="sharing='none' gives each tower its own"):
        vlmoe.create_model("limoe-tiny", sharing="none", moe={"routing_groups": "joint"})
    with pytest.raises(ConfigError, match="unknown moe.routing_groups 'both'"):
        vlmoe.create_model("limoe-tiny", moe={"routing_groups": "both"})
    with pytest.raises(ConfigError, match=r"\['capacity_factor'\] cannot differ for 'text'"):
        vlmoe.create_model("limoe-tiny", moe={"routing_groups": "joint", "text": {"capacity_factor": 2.0}})
    with pytest.raises(ConfigError, match="timm image tower is not supported"):
        vlmoe.create_model("limoe-tiny-timm", moe={"routing_groups": "joint"})


def test_joint_routing_with_activation_checkpointing_and_bf16():
    images, text = _pairs()
    grads = []
    for ckpt in (False, True):
        model = _model("joint", capacity_factor=1.0, noise_scale=1.0)  # noise: the recompute must redraw it alike
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(5)
        out = model(images, text)
        (out["image_features"] @ out["text_features"].T).sum().add(out["aux_loss"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)
    model = _model("joint")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, text)
    (out["image_features"].float().sum() + out["aux_loss"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_eval_per_example_routes_each_modality_alone_as_zero_shot_does():
    model = _model("joint", capacity_factor=0.5).eval()
    images, text = _pairs()
    with torch.no_grad():
        out = model(images, text)
        torch.testing.assert_close(out["text_features"], model.encode_text(text, normalize=True))
        torch.testing.assert_close(out["image_features"][:1], model.encode_image(images[:1], normalize=True))


def test_two_process_ddp_gradients_equal_single_process_in_joint_routing(tmp_path):
    joint = {"moe": {**NO_AUX["moe"], "routing_groups": "joint"}}
    single = run_ddp_step(1, 8, tmp_path / "single.pt", joint)
    ddp = run_ddp_step(2, 4, tmp_path / "ddp.pt", joint)
    assert single.keys() == ddp.keys() and len(single) > 50
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-4, msg=k)


# -- expert parallel ----------------------------------------------------------------------

EP_WORLD = 2


def _ep_inputs(rank):
    img, txt, mask = _parts(seed=10 + rank)
    g = torch.Generator().manual_seed(20 + rank)
    return img, txt, mask, torch.randn(img.shape, generator=g), torch.randn(txt.shape, generator=g)


def _ep_layer(seed):
    torch.manual_seed(seed)
    return SparseMoE(D, 32, num_experts=E, top_k=2, capacity_factor=0.75, noise_scale=0.0, importance_weight=0.05,
                     load_weight=0.0, local_entropy_weight=0.1, global_entropy_weight=0.1, implementation="loop")


def _ep_worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    groups = par.init_expert_parallel(world)
    layer = _ep_layer(seed=rank)
    dist.broadcast(layer.router.weight.data, src=0)
    par.shard_experts(layer, groups)
    img, txt, mask, w_img, w_txt = _ep_inputs(rank)
    img.requires_grad_(True)
    par.all_to_all_meter.reset()
    out = layer.forward_joint({"image": (img, None), "text": (txt, mask)})
    loss = (out["image"] * w_img).sum() + (out["text"] * w_txt).sum() + sum(a.loss for a in layer.aux.values())
    loss.backward()
    dist.all_reduce(layer.router.weight.grad)
    layer.router.weight.grad /= world
    par.reduce_expert_gradients(layer, groups)
    torch.save({"image": out["image"].detach(), "text": out["text"].detach(), "img_grad": img.grad,
                "grads": {n: p.grad.clone() for n, p in layer.named_parameters()}, "offset": layer.experts.expert_offset,
                "local": layer.experts.num_experts, "calls": par.all_to_all_meter.calls},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_expert_parallel_joint_routing_equals_a_single_process(tmp_path):

    start_ranks(_ep_worker, EP_WORLD, EP_WORLD, free_port(), str(tmp_path))
    ref = _ep_layer(seed=0)
    loss = 0
    outs = []
    for r in range(EP_WORLD):  # each rank's batch is its own routing group
        img, txt, mask, w_img, w_txt = _ep_inputs(r)
        img.requires_grad_(True)
        out = ref.forward_joint({"image": (img, None), "text": (txt, mask)})
        loss = loss + ((out["image"] * w_img).sum() + (out["text"] * w_txt).sum() + sum(a.loss for a in ref.aux.values())) / EP_WORLD
        outs.append((out, img))
    loss.backward()
    for r in range(EP_WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        out, img = outs[r]
        torch.testing.assert_close(got["image"], out["image"].detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["text"], out["text"].detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["img_grad"] / EP_WORLD, img.grad, atol=1e-6, rtol=1e-5)
        for n, g in got["grads"].items():
            want = ref.get_parameter(n).grad
            if "experts" in n:
                want = want.narrow(0, got["offset"], got["local"])
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5, msg=f"rank {r}: {n}")
        assert got["calls"] == 4  # one exchange out and one back per joint call, forward and backward
