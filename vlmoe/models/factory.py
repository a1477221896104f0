"""Named model configs (one JSON per model in configs/), create_model and the tokenizer."""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .checkpoint import find_export, read_checkpoint, load_state_dict_strict, read_state_dict
from .hub import download_export, is_hub_id
from .model import VLMoEModel
from ..errors import ConfigError, CheckpointError, NotFound

__all__ = ["list_models", "get_model_config", "resolve_config", "create_model", "load_model", "dense_baseline", "dense_config", "get_tokenizer", "build_model"]

CONFIG_DIR = Path(__file__).parent / "configs"


@lru_cache(maxsize=None)
def _configs() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}


def list_models() -> list[str]:
    """Names usable with create_model."""
    return sorted(_configs())


def get_model_config(name: str) -> dict:
    cfgs = _configs()
    if name not in cfgs:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(cfgs))}")
    return copy.deepcopy(cfgs[name])


def dense_baseline(name: str) -> str:
    """The dense CLIP of the same width, depth, patch size and context length as a LIMoE
    config (limoe-b16-e32 -> clip-b16, limoe-tiny-widenet -> clip-tiny)."""
    get_model_config(name)  # an unknown name is reported as unknown, with the known ones
    if name.startswith("clip-"):
        return name
    # variants of a LIMoE config (expert count, WideNet, Mixtral routing, Soft MoE, bias
    # balancing, shared or fine-grained experts) share its baseline
    base = re.sub(r"(-e\d+|-widenet|-mixtral|-soft|-auxfree-modality|-auxfree|-shared|-fine)$", "", name.replace("limoe-", "clip-", 1))
    if base not in _configs():
        raise ConfigError(f"{name!r} has no dense baseline config {base!r}")
    return base


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config(name_or_config: str | dict | Path, **overrides: Any) -> dict:
    """The config dict of a model name, an export folder (its config.json) or a dict, with
    `overrides` merged in."""
    if isinstance(name_or_config, dict):
        config = copy.deepcopy(name_or_config)
    elif str(name_or_config) in _configs():
        config = get_model_config(str(name_or_config))
    elif find_export(name_or_config):
        config = find_export(name_or_config)[1]
    else:
        get_model_config(str(name_or_config))  # raises with the list of known names
    return _merge(config, overrides)


def dense_config(model_config: str | dict) -> dict:
    """The dense CLIP config of an open_clip model name (e.g. "ViT-B-16"), a vlmoe config name
    (its `moe` dropped) or a config dict: what an open_clip checkpoint is loaded into."""
    if isinstance(model_config, dict):
        return copy.deepcopy(model_config)
    if model_config in _configs():
        cfg = copy.deepcopy(_configs()[model_config])
        cfg.pop("moe", None)
        return cfg
    import open_clip

    cfg = open_clip.get_model_config(model_config)
    if cfg is None:
        raise ConfigError(f"unknown model config {model_config!r}: not a vlmoe name and not an open_clip model name")
    if cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}):
        raise ConfigError(f"open_clip model {model_config!r} has a custom/HF text tower; only CLIP-style towers are supported")
    return {k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}


def build_model(config: dict) -> VLMoEModel:
    known = {"embed_dim", "vision_cfg", "text_cfg", "moe", "sharing", "quick_gelu", "init_logit_scale", "pad_id"}
    unknown = set(config) - known
    if unknown:
        raise ConfigError(f"unknown model config key(s) {sorted(unknown)}; known: {sorted(known)}")
    return VLMoEModel(**config)


