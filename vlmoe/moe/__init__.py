"""Sparse mixture-of-experts core, one part per file:

- `config`: LayerConfig (every setting, validated once) and RoutingOptions;
- `routing`: the gate algebra (vmoe's top-k with capacity and BPR, expert choice);
- `routers`: the routers as classes (token choice, expert choice) and their Assignment;
- `record`: what a call routed, its losses and statistics (MoEAux), listing a model's layers;
- `balance`: auxiliary-loss-free balancing (the expert bias);
- `joint`: LIMoE's joint packing of several modalities;
- `base`, `layer`, `soft`: the common layer base, SparseMoE and SoftMoE;
- `experts`, `losses`, `comm`, `parallel`: the stacked experts, the losses, expert parallelism.
"""
from . import parallel
from .balance import BiasBalance, update_biases
from .base import MoEBase, check_finite, current_routing_context, moe_layers, routing_context
from .config import ROUTERS, LayerConfig, RoutingOptions
from .experts import Experts, grouped_mm_supported
from .layer import SparseMoE, build_layer, collect_aux
from .losses import (
    balance_loss,
    cv_squared,
    global_entropy_loss,
    importance_loss,
    load_loss,
    local_entropy_loss,
    z_loss,
)
from .record import MoEAux, RoutingRecord
from .routers import Assignment, ExpertChoice, Router, TokenChoice
from .routing import Routing, compute_capacity, expert_choice_route, route, top_k_gates
from .soft import SoftMoE

__all__ = [
    "parallel", "Experts", "grouped_mm_supported", "ROUTERS", "MoEAux", "RoutingOptions", "LayerConfig", "SparseMoE",
    "SoftMoE", "MoEBase", "build_layer", "moe_layers", "check_finite", "RoutingRecord", "Assignment", "Router", "TokenChoice",
    "ExpertChoice", "BiasBalance", "update_biases",
    "collect_aux", "current_routing_context", "routing_context", "balance_loss", "cv_squared", "global_entropy_loss",
    "importance_loss", "load_loss", "local_entropy_loss", "z_loss", "Routing", "compute_capacity",
    "expert_choice_route", "route", "top_k_gates",
]
