"""Routing pictures: expert usage per MoE layer, image tokens beside text tokens."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["routing_picture"]


def routing_picture(counts_RE: torch.Tensor, row_labels: list[str], title: str = "routing", path: str | Path | None = None):
    """Heatmap of the fraction of each row's tokens per expert (rows: layer x modality).
    Returns the matplotlib figure; writes a PNG when `path` is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    frac = counts_RE / counts_RE.sum(1, keepdim=True).clamp_min(1)
    R, E = frac.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * E + 2.5), max(2, 0.35 * R + 1.2)))
    im = ax.imshow(frac.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(float(frac.max()), 1e-6))
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(R), row_labels)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of routed tokens")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig
