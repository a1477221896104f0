"""Sparse upcycling (Komatsuzaki et al. 2022): dense checkpoints -> MoE models whose experts
all start as copies of the dense MLP they replace, with a router initialised near zero.

With dropless routing (capacity_factor=None) and renormalised combine weights the upcycled
model computes exactly what the dense one did, whatever the router says.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP
from open_clip.transformer import LayerScale, QuickGELU, VisionTransformer
from torch import nn

from ..moe import SparseMoE
from .checkpoint import load_state_dict_strict, read_state_dict
from .factory import build_model, dense_config
from .moe_config import resolve_layers
from .towers import install_moe, tower_blocks
from ..errors import ConfigError, CheckpointError, NotFound

__all__ = ["upcycle_open_clip", "load_open_clip", "upcycle_timm_vit", "infer_open_clip_config", "experts_from_mlp", "split_neurons", "neuron_importance"]


def _dense_mlp_tensors(sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    """(w1 [D, H], b1, w2 [H, D], b2) of an open_clip (c_fc/c_proj) or timm (fc1/fc2) MLP."""
    for first, second in (("c_fc", "c_proj"), ("fc1", "fc2")):
        if f"{prefix}.{first}.weight" in sd:
            out = {
                "w1": sd.pop(f"{prefix}.{first}.weight").t(),
                "w2": sd.pop(f"{prefix}.{second}.weight").t(),
            }
            for b, name in (("b1", first), ("b2", second)):
                if f"{prefix}.{name}.bias" in sd:
                    out[b] = sd.pop(f"{prefix}.{name}.bias")
            return out
    raise CheckpointError(f"no dense MLP weights under {prefix!r} (looked for c_fc/c_proj and fc1/fc2)")


def experts_from_mlp(sd: dict, prefix: str, num_experts: int, router_weight: torch.Tensor,
                     neurons: torch.Tensor | None = None) -> None:
    """In-place on a state dict: replace the dense MLP under `prefix` by E experts and the
    given router weight. Each expert is a copy of the dense MLP (sparse upcycling), or with
    `neurons` [E, h] (hidden-neuron indices, -1 for an empty slot) the listed subset of it
    (MoEBERT's split)."""
    dense = _dense_mlp_tensors(sd, prefix)
    if neurons is None:
        for name, t in dense.items():
            sd[f"{prefix}.experts.{name}"] = t.unsqueeze(0).repeat(num_experts, *([1] * t.ndim)).contiguous()
    else:
        valid = (neurons >= 0).unsqueeze(-1)
        idx = neurons.clamp_min(0)
        # Empty slots get zero weights in and out: act(0) * 0 contributes nothing.
        w1 = dense["w1"].t()[idx] * valid  # [E, h, D]
        sd[f"{prefix}.experts.w1"] = w1.transpose(1, 2).contiguous()
        sd[f"{prefix}.experts.w2"] = (dense["w2"][idx] * valid).contiguous()  # [E, h, D]
        if "b1" in dense:
            sd[f"{prefix}.experts.b1"] = (dense["b1"][idx] * valid.squeeze(-1)).contiguous()
            sd[f"{prefix}.experts.b2"] = dense["b2"].unsqueeze(0).repeat(num_experts, 1).contiguous()
    sd[f"{prefix}.router.weight"] = router_weight.detach().clone()


def split_neurons(importance: torch.Tensor, num_experts: int, num_shared: int) -> torch.Tensor:
    """MoEBERT's assignment: the `num_shared` most important hidden neurons go to every
    expert, the others are dealt out round-robin in order of importance (so experts are
    alike in importance). Returns [E, h] indices, -1 where an expert has fewer neurons."""
    H = importance.numel()
    if num_experts > H:
        raise ConfigError(f"cannot split {H} hidden neurons into {num_experts} experts: use at most {H} experts")
    if not 0 <= num_shared <= H:
        raise ConfigError(f"num_shared_neurons must be in [0, {H}]; got {num_shared}")
    order = torch.sort(importance, descending=True, stable=True).indices
    shared, rest = order[:num_shared], order[num_shared:]
    per = -(-rest.numel() // num_experts)
    out = torch.full((num_experts, num_shared + per), -1, dtype=torch.long)
    out[:, :num_shared] = shared
    for e in range(num_experts):
        mine = rest[e::num_experts]
        out[e, num_shared : num_shared + mine.numel()] = mine
    return out


def neuron_importance(dense: CLIP, prefixes: list[str], batches=None) -> dict[str, torch.Tensor]:
    """Per hidden neuron of each dense MLP: with `batches` ([(images, texts), ...]) MoEBERT's
    first-order sensitivity sum |w * dL/dw| over the neuron's weights under the contrastive
    loss; without, weight magnitude ||w_in|| * ||w_out||."""
    modules = dict(dense.named_modules())
    mlps = {p: modules[p] for p in prefixes}
    if not batches:
        return {p: m.c_fc.weight.norm(dim=1) * m.c_proj.weight.norm(dim=0) for p, m in mlps.items()}
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    was_training = dense.training
    dense.eval()
    scores = {p: torch.zeros(m.c_fc.out_features) for p, m in mlps.items()}
    size = tuple(dense.visual.image_size)
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError(f"importance batch {i} must be an (images, texts) pair; got {type(batch).__name__}")
        images, texts = batch
        if not (torch.is_tensor(images) and images.ndim == 4 and tuple(images.shape[-2:]) == size):
            raise ConfigError(f"importance batch {i}: images must be [B, 3, {size[0]}, {size[1]}]; got {getattr(images, 'shape', None)}")
        if not (torch.is_tensor(texts) and texts.ndim == 2 and not texts.is_floating_point() and texts.shape[0] == images.shape[0]):
            raise ConfigError(f"importance batch {i}: texts must be token ids [B, L] for the same B as the images; got {getattr(texts, 'shape', None)}")
        dense.zero_grad(set_to_none=True)
        img, txt = dense.encode_image(images, normalize=True), dense.encode_text(texts, normalize=True)
        loss_fn(img, txt, dense.logit_scale.exp()).backward()
        for p, m in mlps.items():
            s = (m.c_fc.weight * m.c_fc.weight.grad).abs().sum(1) + (m.c_proj.weight * m.c_proj.weight.grad).abs().sum(0)
            if m.c_fc.bias is not None:
                s = s + (m.c_fc.bias * m.c_fc.bias.grad).abs()
            scores[p] += s.detach()
    dense.zero_grad(set_to_none=True)
    dense.train(was_training)
    return scores


def infer_open_clip_config(model: CLIP) -> dict:
    """Rebuild the config of a standard open_clip CLIP (ViT image tower, transformer text
    tower) from its modules. Anything it cannot express shows up as a strict-loading error."""
    if type(model) is not CLIP or not isinstance(model.visual, VisionTransformer):
        raise ConfigError(
            f"can only infer the config of an open_clip CLIP with a ViT image tower; got {type(model).__name__} "
            f"with {type(model.visual).__name__}. Pass model_config= (an open_clip model name or a config dict)"
        )
    if getattr(model, "logit_bias", None) is not None:
        raise ConfigError("SigLIP-style models (logit_bias) are not supported")
    v, t = model.visual, model.transformer

    def tower(tr):
        b0 = tr.resblocks[0]
        return dict(width=tr.width, layers=tr.layers, mlp_ratio=b0.mlp.c_fc.out_features / tr.width,
                    ls_init_value=1e-5 if isinstance(b0.ls_1, LayerScale) else None), b0.attn.num_heads

    vt, vheads = tower(v.transformer)
    tt, theads = tower(t)
    vision_cfg = dict(vt, head_width=vt["width"] // vheads, patch_size=v.patch_size[0], image_size=v.image_size[0],
                      no_ln_pre=isinstance(v.ln_pre, nn.Identity), pool_type=v.pool_type,
                      final_ln_after_pool=v.final_ln_after_pool)
    text_cfg = dict(tt, heads=theads, context_length=model.context_length, vocab_size=model.vocab_size,
                    pool_type=model.text_pool_type)
    embed_dim = v.proj.shape[1] if v.proj is not None else vt["width"]
    quick = isinstance(v.transformer.resblocks[0].mlp.gelu, QuickGELU)
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg, "quick_gelu": quick}


def _download_failure(name: str, pretrained: str | None, cache_dir: str | None, error: Exception) -> NotFound:
    """One line for weights open_clip could not fetch, naming the cache folder it looked in."""
    import open_clip

    from .hub import hub_cache_dir

    if name.startswith("hf-hub:"):
        repo, folder = name[len("hf-hub:"):], hub_cache_dir(cache_dir)
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        hub = cfg.get("hf_hub", "")
        repo = "/".join(hub.split("/")[:2]) if hub else cfg.get("url", "?")
        folder = hub_cache_dir(cache_dir) if hub else (cache_dir or str(Path("~/.cache/clip").expanduser()))
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        inner = error
        while inner.__cause__ is not None or inner.__context__ is not None:
            inner = inner.__cause__ or inner.__context__
        why = f"the download failed ({type(inner).__name__})"
    return NotFound(
        f"cannot get the open_clip weights {name}{f' ({pretrained})' if pretrained else ''}: they are not in the cache folder "
        f"{folder} and {why}. Fetch them where there is network (from {repo}) into that folder (cache_dir= or "
        f"HF_HUB_CACHE choose it), or pass a local weights file as pretrained="
    )


def load_open_clip(name: str, pretrained: str | None = None, cache_dir: str | None = None) -> CLIP:
    """An open_clip CLIP with its weights, by open_clip model name + pretrained tag (or weights
    file) or open_clip Hub id, downloaded by open_clip (its cache and offline rules)."""
    import open_clip

    if name.startswith("hf-hub:"):
        if "@" in name:
            raise ConfigError(f"{name!r}: open_clip loads Hub models at their default branch only; drop the @revision")
        if pretrained is not None:
            raise ConfigError(f"{name!r} names its weights itself; drop pretrained={pretrained!r}")
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ConfigError(f"{name!r} is neither a file nor an open_clip model name (open_clip.list_models() lists them)")
        v = cfg.get("vision_cfg", {})
        if "timm_model_name" in v or isinstance(v.get("layers"), (list, tuple)) or cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}):
            raise ConfigError(f"open_clip model {name!r} is not a CLIP with a ViT image tower and a transformer text tower: "
                              f"only those are upcycled")
        if pretrained is None:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(
                f"upcycling {name!r} needs its weights: pass pretrained= a tag ({', '.join(tags) or 'open_clip has none for it'}) "
                f"or a weights file"
            )
        if not open_clip.is_pretrained_cfg(name, pretrained) and not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {name!r}; its tags: "
                              f"{', '.join(tags) or 'none'}")
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.getMessage().startswith("Failed to download")  # said once, below
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir, device="cpu", require_pretrained=True)
    except (FileNotFoundError, RuntimeError, OSError) as e:
        text = str(e)
        if isinstance(e, OSError) or any(w in text.lower() for w in ("download", "could not be loaded", "cannot find the requested")):
            raise _download_failure(name, pretrained, cache_dir, e) from None
        raise
    finally:
        logging.getLogger().removeFilter(quiet)


def _check_moe_settings(router_init_std: float, layer_kwargs: bool = False, **moe: Any) -> None:
    """The MoE settings of an upcycling call (MoEConfig fields, or with `layer_kwargs`
    SparseMoE's keywords), validated the way the layers will validate them (one ConfigError
    line), on a throwaway 8-wide layer."""
    import math

    from .model import MoEConfig

    if isinstance(router_init_std, bool) or not isinstance(router_init_std, (int, float)) or not (
            math.isfinite(router_init_std) and router_init_std >= 0):
        raise ConfigError(f"router_init_std must be a finite number >= 0; got {router_init_std!r}")
    if layer_kwargs:
        SparseMoE(8, 8, **moe)
    else:
        MoEConfig.from_dict(moe).layer_config()


def upcycle_open_clip(
    clip_model_or_checkpoint_path: CLIP | str | Path,
    num_experts: int = 8,
    moe_layers: Any = "every:2",
    text_moe_layers: Any | None = None,
    top_k: int = 1,
    capacity_factor: float | None = None,
    normalize_combine_weights: bool = True,
    model_config: str | dict | None = None,
    router_init_std: float = 1e-3,
    method: str = "copy",
    importance_batches: list | None = None,
    num_shared_neurons: int | float = 0,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    **moe_kwargs: Any,
):
    """An open_clip CLIP (by name and pretrained tag, from the Hub, a model or a checkpoint)
    -> a LIMoE VLMoEModel by sparse upcycling.

    Args:
        clip_model_or_checkpoint_path: an open_clip model name with `pretrained=` (a tag such
            as "datacomp_xl_s13b_b90k", or a weights file), an open_clip Hub id
            ("hf-hub:ORG/NAME"), an open_clip `CLIP`, or a .pt/.bin/.safetensors file (with
            `model_config=`; a `state_dict` key and a `module.` prefix are handled).
        pretrained, cache_dir: for a model name, the weights, downloaded by open_clip into its
            cache (`cache_dir`, else huggingface_hub's cache or ~/.cache/clip), so its offline
            rules (HF_HUB_OFFLINE) apply.
        num_experts, top_k, capacity_factor, normalize_combine_weights: MoE settings; the
            defaults (dropless, renormalised) reproduce the dense model exactly.
        moe_layers, text_moe_layers: placement for the image and text towers ("every:2",
            "last:N", a list, ...); text defaults to the image placement.
        model_config: needed with a checkpoint path: an open_clip model name (e.g.
            "ViT-B-16"), a vlmoe dense config name (e.g. "clip-b16") or a config dict.
            With a model object it is inferred from the modules when not given.
        router_init_std: the router starts near zero (normal with this std).
        method: "copy" (every expert a copy of the dense MLP: E times the parameters, the
            dense active compute) or "split" (MoEBERT: the MLP's hidden neurons divided among
            the experts, so the total stays that of the dense MLP and the active compute drops).
        importance_batches: for "split": [(images, texts), ...] to rank neurons by their
            effect on the contrastive loss; without them, by weight magnitude.
        num_shared_neurons: for "split": the most important neurons kept in every expert (an
            int, or a float in [0, 1] as a fraction of the hidden width).
        moe_kwargs: further MoEConfig fields (router, batch_priority, loss weights, ...).
    """
    if method not in ("copy", "split"):
        raise ConfigError(f"method must be 'copy' or 'split'; got {method!r}")
    # every MoE setting is checked before any download or checkpoint read
    _check_moe_settings(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                        normalize_combine_weights=normalize_combine_weights, router_init_std=router_init_std, **moe_kwargs)
    if isinstance(clip_model_or_checkpoint_path, str) and not Path(clip_model_or_checkpoint_path).exists():
        # the config is then inferred from the loaded modules (what open_clip actually built)
        clip_model_or_checkpoint_path = load_open_clip(clip_model_or_checkpoint_path, pretrained, cache_dir)
    elif pretrained is not None:
        raise ConfigError(f"pretrained= goes with an open_clip model name; {clip_model_or_checkpoint_path!r} is already the weights")
    if isinstance(clip_model_or_checkpoint_path, nn.Module):
        src = clip_model_or_checkpoint_path
        config = dense_config(model_config) if model_config is not None else infer_open_clip_config(src)
        sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    else:
        if model_config is None:
            raise ConfigError(
                "upcycling a checkpoint file needs model_config=: the open_clip model name it was trained as "
                "(e.g. 'ViT-B-16'), a vlmoe dense config name (e.g. 'clip-b16') or a config dict"
            )
        src = None  # the dense model is rebuilt from the checkpoint when it is needed (method="split")
        config = dense_config(model_config)
        sd = read_state_dict(clip_model_or_checkpoint_path)
    if config.get("sharing", "none") != "none":
        raise ConfigError("upcycling builds two towers with their own experts (sharing='none'): the dense towers have different MLPs")
    config["sharing"] = "none"
    config["moe"] = dict(
        num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
        normalize_combine_weights=normalize_combine_weights, image_layers=moe_layers,
        text_layers=moe_layers if text_moe_layers is None else text_moe_layers,
        router_init_std=router_init_std, **moe_kwargs,
    )
    neurons: dict[str, torch.Tensor] = {}
    if method == "split":
        dense = src
        if dense is None:
            dense = build_model({**config, "moe": None})
            load_state_dict_strict(dense, sd, source="dense open_clip weights")
        towers = {"image": ("visual.transformer.resblocks", tower_blocks(dense.visual), config["moe"]["image_layers"]),
                  "text": ("transformer.resblocks", tower_blocks(dense.transformer), config["moe"]["text_layers"])}
        prefixes = {t: [f"{pre}.{i}.mlp" for i in resolve_layers(spec, len(blocks), f"the {t} tower")] for t, (pre, blocks, spec) in towers.items()}
        scores = neuron_importance(dense, [p for ps in prefixes.values() for p in ps], importance_batches)
        hidden = {}
        for tower, ps in prefixes.items():
            for p in ps:
                H = scores[p].numel()
                shared = round(num_shared_neurons * H) if isinstance(num_shared_neurons, float) else num_shared_neurons
                neurons[p] = split_neurons(scores[p], num_experts, shared)
                hidden[tower] = neurons[p].shape[1]
        config["moe"]["expert_hidden_dim"] = hidden
    model = build_model(config)
    own = model.state_dict()
    for tower_prefix, layers in (("visual.transformer.resblocks", model.image_moe_layers), ("transformer.resblocks", model.text_moe_layers)):
        if model.visual.__class__.__name__ == "TimmImageTower" and tower_prefix.startswith("visual"):
            tower_prefix = "visual.trunk.blocks"
        for i in layers:
            p = f"{tower_prefix}.{i}.mlp"
            experts_from_mlp(sd, p, num_experts, own[f"{p}.router.weight"], neurons.get(p))
    load_state_dict_strict(model, sd, strict=True, source="dense open_clip weights")
    return model


