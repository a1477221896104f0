"""The towers' plumbing: a timm model as image tower, finding a tower's blocks and their MLP's
shape, putting MoE layers in place of the MLPs, and per-block activation checkpointing that
keeps the routing context."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError
from ..moe import MoEBase, build_layer, current_routing_context, routing_context
from .moe_config import resolve_layers

__all__ = ["TimmImageTower", "tower_blocks", "mlp_shape", "install_moe", "install_model_moe", "checkpointed_forward"]


class TimmImageTower(nn.Module):
    """A timm model (e.g. a ViT) as CLIP image tower: pooled features -> linear projection."""

    def __init__(self, model_name: str, output_dim: int, image_size: int | tuple = 224, **timm_kwargs):
        super().__init__()
        import timm

        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size, **timm_kwargs)
        self.proj = nn.Linear(self.trunk.num_features, output_dim, bias=False)
        self.image_size = image_size if isinstance(image_size, tuple) else (image_size, image_size)

    def forward(self, x):
        return self.proj(self.trunk(x))

    def set_grad_checkpointing(self, enable=True):
        self.trunk.set_grad_checkpointing(enable)


def tower_blocks(module: nn.Module) -> list[nn.Module]:
    """Transformer blocks of an open_clip Transformer/VisionTransformer or a timm ViT."""
    for path in ("transformer.resblocks", "resblocks", "trunk.blocks", "blocks"):
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return list(obj)
    raise TypeError(f"don't know where the transformer blocks of {type(module).__name__} are")


def mlp_shape(mlp: nn.Module) -> tuple[int, int, type[nn.Module]]:
    """(dim, hidden_dim, activation class) of an open_clip or timm MLP, or of a SparseMoE."""
    if isinstance(mlp, MoEBase):
        return mlp.dim, getattr(mlp, "block_hidden_dim", mlp.hidden_dim), type(mlp.experts.act)
    if hasattr(mlp, "c_fc"):  # open_clip
        return mlp.c_fc.in_features, mlp.c_fc.out_features, type(mlp.gelu)
    if hasattr(mlp, "fc1"):  # timm Mlp
        return mlp.fc1.in_features, mlp.fc1.out_features, type(mlp.act)
    raise TypeError(f"unsupported MLP type {type(mlp).__name__}")


def _block_weight_dtype(block) -> torch.dtype:
    return next(block.parameters()).dtype


def install_moe(blocks: list[nn.Module], layers: list[int], make_moe, existing: list[MoEBase] | None = None,
                share_across_depth: bool = False) -> list[MoEBase]:
    """Replace `block.mlp` of the chosen blocks with SparseMoE (new, `existing` ones to share
    between towers, or with `share_across_depth` one for all chosen blocks, as WideNet).
    Returns the installed layers in order."""
    out = []
    for j, i in enumerate(layers):
        block = blocks[i]
        dim, hidden, act = mlp_shape(block.mlp)
        if existing is not None or (share_across_depth and out):
            moe = existing[j] if existing is not None else out[0]
            if (moe.dim, moe.block_hidden_dim) != (dim, hidden):
                what = "between towers" if existing is not None else "across depths"
                raise ConfigError(
                    f"cannot share MoE layer {j} {what}: it was built for dim={moe.dim}, hidden={moe.block_hidden_dim} "
                    f"but block {i} has dim={dim}, hidden={hidden}; use equal widths and mlp ratios or don't share"
                )
            moe.record_every_call = moe.record_every_call or existing is None
        else:
            moe = make_moe(dim, hidden, act)
            moe.block_hidden_dim = hidden
        block.mlp = moe
        if hasattr(block, "get_weight_dtype"):
            # open_clip asks block 0's `mlp.c_fc` for the cast dtype; a SparseMoE has none.
            block.get_weight_dtype = functools.partial(_block_weight_dtype, block)
        out.append(moe)
    return out

def install_model_moe(cfg, sharing: str, image_blocks, text_blocks) -> tuple[list[int], list[int]]:
    """Put the MoE layers `cfg` (a MoEConfig) describes into the towers' blocks, shared as
    `sharing` says; returns the image and text block indices that got one."""
    layer_cfg = cfg.layer_config()

    def maker(tower: str):
        h = cfg.expert_hidden_dim.get(tower) if isinstance(cfg.expert_hidden_dim, dict) else cfg.expert_hidden_dim

        def make(dim, hidden, act):
            width, g = h or hidden, cfg.granularity
            if width % g:
                raise ConfigError(f"moe.granularity={g} must divide the expert width {width} of the {tower} tower "
                                  f"(each of the {g}x experts is 1/{g} as wide); choose a divisor of {width}")
            m = build_layer(dim, width // g, layer_cfg, act_layer=act)
            if cfg.router_init_std is not None:
                nn.init.normal_(m.router.weight, std=cfg.router_init_std)
            return m

        return make

    image_layers = resolve_layers(cfg.image_layers, len(image_blocks), "the image tower")
    depth = cfg.share_across_depth
    image_moes = install_moe(image_blocks, image_layers, maker("image"), share_across_depth=depth)
    if sharing == "all":
        return image_layers, list(image_layers)
    text_layers = resolve_layers(cfg.text_layers, len(text_blocks), "the text tower")
    shared = None
    if sharing == "moe":
        if len(text_layers) != len(image_layers) and not depth:
            raise ConfigError(
                f"sharing='moe' pairs the towers' MoE layers in order, but the image tower has "
                f"{len(image_layers)} ({image_layers}) and the text tower {len(text_layers)} ({text_layers}); "
                f"give both the same count"
            )
        shared = image_moes if not depth else [image_moes[0]] * len(text_layers)
    install_moe(text_blocks, text_layers, maker("text"), existing=shared, share_across_depth=depth)
    return image_layers, text_layers


def checkpointed_forward(self, *args, **kwargs):
    ctx = current_routing_context()
    forward = type(self).forward

    def run(*a):
        with routing_context(*ctx):
            return forward(self, *a, **kwargs)

    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
