"""One configuration path for an MoE layer: `LayerConfig`, validated once by `resolve()`,
which fills in the router-dependent defaults (top_k, Batch Prioritized Routing, router noise,
loss weights) in one place and refuses, with one ConfigError line naming the setting and the
router, every setting the chosen router would not use.

`RoutingOptions` are the settings that may differ per modality (LIMoE routes image patches
and text tokens apart); a layer holds one for itself and one per overridden modality.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError, check_int, check_number

__all__ = ["LayerConfig", "RoutingOptions", "ROUTERS", "TOKEN_CHOICE", "EVAL_ROUTING", "GATES", "BALANCES",
           "BIAS_MODALITIES", "MODALITIES"]

TOKEN_CHOICE = ("topk", "switch", "gshard")  # each token picks its experts
ROUTERS = (*TOKEN_CHOICE, "expert_choice")  # the routers of SparseMoE
ALL_ROUTERS = (*ROUTERS, "soft")  # and Soft MoE's
GATES = ("softmax", "topk_softmax")
EVAL_ROUTING = ("per_example", "batch", "dropless")
BALANCES = ("loss", "bias")
MODALITIES = ("image", "text")  # per-modality overrides
BIAS_MODALITIES = MODALITIES  # the rows of a per-modality expert bias
LOSS_WEIGHTS = ("importance_weight", "load_weight", "balance_weight", "z_loss_weight", "local_entropy_weight",
                "global_entropy_weight")
# The K a router routes with (None: any K in [1, num_experts]).
ROUTER_TOP_K = {"topk": None, "switch": 1, "gshard": 2, "expert_choice": 1, "soft": 1}


@dataclass
class RoutingOptions:
    """Routing settings that may differ per modality (resolved: no None but where noted)."""

    capacity_factor: float | None = 1.0  # None: dropless
    eval_capacity_factor: float | None = None  # at evaluation (model.eval()); None: capacity_factor
    batch_priority: bool = True  # Batch Prioritized Routing
    importance_weight: float = 0.0  # V-MoE importance loss
    load_weight: float = 0.0  # V-MoE load loss (needs noisy gating)
    balance_weight: float = 0.0  # Switch / GShard balance loss
    z_loss_weight: float = 0.0  # ST-MoE router z-loss
    local_entropy_weight: float = 0.0  # LIMoE local entropy loss
    global_entropy_weight: float = 0.0  # LIMoE global entropy loss
    global_entropy_threshold: float | None = None  # tau; log(S) asks for a soft minimum of S experts


OPTION_NAMES = tuple(f.name for f in fields(RoutingOptions))
# Joint routing: the options every modality shares (one group, one capacity, union losses).
UNION_OPTIONS = ("capacity_factor", "eval_capacity_factor", "batch_priority", "importance_weight", "load_weight",
                 "balance_weight", "z_loss_weight")

_DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    # V-MoE's ImageNet/JFT configs weigh both losses by 0.005.
    "topk": {"importance_weight": 0.005, "load_weight": 0.005},
    "switch": {"balance_weight": 0.01},
    "gshard": {"balance_weight": 0.01},
    "expert_choice": {},
    "soft": {},
}

# Settings only some routers use: (routers, why the others cannot). A setting left at its
# default is never refused; a given one outside its routers is.
_USED_BY: dict[str, tuple[tuple[str, ...], str]] = {
    "capacity_factor": (ROUTERS, "Soft MoE drops no token: every slot mixes the whole sequence"),
    "eval_capacity_factor": (ROUTERS, "Soft MoE drops no token: every slot mixes the whole sequence"),
    "eval_routing": (ROUTERS, "Soft MoE mixes tokens within each sequence only, so evaluation is per example already"),
    "batch_priority": (TOKEN_CHOICE, "BPR orders tokens competing for an expert's capacity; here the experts pick"),
    "noise_scale": (ROUTERS, "Soft MoE has no router logits to perturb"),
    "group_size": (ROUTERS, "Soft MoE mixes each sequence's tokens, not groups"),
    "multiple_of": (ROUTERS, "Soft MoE has no capacity to round"),
    "normalize_combine_weights": (TOKEN_CHOICE, "it rescales a token's top-k weights; no token picks its experts here"),
    "gate": (("topk", "switch"), "GShard already weighs its two experts by g_k / (g1 + g2), which is the top-k softmax"),
    "image": (ROUTERS, "Soft MoE has no routing options to override (slots_per_expert takes per-modality values)"),
    "text": (ROUTERS, "Soft MoE has no routing options to override (slots_per_expert takes per-modality values)"),
    "balance": (TOKEN_CHOICE, "a selection bias steers which experts each token picks; no token picks its experts here "
                              "(expert choice is balanced by construction; Soft MoE needs no balancing)"),
    "bias_per_modality": (TOKEN_CHOICE, "it is a per-modality selection bias (balance='bias')"),
    "bias_update_rate": (TOKEN_CHOICE, "it moves the selection bias of balance='bias'"),
    "slots_per_expert": (("soft",), "only Soft MoE has slots"),
    **{k: (ROUTERS, "Soft MoE has no router loss") for k in LOSS_WEIGHTS},
    "load_weight": (TOKEN_CHOICE, "the load loss counts each token's top-k choices under noise; here the experts pick"),
    "global_entropy_threshold": (ROUTERS, "Soft MoE has no router loss"),
}


@dataclass
class LayerConfig:
    """Every routing and expert setting of one MoE layer (the module's widths and activation
    come from the block it replaces). None means "the router's default"; see SparseMoE for
    what each field does."""

    num_experts: int = 8
    top_k: int | None = None  # None: 1, 2 for "gshard"
    capacity_factor: float | None = 1.0  # None: dropless
    router: str = "topk"  # topk | switch | gshard | expert_choice | soft
    batch_priority: bool | None = None  # None: on for "topk", off for switch / gshard (position)
    noise_scale: float | None = None  # None: 1.0 for "topk", 0 otherwise
    group_size: int | None = None
    multiple_of: int = 4
    normalize_combine_weights: bool = False
    gate: str = "softmax"
    expert_type: str = "mlp"
    implementation: str = "auto"
    importance_weight: float | None = None  # None: the router's default (V-MoE: 0.005)
    load_weight: float | None = None
    balance_weight: float | None = None
    z_loss_weight: float | None = None
    local_entropy_weight: float | None = None
    global_entropy_weight: float | None = None
    global_entropy_threshold: float | None = None
    image: dict = field(default_factory=dict)  # per-modality RoutingOptions overrides
    text: dict = field(default_factory=dict)
    eval_routing: str = "per_example"
    eval_capacity_factor: float | None = None
    balance: str = "loss"
    bias_update_rate: float = 1e-3
    bias_per_modality: bool = False
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
    slots_per_expert: int | dict = 1

    # -- validation ----------------------------------------------------------------------
    def resolve(self) -> "LayerConfig":
        """A copy with the router's defaults filled in, after checking every field: a bad
        value or a setting the router would not use raises one ConfigError line."""
        if self.router not in ALL_ROUTERS:
            raise ConfigError(f"unknown router {self.router!r}; choose one of {ALL_ROUTERS}")
        for m in MODALITIES:
            if not isinstance(getattr(self, m), dict):
                raise ConfigError(f"moe.{m} takes routing options per modality, e.g. {{capacity_factor: 2.0}}; got {getattr(self, m)!r}")
        self._refuse_unused()
        self._check_values()
        r = self.router
        top_k = self.top_k if self.top_k is not None else (ROUTER_TOP_K[r] or 1)
        noise = (1.0 if r == "topk" else 0.0) if self.noise_scale is None else float(self.noise_scale)
        if r == "soft":
            noise = None  # no router logits
        bpr = (r == "topk") if self.batch_priority is None else bool(self.batch_priority)
        if r not in TOKEN_CHOICE:
            bpr = None  # no token competes for an expert's capacity
        weights = dict(_DEFAULT_WEIGHTS[r])
        if self.balance == "bias":  # the bias balances; no loss gradient pulls against the objective
            weights = {k: 0.0 for k in weights}
        if noise == 0 and self.load_weight is None:
            weights.pop("load_weight", None)  # the load loss needs noisy gating: a default of 0, not a silent one
        weights.update({k: getattr(self, k) for k in LOSS_WEIGHTS if getattr(self, k) is not None})
        weights = {k: float(weights.get(k, 0.0)) for k in LOSS_WEIGHTS}
        out = replace(self, top_k=top_k, noise_scale=noise, batch_priority=bpr, **weights)
        out._check_loss_use()
        return out

    def _check_values(self) -> None:
        check_int("num_experts", self.num_experts, 1)
        r, K = self.router, ROUTER_TOP_K[self.router]
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
            if K is not None and self.top_k != K:
                what = {"expert_choice": "each expert takes its top-C tokens (set capacity_factor, the mean experts "
                                         "per token); top_k has no effect: leave it unset",
                        "soft": "Soft MoE has no per-token expert choice: leave top_k unset"}.get(r, "")
                raise ConfigError(f"router={r!r} routes to exactly {K} expert(s); got top_k={self.top_k}"
                                  + (f" ({what})" if what else ""))
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(f"top_k must be in [1, num_experts={self.num_experts}]; got top_k={self.top_k}")
        if self.group_size is not None:
            check_int("group_size", self.group_size, 1, "or None")
        check_int("multiple_of", self.multiple_of, 0, "(0 or 1: no rounding)")
        if self.capacity_factor is not None and (isinstance(self.capacity_factor, bool)
                                                 or not isinstance(self.capacity_factor, (int, float))):
            raise ConfigError(f"capacity_factor must be a number > 0 (or None for dropless routing); got {self.capacity_factor!r}")
        if r == "expert_choice" and self.capacity_factor is None:
            raise ConfigError("router='expert_choice' needs a capacity_factor (each expert takes C tokens)")
        for name, allowed in (("gate", GATES), ("eval_routing", EVAL_ROUTING), ("balance", BALANCES)):
            if getattr(self, name) not in allowed:
                what = "(auxiliary losses) or 'bias' (auxiliary-loss-free)" if name == "balance" else ""
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed} {what}".rstrip())
        if self.eval_routing == "dropless" and r == "expert_choice":
            raise ConfigError("eval_routing='dropless' needs a router that picks experts per token; expert choice "
                              "picks tokens per expert (use 'per_example')")
        check_number("bias_update_rate", self.bias_update_rate, 0.0, above=True)
        if self.bias_update_rate != LayerConfig.bias_update_rate and self.balance != "bias":
            raise ConfigError(f"bias_update_rate={self.bias_update_rate!r} has no effect without balance='bias' (it moves "
                              f"the auxiliary-loss-free expert bias); set balance='bias' or remove it")
        if self.eval_routing == "dropless" and self.eval_capacity_factor is not None:
            raise ConfigError("eval_capacity_factor has no effect with eval_routing='dropless' (dropless routing has no "
                              "capacity); remove one of them")
        if self.bias_per_modality and self.balance != "bias":
            raise ConfigError("bias_per_modality=True needs balance='bias' (it is a per-modality expert bias)")
        check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("shared_expert_gate=True needs num_shared_experts >= 1 (there is no shared expert to gate)")
        if self.noise_scale is not None:
            check_number("noise_scale", self.noise_scale)
        for m in MODALITIES:
            unknown = set(getattr(self, m)) - set(OPTION_NAMES)
            if unknown:
                raise ConfigError(f"unknown routing option(s) {sorted(unknown)} for modality {m!r}; known: {sorted(OPTION_NAMES)}")
        for where, opts in ("", self), *((f" (moe.{m})", _Given(getattr(self, m))) for m in MODALITIES):
            _check_options(opts, where)

    def _refuse_unused(self) -> None:
        defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(self)}
        for name, (routers, why) in _USED_BY.items():
            value = getattr(self, name)
            unset = value == defaults[name] or (name in LOSS_WEIGHTS and value in (None, 0, 0.0))
            if name == "balance" and self.router == "expert_choice" and value == "bias":
                raise ConfigError("balance='bias' biases which experts each token picks; expert choice picks tokens per "
                                  "expert (balanced by construction): use balance='loss' with router='expert_choice'")
            if name == "gate" and self.router == "expert_choice" and value == "topk_softmax":
                raise ConfigError("gate='topk_softmax' selects experts per token; expert choice selects tokens per expert")
            if not unset and self.router not in routers:
                raise ConfigError(f"{name}={value!r} has no effect with router={self.router!r}: {why}; remove it")
        thresholds = [self.global_entropy_threshold] + [getattr(self, m).get("global_entropy_threshold") for m in MODALITIES]
        weights = [self.global_entropy_weight] + [getattr(self, m).get("global_entropy_weight") for m in MODALITIES]
        if any(t is not None for t in thresholds) and all(w is None for w in weights) and self.router != "soft":
            raise ConfigError("global_entropy_threshold is set but no global_entropy_weight is, so no global entropy "
                              "loss uses it (the weight defaults to 0): set global_entropy_weight, or drop the threshold")
        for m in MODALITIES:  # a per-modality option the router would not use
            for name, value in getattr(self, m).items():
                routers, why = _USED_BY.get(name, (ALL_ROUTERS, ""))
                if self.router not in routers and value not in (None, 0, 0.0, False):
                    raise ConfigError(f"{name} (moe.{m})={value!r} has no effect with router={self.router!r}: {why}; remove it")

    def _check_loss_use(self) -> None:
        """Resolved: a load loss without noise, or a threshold without its loss, would do nothing."""
        for where, opts in (("", self.options()), *((f" (moe.{m})", o) for m, o in self.modality_options().items())):
            if opts.load_weight and not self.noise_scale:
                raise ConfigError(f"load_weight{where}={opts.load_weight} needs noisy gating (the load loss is the "
                                  f"probability of each expert's selection under noise): set noise_scale > 0, or drop load_weight")

    # -- what the layer routes with ------------------------------------------------------
    def options(self) -> RoutingOptions:
        """The layer's RoutingOptions (of a resolved config)."""
        opts = RoutingOptions(**{k: getattr(self, k) for k in OPTION_NAMES})
        return replace(opts, batch_priority=bool(opts.batch_priority))

    def modality_options(self) -> dict[str, RoutingOptions]:
        base = self.options()
        return {m: replace(base, **getattr(self, m)) for m in MODALITIES if getattr(self, m)}

    @classmethod
    def from_layer_kwargs(cls, modality_overrides: dict | None = None, **kw: Any) -> "LayerConfig":
        """SparseMoE's keyword arguments (`modality_overrides` becomes `image` / `text`)."""
        overrides = dict(modality_overrides or {})
        unknown = set(overrides) - set(MODALITIES)
        if unknown:
            raise ConfigError(f"modality_overrides takes {MODALITIES}; got {sorted(unknown)}")
        return cls(**kw, **{m: dict(o) for m, o in overrides.items()})


class _Given:
    """A modality's overrides, read as options (a missing one is None: not checked)."""

    def __init__(self, d: dict):
        self.d = d

    def __getattr__(self, k):
        return self.d.get(k)


def _check_options(opts, where: str = "") -> None:
    """The numbers of a set of routing options (a field that is None is left alone)."""
    for k in ("capacity_factor", "eval_capacity_factor"):
        if getattr(opts, k) is not None:
            check_number(f"{k}{where}", getattr(opts, k), 0.0, above=True)
    for k in (*LOSS_WEIGHTS, "global_entropy_threshold"):
        if getattr(opts, k) is not None:
            check_number(f"{k}{where}", getattr(opts, k))
