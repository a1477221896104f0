"""Sparse mixture-of-experts core: routing, experts, auxiliary losses, the SparseMoE layer and
expert parallelism (`vlmoe.moe.parallel`)."""
from . import parallel
from .experts import Experts, grouped_mm_supported
from .layer import ROUTERS, MoEAux, RoutingOptions, SparseMoE, collect_aux, current_routing_context, routing_context
from .losses import (
    balance_loss,
    cv_squared,
    global_entropy_loss,
    importance_loss,
    load_loss,
    local_entropy_loss,
    z_loss,
)
from .routing import Routing, compute_capacity, expert_choice_route, route, top_k_gates
from .soft import SoftMoE

__all__ = [
    "parallel", "Experts", "grouped_mm_supported", "ROUTERS", "MoEAux", "RoutingOptions", "SparseMoE", "SoftMoE",
    "collect_aux", "current_routing_context", "routing_context", "balance_loss", "cv_squared", "global_entropy_loss",
    "importance_loss", "load_loss", "local_entropy_loss", "z_loss", "Routing", "compute_capacity",
    "expert_choice_route", "route", "top_k_gates",
]
