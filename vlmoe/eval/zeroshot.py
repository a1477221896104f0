"""Zero-shot classification with the prompt-ensemble classifier open_clip builds
(normalise per template, average, renormalise)."""
from __future__ import annotations

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from ..data.text import load_classnames, load_templates

__all__ = ["load_classnames", "load_templates", "build_classifier", "topk_correct"]


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: list[str], templates: list[str], device=None) -> torch.Tensor:
    """[embed_dim, num_classes] prompt-ensemble weights, as open_clip builds them."""
    device = device or next(model.parameters()).device
    return build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device, use_tqdm=False)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (k capped at C)."""
    num_classes = logits.shape[1]
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"label {int(labels.max())} in the data but only {num_classes} class names: the class-names file "
            f"must list one name per label, in label order"
        )
    top = logits.topk(min(max(ks), num_classes), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}
