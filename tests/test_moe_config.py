"""One configuration path for the MoE layer: every LayerConfig field under every router is
either used (the layer routes, computes or reports differently) or refused with a ConfigError
line that names it; and the defects of the string-flag layer each have a test here."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

import vlmoe
from vlmoe.errors import ConfigError
from vlmoe.models.stats import model_stats
from vlmoe.moe import LayerConfig, SoftMoE, SparseMoE, build_layer
from vlmoe.moe.config import ALL_ROUTERS

D, H, E = 16, 24, 4

# A value other than the default for every field (the router is the other axis).
PROBE = {
    "num_experts": 6, "top_k": 2, "capacity_factor": 0.5, "batch_priority": False, "noise_scale": 0.5, "group_size": 7,
    "multiple_of": 1, "normalize_combine_weights": True, "gate": "topk_softmax", "expert_type": "swiglu",
    "implementation": "loop", "importance_weight": 0.3, "load_weight": 0.3, "balance_weight": 0.3, "z_loss_weight": 0.3,
    "local_entropy_weight": 0.3, "global_entropy_weight": 0.3, "global_entropy_threshold": 0.5,
    "image": {"capacity_factor": 0.5}, "text": {"capacity_factor": 0.5}, "eval_routing": "batch",
    "eval_capacity_factor": 0.5, "balance": "bias", "bias_update_rate": 0.01, "bias_per_modality": True,
    "num_shared_experts": 1, "shared_expert_gate": True, "slots_per_expert": 2,
}


def _fingerprint(layer) -> list[torch.Tensor]:
    """What a user can observe of a layer: training and evaluation outputs of both
    modalities (text with padding), every recorded loss and statistic, the expert bias after
    a balancing step, the parameters' shapes and the experts' matmul path."""
    g = torch.Generator().manual_seed(1)
    # 40 patches per image: per-example capacities that multiple_of=4 cannot round together
    img, txt = torch.randn(3, 40, D, generator=g), torch.randn(3, 10, D, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = mask[2, 3:] = False
    out = [torch.tensor([hash(layer.experts.implementation) % 1000.0])]
    out += [torch.tensor(p.shape, dtype=torch.float) for p in layer.parameters()]
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        torch.manual_seed(2)
        layer.aux.clear()
        out += [layer(img, modality="image"), layer(txt, mask=mask, modality="text")]
        for aux in layer.aux.values():
            out += [aux.loss.reshape(1), *(v.reshape(-1).float() for v in aux.stats.values())]
        if mode == "train" and getattr(layer, "balancer", None) is not None:
            layer.update_bias()
            out.append(layer.expert_bias.reshape(-1))
    return [t.detach().reshape(-1).float() for t in out]


def _build(router, **kw):
    torch.manual_seed(0)
    layer = build_layer(D, H, LayerConfig(router=router, num_experts=kw.pop("num_experts", E), **kw))
    with torch.no_grad():
        for p in layer.parameters():  # off the initial values, so that biases and gates matter
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_the_probe_covers_every_field():
    assert set(PROBE) == {f.name for f in fields(LayerConfig)} - {"router"}


@pytest.mark.parametrize("router", ALL_ROUTERS)
@pytest.mark.parametrize("name", sorted(PROBE))
def test_every_setting_is_used_by_the_router_or_refused_naming_it(router, name):
    """Given alone, each setting either changes what the layer does (compared with the same
    layer without it, same weights and seeds) or is refused with one line that names it.
    A value equal to what the router does anyway (top_k=2 for GShard) counts as used."""
    value = PROBE[name]
    if name == "batch_priority":
        value = not LayerConfig(router=router if router != "soft" else "topk").resolve().batch_priority
    try:
        layer = _build(router, **{name: value})
    except ConfigError as e:
        assert name in str(e) and "\n" not in str(e), str(e)
        return
    if getattr(LayerConfig(router=router).resolve(), name) == value:
        return  # what the router does by default
    base = _build(router)
    assert not _same(_fingerprint(layer), _fingerprint(base)), f"{name}={value!r} under router={router!r} changed nothing"


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_a_setting_the_router_cannot_use_names_the_router(router):
    refused = {"topk": "slots_per_expert", "switch": "slots_per_expert", "gshard": "gate",
               "expert_choice": "normalize_combine_weights", "soft": "z_loss_weight"}[router]
    with pytest.raises(ConfigError, match=rf"^{refused}=.* has no effect with router='{router}'"):
        _build(router, **{refused: PROBE[refused]})


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_a_resolved_configuration_resolves_to_itself_and_settings_can_change(router):
    """resolve() is idempotent (a layer's settings can be changed after construction, which
    re-checks the whole configuration)."""
    cfg = LayerConfig(router=router).resolve()
    assert cfg.resolve() == cfg
    layer = _build(router)
    if router != "soft":
        layer.group_size = 5
        assert layer.config.group_size == 5 and layer.group_size == 5
    with pytest.raises(ConfigError, match="top_k"):
        layer.top_k = 99


def test_gshard_from_a_bundled_config_routes_top_2():
    """Defect: create_model('limoe-tiny', moe={'router': 'gshard'}) failed with "routes to
    exactly 2 expert(s); got top_k=1": the config and MoEConfig said top_k 1."""
    layer = vlmoe.create_model("limoe-tiny", moe={"router": "gshard"}).moe_layers()[0]
    assert layer.top_k == 2 and layer.router_name == "gshard"
    assert vlmoe.create_model("limoe-tiny", moe={"router": "switch"}).moe_layers()[0].options.batch_priority is False