def upcycle_timm_vit(
    vit_or_checkpoint: nn.Module | str | Path,
    num_experts: int = 8,
    moe_layers: Any = "every:2",
    model_name: str | None = None,
    top_k: int = 1,
    capacity_factor: float | None = None,
    normalize_combine_weights: bool = True,
    router_init_std: float = 1e-3,
    timm_kwargs: dict | None = None,
    **moe_kwargs: Any,
) -> nn.Module:
    """A timm Vision Transformer (model, or checkpoint + `model_name`) -> the same ViT with
    the MLP of the chosen blocks upcycled into SparseMoE (a V-MoE). Put it into a LIMoE model
    with a timm image tower via `model.visual.trunk.load_state_dict(vit.state_dict(), strict=False)`
    (the classifier head is the only difference)."""
    _check_moe_settings(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, layer_kwargs=True,
                        normalize_combine_weights=normalize_combine_weights, router_init_std=router_init_std, **moe_kwargs)
    if isinstance(vit_or_checkpoint, nn.Module):
        vit = copy.deepcopy(vit_or_checkpoint)
    else:
        if model_name is None:
            raise ConfigError("upcycling a timm checkpoint file needs model_name= (the timm architecture, e.g. 'vit_base_patch16_224')")
        import timm

        vit = timm.create_model(model_name, pretrained=False, **(timm_kwargs or {}))
        load_state_dict_strict(vit, read_state_dict(vit_or_checkpoint), source=str(vit_or_checkpoint))
    dense_sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    blocks = tower_blocks(vit)
    layers = resolve_layers(moe_layers, len(blocks), "the ViT")
    for i in layers:
        mlp = blocks[i].mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ConfigError(f"block {i}: only plain timm Mlp blocks (no inner norm) can be upcycled")

    def make(dim, hidden, act):
        m = SparseMoE(dim, hidden, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                      normalize_combine_weights=normalize_combine_weights, act_layer=act, **moe_kwargs)
        nn.init.normal_(m.router.weight, std=router_init_std)
        return m

    install_moe(blocks, layers, make)
    own = vit.state_dict()
    for i in layers:
        experts_from_mlp(dense_sd, f"blocks.{i}.mlp", num_experts, own[f"blocks.{i}.mlp.router.weight"])
    load_state_dict_strict(vit, dense_sd, source="dense timm weights")
    return vit
