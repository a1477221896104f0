"""Joint routing's packing (LIMoE): the real tokens of several modalities as one sequence,
example by example (example b's tokens of every modality in the order given, then example
b+1's), and back to each modality's shape. Masked tokens (text padding) are left out: they
take no capacity and get output 0."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["Packed", "pack", "unpack"]


@dataclass
class Part:
    x: torch.Tensor  # the modality's input, as given
    x_TD: torch.Tensor
    mask_T: torch.Tensor
    real_R: torch.Tensor  # its real tokens' positions in x_TD


@dataclass
class Packed:
    x_UD: torch.Tensor  # the real tokens of every part, example by example
    owner_U: torch.Tensor  # the part (index in `parts`) each token came from
    parts: dict[str, Part]

    def rows(self, i: int) -> torch.Tensor:
        """Part i's tokens in x_UD, in routed order (its real_R is in the same order)."""
        return (self.owner_U == i).nonzero().squeeze(1)


def pack(parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], flat) -> Packed:
    """`flat(x, mask) -> (x_TD, mask_T)` flattens and checks one part."""
    dtype = functools.reduce(torch.promote_types, [x.dtype for x, _ in parts.values()])
    out, xs, examples, owners = {}, [], [], []
    for i, (m, (x, mask)) in enumerate(parts.items()):
        x_TD, mask_T = flat(x, mask)
        real_R = mask_T.nonzero().squeeze(1)
        per_example = max(x_TD.shape[0] // x.shape[0], 1) if x.ndim >= 3 else max(x_TD.shape[0], 1)
        out[m] = Part(x, x_TD, mask_T, real_R)
        xs.append(x_TD.index_select(0, real_R).to(dtype))
        examples.append(real_R // per_example)
        owners.append(torch.full_like(real_R, i))
    order_U = torch.sort(torch.cat(examples), stable=True).indices  # stable: modalities keep their order
    return Packed(torch.cat(xs).index_select(0, order_U), torch.cat(owners).index_select(0, order_U), out)


def unpack(part: Part, rows: torch.Tensor, out_UD: torch.Tensor) -> torch.Tensor:
    """Part's outputs as [T, D] (0 at its masked tokens)."""
    return torch.zeros_like(part.x_TD).index_copy_(0, part.real_R, out_UD.index_select(0, rows).to(part.x_TD.dtype))


def scatter_tokens(part: Part, rows: torch.Tensor, values_U: torch.Tensor, fill) -> torch.Tensor:
    """A per-token value of the packed sequence at part's positions ([T], `fill` at masked ones)."""
    T = part.mask_T.numel()
    return torch.full((T,), fill, dtype=values_U.dtype, device=values_U.device).index_copy_(0, part.real_R, values_U[rows])
