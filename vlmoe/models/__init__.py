"""Models: LIMoE and dense CLIP baselines on open_clip / timm towers, configs, checkpoints."""
from .checkpoint import CheckpointError, load_state_dict_strict, read_state_dict, save_pretrained
from .factory import create_model, dense_baseline, get_model_config, get_tokenizer, list_models
from .model import SHARING_MODES, MoEConfig, TimmImageTower, VLMoEModel, resolve_layers, tower_blocks

__all__ = [
    "CheckpointError", "load_state_dict_strict", "read_state_dict", "save_pretrained", "create_model",
    "dense_baseline", "get_model_config", "get_tokenizer", "list_models", "SHARING_MODES", "MoEConfig",
    "TimmImageTower", "VLMoEModel", "resolve_layers", "tower_blocks",
]