def create_model(name_or_config: str | dict | Path, pretrained: str | Path | None = None, strict: bool = True, **overrides: Any) -> VLMoEModel:
    """Build a model by name (see list_models), from a config dict, or from a vlmoe export
    folder; `overrides` are merged into the config (nested dicts merge key by key, e.g.
    `moe={"num_experts": 4}`).

    pretrained: a vlmoe export (folder or .safetensors), a Lightning .ckpt from `vlmoe fit`,
    or a .pt/.bin/.safetensors state dict of the same architecture. Loading is strict unless
    strict=False (then what was skipped is in `model.load_report`).

    A vlmoe export on the Hugging Face Hub is `hf-hub:ORG/NAME` or `hf-hub:ORG/NAME@REVISION`
    (as name_or_config or as pretrained), read through huggingface_hub's cache (HF_HUB_CACHE,
    HF_HUB_OFFLINE apply)."""
    if is_hub_id(name_or_config):
        name_or_config = download_export(name_or_config)
    if is_hub_id(pretrained):
        pretrained = download_export(pretrained)
    config = resolve_config(name_or_config, **overrides)
    if pretrained is None and not isinstance(name_or_config, dict) and str(name_or_config) not in _configs():
        pretrained = name_or_config  # an export folder (resolve_config found its config.json)
    model = build_model(config)
    if pretrained is not None:
        path = Path(pretrained)
        if not path.exists():
            raise NotFound(f"pretrained checkpoint not found: {path}")
        prefix = "model." if path.suffix == ".ckpt" else None
        sd = read_state_dict(path, prefix=prefix)
        if not sd:
            raise CheckpointError(f"{path} holds no weights under 'model.' (is it a checkpoint written by vlmoe fit?)")
        model.load_report = load_state_dict_strict(model, sd, strict=strict, source=str(path))
    return model


def load_model(spec: str | Path, strict: bool = True) -> VLMoEModel:
    """Any model a user may point at: a vlmoe export (folder or .safetensors with config.json),
    a Lightning .ckpt written by `vlmoe fit`, an open_clip checkpoint as `ARCH@PATH` (e.g.
    `ViT-B-32@open_clip_model.safetensors`, ARCH an open_clip or vlmoe dense config name),
    a Hub export `hf-hub:ORG/NAME[@REV]`, or a model name (randomly initialised)."""
    spec = str(spec)
    if is_hub_id(spec):
        return create_model(spec, strict=strict)
    if "@" in spec and not Path(spec).exists():
        arch, _, path = spec.partition("@")
        config = dense_config(arch)
        model = build_model(config)
        model.load_report = load_state_dict_strict(model, read_state_dict(path), strict=strict, source=path)
        return model
    path = Path(spec)
    if path.suffix == ".ckpt":
        hp = read_checkpoint(path).get("hyper_parameters") or {}
        if not isinstance(hp, dict) or "model_name" not in hp:
            raise CheckpointError(f"{path} is not a checkpoint written by `vlmoe fit` (no model_name in its hyper-parameters)")
        return create_model(resolve_config(hp["model_name"], **(hp.get("model_overrides") or {})), pretrained=path, strict=strict)
    if spec in _configs() or find_export(spec):
        return create_model(spec, strict=strict)
    if path.exists():
        raise CheckpointError(
            f"don't know how to load {path}: expected a vlmoe export (folder or .safetensors with config.json), "
            f"a .ckpt from vlmoe fit, or ARCH@PATH for an open_clip checkpoint"
        )
    get_model_config(spec)  # raises with the known names
    raise AssertionError("unreachable")


def has_no_weights(spec: str | Path) -> bool:
    """True where `load_model(spec)` builds a named model with random weights (a model name,
    not an export, checkpoint, ARCH@PATH or Hub id)."""
    spec = str(spec)
    return not is_hub_id(spec) and "@" not in spec and spec in _configs() and find_export(spec) is None


def warn_random_weights(prog: str, spec: str) -> None:
    """A model name without weights evaluates random initial weights: say so on stderr."""
    import sys

    if has_no_weights(spec):
        print(f"{prog}: note: {spec} is a model name, not weights: it is evaluated with random initial weights "
              f"(pass an export, a .ckpt from vlmoe fit, ARCH@PATH or hf-hub:ORG/NAME for trained ones)",
              file=sys.stderr, flush=True)


def get_tokenizer(model_or_context_length: VLMoEModel | int = 77):
    """open_clip's BPE tokenizer (bundled with open_clip, no download) for the model's
    context length; longer texts are truncated with the end-of-text token kept."""
    from open_clip.tokenizer import SimpleTokenizer

    n = model_or_context_length if isinstance(model_or_context_length, int) else model_or_context_length.context_length
    return SimpleTokenizer(context_length=n)
