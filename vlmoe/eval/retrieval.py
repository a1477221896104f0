"""Image-text retrieval metrics (R@K in both directions) on paired embeddings."""
from __future__ import annotations

import torch
from ..errors import DataError

__all__ = ["retrieval_metrics"]


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i of each is one pair. Recall@K for image->text and text->image, as fractions."""
    if image_features.shape != text_features.shape:
        raise DataError(f"paired features differ in shape: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    n = image_features.shape[0]
    sim = image_features.float() @ text_features.float().t()
    target = torch.arange(n, device=sim.device)
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.t())):
        # rank of the true partner, ties counted against it: duplicate captions (common in
        # small sets) must not inflate recall
        true = s.gather(1, target[:, None])
        rank = (s >= true).sum(1) - 1
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean()) if n else 0.0
    return out
