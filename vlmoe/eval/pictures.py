"""Every picture the package draws (matplotlib, Agg backend; imported only when a picture is
drawn): the routing heatmap of an evaluation, each expert's tokens by modality, each image
patch and caption token coloured by its expert (one fixed colour per expert), and the capacity
sweep's accuracy against compute."""
from __future__ import annotations

import html
from pathlib import Path

import torch

__all__ = ["routing_picture", "modality_bars", "patch_maps", "token_table", "expert_colors", "plot_sweep", "close"]


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def expert_colors(num_experts: int):
    """A fixed colour per expert (tab10 / tab20, then a hue wheel), the same in every picture."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_experts <= 10 else "tab20"]
    if num_experts <= cmap.N:
        return [cmap(e) for e in range(num_experts)]
    return [matplotlib.colors.hsv_to_rgb((e / num_experts, 0.65, 0.9)) for e in range(num_experts)]



def modality_bars(summary: dict, path: str | Path, title: str = "routing"):
    """Per MoE layer, each expert's tokens split into image and text (stacked to 1), with
    the expert's share of all routed tokens written above its bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(summary)
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, 0.5 * len(next(iter(summary[layers[0]].values()))["tokens_per_expert"]) + 3),
                                                      2.2 * len(layers) + 0.6), squeeze=False)
    colors = {"image": "#4c72b0", "text": "#dd8452", "all": "#55a868"}
    for ax, name in zip(axes[:, 0], layers):
        mods = summary[name]
        E = len(next(iter(mods.values()))["tokens_per_expert"])
        counts = {m: torch.tensor(v["tokens_per_expert"], dtype=torch.float64) for m, v in mods.items()}
        total = sum(counts.values())
        bottom = torch.zeros(E, dtype=torch.float64)
        for m, c in counts.items():
            frac = c / total.clamp_min(1)
            ax.bar(range(E), frac.tolist(), bottom=bottom.tolist(), color=colors.get(m, None), label=m)
            bottom += frac
        load = total / total.sum().clamp_min(1)
        for e in range(E):
            ax.text(e, 1.02, f"{load[e]:.0%}", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_xticks(range(E), [f"e{e}" for e in range(E)])
        ax.set_ylabel("modality share")
        ax.set_title(f"{title}: MoE {name.removeprefix('layer')}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) + 1, fontsize=8,
               title="each bar: the expert's tokens by modality; above it: its share of all tokens", title_fontsize=7)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return _save(fig, path)


def _patch_grid(record: dict, grid: tuple[int, int], b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[gh, gw] top-1 expert and kept flags of image b (a leading class token is dropped)."""
    expert, kept = record["expert"][b], record["kept"][b]
    n = grid[0] * grid[1]
    expert, kept = expert[-n:], kept[-n:]  # prefix tokens (class token) come first
    return expert.view(grid), kept.view(grid)


def patch_maps(images: torch.Tensor, store: dict, grid: tuple[int, int], num_experts: int, path: str | Path,
               title: str = "routing", mean=None, std=None):
    """One row per image: the image, then one panel per MoE layer with each patch coloured by
    its top-1 expert; patches whose choice was dropped are hatched. Returns the expert maps
    [images, layers, gh, gw]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layer_ids = [i for i, recs in store.items() if any(r["modality"] == "image" for r in recs)]
    records = {i: next(r for r in store[i] if r["modality"] == "image") for i in layer_ids}
    colors = expert_colors(num_experts)
    N = images.shape[0]
    maps = torch.stack([torch.stack([_patch_grid(records[i], grid, b)[0] for i in layer_ids]) for b in range(N)])
    fig, axes = plt.subplots(N, 1 + len(layer_ids), figsize=(1.9 * (1 + len(layer_ids)), 1.9 * N + 0.9), squeeze=False)
    mean = torch.tensor(mean or (0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor(std or (0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    for b in range(N):
        img = (images[b].cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0)
        axes[b, 0].imshow(img.numpy())
        axes[b, 0].set_title("image" if b == 0 else "", fontsize=8)
        for j, i in enumerate(layer_ids):
            expert, kept = _patch_grid(records[i], grid, b)
            rgb = torch.tensor([[colors[int(e)][:3] for e in row] for row in expert])
            ax = axes[b, j + 1]
            ax.imshow(rgb.numpy(), interpolation="nearest")
            for y, x in (~kept).nonzero().tolist():
                ax.add_patch(matplotlib.patches.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="xxx", lw=0, color="black"))
            if b == 0:
                ax.set_title(f"MoE {i}, image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=colors[e], label=f"e{e}") for e in range(num_experts)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="xxx", label="dropped"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=7)
    fig.suptitle(f"{title}: top-1 expert of each patch", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    _save(fig, path)
    return maps


def token_table(texts: torch.Tensor, store: dict, num_experts: int, tokenizer, path: str | Path, title: str = "routing") -> Path:
    """An HTML table per caption: its tokens, one row per MoE layer, each cell coloured by
    the token's top-1 expert (struck through when dropped)."""
    import matplotlib

    colors = [matplotlib.colors.to_hex(c) for c in expert_colors(num_experts)]
    layer_ids = [i for i, recs in store.items() if any(r["modality"] == "text" for r in recs)]
    records = {i: next(r for r in store[i] if r["modality"] == "text") for i in layer_ids}
    decoder = getattr(tokenizer, "decoder", {})
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "td{padding:2px 5px;font-family:monospace;font-size:12px;color:#fff}th{font-size:11px;text-align:left}"
             "table{border-collapse:collapse;margin-bottom:14px}.dropped{text-decoration:line-through;opacity:.55}</style>"
             f"</head><body><h3>{html.escape(title)}: top-1 expert of each caption token</h3><p>"]
    parts += [f"<span style='background:{c};color:#fff;padding:2px 6px'>e{e}</span> " for e, c in enumerate(colors)]
    parts.append("<span class='dropped' style='padding:2px 6px'>dropped</span></p>")
    for b in range(texts.shape[0]):
        real = records[layer_ids[0]]["mask"][b] if layer_ids else texts[b] != 0
        ids = [int(t) for t, r in zip(texts[b], real) if r]
        words = [html.escape(decoder.get(t, str(t)).replace("</w>", "")) for t in ids]
        parts.append("<table><tr><th></th>" + "".join(f"<th>{w}</th>" for w in words) + "</tr>")
        for i in layer_ids:
            r = records[i]
            cells = []
            for e, k in zip(r["expert"][b][real].tolist(), r["kept"][b][real].tolist()):
                cells.append(f"<td style='background:{colors[e]}' class='{'' if k else 'dropped'}'>e{e}</td>")
            parts.append(f"<tr><th>MoE {i}</th>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path




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


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """Top-1 against active GFLOPs per image: one curve per MoE model (and BPR setting),
    each dense model a single point."""
    from .sweep import short_label

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("capacity_factor") is None:
            ax.scatter([r["gflops_per_image"]], [100 * r["top1"]], marker="*", s=160, zorder=3, color="black",
                       label=f"{short_label(r['model'])} (dense)")
            continue
        bpr = r.get("batch_priority")
        key = short_label(r["model"]) + ("" if bpr is None else f", BPR {'on' if bpr else 'off'}")
        curves.setdefault(key, []).append(r)
    for key, pts in curves.items():
        pts = sorted(pts, key=lambda r: r["gflops_per_image"])
        ax.plot([p["gflops_per_image"] for p in pts], [100 * p["top1"] for p in pts], marker="o", label=key)
        for p in pts:
            ax.annotate(f"cf {p['capacity_factor']:g}", (p["gflops_per_image"], 100 * p["top1"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.set_xlabel("active forward GFLOPs per image")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("capacity sweep at inference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