@pytest.mark.parametrize("setting", [
    {"local_entropy_weight": 0.1}, {"global_entropy_weight": 0.1}, {"z_loss_weight": 0.1}, {"noise_scale": 1.0},
    {"group_size": 8}, {"text": {"capacity_factor": 2.0}}, {"image": {"capacity_factor": 2.0}}, {"capacity_factor": 2.0},
    {"eval_capacity_factor": 0.5}, {"router_init_std": 0.01}, {"batch_priority": True}, {"importance_weight": 0.1},
    {"gate": "topk_softmax"}, {"eval_routing": "batch"},
])
def test_soft_moe_refuses_every_token_routing_setting(setting):
    """Defect: under router 'soft' each of these was accepted and changed nothing."""
    name = next(iter(setting))
    with pytest.raises(ConfigError, match=rf"^{name}.*has no effect with router='soft'"):
        vlmoe.create_model("limoe-tiny-soft", moe=setting)


def test_limoe_settings_copied_onto_soft_moe_are_refused():
    """limoe-tiny's entropy losses on a Soft MoE layer would be silently dropped."""
    cfg = vlmoe.get_model_config("limoe-tiny")
    with pytest.raises(ConfigError, match="has no effect with router='soft'"):
        vlmoe.create_model({**cfg, "moe": {**cfg["moe"], "router": "soft"}})


def test_expert_choice_refuses_top_k_and_routes_by_capacity():
    """Defect: router 'expert_choice' with top_k 99 was accepted and routed with K = 1. An
    evaluation-time BPR override is refused too (planted: expert choice said to prioritise)."""
    with pytest.raises(ConfigError, match="batch_priority has no effect with router='expert_choice'"):
        SparseMoE(D, H, num_experts=E, router="expert_choice").configure_eval(batch_priority=False)
    with pytest.raises(ConfigError, match=r"router='expert_choice' routes to exactly 1 expert\(s\); got top_k=99"):
        SparseMoE(D, H, num_experts=E, router="expert_choice", top_k=99)
    assert SparseMoE(D, H, num_experts=E, router="expert_choice", top_k=1).top_k == 1


def test_per_modality_options_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^moe.text takes routing options per modality"):
        vlmoe.create_model("limoe-tiny", moe={"text": "capacity_factor=2"})


def test_options_without_their_subject_are_refused():
    """slots_per_expert under 'topk' and bias_update_rate without balance 'bias' were ignored;
    a load loss without router noise was silently never computed."""
    with pytest.raises(ConfigError, match="slots_per_expert=2 has no effect with router='topk'"):
        vlmoe.create_model("limoe-tiny", moe={"slots_per_expert": 2})
    with pytest.raises(ConfigError, match="bias_update_rate"):
        SparseMoE(D, H, num_experts=E, bias_update_rate=0.01)
    with pytest.raises(ConfigError, match="load_weight=0.1 needs noisy gating"):
        SparseMoE(D, H, num_experts=E, noise_scale=0.0, load_weight=0.1)
    with pytest.raises(ConfigError, match="global_entropy_threshold is set but no global_entropy_weight"):
        SparseMoE(D, H, num_experts=E, global_entropy_threshold=math.log(2))
    # the default load loss with no noise is off, not a weight that does nothing
    assert SparseMoE(D, H, num_experts=E, noise_scale=0.0).options.load_weight == 0.0
    # an ablation: weight 0 with the bundled thresholds is allowed (the user turned the loss off)
    vlmoe.create_model("limoe-tiny", moe={"global_entropy_weight": 0.0})


def test_soft_moe_refuses_evaluation_settings_and_the_sweep_says_so(tmp_path):
    """Defect: vlmoe-zeroshot --capacity-factor on a Soft MoE model printed rows labelled
    with capacities that changed nothing; --eval-capacity-factor was written as if used."""
    soft = SoftMoE(D, H, num_experts=E)
    for kw in ({"eval_routing": "batch"}, {"eval_capacity_factor": 0.5}, {"batch_priority": False}):
        with pytest.raises(ConfigError, match="has no effect on Soft MoE"):
            soft.configure_eval(**kw)
    soft.configure_eval()  # nothing asked, nothing refused
    model = vlmoe.create_model("limoe-tiny-soft")
    with pytest.raises(ConfigError, match="has no effect on Soft MoE"):
        model.set_eval_routing(eval_capacity_factor=2.0)


