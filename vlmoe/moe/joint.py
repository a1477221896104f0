"""Joint routing's packing (LIMoE): the tokens of several modalities as one sequence, real
tokens example by example (example b's tokens of every modality in the order given, then
example b+1's), then every masked token (text padding), and back to each modality's shape.

The packed sequence keeps the padding (masked: it takes no capacity and gets output 0), so
every size is known from the inputs' shapes, never from their values: packing makes no host
sync. The real tokens come first and in the same order as if the padding were left out, so
groups of `group_size` hold the same real tokens either way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["Packed", "pack", "unpack", "scatter_tokens"]


@dataclass
class Part:
    x: torch.Tensor  # the modality's input, as given
    x_TD: torch.Tensor
    mask_T: torch.Tensor


@dataclass
class Packed:
    x_UD: torch.Tensor  # every part's tokens: the real ones example by example, then the masked ones
    mask_U: torch.Tensor  # which are real
    owner_U: torch.Tensor  # the part (index in `parts`) each token came from
    parts: dict[str, Part]
    place_U: torch.Tensor  # where each input token (parts concatenated in order) went in x_UD
    offsets: list[int]  # where each part starts in that concatenation

    def rows(self, i: int) -> torch.Tensor:
        """Part i's tokens in x_UD, in the part's own order ([T_i])."""
        return self.place_U[self.offsets[i]:self.offsets[i + 1]]


def pack(parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], flat) -> Packed:
    """`flat(x, mask) -> (x_TD, mask_T)` flattens and checks one part."""
    dtype = functools.reduce(torch.promote_types, [x.dtype for x, _ in parts.values()])
    out, xs, masks, keys, owners, offsets = {}, [], [], [], [], [0]
    examples = max((x.shape[0] if x.ndim >= 3 else 1) for x, _ in parts.values())
    for i, (m, (x, mask)) in enumerate(parts.items()):
        x_TD, mask_T = flat(x, mask)
        T = x_TD.shape[0]
        per_example = max(T // x.shape[0], 1) if x.ndim >= 3 else max(T, 1)
        example_T = torch.arange(T, device=x_TD.device) // per_example
        out[m] = Part(x, x_TD, mask_T)
        xs.append(x_TD.to(dtype))
        masks.append(mask_T)
        keys.append(torch.where(mask_T, example_T, examples))  # masked tokens after every example's real ones
        owners.append(torch.full((T,), i, dtype=torch.long, device=x_TD.device))
        offsets.append(offsets[-1] + T)
    order_U = torch.sort(torch.cat(keys), stable=True).indices  # stable: modalities and positions keep their order
    place_U = torch.empty_like(order_U).scatter_(0, order_U, torch.arange(order_U.numel(), device=order_U.device))
    return Packed(torch.cat(xs).index_select(0, order_U), torch.cat(masks).index_select(0, order_U),
                  torch.cat(owners).index_select(0, order_U), out, place_U, offsets)


def unpack(part: Part, rows: torch.Tensor, out_UD: torch.Tensor) -> torch.Tensor:
    """Part's outputs as [T, D] (0 at its masked tokens, which no expert took)."""
    return out_UD.index_select(0, rows).to(part.x_TD.dtype)


def scatter_tokens(part: Part, rows: torch.Tensor, values_U: torch.Tensor, fill) -> torch.Tensor:
    """A per-token value of the packed sequence at part's positions ([T], `fill` at masked ones)."""
    values_T = values_U.index_select(0, rows)
    return torch.where(part.mask_T, values_T, torch.full_like(values_T, fill))
