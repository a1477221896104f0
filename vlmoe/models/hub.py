"""The Hugging Face Hub: vlmoe exports by `hf-hub:ORG/NAME[@REV]` (through huggingface_hub,
so its cache, `HF_HUB_CACHE` / `HF_HOME`, `HF_HUB_OFFLINE` and revisions apply), and
`push_to_hub`, which uploads exactly what `save_pretrained` writes plus a model card and an
`open_clip_config.json`."""
from __future__ import annotations

import json
from dataclasses import asdict
import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NotFound, VLMoEError
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_pretrained

__all__ = ["HF_HUB_PREFIX", "is_hub_id", "parse_hub_id", "hub_cache_dir", "download_export", "write_hub_folder", "push_to_hub",
           "model_card"]

HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
_OPEN_CLIP_HINT = ("vlmoe exports (save_pretrained, push_to_hub) hold config.json and model.safetensors; an open_clip "
                   "model repo becomes a LIMoE with vlmoe.upcycle_open_clip('hf-hub:ORG/NAME')")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_HUB_PREFIX)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """`hf-hub:ORG/NAME[@REV]` -> (ORG/NAME, REV or None)."""
    body = spec[len(HF_HUB_PREFIX):] if spec.startswith(HF_HUB_PREFIX) else spec
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        raise ConfigError(f"{spec!r} is not a Hub id: write hf-hub:ORG/NAME, or hf-hub:ORG/NAME@REVISION (a branch, tag or commit)")
    return repo_id, revision or None


def hub_cache_dir(cache_dir: str | Path | None = None) -> str:
    """The folder huggingface_hub reads and fills: `cache_dir`, else HF_HUB_CACHE (HF_HOME/hub)."""
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _is_network_error(e: BaseException) -> bool:
    """A failure to reach the Hub (no network, DNS, timeouts, offline mode), whichever HTTP
    library huggingface_hub uses."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TransportError", "ConnectionError", "OfflineModeIsEnabled",
                         "Timeout", "ReadTimeout", "TimeoutException", "NetworkError", "NameResolutionError"})


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_export(spec: str, cache_dir: str | Path | None = None, token: str | bool | None = None) -> Path:
    """The local folder (a huggingface_hub snapshot) holding the vlmoe export `spec`
    (hf-hub:ORG/NAME[@REV]): config.json and model.safetensors, downloaded unless cached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, revision = parse_hub_id(spec)
    at = f"{repo_id}@{revision}" if revision else repo_id
    folder = hub_cache_dir(cache_dir)
    paths = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                              library_name="vlmoe")))
        except LocalEntryNotFoundError:
            if name == CONFIG_NAME and isinstance(try_to_load_from_cache(repo_id, OPEN_CLIP_CONFIG_NAME, cache_dir=cache_dir,
                                                                         revision=revision), str):
                raise NotFound(f"hf-hub:{at} holds an open_clip model, not a vlmoe export: {_OPEN_CLIP_HINT}") from None
            why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
            raise NotFound(
                f"hf-hub:{at}: {name} is not in the Hugging Face cache {folder} and {why}: download it where there is "
                f"network (huggingface-cli download {repo_id}{f' --revision {revision}' if revision else ''}), or point "
                f"HF_HUB_CACHE at a cache that holds it"
            ) from None
        except RevisionNotFoundError:
            raise NotFound(f"hf-hub:{at}: the repository has no revision {revision!r} (a branch, tag or commit id)") from None
        except RepositoryNotFoundError:
            raise NotFound(f"hf-hub:{at}: no such model repository on the Hub (or it is private: log in or pass token=)") from None
        except EntryNotFoundError:
            hint = ""
            if name == CONFIG_NAME:
                hint = f": it is not a vlmoe export. {_OPEN_CLIP_HINT}"
            raise NotFound(f"hf-hub:{at} has no {name}{hint}") from None
    if paths[0].parent != paths[1].parent:
        raise NotFound(f"hf-hub:{at}: {CONFIG_NAME} and {WEIGHTS_NAME} resolved to different snapshots ({paths[0].parent}, "
                       f"{paths[1].parent}); clear the cache entry under {folder} and download again")
    return paths[0].parent


