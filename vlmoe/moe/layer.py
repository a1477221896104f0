"""The SparseMoE layer: a drop-in replacement for timm's `Mlp` / open_clip's MLP.

Its parts, each in its own file: the configuration (`config.LayerConfig`), the router
(`routers`), the expert bias (`balance`), what a call routed (`record`), joint packing
(`joint`) and the common base shared with Soft MoE (`base`).

Legend: T tokens, G groups, S tokens per group, E experts, K choices, C capacity,
N = G*S*K assignments, M kept assignments, D model dim, H hidden dim.
"""
from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .balance import BiasBalance, update_biases
from .base import MoEBase, current_routing_context, moe_layers, routing_context
from .comm import expert_parallel_apply
from .config import BIAS_MODALITIES, EVAL_ROUTING, ROUTERS, UNION_OPTIONS, LayerConfig, RoutingOptions
from .joint import pack, scatter_tokens, unpack
from .record import MODALITY_LOSSES, UNION_LOSSES, MoEAux, RoutingRecord, group_tokens
from .routers import make_router
from ..errors import ConfigError, check_int, check_number

__all__ = ["SparseMoE", "RoutingOptions", "MoEAux", "LayerConfig", "routing_context", "current_routing_context",
           "collect_aux", "build_layer", "ROUTERS", "EVAL_ROUTING", "BIAS_MODALITIES"]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes
    forwards). Under torch.compile the forward is traced once, as a forward: False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class SparseMoE(MoEBase):
    """Sparse mixture-of-experts MLP: `forward(x) -> x` for x [B, T, D] or [N, D].

    Args:
        dim: model width D.
        hidden_dim: expert hidden width H (default 4 * dim).
        num_experts: E.
        top_k: experts per token (K); 1 for "switch" and "expert_choice", 2 for "gshard".
        capacity_factor: buffer slots per expert = ceil(S*K*cf/E) rounded to `multiple_of`;
            None routes dropless (every choice kept). For expert choice: the mean number of
            experts per token.
        batch_priority: Batch Prioritized Routing (V-MoE) instead of priority by position.
            Default (None): on for "topk" (V-MoE), off for "switch" and "gshard", which place
            tokens by position as their papers do. Token-choice routers only.
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
        implementation: experts' matmul path: "auto" (V-MoE's static capacity buffers when
            there is a capacity: no host sync, one graph under torch.compile; the ragged rows
            when dropless), "bmm" (the same), "grouped_mm" or "loop" (the ragged rows, sized
            from the data: one host read per call). A layer whose experts are sharded, see
            `shard_experts`, always sends ragged rows.
        *_weight, global_entropy_threshold: auxiliary loss weights (see RoutingOptions); the
            defaults depend on the router (V-MoE: importance and load 0.005; the load loss
            needs noise).
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
            balancing, DeepSeek-V3, `vlmoe.moe.balance`: the importance / load / balance
            losses then default to weight 0).
        bias_update_rate: how far `update_bias()` moves the bias per optimizer step.
        bias_per_modality: with balance="bias", one bias per expert and modality (rows
            BIAS_MODALITIES), each moved by its own modality's loads and applied to its own
            modality's tokens. Every call then needs its modality.
        num_shared_experts: always-on experts (DeepSeekMoE, Qwen2-MoE) of the routed experts'
            width, one dense MLP of num_shared_experts x hidden_dim beside the routed output.
        shared_expert_gate: scale the shared output by sigmoid(x . w) per token (Qwen2-MoE).

    Every setting is checked once (`LayerConfig.resolve`): one the router would not use is
    refused with a ConfigError that names it.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, num_experts: int = 8, *,
                 act_layer: type[nn.Module] = nn.GELU, bias: bool = True, config: LayerConfig | None = None,
                 modality_overrides: dict[str, dict[str, Any]] | None = None, **settings: Any):
        check_int("dim", dim, 1)
        if hidden_dim is not None:
            check_int("hidden_dim", hidden_dim, 1)
        if config is None:
            config = LayerConfig.from_layer_kwargs(modality_overrides, num_experts=num_experts, **settings)
        elif settings or modality_overrides:
            raise ConfigError("SparseMoE takes a LayerConfig or keyword settings, not both")
        if config.router == "soft":
            raise ConfigError("router='soft' is Soft MoE: build it with vlmoe.moe.SoftMoE (or build_layer)")
        cfg = config.resolve()
        super().__init__(dim, hidden_dim or 4 * dim, cfg.num_experts, router=nn.Linear(dim, cfg.num_experts, bias=False),
                         act_layer=act_layer, bias=bias, implementation=cfg.implementation, expert_type=cfg.expert_type,
                         num_shared_experts=cfg.num_shared_experts, shared_expert_gate=cfg.shared_expert_gate)
        self.config = cfg
        self.policy = make_router(cfg)
        self.options, self.modality_options = cfg.options(), cfg.modality_options()
        self.eval_routing = cfg.eval_routing
        self.balancer = BiasBalance(cfg.num_experts, cfg.bias_update_rate, cfg.bias_per_modality) if cfg.balance == "bias" else None
        self.init_weights()

    expert_bias = property(lambda self: self.balancer.expert_bias if self.balancer is not None else None)

    def _configured(self) -> None:
        self.policy = make_router(self.config)

    def init_weights(self) -> None:
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.dim))
        self.experts.init_weights()
        self.init_shared()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the bias moved into `balancer`
        if prefix + "expert_bias" in state_dict and self.balancer is not None:
            state_dict[prefix + "balancer.expert_bias"] = state_dict.pop(prefix + "expert_bias")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        c, o = self.config, self.options
        return (
            f"router={c.router}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"capacity_factor={o.capacity_factor}, batch_priority={o.batch_priority}, noise_scale={c.noise_scale}, "
            f"gate={c.gate}, eval_routing={self.eval_routing}"
            + (f", balance=bias, bias_update_rate={c.bias_update_rate}" if c.balance == "bias" else "")
            + (", bias_per_modality=True" if c.bias_per_modality else "")
            + (f", num_shared_experts={c.num_shared_experts}, shared_expert_gate={c.shared_expert_gate}"
               if c.num_shared_experts else "")
        )

    # -- settings that change after construction -------------------------------------------
    def update_bias(self, group=None) -> torch.Tensor | None:
        """One auxiliary-loss-free balancing step for this layer (see `update_biases` for all
        layers at once); returns the loads, or None when the layer does not balance by bias."""
        return update_biases([self.balancer], group)[0] if self.balancer is not None else None

    def configure_eval(self, eval_routing: str | None = None, eval_capacity_factor: float | None = None,
                       batch_priority: bool | None = None) -> None:
        """Change how eval-mode forwards route, in every modality; None leaves a setting as it
        is. `batch_priority` is the layer's BPR setting, which training shares."""
        if eval_routing is not None:
            if eval_routing not in EVAL_ROUTING:
                raise ConfigError(f"unknown eval_routing {eval_routing!r}; choose one of {EVAL_ROUTING}")
            if eval_routing == "dropless" and not self.policy.dropless_ok():
                raise ConfigError("eval_routing='dropless' needs a router that picks experts per token; expert choice "
                                  "picks tokens per expert (use 'per_example')")
            self.eval_routing = eval_routing
        change = {}
        if eval_capacity_factor is not None:
            check_number("eval_capacity_factor", eval_capacity_factor, 0.0, above=True)
            change["eval_capacity_factor"] = float(eval_capacity_factor)
        if batch_priority is not None:
            if not self.policy.prioritises():
                raise ConfigError(f"batch_priority has no effect with router={self.router_name!r}: the experts pick their tokens")
            change["batch_priority"] = bool(batch_priority)
        if change:
            self.options = replace(self.options, **change)
            self.modality_options = {k: replace(v, **change) for k, v in self.modality_options.items()}

    def eval_state(self) -> tuple:
        return self.options, dict(self.modality_options), self.eval_routing

    def load_eval_state(self, state: tuple) -> None:
        self.options, self.modality_options, self.eval_routing = state[0], dict(state[1]), state[2]

    def check_joint_options(self) -> None:
        """Joint routing uses one capacity, one BPR setting and one set of union losses: a
        per-modality override of those cannot apply."""
        for m, o in self.modality_options.items():
            differ = [f for f in UNION_OPTIONS if getattr(o, f) != getattr(self.options, f)]
            if differ:
                raise ConfigError(
                    f"joint routing routes every modality in one group, so {differ} cannot differ for {m!r}; set them "
                    f"for the layer, not per modality (per modality in joint routing: "
                    f"{[f.name for f in fields(RoutingOptions) if f.name not in UNION_OPTIONS]})"
                )

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

    def capacity_factor_now(self, opts: RoutingOptions) -> float | None:
        """The capacity factor a call routes with now (None: dropless)."""
        if self.training:
            return opts.capacity_factor
        if self.eval_routing == "dropless" and self.policy.dropless_ok():
            return None
        return opts.eval_capacity_factor if opts.eval_capacity_factor is not None else opts.capacity_factor

    def active_fraction(self, modality: str | None = None) -> float:
        """The share of the routed experts' parameters a token uses on average in evaluation:
        K/E for token choice; for expert choice, which takes cf x tokens rows in all, the
        evaluation capacity factor / E (at most 1)."""
        opts = self.options_for(modality)
        cf = opts.eval_capacity_factor if opts.eval_capacity_factor is not None else opts.capacity_factor
        return self.policy.active_fraction(self.num_experts, cf)

    # -- routing ---------------------------------------------------------------------------
    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in float32, even under autocast."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.router.weight.float())

    def _route(self, x_TD, mask_T, S, opts, capacity_factor, per_group, bias_row=None) -> RoutingRecord:
        """Route the tokens x_TD in groups of S. bias_row: with a per-modality expert bias,
        the row the tokens use (an int, or one per token [T])."""
        E = self.num_experts
        logits_TE = self.router_logits(x_TD)
        self._note_finite(logits_TE)
        noise_std = self.noise_scale / E
        noisy = self.training and noise_std > 0
        noisy_logits_TE = logits_TE + noise_std * torch.randn_like(logits_TE) if noisy else logits_TE
        clean_gates_TE = logits_TE.softmax(-1)
        gates_TE = noisy_logits_TE.softmax(-1) if noisy else clean_gates_TE
        gates_GSE, mask_GS = group_tokens(gates_TE, S, 0.0), group_tokens(mask_T, S, False)
        b = self.balancer
        bias = None if b is None else b.selection_bias(bias_row, lambda t: group_tokens(t, S, 0))
        a = self.policy.assign(gates_GSE, mask_GS, opts, capacity_factor, per_group, bias, self.training)
        if b is not None and self.training and not _in_backward():
            # a checkpointed forward recomputed in backward is not counted twice
            b.count(a, mask_GS, bias_row, lambda t: group_tokens(t, S, 0))
        return RoutingRecord(logits_TE, noisy_logits_TE, clean_gates_TE, gates_TE, noise_std if noisy else 0.0, a)

    def _compute(self, x_TD, r: RoutingRecord, G: int) -> torch.Tensor:
        """The experts' weighted outputs for the kept assignments, summed per token."""
        a, impl = r.assignment, self.experts.implementation
        if a.capacity is not None and self.ep is None and impl in ("auto", "bmm"):
            return self._compute_buffers(x_TD, a, G)
        return self._compute_ragged(x_TD, a, G)

    def _compute_buffers(self, x_TD, a, G: int) -> torch.Tensor:
        """V-MoE's layout, every shape static: per-expert buffers [E, G*C, D], C the buffer
        capacity from the group length; buffer row (expert, group, slot) holds the token that
        took that slot, an empty slot a row of zeros. Every assignment (dropped ones too, with
        weight 0 and the spare row R) reads its row back, so nothing is selected on the host."""
        E, D, C = self.num_experts, self.dim, a.capacity
        T, R = x_TD.shape[0], self.num_experts * G * a.capacity
        kept_N = a.kept_N
        row_N = torch.where(kept_N, (a.expert_N * G + a.group_N) * C + a.slot_N, R)
        # kept choices are real tokens (< T); T is the zero row, R the dropped choices' spare row
        token_N = torch.where(kept_N, a.token_N, T)
        source_R = torch.full((R + 1,), T, dtype=torch.long, device=x_TD.device).scatter_(0, row_N, token_N)[:R]
        x_pad = torch.cat([x_TD, x_TD.new_zeros(1, D)])
        y_RD = self.experts.forward_buffers(x_pad.index_select(0, source_R).view(E, G * C, D)).reshape(R, D)
        y_ND = torch.cat([y_RD, y_RD.new_zeros(1, D)]).index_select(0, row_N)
        out_TD = x_TD.new_zeros(T + 1, D)
        out_TD.index_add_(0, token_N, y_ND.to(x_TD.dtype) * a.weight_N.to(x_TD.dtype).unsqueeze(-1))
        return out_TD[:T]

    def _compute_ragged(self, x_TD, a, G: int) -> torch.Tensor:
        """Only the kept rows, grouped by expert: the dropless, expert-parallel and explicit
        grouped_mm / loop path. Its sizes depend on the data (one host read each for the kept
        rows and, dropless, the longest queue)."""
        E = self.num_experts
        kept_M = a.kept_N.nonzero().squeeze(1)
        token_M, expert_M, weight_M = a.token_N[kept_M], a.expert_N[kept_M], a.weight_N[kept_M]
        slot_M, group_M = a.slot_N[kept_M], a.group_N[kept_M]
        M = kept_M.numel()
        counts_E = torch.zeros(E, dtype=torch.long, device=x_TD.device).index_add_(0, expert_M, torch.ones_like(expert_M))
        # Rows grouped by expert (then group, then slot), placed without a sort: the kept
        # slots of each (expert, group) are 0..n-1, so a row's place is the rows of the
        # (expert, group) pairs before its own plus its slot.
        count_EG = torch.zeros(E * G, dtype=torch.long, device=x_TD.device).index_add_(
            0, expert_M * G + group_M, torch.ones_like(expert_M))
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
        return out_TD

    def _aux(self, r: RoutingRecord, mask_T, S, opts, losses=None, rows=None) -> MoEAux:
        return r.aux(self.policy, mask_T, S, opts, losses, rows, self.ep.ep_size if self.ep is not None else None)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, modality: str | None = None) -> torch.Tensor:
        mask, modality = self._context(mask, modality)
        x_TD, mask_T = self._flat(x, mask)
        T = x_TD.shape[0]
        opts = self.options_for(modality)
        S, per_group = max(min(self.group_size or T, T), 1), False
        if not self.training and self.eval_routing == "per_example" and x.ndim >= 3:
            S, per_group = max(T // max(x.shape[0], 1), 1), True  # one example ([B, ...tokens, D]), one group
        bias_row = self.balancer.row(modality) if self.bias_per_modality else None
        r = self._route(x_TD, mask_T, S, opts, self.capacity_factor_now(opts), per_group, bias_row)
        out_TD = self._add_shared(self._compute(x_TD, r, -(-T // S)), x_TD)
        if self.capture is not None:  # per-token routing, for pictures (vlmoe.eval.routing)
            expert_T, kept_T = r.top1_kept(self.policy, T)
            self._capture_one(modality, x.shape[:-1], expert_T, kept_T, mask_T)
        self._record(modality, self._aux(r, mask_T, S, opts))
        return out_TD.reshape(x.shape)

    def forward_joint(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Route several modalities' tokens together: LIMoE's joint routing.

        `parts` maps each modality to (x [B, T, D] or [N, D], token mask or None); returns
        each modality's output, shaped like its input. The real tokens of all parts form one
        routing group per call (or `group_size` groups, filled example by example; see
        `vlmoe.moe.joint`), so image patches and text tokens compete for the same capacity;
        BPR ranks them together; the importance / load / balance / z losses are computed over
        the union (recorded under "joint"). The LIMoE entropy losses and the per-modality
        statistics stay per modality, each over its own tokens (recorded under the modality).
        Capacity, BPR and those union losses use the layer's shared options, so per-modality
        overrides of them are refused.

        In eval mode with eval_routing="per_example" each modality's examples are routed
        alone, through the layer's ordinary call, so results do not depend on the batch.
        """
        if not parts:
            raise ConfigError("forward_joint needs at least one modality's tokens")
        if not self.training and self.eval_routing == "per_example":
            return super().forward_joint(parts)
        self.check_joint_options()
        opts = self.options
        p = pack(parts, self._flat)
        U, mask_U = p.x_UD.shape[0], p.mask_U
        S = max(min(self.group_size or U, U), 1)
        bias_row = None
        if self.bias_per_modality:  # each token selects with its own modality's bias
            bias_row = torch.zeros_like(p.owner_U)
            for i, m in enumerate(p.parts):
                bias_row = torch.where(p.owner_U == i, self.balancer.row(m), bias_row)
        r = self._route(p.x_UD, mask_U, S, opts, self.capacity_factor_now(opts), False, bias_row)
        out_UD = self._compute(p.x_UD, r, -(-U // S))
        self._record("joint", self._aux(r, mask_U, S, opts, losses=UNION_LOSSES))
        top1 = r.top1_kept(self.policy, U) if self.capture is not None else None
        outs = {}
        for i, (m, part) in enumerate(p.parts.items()):
            rows = p.rows(i)
            outs[m] = self._add_shared(unpack(part, rows, out_UD), part.x_TD).reshape(part.x.shape)
            self._record(m, self._aux(r, mask_U, max(rows.numel(), 1), self.options_for(m), losses=MODALITY_LOSSES, rows=rows))
            if top1 is not None:
                expert_T, kept_T = (scatter_tokens(part, rows, t, fill) for t, fill in zip(top1, (-1, False)))
                self._capture_one(m, part.x.shape[:-1], expert_T, kept_T, part.mask_T)
        return outs


def build_layer(dim: int, hidden_dim: int | None, config: LayerConfig, act_layer: type[nn.Module] = nn.GELU,
                bias: bool = True) -> MoEBase:
    """The MoE layer a configuration describes: SoftMoE for router "soft", else SparseMoE."""
    if config.router == "soft":
        from .soft import SoftMoE

        return SoftMoE(dim, hidden_dim, act_layer=act_layer, bias=bias, config=config)
    return SparseMoE(dim, hidden_dim, act_layer=act_layer, bias=bias, config=config)


def collect_aux(module: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum the weighted auxiliary losses of every MoE layer in `module` (from their last call)
    and return it with flat per-layer, per-modality metrics for logging:
    `moe/{layer}/{modality}/{name}` (losses detached, statistics as tensors)."""
    total = None
    metrics: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in module.named_modules()}  # a shared layer under its first name
    for m in moe_layers(module):
        for modality, aux in m.aux.items():
            total = aux.loss if total is None else total + aux.loss
            prefix = f"moe/{names[id(m)] or 'layer'}/{modality or 'all'}"
            for k, v in aux.losses.items():
                metrics[f"{prefix}/{k}_loss"] = v.detach()
            for k, v in aux.stats.items():
                metrics[f"{prefix}/{k}"] = v
    if total is None:
        total = torch.zeros(())
    return total, metrics