def test_active_flops_are_dropless_whatever_the_eval_capacity_factor():
    """Defect: model_stats cleared capacity_factor but not eval_capacity_factor, so a model
    with eval_capacity_factor 0.25 reported fewer image FLOPs."""
    torch.manual_seed(0)
    base = model_stats(vlmoe.create_model("limoe-tiny"))
    torch.manual_seed(0)
    low = model_stats(vlmoe.create_model("limoe-tiny", moe={"eval_capacity_factor": 0.25, "eval_routing": "batch"}))
    assert low["flops_image"] == base["flops_image"] and low["flops_text"] == base["flops_text"]


def test_expert_choice_active_parameters_follow_its_capacity_factor():
    """Expert choice computes cf x tokens expert rows: per token cf/E of the experts, not all
    of them (the plant "1.0 for expert choice" fails here)."""
    def expert_params(model):
        return sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())

    for cf in (1.0, 2.0):
        torch.manual_seed(0)
        dense_like = model_stats(vlmoe.create_model("limoe-tiny", moe={"router": "expert_choice", "capacity_factor": cf}))
        torch.manual_seed(0)
        m = vlmoe.create_model("limoe-tiny", moe={"router": "expert_choice", "capacity_factor": cf})
        n_exp = expert_params(m)
        total_image = dense_like["active_params_image"]
        # an image token passes through the image tower's MoE layers only (shared with text):
        # active = everything else + cf/8 of the experts
        other = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("visual.", "logit_scale"))
                    and ".experts." not in n)
        assert total_image == pytest.approx(other + n_exp * cf / 8)


def test_joint_evaluation_calls_reach_hooks_and_meters():
    """Defect: in eval mode forward_joint called self.forward directly, so forward hooks (and
    the meters built on them) never saw joint-routed models' evaluation calls."""
    from vlmoe.eval.sweep import RoutingMeter

    model = vlmoe.create_model("limoe-tiny", moe={"routing_groups": "joint"}).eval()
    calls = []
    for m in model.moe_layers():
        m.register_forward_hook(lambda mod, inp, out: calls.append(1))
    image = torch.randn(2, 3, *model.image_size)
    text = torch.randint(1, 300, (2, model.context_length))
    text[:, 5:] = 0
    with RoutingMeter(model) as meter, torch.no_grad():
        model(image, text)
    assert len(calls) == 2 * len(model.moe_layers())  # one call per modality and layer
    tokens = {mod: sum(v[0] for (name, m), v in meter.per_layer.items() if m == mod) for mod in ("image", "text")}
    n_patches = model.visual.grid_size[0] * model.visual.grid_size[1] + 1  # and the class token
    assert tokens == {"image": 2 * n_patches * len(model.moe_layers()), "text": 2 * 5 * len(model.moe_layers())}
    # a training-mode joint call records the union ("joint") beside each modality: counted once
    model.train()
    with RoutingMeter(model) as train_meter:
        model(image, text)
    assert train_meter.choices == sum(tokens.values())


def test_expert_choice_counts_a_token_as_kept_once_whatever_number_of_experts_took_it():
    """Expert choice's dropped share is the share of tokens no expert took (its one routed
    "choice" per token). Planted: kept counted as kept assignments, so a token two experts took
    counted twice and the dropped share came out too low."""
    from vlmoe.moe import expert_choice_route

    torch.manual_seed(3)
    layer = SparseMoE(D, H, num_experts=E, router="expert_choice", capacity_factor=1.0, eval_routing="batch").eval()
    x = torch.randn(16, D)
    with torch.no_grad():
        layer(x)
        token_EC, _ = expert_choice_route(layer.router_logits(x).softmax(-1), 4, None)  # C = 16 * 1 / 4
    taken = set(token_EC.reshape(-1).tolist()) - {-1}
    assert len(taken) < 16, "the case must have a token taken twice and one not at all"
    st = layer.aux[None].stats
    assert int(st["num_kept"]) == len(taken) and int(st["num_choices"]) == 16
    assert float(st["dropped_frac"]) == pytest.approx(1 - len(taken) / 16)


def test_a_per_modality_option_the_router_cannot_use_is_refused_naming_the_modality():
    """Planted: the per-modality loop of the refusal skipped, so a text-only load loss or BPR
    under expert choice was accepted and did nothing."""
    for option in ({"load_weight": 0.1}, {"batch_priority": True}):
        name = next(iter(option))
        with pytest.raises(ConfigError, match=rf"^{name} \(moe.text\)=.* has no effect with router='expert_choice'"):
            SparseMoE(D, H, num_experts=E, router="expert_choice", modality_overrides={"text": option})


def test_parameters_keep_their_order_router_first():
    """The router's parameters come first, then the experts, then the shared experts: the
    order of named_parameters is the order in which the optimiser and Lightning's gradient
    clipping sum, so a reordering changes 250-step results (the demo's LIMoE-tiny moved from
    64.0% to 66.6% when the redesign first registered the experts before the router)."""
    for layer in (SparseMoE(D, H, num_experts=E, num_shared_experts=1, shared_expert_gate=True), SoftMoE(D, H, num_experts=E)):
        names = [n for n, _ in layer.named_parameters()]
        first = [n for n in names if n != "scale"][0]
        assert first == "router.weight", names
        assert names.index("experts.w1") < (names.index("shared_experts.w1") if "shared_experts.w1" in names else len(names))
