"""Experts: E two-layer MLPs held as stacked weights, applied to tokens sorted by expert.

Legend: M tokens routed to experts (sorted by expert), E experts, D model dim, H hidden dim.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import ConfigError

__all__ = ["Experts", "grouped_mm_supported"]

Implementation = Literal["auto", "bmm", "grouped_mm", "loop"]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous:
    grouped_mm's backward rejects expanded gradients (e.g. from `.sum()`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs for these operands: CPU (float32 or
    bfloat16) or CUDA with bfloat16 on sm80+, and every row stride 16-byte aligned."""
    if not hasattr(F, "grouped_mm"):
        return False
    if any((d * torch.empty((), dtype=dtype).element_size()) % 16 for d in dims):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


class _SwiGLU(nn.Module):
    """silu(gate) * up, with gate and up the two halves of the first projection."""

    def forward(self, h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class Experts(nn.Module):
    """E MLPs with stacked weights: w1 [E, D, H], b1 [E, H], w2 [E, H, D], b2 [E, D].

    Each expert computes `act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`, i.e. timm's `Mlp` /
    open_clip's MLP with `fc1.weight = w1[e].T`. With expert_type="swiglu" (Mixtral, LLaMA)
    w1 is [E, D, 2H], its first H columns the gate and the rest the up projection:
    `(silu(x @ gate) * (x @ up)) @ w2`.

    Args:
        num_experts: E.
        dim: model width D (input and output).
        hidden_dim: expert hidden width H.
        act_layer: activation module class (nn.GELU as in timm / open_clip).
        expert_type: "mlp" (act_layer MLP) or "swiglu" (gated SiLU; act_layer unused).
        bias: whether the two projections have biases.
        implementation: how ragged token lists are computed: "grouped_mm" (one kernel per
            projection), "loop" (a readable per-expert loop, the reference) or "auto"
            (grouped_mm where supported). "bmm" is a SparseMoE choice (capacity buffers,
            `forward_buffers`); here it means "auto".
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        implementation: Implementation = "auto",
        expert_type: Literal["mlp", "swiglu"] = "mlp",
    ):
        super().__init__()
        if implementation not in ("auto", "bmm", "grouped_mm", "loop"):
            raise ConfigError(f"implementation must be 'auto', 'bmm', 'grouped_mm' or 'loop'; got {implementation!r}")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.implementation = implementation
        if expert_type not in ("mlp", "swiglu"):
            raise ConfigError(f"expert_type must be 'mlp' or 'swiglu'; got {expert_type!r}")
        self.expert_type = expert_type
        first = 2 * hidden_dim if expert_type == "swiglu" else hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, first))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, first)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.act = _SwiGLU() if expert_type == "swiglu" else act_layer()
        # Expert parallelism (vlmoe.moe.parallel): this module may hold only experts
        # [expert_offset, expert_offset + num_experts) of num_total_experts.
        self.num_total_experts, self.expert_offset, self.groups = num_experts, 0, None
        self._register_load_state_dict_pre_hook(self._slice_full_experts)
        self.init_weights()

    @property
    def is_sharded(self) -> bool:
        return self.groups is not None

    def shard(self, groups) -> None:
        """Keep only EP rank `groups.ep_rank`'s experts (see vlmoe.moe.parallel)."""
        E, P = self.num_total_experts, groups.ep_size
        if E % P:
            raise ConfigError(
                f"{E} experts cannot be split evenly over an expert-parallel group of {P} ranks; "
                f"use an expert_parallel_size that divides {E}"
            )
        n = E // P
        self.expert_offset, self.num_experts, self.groups = groups.ep_rank * n, n, groups
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.data.narrow(0, self.expert_offset, n).clone(), requires_grad=p.requires_grad))

    def unshard(self, full: dict[str, torch.Tensor]) -> None:
        """Take back all experts (`full`: parameter name -> [E, ...] tensor)."""
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(full[name].to(p.device, p.dtype), requires_grad=p.requires_grad))
        self.num_experts, self.expert_offset, self.groups = self.num_total_experts, 0, None

    def _slice_full_experts(self, state_dict, prefix, *args) -> None:
        # Checkpoints always hold all experts (whatever EP size wrote them): a sharded
        # module keeps its own rows.
        if not self.is_sharded:
            return
        for name, p in self.named_parameters(recurse=False):
            t = state_dict.get(prefix + name)
            if t is not None and t.shape[0] == self.num_total_experts and t.shape[1:] == p.shape[1:]:
                state_dict[prefix + name] = t.narrow(0, self.expert_offset, self.num_experts)

    def init_weights(self) -> None:
        """nn.Linear's default initialisation, expert by expert."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            fan_in = w.shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            # kaiming_uniform_(a=sqrt(5)) as nn.Linear does reduces to U(-1/sqrt(fan_in), ..).
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        shard = (f"experts {self.expert_offset}..{self.expert_offset + self.num_experts - 1} of "
                 f"{self.num_total_experts}, ") if self.is_sharded else ""
        return (f"{shard}num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"expert_type={self.expert_type}, implementation={self.implementation}")

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.implementation == "loop":
            return False
        if torch.compiler.is_compiling() and self.implementation != "grouped_mm":
            # grouped_mm's meta kernel rejects float32 (torch 2.14), so a traced grouped_mm
            # fails; compiled, the ragged path runs the per-expert loop (with a graph break at
            # its split sizes, which depend on the data)
            return False
        ok = grouped_mm_supported(x.device, self._compute_dtype(x), self.dim, self.hidden_dim, self.w1.shape[-1])
        if self.implementation == "grouped_mm" and not ok:
            raise RuntimeError(
                f"grouped_mm is not supported for dtype {self._compute_dtype(x)} on {x.device} with "
                f"dim={self.dim}, hidden_dim={self.hidden_dim}; use implementation='auto' or 'loop'"
            )
        return ok

    def forward_buffers(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Experts on padded per-expert buffers [E, C, D] (V-MoE's layout): one batched
        matmul per projection with the bias fused in; the fastest path on CPU."""
        b1 = self.b1.unsqueeze(1) if self.b1 is not None else None
        b2 = self.b2.unsqueeze(1) if self.b2 is not None else None
        h_ECH = torch.bmm(x_ECD, self.w1) if b1 is None else torch.baddbmm(b1, x_ECD, self.w1)
        h_ECH = self.act(h_ECH)
        return torch.bmm(h_ECH, self.w2) if b2 is None else torch.baddbmm(b2, h_ECH, self.w2)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_MD: tokens sorted by expert; counts_E: how many rows belong to each expert."""
        if self.use_grouped_mm(x_MD):
            return self._forward_grouped(x_MD, counts_E)
        return self._forward_loop(x_MD, counts_E)

    def _forward_grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x_MD)
        M = x_MD.shape[0]
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        # Autocast has no rule for grouped_mm: cast explicitly.
        with torch.autocast(x_MD.device.type, enabled=False):
            h_MH = F.grouped_mm(x_MD.to(dtype).contiguous(), self.w1.to(dtype), offs=offsets_E)
            if self.b1 is not None:
                expert_M = torch.repeat_interleave(
                    torch.arange(self.num_experts, device=x_MD.device), counts_E, output_size=M
                )
                h_MH += self.b1.to(dtype).index_select(0, expert_M)
            h_MH = self.act(h_MH)
            y_MD = F.grouped_mm(h_MH, self.w2.to(dtype), offs=offsets_E)
            if self.b2 is not None:
                y_MD += self.b2.to(dtype).index_select(0, expert_M)
            y_MD = _ContiguousGrad.apply(y_MD)
        return y_MD

    def _forward_loop(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # unbind (not w1[e]) so backward stacks E gradients once instead of E full-size ones.
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        b1 = self.b1.unbind(0) if self.b1 is not None else [None] * self.num_experts
        b2 = self.b2.unbind(0) if self.b2 is not None else [None] * self.num_experts
        outputs = []
        for e, x in enumerate(x_MD.split(counts_E.tolist())):
            if x.shape[0] == 0:
                continue
            h = self.act(F.linear(x, w1[e].t(), b1[e]))
            outputs.append(F.linear(h, w2[e].t(), b2[e]))
        if not outputs:
            # No rows: still a graph through the weights, so that backward runs everywhere
            # (expert parallelism needs every rank in the backward all-to-all).
            x = x_MD[:0]
            return F.linear(self.act(F.linear(x, w1[0].t(), b1[0])), w2[0].t(), b2[0])
        return torch.cat(outputs)
