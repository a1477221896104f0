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
from .moe import SparseMoE

__version__ = "0.1.0"
__all__ = [
    "moe", "SparseMoE", "VLMoEModel", "create_model", "dense_baseline", "get_model_config",
    "get_tokenizer", "list_models", "save_pretrained", "__version__",
]
