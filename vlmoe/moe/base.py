"""What every MoE layer shares (`MoEBase`): the routing context the towers set, the stacked
experts and the always-on shared experts, input checks, the per-call records (`aux`) and
their observers, and capture of per-token routing for the pictures. `SparseMoE` (token and
expert choice) and `SoftMoE` build on it; neither inherits the other's machinery."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Iterator

import torch
from torch import nn

from .experts import Experts
from .record import MoEAux, record_key
from ..errors import ConfigError

__all__ = ["MoEBase", "routing_context", "current_routing_context", "eval_settings_kept", "moe_layers", "check_finite"]

# The innermost routing context is the stack's last entry: a plain list, which
# torch.compile traces without a graph break (a ContextVar breaks the graph at every `with`).
_CONTEXT: list[tuple[str | None, torch.Tensor | None]] = [(None, None)]


@contextlib.contextmanager
def routing_context(modality: str | None = None, mask: torch.Tensor | None = None) -> Iterator[None]:
    """Tell every MoE layer called inside the block which modality its tokens are and which
    tokens are real (mask [B, T], True for real tokens). Used by the towers, whose blocks
    call `mlp(x)` with no room for extra arguments. The context belongs to the process (not
    to a thread): one model runs its towers at a time."""
    _CONTEXT.append((modality, mask))
    try:
        yield
    finally:
        _CONTEXT.pop()


def current_routing_context() -> tuple[str | None, torch.Tensor | None]:
    """(modality, mask) set by the innermost `routing_context`."""
    return _CONTEXT[-1]


def _setting(name: str) -> property:
    """A setting of the layer's resolved configuration (`self.config`, the one copy); setting
    it re-checks the whole configuration."""
    def get(self):
        return getattr(self.config, name)

    def set(self, value):
        self.config = replace(self.config, **{name: value}).resolve()
        self._configured()

    return property(get, set, doc=f"The layer's {name} (see LayerConfig).")


class MoEBase(nn.Module):
    """The common part of the MoE layers: `forward(x, mask=None, modality=None) -> x`.

    After each call, `aux[modality]` holds that call's losses and statistics (MoEAux), and
    each function in `observers` is called with (layer, modality, aux): the way meters see
    every call, including the calls a joint forward makes."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, router: nn.Module, act_layer, bias: bool,
                 implementation: str, expert_type: str, num_shared_experts: int, shared_expert_gate: bool):
        super().__init__()
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        # The router first: parameters (and so the optimiser's and the gradient norm's order)
        # and the random numbers drawn at construction stay in the order of earlier releases.
        self.router = router
        self.experts = Experts(num_experts, dim, hidden_dim, act_layer=act_layer, bias=bias,
                               implementation=implementation, expert_type=expert_type)
        self.num_shared_experts = num_shared_experts
        self.shared_experts = (Experts(1, dim, num_shared_experts * hidden_dim, act_layer=act_layer, bias=bias,
                                       implementation="loop", expert_type=expert_type) if num_shared_experts else None)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        self.aux: dict[str | None, MoEAux] = {}
        # A layer shared across depths (WideNet) runs several times per forward and per
        # modality: then each call keeps its record ("text", "text#1", ...) until the owner
        # clears `aux`; otherwise a call replaces the previous one of its modality.
        self.record_every_call = False
        self.observers: list[Callable] = []
        # Set to a list to record each call's per-token routing (top-1 expert, kept or not).
        self.capture: list[dict] | None = None
        # Whether any call's router logits were NaN/inf since `check_finite` last looked: kept
        # on the device (checking each call would read it back to the host every time).
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    top_k = _setting("top_k")
    router_name = property(lambda self: self.config.router)
    noise_scale = _setting("noise_scale")
    group_size = _setting("group_size")
    multiple_of = _setting("multiple_of")
    gate = property(lambda self: self.config.gate)
    normalize_combine_weights = _setting("normalize_combine_weights")
    balance = property(lambda self: self.config.balance)
    bias_update_rate = property(lambda self: self.config.bias_update_rate)
    bias_per_modality = property(lambda self: self.config.bias_per_modality)

    def _configured(self) -> None:
        """Called after a setting changed (see `_setting`)."""

    def init_shared(self) -> None:
        if self.shared_experts is not None:
            self.shared_experts.init_weights()
        if self.shared_gate is not None:
            nn.init.zeros_(self.shared_gate.weight)  # the gate starts at sigmoid(0) = 1/2

    # -- calls -----------------------------------------------------------------------------
    def _context(self, mask, modality):
        ctx_modality, ctx_mask = _CONTEXT[-1]
        return (mask if mask is not None else ctx_mask), (modality if modality is not None else ctx_modality)

    def _flat(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x as [T, D] and its token mask as [T] bool (all True without one)."""
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ConfigError(f"{type(self).__name__}(dim={self.dim}) expects [..., {self.dim}] input; got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        if mask is None:
            return x_TD, torch.ones(T, dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:-1]:
            raise ConfigError(f"token mask must have shape {tuple(x.shape[:-1])} (input without its last dim); got {tuple(mask.shape)}")
        return x_TD, mask.reshape(T).to(torch.bool)

    def _add_shared(self, out_TD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        """out_TD plus the always-on experts' output on x_TD (gated per token if asked)."""
        if self.shared_experts is None:
            return out_TD
        y_TD = self.shared_experts.forward_buffers(x_TD.unsqueeze(0)).squeeze(0).to(x_TD.dtype)
        if self.shared_gate is not None:
            y_TD = y_TD * torch.sigmoid(self.shared_gate(x_TD))
        return out_TD + y_TD

    def _note_finite(self, logits: torch.Tensor) -> None:
        """Remember, on the device, whether these router logits held a NaN or inf (max |x|
        propagates both: one reduction); `check_finite` raises on it."""
        if logits.numel():
            self.nonfinite.logical_or_(~torch.isfinite(logits.detach().abs().amax()))

    def _record(self, modality: str | None, aux: MoEAux) -> None:
        self.aux[record_key(self.aux, modality, self.record_every_call)] = aux
        for observe in self.observers:
            observe(self, modality, aux)

    @torch.no_grad()
    def _capture_one(self, modality, shape, expert_T, kept_T, mask_T) -> None:
        """Record one call's per-token routing (-1 for padding), shaped like x without D."""
        expert_T = torch.where(mask_T, expert_T, torch.full_like(expert_T, -1))
        shape = tuple(shape)
        self.capture.append({"modality": modality, "expert": expert_T.view(shape).cpu(),
                             "kept": (kept_T & mask_T).view(shape).cpu(), "mask": mask_T.view(shape).cpu()})

    # -- what other parts ask of every layer -------------------------------------------------
    @property
    def routes_tokens(self) -> bool:
        """False for a layer with nothing to drop or sweep (Soft MoE)."""
        return True

    def eval_state(self) -> tuple:
        """What `configure_eval` changes, to put back with `load_eval_state`."""
        return ()

    def load_eval_state(self, state: tuple) -> None:
        pass

    def check_joint_options(self) -> None:
        """Raise if joint routing cannot honour the layer's per-modality settings."""

    def forward_joint(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Each modality's tokens through the layer (a layer that mixes tokens only within a
        sequence routes modalities together as it routes each alone)."""
        return {m: self(x, mask, m) for m, (x, mask) in parts.items()}


@contextlib.contextmanager
def eval_settings_kept(layers) -> Iterator[None]:
    """Inside the block, evaluation settings may be changed (`configure_eval`); afterwards
    every layer's own are back."""
    saved = [(m, m.eval_state()) for m in layers]
    try:
        yield
    finally:
        for m, state in saved:
            m.load_eval_state(state)


def check_finite(module: nn.Module) -> None:
    """Raise FloatingPointError if any MoE layer of `module` saw NaN or inf router logits since
    the last check, naming the layers; then start counting afresh. One host read for all the
    layers: the layers only note it on the device, so that a step has no host sync. The
    training module calls this on each logging step (`log_every_n_steps`) and after each
    evaluation; call it yourself when you drive the layers directly."""
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoEBase)]
    if not layers:
        return
    flags = torch.stack([m.nonfinite.to(layers[0][1].nonfinite.device) for _, m in layers]).cpu()
    for _, m in layers:
        m.nonfinite.zero_()
    bad = list(dict.fromkeys(name or "(the layer)" for (name, _), f in zip(layers, flags.tolist()) if f))
    if bad:
        raise FloatingPointError(
            f"MoE router logits were not finite (NaN/inf) in {', '.join(bad)} since the last check: the input or "
            f"the router weights have diverged; lower the learning rate or enable gradient clipping"
        )


def moe_layers(module: nn.Module) -> list[MoEBase]:
    """The distinct MoE layers of a model, in module order (a shared layer once)."""
    return list({id(m): m for m in module.modules() if isinstance(m, MoEBase)}.values())
