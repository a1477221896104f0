"""The SparseMoE layer: a drop-in replacement for timm's `Mlp` / open_clip's MLP.

Legend: T tokens, G groups, S tokens per group, E experts, K choices, C capacity,
N = G*S*K assignments, M kept assignments, D model dim, H hidden dim.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .experts import Experts, Implementation
from .comm import expert_parallel_apply
from .routing import _all_finite, compute_capacity, expert_choice_route, route, top_k_gates
from ..errors import ConfigError

__all__ = ["SparseMoE", "RoutingOptions", "MoEAux", "routing_context", "current_routing_context", "collect_aux", "ROUTERS",
           "EVAL_ROUTING"]

RouterName = Literal["topk", "switch", "gshard", "expert_choice"]
ROUTERS = ("topk", "switch", "gshard", "expert_choice")
BIAS_MODALITIES = ("image", "text")  # the rows of a per-modality expert bias
GATES = ("softmax", "topk_softmax")
EVAL_ROUTING = ("per_example", "batch", "dropless")

_CONTEXT: contextvars.ContextVar[tuple[str | None, torch.Tensor | None]] = contextvars.ContextVar(
    "vlmoe_routing_context", default=(None, None)
)


@contextlib.contextmanager
def routing_context(modality: str | None = None, mask: torch.Tensor | None = None) -> Iterator[None]:
    """Tell every SparseMoE called inside the block which modality its tokens are and which
    tokens are real (mask [B, T], True for real tokens). Used by the towers, whose blocks
    call `mlp(x)` with no room for extra arguments."""
    token = _CONTEXT.set((modality, mask))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes
    forwards)."""
    return torch._C._current_graph_task_id() != -1


def current_routing_context() -> tuple[str | None, torch.Tensor | None]:
    """(modality, mask) set by the innermost `routing_context`."""
    return _CONTEXT.get()


@dataclass
class RoutingOptions:
    """Routing settings that may differ per modality (LIMoE routes images and text apart)."""

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


_DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    # V-MoE's ImageNet/JFT configs weigh both losses by 0.005.
    "topk": {"importance_weight": 0.005, "load_weight": 0.005},
    "switch": {"balance_weight": 0.01},
    "gshard": {"balance_weight": 0.01},
    "expert_choice": {},
}


def _check_int(name: str, value, minimum: int, hint: str = "") -> None:
    """A clear error for a non-integer or too small size (2.5, "8", True, 0, -4)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{' ' + hint if hint else ''}; got {value!r}")


def _check_real(name: str, value, minimum: float = 0.0, where: str = "") -> None:
    """A finite number >= minimum ("NaN" as a string, NaN, inf and negatives refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}{where} must be a finite number >= {minimum:g}; got {value!r}")


