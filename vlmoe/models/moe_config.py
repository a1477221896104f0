"""The MoE part of a model's configuration: `MoEConfig` (every LayerConfig field, and where
the MoE layers go) and the placement specs ("every:2", "last:N", "all", a list)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ConfigError, check_int, check_number
from ..moe.config import ROUTER_TOP_K, LayerConfig

__all__ = ["MoEConfig", "resolve_layers", "ROUTING_GROUPS"]

ROUTING_GROUPS = ("per_modality", "joint")


@dataclass
class MoEConfig(LayerConfig):
    """Where the MoE layers go and how they route: every LayerConfig field (see SparseMoE;
    None means the router's default), and the model-level settings below.

    Evaluation (model.eval()): eval_routing "per_example" routes each image / caption alone,
    so a result never depends on the rest of the batch; "batch" is V-MoE's batch-level
    evaluation; "dropless" keeps every choice. `image` / `text`: per-modality overrides of
    RoutingOptions fields."""

    # "per_modality": each shared MoE layer routes a batch's image patches and its text tokens
    # in separate calls (separate groups, capacities and balance losses); "joint": LIMoE's,
    # model(image, text) routes both together in one group (capacity, BPR and the V-MoE
    # losses over the union; the entropy losses per modality). Needs sharing "moe" or "all".
    routing_groups: str = "per_modality"
    image_layers: Any = "every:2"  # "every:N", "last:N", "all", "none" or a list of block indices
    text_layers: Any = "every:2"
    router_init_std: float | None = None  # None: 1/sqrt(dim); upcycling uses a small value
    expert_hidden_dim: int | dict | None = None  # None: the dense MLP's width; {"image": h, "text": h} per tower
    share_across_depth: bool = False  # WideNet: one MoE layer for all MoE depths of a tower
    # fine-grained experts: m x the experts, m x top_k, each 1/m as wide (the same active FLOPs)
    granularity: int = 1

    @classmethod
    def from_dict(cls, d: dict | "MoEConfig" | None) -> "MoEConfig | None":
        if d is None or isinstance(d, MoEConfig):
            return d
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown MoE config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def layer_config(self) -> LayerConfig:
        """The configuration of each MoE layer (granularity applied), validated: one
        ConfigError line for a bad or unused setting."""
        m = check_int("moe.granularity", self.granularity, 1)
        if self.routing_groups not in ROUTING_GROUPS:
            raise ConfigError(f"unknown moe.routing_groups {self.routing_groups!r}; choose one of {ROUTING_GROUPS}")
        if self.router_init_std is not None:
            check_number("router_init_std", self.router_init_std)
            if self.router == "soft":
                raise ConfigError("router_init_std has no effect with router='soft': Soft MoE's slot parameters are "
                                  "l2-normalised; remove it")
        cfg = LayerConfig(**{f.name: getattr(self, f.name) for f in fields(LayerConfig)})
        if m > 1:
            check_int("num_experts", self.num_experts, 1)
            top_k = self.top_k if self.top_k is not None else (ROUTER_TOP_K.get(self.router) or 1)
            cfg = replace(cfg, num_experts=self.num_experts * m, top_k=check_int("top_k", top_k, 1) * m)
        cfg.resolve()
        return cfg


def resolve_layers(spec: Any, depth: int, what: str = "layers") -> list[int]:
    """Block indices from a placement spec: "every:N" (blocks N-1, 2N-1, ..., as V-MoE's
    "every other layer" for N=2), "last:N", "all", "none"/None or an explicit list."""
    if spec is None or spec == "none":
        return []
    if spec == "all":
        return list(range(depth))
    if isinstance(spec, str) and ":" in spec:
        kind, _, n = spec.partition(":")
        if not n.isdigit() or int(n) < 1 or kind not in ("every", "last"):
            raise ConfigError(f"bad MoE placement {spec!r} for {what}; use 'every:N', 'last:N', 'all', 'none' or a list")
        n = int(n)
        if kind == "every":
            return [i for i in range(depth) if (i + 1) % n == 0]
        if n > depth:
            raise ConfigError(f"MoE placement {spec!r} for {what} asks for {n} blocks but the tower has {depth}")
        return list(range(depth - n, depth))
    if isinstance(spec, (list, tuple)):
        out = sorted({int(i) for i in spec})
        bad = [i for i in out if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"MoE layer indices {bad} for {what} are out of range: the tower has {depth} blocks (0..{depth - 1})")
        return out
    raise ConfigError(f"bad MoE placement {spec!r} for {what}; use 'every:N', 'last:N', 'all', 'none' or a list")
