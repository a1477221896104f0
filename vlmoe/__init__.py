"""vlmoe: LIMoE / V-MoE style vision-language mixture-of-experts models."""
from . import moe
from .models import (
    VLMoEModel,
    create_model,
    dense_baseline,
    get_model_config,
    get_tokenizer,
    list_models,
    save_pretrained,
)
from .models.hub import push_to_hub
from .models.upcycle import upcycle_open_clip, upcycle_timm_vit
from .moe import SparseMoE
from .errors import VLMoEError

__version__ = "0.1.0"
__all__ = [
    "moe", "SparseMoE", "VLMoEModel", "create_model", "dense_baseline", "get_model_config",
    "get_tokenizer", "list_models", "push_to_hub", "save_pretrained", "upcycle_open_clip", "upcycle_timm_vit", "VLMoEError",
    "__version__",
]