def _check_factor(name: str, value, where: str = "") -> None:
    """A capacity factor: a finite number > 0 (None, where allowed, is checked by the caller)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}{where} must be a finite number > 0; got {value!r}")


_LOSS_WEIGHTS = ("importance_weight", "load_weight", "balance_weight", "z_loss_weight", "local_entropy_weight",
                 "global_entropy_weight")


def _check_options(opts: "RoutingOptions", where: str = "") -> None:
    if opts.capacity_factor is not None:
        _check_factor("capacity_factor", opts.capacity_factor, where)
    if opts.eval_capacity_factor is not None:
        _check_factor("eval_capacity_factor", opts.eval_capacity_factor, where)
    for k in _LOSS_WEIGHTS:
        _check_real(k, getattr(opts, k), 0.0, where)
    if opts.global_entropy_threshold is not None:
        _check_real("global_entropy_threshold", opts.global_entropy_threshold, 0.0, where)


@dataclass
class MoEAux:
    """What one SparseMoE call leaves for the training loop."""

    loss: torch.Tensor  # weighted sum of the auxiliary losses (differentiable)
    losses: dict[str, torch.Tensor]  # each unweighted loss (differentiable)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached statistics


class SparseMoE(nn.Module):
    """Sparse mixture-of-experts MLP: `forward(x) -> x` for x [B, T, D] or [N, D].

    Args:
        dim: model width D.
        hidden_dim: expert hidden width H (default 4 * dim).
        num_experts: E.
        top_k: experts per token (K); 1 for "switch", 2 for "gshard".
        capacity_factor: buffer slots per expert = ceil(S*K*cf/E) rounded to `multiple_of`;
            None routes dropless (every choice kept).
        batch_priority: Batch Prioritized Routing (V-MoE) instead of priority by position.
            Default (None): on for "topk" (V-MoE), off for "switch" and "gshard", which place
            tokens by position as their papers do.
        router: "topk" (V-MoE), "switch" (top-1), "gshard" (top-2 with random routing of
            the second expert in training) or "expert_choice" (each expert takes its top-C).
        noise_scale: training noise std = noise_scale / E added to the router logits
            (default 1.0 for "topk", 0 otherwise).
        group_size: tokens per routing group (default: all tokens of a call in one group).
        multiple_of: capacity is rounded up to a multiple of this.
        normalize_combine_weights: divide each token's kept weights by their sum.
        gate: "softmax" (V-MoE: combine with the softmax over all experts) or "topk_softmax"
            (Mixtral: softmax over the selected top-k logits, so a token's weights sum to 1).
        expert_type: "mlp" (act_layer MLP, timm / open_clip) or "swiglu" (Mixtral's experts).
        act_layer, bias: expert MLP activation and biases (timm / open_clip defaults).
        implementation: experts' matmul path, "auto", "grouped_mm" or "loop" (a layer whose
            experts are sharded, see `shard_experts`, always sends ragged rows).
        *_weight, global_entropy_threshold: auxiliary loss weights (see RoutingOptions); the
            defaults depend on the router (V-MoE: importance and load 0.005).
        modality_overrides: per-modality RoutingOptions fields, e.g.
            {"text": {"capacity_factor": 2.0, "global_entropy_threshold": math.log(4)}}.
        eval_routing: how an eval-mode forward (model.eval()) groups tokens:
            "per_example" (default: each example of a [B, T, D] input, its real tokens, is
            its own routing group, so capacity and BPR compete only within the example and
            the result does not depend on the rest of the batch), "batch" (the training
            grouping, V-MoE's evaluation: batch-dependent) or "dropless" (no capacity).
            Training forwards are unaffected.
        eval_capacity_factor: capacity factor of eval-mode forwards (default: capacity_factor).
        balance: "loss" (the router's auxiliary balance losses) or "bias" (auxiliary-loss-free
            balancing, DeepSeek-V3: a per-expert bias, a buffer, is added to the gates to choose
            experts only, never to the combine weights, and `update_bias()` moves it by
            `bias_update_rate` against the sign of each expert's load error, once per optimizer
            step; the importance / load / balance losses then default to weight 0).
        bias_per_modality: with balance="bias", one bias per expert and modality (rows
            BIAS_MODALITIES), each moved by its own modality's loads and applied to its own
            modality's tokens, so a layer shared by the towers balances text as well as image
            patches (with one bias the patches, ~5x the text tokens, set it). Every call then needs
            its modality (routing_context or `modality=`).
        num_shared_experts: always-on experts (DeepSeekMoE, Qwen2-MoE) of the routed experts'
            width, one dense MLP of num_shared_experts x hidden_dim beside the routed output.
        shared_expert_gate: scale the shared output by sigmoid(x . w) per token (Qwen2-MoE).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        num_experts: int = 8,
        top_k: int | None = None,
        capacity_factor: float | None = 1.0,
        batch_priority: bool | None = None,
        router: RouterName = "topk",
        noise_scale: float | None = None,
        group_size: int | None = None,
        multiple_of: int = 4,
        normalize_combine_weights: bool = False,
        gate: Literal["softmax", "topk_softmax"] = "softmax",
        expert_type: Literal["mlp", "swiglu"] = "mlp",
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        implementation: Implementation = "auto",
        importance_weight: float | None = None,
        load_weight: float | None = None,
        balance_weight: float | None = None,
        z_loss_weight: float | None = None,
        local_entropy_weight: float | None = None,
        global_entropy_weight: float | None = None,
        global_entropy_threshold: float | None = None,
        modality_overrides: dict[str, dict[str, Any]] | None = None,
        eval_routing: Literal["per_example", "batch", "dropless"] = "per_example",
        eval_capacity_factor: float | None = None,
        balance: Literal["loss", "bias"] = "loss",
        bias_update_rate: float = 1e-3,
        bias_per_modality: bool = False,
        num_shared_experts: int = 0,
        shared_expert_gate: bool = False,
    ):
        super().__init__()
        _check_int("dim", dim, 1)
        if hidden_dim is not None:
            _check_int("hidden_dim", hidden_dim, 1)
        _check_int("num_experts", num_experts, 1)
        if top_k is not None:
            _check_int("top_k", top_k, 1)
        if group_size is not None:
            _check_int("group_size", group_size, 1, "or None")
        _check_int("multiple_of", multiple_of, 0, "(0 or 1: no rounding)")
        if capacity_factor is not None and (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))):
            raise ConfigError(f"capacity_factor must be a number > 0 (or None for dropless routing); got {capacity_factor!r}")
        if router not in ROUTERS:
            raise ConfigError(f"unknown router {router!r}; choose one of {ROUTERS}")
        if gate not in GATES:
            raise ConfigError(f"unknown gate {gate!r}; choose one of {GATES}")
        if gate == "topk_softmax" and router == "expert_choice":
            raise ConfigError("gate='topk_softmax' selects experts per token; expert choice selects tokens per expert")
        if balance not in ("loss", "bias"):
            raise ConfigError(f"unknown balance {balance!r}; choose 'loss' (auxiliary losses) or 'bias' (auxiliary-loss-free)")
        if balance == "bias" and router == "expert_choice":
            raise ConfigError("balance='bias' biases which experts each token picks; expert choice picks tokens per expert "
                              "(balanced by construction): use balance='loss' with router='expert_choice'")
        if isinstance(bias_update_rate, bool) or not isinstance(bias_update_rate, (int, float)) or not bias_update_rate > 0:
            raise ConfigError(f"bias_update_rate must be a number > 0; got {bias_update_rate!r}")
        if bias_per_modality and balance != "bias":
            raise ConfigError("bias_per_modality=True needs balance='bias' (it is a per-modality expert bias)")
        _check_int("num_shared_experts", num_shared_experts, 0)
        if shared_expert_gate and not num_shared_experts:
            raise ConfigError("shared_expert_gate=True needs num_shared_experts >= 1 (there is no shared expert to gate)")
        default_k = {"switch": 1, "gshard": 2}.get(router, 1)
        top_k = default_k if top_k is None else top_k
        if router in ("switch", "gshard") and top_k != default_k:
            raise ConfigError(f"router={router!r} routes to exactly {default_k} expert(s); got top_k={top_k}")
        if router != "expert_choice" and not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={num_experts}]; got top_k={top_k}")
        if router == "expert_choice" and capacity_factor is None:
            raise ConfigError("router='expert_choice' needs a capacity_factor (each expert takes C tokens)")
        self.dim, self.hidden_dim = dim, hidden_dim or 4 * dim
        self.num_experts, self.top_k, self.router_name = num_experts, top_k, router
        if noise_scale is not None:
            _check_real("noise_scale", noise_scale)
        self.noise_scale = (1.0 if router == "topk" else 0.0) if noise_scale is None else float(noise_scale)
        self.group_size, self.multiple_of = group_size, multiple_of
        self.normalize_combine_weights = normalize_combine_weights
        self.gate = gate
        self.eval_routing = "per_example"

        weights = dict(_DEFAULT_WEIGHTS[router])
        if balance == "bias":  # the bias balances; no loss gradient pulls against the objective
            weights = {k: 0.0 for k in weights}
        given = dict(
            importance_weight=importance_weight, load_weight=load_weight, balance_weight=balance_weight,
            z_loss_weight=z_loss_weight, local_entropy_weight=local_entropy_weight,
            global_entropy_weight=global_entropy_weight,
        )
        weights.update({k: v for k, v in given.items() if v is not None})
        if batch_priority is None:
            batch_priority = router not in ("switch", "gshard")
        self.options = RoutingOptions(
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, batch_priority=bool(batch_priority),
            global_entropy_threshold=global_entropy_threshold, **weights,
        )
        self.modality_options: dict[str, RoutingOptions] = {}
        names = {f.name for f in fields(RoutingOptions)}
        for modality, overrides in (modality_overrides or {}).items():
            unknown = set(overrides) - names
            if unknown:
                raise ConfigError(f"unknown routing option(s) {sorted(unknown)} for modality {modality!r}; known: {sorted(names)}")
            self.modality_options[modality] = replace(self.options, **overrides)
        _check_options(self.options)
        for modality, opts in self.modality_options.items():
            _check_options(opts, f" (moe.{modality})")
        self.configure_eval(eval_routing)

        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, self.hidden_dim, act_layer=act_layer, bias=bias,
                               implementation=implementation, expert_type=expert_type)
        self.balance, self.bias_update_rate = balance, float(bias_update_rate)
        self.bias_per_modality = bool(bias_per_modality)
        if balance == "bias":
            # Saved in checkpoints, never trained (a buffer): moved by update_bias(). [E], or
            # [len(BIAS_MODALITIES), E] with one row per modality.
            shape = (len(BIAS_MODALITIES), num_experts) if self.bias_per_modality else (num_experts,)
            self.register_buffer("expert_bias", torch.zeros(shape))
            self.register_buffer("_bias_load", torch.zeros(shape), persistent=False)
        self.num_shared_experts = num_shared_experts
        self.shared_experts = (Experts(1, dim, num_shared_experts * self.hidden_dim, act_layer=act_layer, bias=bias,
                                       implementation="loop", expert_type=expert_type) if num_shared_experts else None)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        self.aux: dict[str | None, MoEAux] = {}
        # A layer shared across depths (WideNet) runs several times per forward and per
        # modality: then each call keeps its record ("text", "text#1", ...) until the owner
        # clears `aux`; otherwise a call replaces the previous one of its modality.
        self.record_every_call = False
        # Set to a list to record each call's per-token routing (top-1 expert, kept or not).
        self.capture: list[dict] | None = None
        self.padded_min_fill = 0.85
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.dim))
        self.experts.init_weights()
        if self.shared_experts is not None:
            self.shared_experts.init_weights()
        if self.shared_gate is not None:
            nn.init.zeros_(self.shared_gate.weight)  # the gate starts at sigmoid(0) = 1/2

    # -- shared experts and auxiliary-loss-free balancing ----------------------------------
    def _add_shared(self, out_TD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        """out_TD plus the always-on experts' output on x_TD (out_TD itself without them)."""
        return out_TD if self.shared_experts is None else out_TD + self._shared(x_TD)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The always-on experts' output, gated per token if asked."""
        y_TD = self.shared_experts.forward_buffers(x_TD.unsqueeze(0)).squeeze(0).to(x_TD.dtype)
        if self.shared_gate is not None:
            y_TD = y_TD * torch.sigmoid(self.shared_gate(x_TD))
        return y_TD

    @torch.no_grad()
    def update_bias(self, group=None) -> torch.Tensor | None:
        """Auxiliary-loss-free balancing step (call once per optimizer step): the expert loads
        the training forwards chose since the last call, summed over the ranks of `group`
        (default: every process) so the bias stays the same on every rank, move each expert's
        bias by bias_update_rate * sign(mean load - load). Returns the loads (None when the
        layer does not balance by bias)."""
        if self.balance != "bias":
            return None
        load_E = self._bias_load.clone()  # [E], or [modalities, E]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(load_E, group=group)
        self._bias_load.zero_()
        # each row (modality) against its own mean; a row no token used this step stays
        seen = load_E.sum(-1, keepdim=True) > 0
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean(-1, keepdim=True) - load_E) * seen
        return load_E

    def _bias_row(self, modality: str | None) -> int:
        """The row of a per-modality expert bias that a call's tokens use."""
        if modality not in BIAS_MODALITIES:
            raise ConfigError(
                f"this layer balances by a bias per modality (bias_per_modality=True, rows {BIAS_MODALITIES}), so each "
                f"call needs its modality; got {modality!r}: call it under routing_context(modality=...) or pass modality="
            )
        return BIAS_MODALITIES.index(modality)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"router={self.router_name}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={o.capacity_factor}, batch_priority={o.batch_priority}, noise_scale={self.noise_scale}, gate={self.gate}, "
            f"eval_routing={self.eval_routing}"
            + (f", balance=bias, bias_update_rate={self.bias_update_rate}" if self.balance == "bias" else "")
            + (", bias_per_modality=True" if self.bias_per_modality else "")
            + (f", num_shared_experts={self.num_shared_experts}, shared_expert_gate={self.shared_gate is not None}"
               if self.num_shared_experts else "")
        )

    def configure_eval(self, eval_routing: str | None = None, eval_capacity_factor: float | None = None,
                       batch_priority: bool | None = None) -> None:
        """Change how eval-mode forwards route, in every modality; None leaves a setting as it
        is. `batch_priority` is the layer's BPR setting, which training shares."""
        if eval_routing is not None:
            if eval_routing not in EVAL_ROUTING:
                raise ConfigError(f"unknown eval_routing {eval_routing!r}; choose one of {EVAL_ROUTING}")
            if eval_routing == "dropless" and self.router_name == "expert_choice":
                raise ConfigError("eval_routing='dropless' needs a router that picks experts per token; expert choice "
                                  "picks tokens per expert (use 'per_example')")
            self.eval_routing = eval_routing
        change = {}
        if eval_capacity_factor is not None:
            _check_factor("eval_capacity_factor", eval_capacity_factor)
            change["eval_capacity_factor"] = float(eval_capacity_factor)
        if batch_priority is not None:
            change["batch_priority"] = bool(batch_priority)
        if change:
            self.options = replace(self.options, **change)
            self.modality_options = {k: replace(v, **change) for k, v in self.modality_options.items()}

    @property
    def ep(self):
        """The ExpertParallelGroups the experts are sharded over, or None."""
        return self.experts.groups

    def shard_experts(self, groups) -> None:
        """Keep only this rank's share of the experts; calls then exchange tokens with the
        other ranks of `groups.ep_group` (see vlmoe.moe.parallel.shard_experts, which
        also makes every rank start from the same experts)."""
        self.experts.shard(groups)

    def unshard_experts(self, full: dict[str, torch.Tensor]) -> None:
        self.experts.unshard(full)

    def options_for(self, modality: str | None) -> RoutingOptions:
        return self.modality_options.get(modality, self.options) if modality else self.options

    # -- routing -------------------------------------------------------------------------
    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in float32, even under autocast."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.router.weight.float())

    def _group(self, t_T: torch.Tensor, S: int, fill) -> torch.Tensor:
        T = t_T.shape[0]
        pad = (-T) % S
        if pad:
            t_T = torch.cat([t_T, t_T.new_full((pad, *t_T.shape[1:]), fill)])
        return t_T.reshape(-1, S, *t_T.shape[1:])

    def _assign(self, gates_GSE, mask_GS, opts: RoutingOptions, capacity_factor: float | None, per_group: bool = False,
                bias_E: torch.Tensor | None = None):
        """Flat routing over all choices of all groups: token_N (index into the padded token
        list), expert_N, group_N, slot_N (position in the group's buffer of that expert,
        -1 if dropped), weight_N, and the capacity per group and expert (None: dropless).
        With `per_group` each group's capacity comes from its own real tokens (per-example
        evaluation); otherwise from the real tokens of the fullest group. `bias_E`: the selection
        bias, [E] or one row per token [G, S, E] (auxiliary-loss-free balancing)."""
        G, S, E = gates_GSE.shape
        device = gates_GSE.device
        K = self.top_k if self.router_name != "expert_choice" else 1
        # Capacity comes from real tokens, never from padding: each group's own (per_group), or
        # the fullest group's.
        capacity = route_capacity = None
        if capacity_factor is not None:
            if per_group:
                route_capacity = compute_capacity(mask_GS.sum(1), E, K, capacity_factor, self.multiple_of)
                capacity = int(route_capacity.max())
            else:
                n_valid = S if bool(mask_GS.all()) else int(mask_GS.sum(1).max())
                capacity = route_capacity = compute_capacity(max(n_valid, 1), E, K, capacity_factor, self.multiple_of)
        if self.router_name == "expert_choice":
            C = capacity
            token_GEC, weight_GEC = expert_choice_route(gates_GSE, C, mask_GS)
            C = token_GEC.shape[-1]
            if per_group:  # each group keeps its own top-C_g (the route sorted them by gate)
                beyond_GEC = torch.arange(C, device=device).view(1, 1, C) >= route_capacity.view(G, 1, 1)
                token_GEC = token_GEC.masked_fill(beyond_GEC, -1)
                weight_GEC = weight_GEC.masked_fill(beyond_GEC, 0.0)
            expert_GEC = torch.arange(E, device=device).view(1, E, 1).expand(G, E, C)
            group_GEC = torch.arange(G, device=device).view(G, 1, 1).expand(G, E, C)
            slot_GEC = torch.arange(C, device=device).view(1, 1, C).expand(G, E, C)
            chosen_GEC = token_GEC >= 0
            slot_GEC = torch.where(chosen_GEC, slot_GEC, -1)
            token_GEC = token_GEC.clamp_min(0) + S * group_GEC
            return (token_GEC.reshape(-1), expert_GEC.reshape(-1), group_GEC.reshape(-1),
                    slot_GEC.reshape(-1), weight_GEC.reshape(-1), C)

        keep_GSK = None
        scale_GS1 = None
        if self.router_name == "gshard" or self.gate == "topk_softmax":
            # Weights normalised over the selected top-k before any is dropped: GShard's
            # g_k / (g1 + g2), and Mixtral's softmax over the top-k logits (the same thing).
            if bias_E is None:
                top_GSK, _ = top_k_gates(gates_GSE, K)
            else:  # the experts the bias selects, their unbiased gates
                top_GSK = gates_GSE.gather(-1, top_k_gates(gates_GSE + bias_E, K)[1])
            denom_GS1 = top_GSK.sum(-1, keepdim=True)
            scale_GS1 = 1.0 / denom_GS1
        if self.router_name == "gshard" and self.training:
            # GShard: the 2nd expert is used with probability min(1, 2 * g2 / (g1 + g2)).
            p2_GS = 2.0 * top_GSK[..., 1] / denom_GS1[..., 0]
            keep2_GS = torch.rand_like(p2_GS) < p2_GS
            keep_GSK = torch.stack([torch.ones_like(keep2_GS), keep2_GS], -1)
        r = route(
            gates_GSE, K, route_capacity, batch_priority=opts.batch_priority, mask=mask_GS, keep=keep_GSK,
            renormalize=self.normalize_combine_weights, selection_bias=bias_E,
        )
        weight_GSK = r.combine_weight
        if scale_GS1 is not None and not self.normalize_combine_weights:
            weight_GSK = weight_GSK * scale_GS1
        token_GSK = torch.arange(G * S, device=device).view(G, S, 1).expand(G, S, K)
        group_GSK = torch.arange(G, device=device).view(G, 1, 1).expand(G, S, K)
        return (token_GSK.reshape(-1), r.expert_index.reshape(-1), group_GSK.reshape(-1),
                r.slot.reshape(-1), weight_GSK.reshape(-1), capacity)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, modality: str | None = None) -> torch.Tensor:
        ctx_modality, ctx_mask = _CONTEXT.get()
        modality = modality if modality is not None else ctx_modality
        mask = mask if mask is not None else ctx_mask
        x_TD, mask_T = self._flat(x, mask)
        T = x_TD.shape[0]
        opts = self.options_for(modality)
        S, per_group = max(min(self.group_size or T, T), 1), False
        if not self.training and self.eval_routing == "per_example" and x.ndim >= 3:
            S, per_group = max(T // max(x.shape[0], 1), 1), True  # one example ([B, ...tokens, D]), one group
        bias_row = self._bias_row(modality) if self.bias_per_modality else None
        out_TD, r = self._dispatch(x_TD, mask_T, S, opts, self._capacity_factor(opts), per_group, bias_row)
        out_TD = self._add_shared(out_TD, x_TD)
        if self.capture is not None:  # per-token routing, for pictures (vlmoe.eval.routing)
            expert_T, kept_T = self._top1_kept(r, T)
            self._capture_one(modality, x.shape[:-1], expert_T, kept_T, mask_T)
        self._record(modality, self._aux(r, mask_T, S, opts))
        return out_TD.reshape(x.shape)

    def forward_joint(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Route several modalities' tokens together: LIMoE's joint routing.

        `parts` maps each modality to (x [B, T, D] or [N, D], token mask or None); returns
        each modality's output, shaped like its input. The real tokens of all parts form one
        routing group per call (or `group_size` groups, filled example by example: example
        b's tokens of every modality, then example b+1's), so image patches and text tokens
        compete for the same capacity; BPR ranks them together; the importance / load /
        balance / z losses are computed over the union (recorded under "joint"). Masked
        tokens (text padding) are left out: they take no capacity and get output 0. The
        LIMoE entropy losses and the per-modality statistics stay per modality, each over its
        own tokens (recorded under the modality). Capacity, BPR and those union losses use
        the layer's shared options, so per-modality overrides of them are refused.

        In eval mode with eval_routing="per_example" each modality's examples are routed
        alone, as `forward` does, so results do not depend on the batch.
        """
        if not parts:
            raise ConfigError("forward_joint needs at least one modality's tokens")
        if not self.training and self.eval_routing == "per_example":
            return {m: self.forward(x, mask, m) for m, (x, mask) in parts.items()}
        self.check_joint_options()
        opts = self.options
        flats, dtype = {}, functools.reduce(torch.promote_types, [x.dtype for x, _ in parts.values()])
        xs, examples, owners = [], [], []
        for i, (m, (x, mask)) in enumerate(parts.items()):
            x_TD, mask_T = self._flat(x, mask)
            real_R = mask_T.nonzero().squeeze(1)
            per_example = max(x_TD.shape[0] // x.shape[0], 1) if x.ndim >= 3 else max(x_TD.shape[0], 1)
            flats[m] = (x, x_TD, mask_T, real_R)
            xs.append(x_TD.index_select(0, real_R).to(dtype))
            examples.append(real_R // per_example)
            owners.append(torch.full_like(real_R, i))
        # example by example, each example's modalities in the order given (stable sort)
        order_U = torch.sort(torch.cat(examples), stable=True).indices
        x_UD = torch.cat(xs).index_select(0, order_U)
        owner_U = torch.cat(owners).index_select(0, order_U)
        U = x_UD.shape[0]
        mask_U = torch.ones(U, dtype=torch.bool, device=x_UD.device)
        S = max(min(self.group_size or U, U), 1)
        bias_row = None
        if self.bias_per_modality:  # each token selects with its own modality's bias
            bias_row = torch.tensor([self._bias_row(m) for m in flats], device=owner_U.device).index_select(0, owner_U)
        out_UD, r = self._dispatch(x_UD, mask_U, S, opts, self._capacity_factor(opts), False, bias_row)
        self._record("joint", self._aux(r, mask_U, S, opts, losses=_UNION_LOSSES))
        if self.capture is not None:
            expert_U, kept_U = self._top1_kept(r, U)
        outs = {}
        for i, (m, (x, x_TD, mask_T, real_R)) in enumerate(flats.items()):
            rows = (owner_U == i).nonzero().squeeze(1)  # in routed order; real_R is in the same order
            out_TD = torch.zeros_like(x_TD).index_copy_(0, real_R, out_UD.index_select(0, rows).to(x_TD.dtype))
            outs[m] = self._add_shared(out_TD, x_TD).reshape(x.shape)
            n = rows.numel()
            self._record(m, self._aux(r, mask_U, max(n, 1), self.options_for(m), losses=_MODALITY_LOSSES, rows=rows))
            if self.capture is not None:
                T = mask_T.numel()
                expert_T = torch.full((T,), -1, dtype=torch.long, device=mask_T.device).index_copy_(0, real_R, expert_U[rows])
                kept_T = torch.zeros(T, dtype=torch.bool, device=mask_T.device).index_copy_(0, real_R, kept_U[rows])
                self._capture_one(m, x.shape[:-1], expert_T, kept_T, mask_T)
        return outs

    def _capacity_factor(self, opts: RoutingOptions) -> float | None:
        """The capacity factor a call routes with now (None: dropless)."""
        if self.training:
            return opts.capacity_factor
        if self.eval_routing == "dropless" and self.router_name != "expert_choice":
            return None
        return opts.eval_capacity_factor if opts.eval_capacity_factor is not None else opts.capacity_factor

    def check_joint_options(self) -> None:
        """Joint routing uses one capacity, one BPR setting and one set of union losses: a
        per-modality override of those cannot apply."""
        for m, o in self.modality_options.items():
            differ = [f for f in _UNION_OPTIONS if getattr(o, f) != getattr(self.options, f)]
            if differ:
                raise ConfigError(
                    f"joint routing routes every modality in one group, so {differ} cannot differ for {m!r}; set them "
                    f"for the layer, not per modality (per modality in joint routing: "
                    f"{[f.name for f in fields(RoutingOptions) if f.name not in _UNION_OPTIONS]})"
                )

    def _flat(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ConfigError(f"SparseMoE(dim={self.dim}) expects [..., {self.dim}] input; got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        if mask is None:
            return x_TD, torch.ones(T, dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:-1]:
            raise ConfigError(f"token mask must have shape {tuple(x.shape[:-1])} (input without its last dim); got {tuple(mask.shape)}")
        return x_TD, mask.reshape(T).to(torch.bool)

    def _dispatch(self, x_TD, mask_T, S, opts, capacity_factor, per_group, bias_row=None):
        """Route the tokens x_TD in groups of S, run the experts, combine: (out_TD, _Routed).
        bias_row: with a per-modality expert bias, the row the tokens use (an int, or one per
        token [T])."""
        E, D = self.num_experts, self.dim
        logits_TE = self.router_logits(x_TD)
        if not _all_finite(logits_TE):
            raise FloatingPointError(
                "SparseMoE router logits are not finite (NaN/inf): the input or the router weights "
                "have diverged; lower the learning rate or enable gradient clipping"
            )
        noise_std = self.noise_scale / E
        noisy = self.training and noise_std > 0
        noisy_logits_TE = logits_TE + noise_std * torch.randn_like(logits_TE) if noisy else logits_TE
        clean_gates_TE = logits_TE.softmax(-1)
        gates_TE = noisy_logits_TE.softmax(-1) if noisy else clean_gates_TE

        gates_GSE = self._group(gates_TE, S, 0.0)
        mask_GS = self._group(mask_T, S, False)
        G = gates_GSE.shape[0]
        bias = row = None
        if self.balance == "bias":
            bias = self.expert_bias
            if self.bias_per_modality:  # the tokens' rows: one int, or [G, S]
                row = bias_row if isinstance(bias_row, int) else self._group(bias_row, S, 0)
                bias = bias[row]  # [E] or [G, S, E]
        token_N, expert_N, group_N, slot_N, weight_N, capacity = self._assign(gates_GSE, mask_GS, opts, capacity_factor, per_group,
                                                                              bias)
        if self.balance == "bias" and self.training and not _in_backward():
            # the load the routing asked of each expert (choices of real tokens, dropped or
            # not), per modality with a per-modality bias; a checkpointed forward recomputed in
            # backward is not counted twice
            chosen_N = mask_GS.reshape(-1).index_select(0, token_N)
            cell_N = expert_N[chosen_N]
            if self.bias_per_modality:
                cell_N = (row if isinstance(row, int) else row.reshape(-1).index_select(0, token_N[chosen_N])) * E + cell_N
            load = torch.bincount(cell_N, minlength=self._bias_load.numel())
            self._bias_load += load.view_as(self._bias_load).to(self._bias_load.dtype)

        kept_M = (slot_N >= 0).nonzero().squeeze(1)
        token_M, expert_M, weight_M = token_N[kept_M], expert_N[kept_M], weight_N[kept_M]
        slot_M, group_M = slot_N[kept_M], group_N[kept_M]
        routed = _Routed(logits_TE, noisy_logits_TE, clean_gates_TE, gates_TE, noise_std if noisy else 0.0,
                         token_M, expert_M, capacity, token_N, slot_N)
        M = kept_M.numel()
        counts_E = torch.bincount(expert_M, minlength=E)
        C = capacity if capacity is not None else (int(slot_M.max()) + 1 if M else 1)
        impl = self.experts.implementation
        # Padded buffers waste rows on empty slots but run as one batched matmul with the
        # bias fused. Measured with scripts/bench_moe.py on 2 CPU cores they win for top-1
        # at >= 85% fill; for top-2 the ragged grouped_mm path won even at 98% fill.
        padded = self.top_k == 1 and M >= self.padded_min_fill * E * G * C
        if self.ep is None and (impl == "bmm" or (impl == "auto" and padded)):
            # V-MoE layout: per-expert buffers [E, G*C, D] filled by (expert, group, slot).
            row_M = (expert_M * G + group_M) * C + slot_M
            buf_RD = x_TD.new_zeros(E * G * C, D).index_copy_(0, row_M, x_TD.index_select(0, token_M))
            y_RD = self.experts.forward_buffers(buf_RD.view(E, G * C, D)).reshape(E * G * C, D)
            y_MD = y_RD.index_select(0, row_M)
        else:
            # Ragged rows grouped by expert (then group, then slot), placed without a sort: the
            # kept slots of each (expert, group) are 0..n-1, so a row's place is the rows of the
            # (expert, group) pairs before its own plus its slot.
            count_EG = torch.bincount(expert_M * G + group_M, minlength=E * G)
            place_M = (count_EG.cumsum(0) - count_EG).index_select(0, expert_M * G + group_M) + slot_M
            order_M = torch.empty_like(place_M).scatter_(0, place_M, torch.arange(M, device=place_M.device))
            token_M, weight_M = token_M.index_select(0, order_M), weight_M.index_select(0, order_M)
            x_MD = x_TD.index_select(0, token_M)
            if self.ep is not None:  # expert parallel: the rows go to the ranks that own their experts
                y_MD = expert_parallel_apply(self.experts, x_MD, counts_E, self.ep)
            else:
                y_MD = self.experts(x_MD, counts_E)
        out_TD = torch.zeros_like(x_TD)
        out_TD.index_add_(0, token_M, y_MD.to(x_TD.dtype) * weight_M.to(x_TD.dtype).unsqueeze(-1))
        return out_TD, routed

    def _record(self, modality: str | None, aux: "MoEAux") -> None:
        key = modality
        if self.record_every_call and key in self.aux:
            key = f"{modality}#{sum(1 for k in self.aux if k == modality or str(k).startswith(f'{modality}#'))}"
        self.aux[key] = aux

    @torch.no_grad()
    def _top1_kept(self, r: "_Routed", T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each routed token's top-1 expert and whether that choice was computed (for expert
        choice: whether any expert took the token)."""
        expert_T = r.gates_TE.argmax(-1)
        if self.router_name == "expert_choice":
            kept_T = torch.bincount(r.token_N[r.slot_N >= 0], minlength=T)[:T] > 0
        else:
            kept_T = r.slot_N.view(-1, self.top_k)[:T, 0] >= 0
        return expert_T, kept_T

    @torch.no_grad()
    def _capture_one(self, modality, shape, expert_T, kept_T, mask_T) -> None:
        """Record one call's per-token routing (-1 for padding), shaped like x without D."""
        expert_T = torch.where(mask_T, expert_T, torch.full_like(expert_T, -1))
        shape = tuple(shape)
        self.capture.append({"modality": modality, "expert": expert_T.view(shape).cpu(),
                             "kept": (kept_T & mask_T).view(shape).cpu(), "mask": mask_T.view(shape).cpu()})

    def _aux(self, r: "_Routed", mask_T, S, opts, losses=None, rows=None) -> MoEAux:
        """The auxiliary losses (`losses`: names to compute, default all with a weight) and
        statistics of a call, over all its tokens or only `rows` (one group of them)."""
        T = mask_T.numel()
        logits_TE, noisy_logits_TE, clean_gates_TE, gates_TE = r.logits_TE, r.noisy_logits_TE, r.clean_gates_TE, r.gates_TE
        kept_per_token = torch.bincount(r.token_M, minlength=T)[:T]
        expert_M = r.expert_M
        if rows is not None:
            member_T = torch.zeros(T, dtype=torch.bool, device=mask_T.device).index_fill_(0, rows, True)
            expert_M = expert_M[member_T[r.token_M]]
            logits_TE, noisy_logits_TE = logits_TE.index_select(0, rows), noisy_logits_TE.index_select(0, rows)
            clean_gates_TE, gates_TE = clean_gates_TE.index_select(0, rows), gates_TE.index_select(0, rows)
            mask_T, kept_per_token = mask_T.index_select(0, rows), kept_per_token.index_select(0, rows)
        counts_E = torch.bincount(expert_M, minlength=self.num_experts)
        group = lambda t, fill: self._group(t, S, fill)  # noqa: E731
        mask_GS = group(mask_T, False)
        weights = {
            "importance": opts.importance_weight, "load": opts.load_weight, "balance": opts.balance_weight,
            "z": opts.z_loss_weight, "local_entropy": opts.local_entropy_weight,
            "global_entropy": opts.global_entropy_weight,
        }
        if losses is not None:
            weights = {k: (w if k in losses else 0.0) for k, w in weights.items()}
        out: dict[str, torch.Tensor] = {}
        if weights["importance"]:
            out["importance"] = L.importance_loss(group(clean_gates_TE, 0.0), mask_GS)
        if weights["load"] and r.noise_std > 0 and self.router_name != "expert_choice":
            out["load"] = L.load_loss(group(logits_TE, 0.0), group(noisy_logits_TE, 0.0), r.noise_std, self.top_k, mask_GS)
        if weights["balance"]:
            out["balance"] = L.balance_loss(group(gates_TE, 0.0), mask_GS)
        if weights["z"]:
            out["z"] = L.z_loss(group(logits_TE, 0.0), mask_GS)
        if weights["local_entropy"]:
            out["local_entropy"] = L.local_entropy_loss(group(clean_gates_TE, 0.0), mask_GS)
        if weights["global_entropy"]:
            out["global_entropy"] = L.global_entropy_loss(group(clean_gates_TE, 0.0), mask_GS, opts.global_entropy_threshold)
        total = sum((weights[k] * v for k, v in out.items()), logits_TE.new_zeros(()))

        with torch.no_grad():
            n_tokens = mask_T.sum()
            n_choices = n_tokens * (self.top_k if self.router_name != "expert_choice" else 1)
            n_kept = counts_E.sum()
            mean_gate = (clean_gates_TE * mask_T.unsqueeze(-1)).sum(0) / n_tokens.clamp_min(1)
            stats = {
                "tokens_per_expert": counts_E.detach().float(),
                "expert_load": counts_E.float() / n_kept.clamp_min(1),
                "mean_gate": mean_gate,
                # exp(H(mean gate)): how many experts the tokens' mean routing spreads over (1..E)
                "effective_experts": torch.exp(L.entropy(mean_gate)),
                "num_tokens": n_tokens.float(),
                # Fraction of (token, choice) pairs dropped; for expert choice: of tokens unrouted.
                # No token: nothing was dropped (0, not 1).
                "dropped_frac": (n_choices - n_kept).float() / n_choices.clamp_min(1)
                if self.router_name != "expert_choice"
                else ((kept_per_token == 0) & mask_T).sum().float() / n_tokens.clamp_min(1),
                "dropped_token_frac": ((kept_per_token == 0) & mask_T).sum().float() / n_tokens.clamp_min(1),
                "capacity": torch.tensor(float(r.capacity if r.capacity is not None else -1)),
            }
            if self.ep is not None:  # share of this rank's kept rows computed by each EP rank
                stats["rank_load"] = counts_E.view(self.ep.ep_size, -1).sum(1).float() / n_kept.clamp_min(1)
        return MoEAux(total, out, stats)


@dataclass
class _Routed:
    """What one routing pass leaves for the losses and statistics (T routed tokens)."""

    logits_TE: torch.Tensor
    noisy_logits_TE: torch.Tensor
    clean_gates_TE: torch.Tensor
    gates_TE: torch.Tensor
    noise_std: float  # of the noise actually added (0 when none)
    token_M: torch.Tensor  # kept assignments' tokens
    expert_M: torch.Tensor  # and experts
    capacity: int | None
    token_N: torch.Tensor  # every choice's token
    slot_N: torch.Tensor  # and buffer slot (-1: dropped)


# Joint routing: the losses over the union of modalities and the options they share.
_UNION_LOSSES = frozenset({"importance", "load", "balance", "z"})
_MODALITY_LOSSES = frozenset({"local_entropy", "global_entropy"})
_UNION_OPTIONS = ("capacity_factor", "eval_capacity_factor", "batch_priority", "importance_weight", "load_weight",
                  "balance_weight", "z_loss_weight")


def collect_aux(module: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum the weighted auxiliary losses of every SparseMoE in `module` (from their last call)
    and return it with flat per-layer, per-modality metrics for logging:
    `moe/{layer}/{modality}/{name}` (losses detached, statistics as tensors)."""
    total = None
    metrics: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, m in module.named_modules():
        if not isinstance(m, SparseMoE) or id(m) in seen:
            continue
        seen.add(id(m))  # a shared layer is visited once but holds every modality's record
        for modality, aux in m.aux.items():
            total = aux.loss if total is None else total + aux.loss
            prefix = f"moe/{name or 'layer'}/{modality or 'all'}"
            for k, v in aux.losses.items():
                metrics[f"{prefix}/{k}_loss"] = v.detach()
            for k, v in aux.stats.items():
                metrics[f"{prefix}/{k}"] = v
    if total is None:
        total = torch.zeros(())
    return total, metrics