# -- writing ----------------------------------------------------------------------------------

def _open_clip_config(model) -> dict:
    """open_clip's hub config layout: {"model_cfg": ..., "preprocess_cfg": ...}. The
    model_cfg is vlmoe's (its `moe` and `sharing` keys are what open_clip cannot build:
    load it with vlmoe)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "model_cfg": model.config,
        "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        "library": "vlmoe",
    }


def _result_rows(results) -> list[tuple[str, str, float]]:
    """(dataset, metric, value) rows from CLIP_benchmark result dicts, vlmoe-zeroshot rows, or
    a plain {dataset: {metric: value}} mapping."""
    if results is None:
        return []
    if isinstance(results, dict) and "metrics" not in results and "top1" not in results:
        items = results.items()
        return [(str(d), str(k), float(v)) for d, ms in items for k, v in (ms.items() if isinstance(ms, dict) else [("value", ms)])
                if isinstance(v, (int, float))]
    rows = []
    for r in results if isinstance(results, (list, tuple)) else [results]:
        if not isinstance(r, dict):
            raise ConfigError(f"results: expected CLIP_benchmark result dicts, vlmoe-zeroshot rows or {{dataset: {{metric: value}}}}; got {type(r).__name__}")
        if "metrics" in r:  # CLIP_benchmark
            rows += [(str(r.get("dataset", "?")), k, float(v)) for k, v in r["metrics"].items() if isinstance(v, (int, float))]
        elif "top1" in r:  # vlmoe-zeroshot
            ds = str(r.get("dataset", "zero-shot"))
            rows += [(ds, k, float(r[k])) for k in ("top1", "top5") if isinstance(r.get(k), (int, float))]
        else:
            raise ConfigError(f"results: a row needs 'metrics' (CLIP_benchmark) or 'top1' (vlmoe-zeroshot); got keys {sorted(r)}")
    return rows


def model_card(model, repo_id: str, training_data: str | None = None, results=None, license: str | None = None,
               description: str | None = None) -> str:
    """The README.md pushed with a model: what it is, its size and active compute, its
    training data and zero-shot results where known, and how to load it."""
    from .stats import model_stats

    cfg = model.config
    moe = asdict(model.moe_config.resolve()) if model.moe_config is not None else None  # the router's defaults filled in
    stats = model_stats(model)
    tags = ["vlmoe", "clip", "zero-shot-image-classification"] + (["mixture-of-experts", "limoe"] if moe else [])
    head = ["---", "library_name: vlmoe", "pipeline_tag: zero-shot-image-classification", "tags:"] + [f"- {t}" for t in tags]
    if license:
        head.append(f"license: {license}")
    head.append("---")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    kind = (f"a LIMoE-style mixture-of-experts CLIP ({moe.get('num_experts')} experts, top-{moe.get('top_k', 1)}, "
            f"sharing={cfg.get('sharing', 'none')})") if moe else "a dense CLIP"
    lines = head + ["", f"# {repo_id}", "", description or f"{kind[0].upper()}{kind[1:]}, saved with [vlmoe](https://pypi.org/project/vlmoe/).", ""]
    lines += ["## Architecture", "", "| | |", "|---|---|",
              f"| embedding dim | {cfg.get('embed_dim')} |",
              f"| image tower | width {v.get('width')}, {v.get('layers')} layers, patch {v.get('patch_size')}, image size {v.get('image_size')} |",
              f"| text tower | width {t.get('width')}, {t.get('layers')} layers, context {t.get('context_length')} |"]
    if moe:
        keys = ["num_experts", "top_k", "router", "capacity_factor", "batch_priority", "image_layers", "text_layers", "routing_groups"]
        lines += [f"| moe.{k} | {json.dumps(moe[k])} |" for k in keys if k in moe]
        lines.append(f"| sharing | {cfg.get('sharing', 'none')} |")
    lines += ["", "## Size and active compute", "", "| | |", "|---|---|",
              f"| parameters | {stats['total_params'] / 1e6:.2f}M |",
              f"| active parameters per image token | {stats['active_params_image'] / 1e6:.2f}M |",
              f"| active parameters per text token | {stats['active_params_text'] / 1e6:.2f}M |",
              f"| forward GFLOPs per image | {stats['flops_image'] / 1e9:.3f} |",
              f"| forward GFLOPs per text | {stats['flops_text'] / 1e9:.4f} |",
              "", "## Training data", "", training_data or "Not recorded with this export.", ""]
    rows = _result_rows(results)
    lines += ["## Zero-shot results", ""]
    if rows:
        lines += ["| dataset | metric | value |", "|---|---|---|"] + [f"| {d} | {m} | {x:.4f} |" for d, m, x in rows]
    else:
        lines.append("None given with this export.")
    lines += ["", "## Use", "", "```python", "import vlmoe", "", f'model = vlmoe.create_model("hf-hub:{repo_id}")',
              "tokenizer = vlmoe.get_tokenizer(model)", "```", "",
              "Zero-shot evaluation from the shell:", "", "```bash",
              f"vlmoe-zeroshot --model hf-hub:{repo_id} --data 'shards/test-{{000000..000009}}.tar' --classnames names.txt --templates templates.txt",
              f"vlmoe-benchmark eval --model_type vlmoe --model hf-hub:{repo_id} --pretrained none --dataset wds/NAME --dataset_root DIR",
              "```", ""]
    return "\n".join(lines)


def write_hub_folder(model, folder: str | Path, repo_id: str = "ORG/NAME", training_data: str | None = None, results=None,
                     license: str | None = None, description: str | None = None) -> Path:
    """What push_to_hub uploads, written to `folder`: save_pretrained's model.safetensors and
    config.json, open_clip_config.json and README.md (the model card)."""
    folder = save_pretrained(model, folder)
    (folder / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(_open_clip_config(model), indent=2))
    (folder / "README.md").write_text(model_card(model, repo_id, training_data, results, license, description))
    return folder


def push_to_hub(model, repo_id: str, *, revision: str | None = None, private: bool | None = None, token: str | bool | None = None,
                commit_message: str | None = None, training_data: str | None = None, results=None, license: str | None = None,
                description: str | None = None):
    """Upload `model` to the Hub repo `repo_id` (created if missing; `revision` a branch,
    created from the default branch if missing): exactly what save_pretrained writes, plus
    open_clip_config.json and a model card (config, parameter and active-parameter counts,
    `training_data` if given, zero-shot `results` if given: CLIP_benchmark result dicts,
    vlmoe-zeroshot --json rows, or {dataset: {metric: value}}). Returns huggingface_hub's
    commit info. Load it back with create_model("hf-hub:ORG/NAME")."""
    from huggingface_hub import HfApi

    parse_hub_id(repo_id)
    if getattr(model, "config", None) is None:
        raise ConfigError(f"push_to_hub needs a vlmoe model (with a .config); got {type(model).__name__}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="vlmoe-hub-") as tmp:
        write_hub_folder(model, tmp, repo_id, training_data, results, license, description)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            return api.upload_folder(folder_path=tmp, repo_id=repo_id, repo_type="model", revision=revision,
                                     commit_message=commit_message or "Upload vlmoe model")
        except Exception as e:  # noqa: BLE001 - only network failures are turned into one line
            if not _is_network_error(e):
                raise
            why = "HF_HUB_OFFLINE is set" if _offline() else f"the Hub cannot be reached ({type(e).__name__})"
            raise VLMoEError(f"push_to_hub {repo_id}: {why}; nothing was uploaded. Check the network (or HF_ENDPOINT), "
                             f"unset HF_HUB_OFFLINE, or write the folder with vlmoe.save_pretrained and upload it later") from None
