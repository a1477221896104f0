"""Zero-shot classification with the prompt-ensemble classifier open_clip builds
(normalise per template, average, renormalise)."""
from __future__ import annotations

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from ..data.text import load_classnames, load_templates
from ..errors import DataError

__all__ = ["load_classnames", "load_templates", "build_classifier", "topk_correct", "evaluate_zeroshot"]


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: list[str], templates: list[str], device=None) -> torch.Tensor:
    """[embed_dim, num_classes] prompt-ensemble weights, as open_clip builds them."""
    device = device or next(model.parameters()).device
    return build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device, use_tqdm=False)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (k capped at C)."""
    num_classes = logits.shape[1]
    if labels.numel():
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise DataError(
                f"label {int(bad[0])} in the data is outside [0, {num_classes}) for the {num_classes} class names: labels "
                f"(`cls`) must index the class-names file, one name per label in label order"
            )
    top = logits.topk(min(max(ks), num_classes), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate_zeroshot(model, batches, classifier: torch.Tensor, progress=None) -> dict:
    """Top-1/top-5 accuracy (fractions) and per-class accuracy of `model` over `batches`
    ({"image", "label", "skipped"} dicts). `progress` wraps the iterable (e.g. tqdm)."""
    device = classifier.device
    C = classifier.shape[1]
    n = top1 = top5 = skipped = 0
    per_class_hits = torch.zeros(C, dtype=torch.long)
    per_class_n = torch.zeros(C, dtype=torch.long)
    for batch in progress(batches) if progress else batches:
        skipped += int(batch.get("skipped", 0))
        if "image" not in batch:
            continue
        labels = batch["label"].to(device)
        feats = model.encode_image(batch["image"].to(device), normalize=True)
        logits = feats.float() @ classifier.float()
        hits = topk_correct(logits, labels)
        n, top1, top5 = n + labels.numel(), top1 + hits[1], top5 + hits[5]
        correct = (logits.argmax(1) == labels).long().cpu()
        per_class_n += torch.bincount(labels.cpu(), minlength=C)
        per_class_hits += torch.bincount(labels.cpu(), weights=correct, minlength=C).long()
    if n == 0:
        raise DataError("no labelled images were read: check the data path and that the shards have `cls` labels")
    return {
        "top1": top1 / n, "top5": top5 / n, "n": n, "skipped": skipped,
        "per_class": (per_class_hits.float() / per_class_n.clamp_min(1)).tolist(),
        "per_class_n": per_class_n.tolist(),
    }
