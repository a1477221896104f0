"""Every picture the package draws (matplotlib, Agg backend; imported only when a picture is
drawn): the routing heatmap of an evaluation, each expert's tokens by modality, each image
patch and caption token coloured by its expert (one fixed colour per expert), and the capacity
sweep's accuracy against compute."""
from __future__ import annotations

import html
from pathlib import Path

import torch

__all__ = ["routing_picture", "modality_bars", "patch_maps", "patch_mosaic", "token_table", "expert_colors", "plot_sweep", "close"]


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
    E = len(next(iter(summary[layers[0]].values()))["tokens_per_expert"])
    # fixed margins in inches (matplotlib's tight_layout measured every label: most of the time
    # a validation spent drawing)
    width, block, legend = max(6.0, 0.5 * E + 3), 2.2, 0.6
    height = block * len(layers) + legend
    fig = plt.figure(figsize=(width, height))
    colors = {"image": "#4c72b0", "text": "#dd8452", "all": "#55a868"}
    first = None
    for k, name in enumerate(layers):
        top = height - 0.05 - block * k - 0.3  # room for the title
        ax = fig.add_axes((0.75 / width, (top - 1.55) / height, 1 - 0.95 / width, 1.55 / height))
        first = first or ax
        mods = summary[name]
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
    handles, labels = first.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) + 1, fontsize=8,
               title="each bar: the expert's tokens by modality; above it: its share of all tokens", title_fontsize=7)
    return _save(fig, path)


def _patch_grid(record: dict, grid: tuple[int, int], b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[gh, gw] top-1 expert and kept flags of image b (a leading class token is dropped)."""
    expert, kept = record["expert"][b], record["kept"][b]
    n = grid[0] * grid[1]
    expert, kept = expert[-n:], kept[-n:]  # prefix tokens (class token) come first
    return expert.view(grid), kept.view(grid)


def patch_mosaic(images: torch.Tensor, maps: torch.Tensor, kept: torch.Tensor, colors, cell: int = 8) -> torch.Tensor:
    """The pixels of `patch_maps`: one row per image, the image and then one panel per layer,
    each patch a `cell` x `cell` square of its top-1 expert's colour; a dropped patch is
    lightened halfway to white and crossed by its two black diagonals. `images` [N, 3, H, W] in
    [0, 1], `maps` and `kept` [N, L, gh, gw]. Returns [rows, cols, 3] floats in [0, 1], white
    between panels (a gap of cell // 2 pixels)."""
    N, L, gh, gw = maps.shape
    palette = torch.tensor([c[:3] for c in colors], dtype=torch.float32)
    panels = palette[maps.long()]  # [N, L, gh, gw, 3]
    panels = torch.where(kept[..., None], panels, (panels + 1) / 2)
    panels = panels.repeat_interleave(cell, 2).repeat_interleave(cell, 3)  # [N, L, gh*c, gw*c, 3]
    i = torch.arange(cell)
    cross = (i[:, None] == i[None, :]) | (i[:, None] + i[None, :] == cell - 1)  # both diagonals of a cell
    ink = (~kept).repeat_interleave(cell, 2).repeat_interleave(cell, 3) & cross.repeat(gh, gw)
    panels = panels.masked_fill(ink[..., None], 0.0)
    size = (gh * cell, gw * cell)
    pics = torch.nn.functional.interpolate(images.float(), size=size, mode="nearest").permute(0, 2, 3, 1)
    gap = cell // 2
    out = torch.ones(N * size[0] + (N - 1) * gap, (L + 1) * size[1] + L * gap, 3)
    for b in range(N):
        y = b * (size[0] + gap)
        for j, panel in enumerate([pics[b], *panels[b]]):
            x = j * (size[1] + gap)
            out[y:y + size[0], x:x + size[1]] = panel
    return out.clamp(0, 1)


def patch_maps(images: torch.Tensor, store: dict, grid: tuple[int, int], num_experts: int, path: str | Path,
               title: str = "routing", mean=None, std=None):
    """One row per image: the image, then one panel per MoE layer with each patch coloured by
    its top-1 expert; patches whose choice was dropped are lightened and crossed
    (`patch_mosaic`). One image in one axes: fast enough to draw at every validation. Returns
    the expert maps [images, layers, gh, gw]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layer_ids = [i for i, recs in store.items() if any(r["modality"] == "image" for r in recs)]
    records = {i: next(r for r in store[i] if r["modality"] == "image") for i in layer_ids}
    colors = expert_colors(num_experts)
    N = images.shape[0]
    grids = [[_patch_grid(records[i], grid, b) for i in layer_ids] for b in range(N)]
    maps = torch.stack([torch.stack([e for e, _ in row]) for row in grids])
    kept = torch.stack([torch.stack([k for _, k in row]) for row in grids])
    mean = torch.tensor(mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    pics = (images.detach().cpu().float() * std + mean).clamp(0, 1)
    cell = max(8, images.shape[-1] // grid[1])
    mosaic = patch_mosaic(pics, maps.cpu(), kept.cpu(), colors, cell)
    panel, gap = grid[1] * cell, cell // 2
    L = len(layer_ids)
    handles = [Patch(color=colors[e], label=f"e{e}") for e in range(num_experts)]
    handles.append(Patch(facecolor="#e0e0e0", edgecolor="black", hatch="xx", label="dropped"))
    width = max(5.0, 1.6 * (L + 1) + 0.4)  # inches; the legend's rows and the titles get fixed margins
    ncol = max(1, min(len(handles), int(width / 0.8)))
    bottom, top = 0.2 + 0.22 * -(-len(handles) // ncol), 0.7
    height = 1.6 * N + bottom + top
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0.02, bottom / height, 0.96, 1 - (bottom + top) / height))
    ax.imshow(mosaic.numpy(), interpolation="nearest")
    ax.xaxis.tick_top()
    ax.set_xticks([j * (panel + gap) + panel / 2 for j in range(L + 1)], ["image", *(f"MoE {i}" for i in layer_ids)], fontsize=8)
    ax.set_yticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7)
    fig.suptitle(f"{title}: top-1 expert of each patch", fontsize=9, y=1 - 0.12 / height, va="top")
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
