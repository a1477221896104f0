"""vlmoe: LIMoE / V-MoE style vision-language mixture-of-experts models."""
from . import moe
from .moe import SparseMoE

__version__ = "0.1.0"
__all__ = ["moe", "SparseMoE", "__version__"]
