"""Reference outputs of the MoE layer and the design configs, for checking that a refactor
changes nothing: forward outputs, input and parameter gradients, auxiliary losses and
statistics, for every router, both routing modes, masks, evaluation routings and every
design config, in training and in evaluation.

    python scripts/layer_reference.py save /tmp/ref.pt     # on the code before the change
    python scripts/layer_reference.py check /tmp/ref.pt    # on the code after it

To compare with an older commit without switching branches:
    git worktree add /tmp/old <commit> && (cd /tmp/old && PYTHONPATH=. python scripts/layer_reference.py save /tmp/ref.pt)

`check` compares bit for bit (torch.equal) on the same machine and prints every difference;
exit status 1 if there is one.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import vlmoe
from vlmoe.models.stats import model_stats
from vlmoe.moe import SparseMoE

LAYER_CASES: dict[str, dict] = {
    "topk": {},
    "topk-k2": {"top_k": 2},
    "topk-k2-mixtral": {"top_k": 2, "gate": "topk_softmax", "expert_type": "swiglu", "capacity_factor": None},
    "topk-k2-normalize": {"top_k": 2, "normalize_combine_weights": True},
    "topk-nobpr": {"batch_priority": False},
    "topk-dropless": {"capacity_factor": None},
    "topk-group": {"group_size": 12},
    "topk-losses": {"z_loss_weight": 0.1, "local_entropy_weight": 0.1, "global_entropy_weight": 0.1,
                    "global_entropy_threshold": math.log(2), "modality_overrides": {"text": {"global_entropy_threshold": math.log(4)}}},
    "topk-text-cf": {"modality_overrides": {"text": {"capacity_factor": 2.0}}},
    "topk-shared": {"num_shared_experts": 1, "shared_expert_gate": True},
    "topk-bias": {"balance": "bias"},
    "topk-bias-modality": {"balance": "bias", "bias_per_modality": True},
    "topk-eval-batch": {"eval_routing": "batch", "eval_capacity_factor": 0.5},
    "topk-eval-dropless": {"eval_routing": "dropless"},
    "switch": {"router": "switch"},
    "gshard": {"router": "gshard"},
    "gshard-bias": {"router": "gshard", "balance": "bias", "bias_per_modality": True},
    "expert_choice": {"router": "expert_choice"},
    "expert_choice-cf2": {"router": "expert_choice", "capacity_factor": 2.0, "z_loss_weight": 0.1},
    "expert_choice-eval-batch": {"router": "expert_choice", "eval_routing": "batch"},
}

MODELS = ["limoe-tiny", "limoe-tiny-single", "limoe-tiny-timm", "limoe-tiny-soft", "limoe-tiny-auxfree",
          "limoe-tiny-auxfree-modality", "limoe-tiny-shared", "limoe-tiny-fine", "limoe-tiny-mixtral",
          "limoe-tiny-widenet", "clip-tiny"]


def _put(out: dict, key: str, t) -> None:
    if torch.is_tensor(t):
        out[key] = t.detach().clone().float() if t.is_floating_point() else t.detach().clone()


def _aux(out: dict, prefix: str, layer) -> None:
    for modality, aux in layer.aux.items():
        _put(out, f"{prefix}/aux/{modality}/loss", aux.loss)
        for k, v in aux.losses.items():
            _put(out, f"{prefix}/aux/{modality}/losses/{k}", v)
        for k, v in aux.stats.items():
            _put(out, f"{prefix}/aux/{modality}/stats/{k}", v)


def layer_cases(weights: dict | None) -> dict:
    out = {}
    D, B, T = 16, 3, 10
    for name, kw in LAYER_CASES.items():
        torch.manual_seed(0)
        layer = SparseMoE(D, 32, num_experts=4, **kw)
        with torch.no_grad():  # move every parameter off its init so biases matter
            for p in layer.parameters():
                p.add_(0.05 * torch.randn_like(p))
        wkey = f"weights/layer/{name}/"
        if weights is None:
            out.update({wkey + k: v.clone() for k, v in layer.state_dict().items()})
        else:
            layer.load_state_dict({k[len(wkey):]: v for k, v in weights.items() if k.startswith(wkey)})
        x = torch.randn(B, T, D)
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, 6:] = False
        mask[2, 3:] = False
        img = torch.randn(B, 12, D)
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            for call in ("image", "text", "joint"):
                if call == "joint" and "modality_overrides" in kw and "capacity_factor" in kw["modality_overrides"]["text"]:
                    continue  # joint routing refuses a per-modality capacity
                key = f"layer/{name}/{mode}/{call}"
                torch.manual_seed(1)
                xi, xt = img.clone().requires_grad_(), x.clone().requires_grad_()
                layer.aux.clear()
                layer.zero_grad(set_to_none=True)
                layer.capture = []
                if call == "image":
                    y = {"image": layer(xi, modality="image")}
                elif call == "text":
                    y = {"text": layer(xt, mask=mask, modality="text")}
                else:
                    y = layer.forward_joint({"image": (xi, None), "text": (xt, mask)})
                total = sum((v * torch.linspace(-1, 1, v.shape[-1])).sum() for v in y.values())
                total = total + sum(a.loss for a in layer.aux.values())
                total.backward()
                for m, v in y.items():
                    _put(out, f"{key}/out/{m}", v)
                _put(out, f"{key}/grad/image", xi.grad)
                _put(out, f"{key}/grad/text", xt.grad)
                for pn, p in layer.named_parameters():
                    _put(out, f"{key}/pgrad/{pn}", p.grad)
                _aux(out, key, layer)
                for i, c in enumerate(layer.capture):
                    for k in ("expert", "kept", "mask"):
                        _put(out, f"{key}/capture/{i}/{k}", c[k])
                layer.capture = None
                if mode == "train" and layer.balance == "bias":
                    _put(out, f"{key}/bias_load", layer.update_bias())
                    _put(out, f"{key}/expert_bias", layer.expert_bias)
    return out


def model_cases(weights: dict | None) -> dict:
    """`weights`: state dicts saved with the reference, loaded into each model so that a
    change of initialisation order does not count as a difference."""
    out = {}
    for name in MODELS:
        routings = ["per_modality", "joint"] if name in ("limoe-tiny", "limoe-tiny-single") else [None]
        for routing in routings:
            torch.manual_seed(0)
            kw = {"moe": {"routing_groups": routing}} if routing else {}
            model = vlmoe.create_model(name, **kw)
            key = f"model/{name}/{routing}"
            if weights is None:
                out.update({f"weights/{key}/{k}": v.clone() for k, v in model.state_dict().items()})
            else:
                model.load_state_dict({k[len(f"weights/{key}/"):]: v for k, v in weights.items()
                                       if k.startswith(f"weights/{key}/")})
            size = model.image_size
            torch.manual_seed(1)
            image = torch.randn(4, 3, *size)
            text = torch.randint(1, 400, (4, model.context_length))
            for i, n in enumerate((5, 9, 3, 12)):
                text[i, n:] = 0
                text[i, n - 1] = model.vocab_size - 1
            model.train()
            torch.manual_seed(2)
            o = model(image, text)
            logits = o["logit_scale"] * o["image_features"] @ o["text_features"].t()
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(4)) + o["aux_loss"]
            loss.backward()
            _put(out, f"{key}/train/loss", loss)
            _put(out, f"{key}/train/image_features", o["image_features"])
            _put(out, f"{key}/train/text_features", o["text_features"])
            for k, v in o["moe_metrics"].items():
                _put(out, f"{key}/train/metrics/{k}", v)
            for pn, p in model.named_parameters():
                _put(out, f"{key}/train/pgrad/{pn}", p.grad)
            model.eval()
            with torch.no_grad():
                o = model(image, text)
                _put(out, f"{key}/eval/image_features", o["image_features"])
                _put(out, f"{key}/eval/text_features", o["text_features"])
                for k, v in o["moe_metrics"].items():
                    _put(out, f"{key}/eval/metrics/{k}", v)
            if model.moe_config is not None:
                for k, v in model_stats(model).items():
                    out[f"{key}/stats/{k}"] = torch.tensor(v, dtype=torch.float64)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["save", "check"])
    p.add_argument("path")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the same reduction order in both runs
    old = torch.load(a.path, weights_only=True) if a.action == "check" else None
    ref = {**layer_cases(old), **model_cases(old)}
    if a.action == "save":
        torch.save(ref, a.path)
        print(f"saved {len(ref)} tensors to {a.path}")
        return 0
    old = {k: v for k, v in old.items() if not k.startswith("weights/")}
    bad, new = [], sorted(set(ref) - set(old))
    for k in sorted(old):
        if k not in ref:
            bad.append(f"{k}: missing from the new run")
        elif old[k].shape != ref[k].shape or not torch.equal(old[k], ref[k]):
            diff = (old[k].double() - ref[k].double()).abs().max().item() if old[k].shape == ref[k].shape else "shape"
            bad.append(f"{k}: differs (max abs {diff})")
    for line in bad:
        print(line)
    print(f"{len(old)} reference tensors, {len(bad)} differences; {len(new)} new in this run"
          + (f" (e.g. {', '.join(new[:3])})" if new else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
