"""LIMoE models: open_clip's CLIP with the MLP of chosen blocks replaced by SparseMoE.

The model *is* an open_clip `CLIP` (a subclass), so its state-dict keys, `encode_image`,
`encode_text`, `logit_scale` and open_clip's tokenizer, transforms and zero-shot helpers all
work unchanged. Only the MLP of the MoE blocks differs (`...resblocks.{i}.mlp.router.weight`,
`...mlp.experts.w1`, ...).
"""
from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock, text_global_pool
from torch import nn

from ..moe import MoEBase, collect_aux, moe_layers, routing_context
from ..moe.record import is_modality_key
from ..errors import ConfigError
from .moe_config import ROUTING_GROUPS, MoEConfig, resolve_layers
from .towers import TimmImageTower, checkpointed_forward, install_model_moe, tower_blocks

__all__ = ["MoEConfig", "VLMoEModel", "TimmImageTower", "resolve_layers", "tower_blocks", "SHARING_MODES",
           "ROUTING_GROUPS"]

Sharing = Literal["none", "moe", "all"]
SHARING_MODES = ("none", "moe", "all")


class VLMoEModel(CLIP):
    """open_clip CLIP with sparse MoE layers and per-modality routing.

    Args:
        embed_dim: joint embedding width.
        vision_cfg: open_clip CLIPVisionCfg fields, or {"timm_model_name": ..., "image_size": ...,
            "timm_kwargs": {...}} for a timm image tower.
        text_cfg: open_clip CLIPTextCfg fields.
        moe: MoEConfig fields; None builds the dense CLIP baseline.
        sharing: "none" (each tower its own MoE layers), "moe" (the MoE layer at each MoE
            depth shared by both towers) or "all" (LIMoE's single tower for both modalities).
        quick_gelu, init_logit_scale: as in open_clip.
        pad_id: text token id of padding (open_clip's tokenizer pads with 0).
    """

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict,
        text_cfg: dict,
        moe: dict | MoEConfig | None = None,
        sharing: Sharing = "none",
        quick_gelu: bool = False,
        init_logit_scale: float = 2.6592600369644043,  # ln(1/0.07)
        pad_id: int = 0,
    ):
        if sharing not in SHARING_MODES:
            raise ConfigError(f"unknown sharing mode {sharing!r}; choose one of {SHARING_MODES}")
        vision_cfg, text_cfg = dict(vision_cfg), dict(text_cfg)
        timm_name = vision_cfg.get("timm_model_name")
        _check_keys(vision_cfg, set(CLIPVisionCfg.__dataclass_fields__) | {"timm_kwargs"}, "vision_cfg")
        _check_keys(text_cfg, set(CLIPTextCfg.__dataclass_fields__), "text_cfg")
        if timm_name:
            # Build a throwaway 1-block tower for CLIP.__init__, then put the timm tower in.
            base_vision = CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=vision_cfg.get("image_size", 224))
        else:
            base_vision = CLIPVisionCfg(**vision_cfg)
        super().__init__(embed_dim, base_vision, CLIPTextCfg(**text_cfg), quick_gelu=quick_gelu, init_logit_scale=init_logit_scale, output_dict=True)
        if timm_name:
            self.visual = TimmImageTower(timm_name, embed_dim, vision_cfg.get("image_size", 224), **vision_cfg.get("timm_kwargs", {}))
        self._arch = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
        self.sharing, self.pad_id, self.quick_gelu = sharing, pad_id, quick_gelu
        self.moe_config = MoEConfig.from_dict(moe)

        self._grad_checkpointing = False
        image_blocks, text_blocks = tower_blocks(self.visual), tower_blocks(self.transformer)
        if sharing == "all":
            if timm_name:
                raise ConfigError("sharing='all' needs open_clip towers on both sides (a timm image tower has its own block type); use sharing='moe' or 'none'")
            mismatch = {k: (vision_cfg.get(k), text_cfg.get(k)) for k in ("width", "layers") if vision_cfg.get(k) != text_cfg.get(k)}
            if self.visual.transformer.resblocks[0].attn.num_heads != self.transformer.resblocks[0].attn.num_heads:
                mismatch["heads"] = (self.visual.transformer.resblocks[0].attn.num_heads, self.transformer.resblocks[0].attn.num_heads)
            if mismatch:
                raise ConfigError(f"sharing='all' runs text through the image transformer, so these must match (image, text): {mismatch}")
            self.transformer = self.visual.transformer
            text_blocks = image_blocks

        self.image_moe_layers: list[int] = []
        self.text_moe_layers: list[int] = []
        if self.moe_config is not None:
            self.image_moe_layers, self.text_moe_layers = install_model_moe(self.moe_config, sharing, image_blocks, text_blocks)
            if self.moe_config.routing_groups == "joint":
                self._check_joint(image_blocks, text_blocks)

    @property
    def routing_groups(self) -> str:
        return self.moe_config.routing_groups if self.moe_config is not None else "per_modality"

    def _check_joint(self, image_blocks, text_blocks) -> None:
        """Joint routing drives both towers block by block; say clearly what it cannot drive."""
        if self.sharing == "none":
            raise ConfigError("moe.routing_groups='joint' routes images and text through the same MoE layers, but "
                              "sharing='none' gives each tower its own; use sharing='moe' or 'all', or "
                              "routing_groups='per_modality'")
        if isinstance(self.visual, TimmImageTower):
            raise ConfigError("moe.routing_groups='joint' drives open_clip's blocks in lockstep; a timm image tower is "
                              "not supported: use an open_clip vision tower or routing_groups='per_modality'")
        pairs = list(zip(self.image_moe_layers, self.text_moe_layers))
        if len(self.image_moe_layers) != len(self.text_moe_layers) or any(
                image_blocks[i].mlp is not text_blocks[t].mlp for i, t in pairs):
            raise ConfigError(f"moe.routing_groups='joint' needs the towers' MoE layers paired one to one (image blocks "
                              f"{self.image_moe_layers}, text blocks {self.text_moe_layers}); give both towers the same "
                              f"number of MoE layers")
        for what, tower, blocks in (("image", self.visual.transformer, image_blocks), ("text", self.transformer, text_blocks)):
            bad = [i for i, b in enumerate(blocks) if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv")]
            if bad or not getattr(tower, "batch_first", True):
                raise ConfigError(f"moe.routing_groups='joint' drives open_clip's ResidualAttentionBlock (batch first); "
                                  f"the {what} tower's blocks {bad or 'all'} are not that; use routing_groups='per_modality'")
        for m in self.moe_layers():
            m.check_joint_options()

    # -- the open_clip surface --------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    def check_images(self, image: torch.Tensor) -> None:
        if image.ndim == 4 and image.shape[0] == 0:
            raise ConfigError("encode_image got an empty batch (0 images); pass at least one image")
        if image.ndim != 4 or tuple(image.shape[-2:]) != self.image_size:
            raise ConfigError(
                f"images must be [B, C, {self.image_size[0]}, {self.image_size[1]}] for this model; got "
                f"{tuple(image.shape)}. Preprocess with open_clip's transforms for image_size={self.image_size}"
            )

    def prepare_text(self, text: torch.Tensor) -> torch.Tensor:
        """Tokens longer than the context are truncated as open_clip's tokenizer does (the
        last kept token becomes the end-of-text token)."""
        if text.ndim != 2:
            raise ConfigError(f"text must be token ids [B, L]; got shape {tuple(text.shape)}")
        if text.shape[0] == 0:
            raise ConfigError("encode_text got an empty batch (0 texts); pass at least one")
        if text.shape[1] > self.context_length:
            eot = text.max(dim=1).values  # the end-of-text id is the largest id in each row
            text = text[:, : self.context_length].clone()
            cut = text.max(dim=1).values < eot
            text[cut, -1] = eot[cut]
        elif text.shape[1] < self.context_length:
            text = F.pad(text, (0, self.context_length - text.shape[1]), value=self.pad_id)
        return text

    def _reset_aux(self, modality: str) -> None:
        """Drop the previous records of this modality (a depth-shared layer keeps one per call)."""
        for m in self.moe_layers():
            for k in [k for k in m.aux if is_modality_key(k, modality)]:
                del m.aux[k]

    def encode_image(self, image, normalize: bool = False):
        self.check_images(image)
        self._reset_aux("image")
        with routing_context("image"):
            return super().encode_image(image, normalize=normalize)

    def encode_text(self, text, normalize: bool = False):
        text = self.prepare_text(text)
        self._reset_aux("text")
        with routing_context("text", text != self.pad_id):
            return super().encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict:
        """Normalized features, logit scale (exp'd, as open_clip) and the MoE auxiliary terms:
        `aux_loss` (weighted sum over layers and modalities) and `moe_metrics` (per layer and
        modality, for logging). With moe.routing_groups="joint" and both inputs given, the
        towers run in lockstep and every shared MoE layer routes both modalities together."""
        for m in self.moe_layers():
            m.aux = {}  # an image-only or text-only call reports only its modality (a new dict: compiled, no guard on the old one)
        if self.routing_groups == "joint" and image is not None and text is not None:
            image_features, text_features = self.encode_joint(image, text, normalize=True)
            out = {"image_features": image_features, "text_features": text_features, "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
        else:
            out = super().forward(image, text)
        aux, out["moe_metrics"] = collect_aux(self)
        out["aux_loss"] = aux.to(out["logit_scale"].device)  # a dense model's 0 stays on the right device
        return out

    def encode_joint(self, image: torch.Tensor, text: torch.Tensor, normalize: bool = False):
        """(image features, text features) with the towers advanced block by block together:
        at each MoE depth both modalities' tokens go through the shared layer in one joint
        call (`SparseMoE.forward_joint`). The embedding, attention, pooling and projection are
        open_clip's own modules."""
        self.check_images(image)
        text = self.prepare_text(text)
        v = self.visual
        x_img = v._embeds(image)
        cast = self.transformer.get_cast_dtype()
        x_txt = self.token_embedding(text).to(cast) + self.positional_embedding.to(cast)
        mask = text != self.pad_id
        image_blocks, text_blocks = tower_blocks(v), tower_blocks(self.transformer)
        depths = [*zip(self.image_moe_layers, self.text_moe_layers), (len(image_blocks), len(text_blocks))]
        i = t = 0
        for i_moe, t_moe in depths:
            with routing_context("image"):  # the dense blocks up to the next MoE depth
                for block in image_blocks[i:i_moe]:
                    x_img = block(x_img)
            with routing_context("text", mask):
                for block in text_blocks[t:t_moe]:
                    x_txt = block(x_txt, attn_mask=self.attn_mask)
            if i_moe < len(image_blocks):
                x_img, x_txt = self._joint_block(image_blocks[i_moe], text_blocks[t_moe], x_img, x_txt, mask)
            i, t = i_moe + 1, t_moe + 1
        pooled, _ = v._pool(x_img)
        image_features = pooled @ v.proj if v.proj is not None else pooled
        x_txt = self.ln_final(x_txt)
        x_txt = text_global_pool(x_txt, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
        if self.text_projection is not None:
            x_txt = self.text_projection(x_txt) if isinstance(self.text_projection, nn.Linear) else x_txt @ self.text_projection
        if normalize:
            return F.normalize(image_features, dim=-1), F.normalize(x_txt, dim=-1)
        return image_features, x_txt

    def _joint_block(self, image_block, text_block, x_img, x_txt, mask):
        """One MoE depth of both towers: each block's attention half, then the shared MoE on
        both modalities' tokens at once (checkpointed together: recomputing one modality
        alone would route differently)."""
        def run(x_img, x_txt):
            x_img = x_img + image_block.ls_1(image_block.attention(q_x=image_block.ln_1(x_img)))
            x_txt = x_txt + text_block.ls_1(text_block.attention(q_x=text_block.ln_1(x_txt), attn_mask=self.attn_mask))
            y = image_block.mlp.forward_joint({"image": (image_block.ln_2(x_img), None),
                                               "text": (text_block.ln_2(x_txt), mask)})
            return x_img + image_block.ls_2(y["image"]), x_txt + text_block.ls_2(y["text"])

        if self._grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run, x_img, x_txt, use_reentrant=False)
        return run(x_img, x_txt)

    def eval_routing(self) -> dict | None:
        """How eval-mode forwards route ({"eval_routing", "eval_capacity_factor"}; the
        per-modality capacities when they differ), or None for a dense model: what a
        reported number says about how it was obtained."""
        if self.moe_config is None:
            return None
        layer = self.moe_layers()[0]
        out = {"eval_routing": layer.eval_routing}
        if not layer.routes_tokens:  # Soft MoE: no capacity
            return {**out, "eval_capacity_factor_image": None, "eval_capacity_factor_text": None}
        for modality in ("image", "text"):
            o = layer.options_for(modality)
            cf = o.eval_capacity_factor if o.eval_capacity_factor is not None else o.capacity_factor
            out[f"eval_capacity_factor_{modality}"] = None if layer.eval_routing == "dropless" else cf
        return out

    def set_eval_routing(self, eval_routing: str | None = None, eval_capacity_factor: float | None = None) -> None:
        """Change how eval-mode forwards route, for every MoE layer (weights untouched); the
        model's config (what save_pretrained writes) follows."""
        for m in self.moe_layers():
            m.configure_eval(eval_routing, eval_capacity_factor)
        if self.moe_config is not None:
            if eval_routing is not None:
                self.moe_config.eval_routing = eval_routing
            if eval_capacity_factor is not None:
                self.moe_config.eval_capacity_factor = eval_capacity_factor

    def moe_layers(self) -> list[MoEBase]:
        """Distinct MoE layers (a shared one once)."""
        return moe_layers(self)

    @property
    def config(self) -> dict:
        """What the model is, as a plain dict (what checkpoints and save_pretrained write):
        `moe` holds the MoEConfig as given (None: the router's default)."""
        return {**self._arch, "moe": asdict(self.moe_config) if self.moe_config is not None else None,
                "sharing": self.sharing, "quick_gelu": self.quick_gelu, "pad_id": self.pad_id}

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing per block. open_clip's own checkpointing would recompute
        the blocks in backward outside the routing context (text routed without its padding
        mask); here each block re-enters the context it ran in."""
        self._grad_checkpointing = bool(enable)  # the joint MoE depths (see _joint_block)
        blocks = tower_blocks(self.visual) + ([] if self.sharing == "all" else tower_blocks(self.transformer))
        for block in blocks:
            if enable:
                block.forward = functools.partial(checkpointed_forward, block)
            else:
                block.__dict__.pop("forward", None)


def _check_keys(d: dict, known: set, what: str) -> None:
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {sorted(unknown)}; known: {sorted(known)}")
