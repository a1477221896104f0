"""Export a training checkpoint to vlmoe's inference format (model.safetensors + config.json).

    python scripts/export.py runs/limoe_tiny/.../checkpoints/last.ckpt out/limoe-tiny
    python -c "import vlmoe; m = vlmoe.create_model('out/limoe-tiny')"
"""
from __future__ import annotations

import argparse

import torch

import vlmoe
from vlmoe.models.factory import resolve_config


def export(ckpt: str, out: str) -> str:
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)  # untrusted: tensors and plain data only
    hp = meta.get("hyper_parameters") or {}
    name = hp.get("model_name")
    if not name:
        raise ValueError(f"{ckpt} has no model_name in its hyper-parameters: was it written by `vlmoe fit`?")
    config = resolve_config(name, **(hp.get("model_overrides") or {}))
    model = vlmoe.create_model(config, pretrained=ckpt)
    return str(vlmoe.save_pretrained(model, out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a Lightning .ckpt from vlmoe fit")
    p.add_argument("out", help="output folder")
    a = p.parse_args(argv)
    print(export(a.checkpoint, a.out))


if __name__ == "__main__":
    main()
