"""vlmoe: LIMoE / V-MoE style vision-language mixture-of-experts models.

The names below are imported on first use (PEP 562): `import vlmoe`, and the commands that
need no model (`make_shards.py`, a mistyped `vlmoe-info`), do not pay for torch, open_clip and
Lightning until something asks for them."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import VLMoEError

__version__ = "0.1.0"

_SUBMODULES = {"cli", "data", "errors", "eval", "models", "moe", "syncs", "train"}
_NAMES = {
    "SparseMoE": "vlmoe.moe",
    "VLMoEModel": "vlmoe.models",
    "create_model": "vlmoe.models",
    "dense_baseline": "vlmoe.models",
    "get_model_config": "vlmoe.models",
    "get_tokenizer": "vlmoe.models",
    "list_models": "vlmoe.models",
    "save_pretrained": "vlmoe.models",
    "push_to_hub": "vlmoe.models.hub",
    "upcycle_open_clip": "vlmoe.models.upcycle",
    "upcycle_timm_vit": "vlmoe.models.upcycle",
}
__all__ = ["moe", *_NAMES, "VLMoEError", "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_NAMES})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import moe
    from .models import (VLMoEModel, create_model, dense_baseline, get_model_config, get_tokenizer, list_models,
                         save_pretrained)
    from .models.hub import push_to_hub
    from .models.upcycle import upcycle_open_clip, upcycle_timm_vit
    from .moe import SparseMoE
