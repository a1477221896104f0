"""Export a training checkpoint to vlmoe's inference format (model.safetensors + config.json).

    python scripts/export.py runs/limoe_tiny/.../checkpoints/last.ckpt out/limoe-tiny
    python -c "import vlmoe; m = vlmoe.create_model('out/limoe-tiny')"
"""
from __future__ import annotations

import argparse
import sys

import vlmoe
from vlmoe.cli import run_console
from vlmoe.models.factory import load_model


def export(ckpt: str, out: str) -> str:
    model = load_model(ckpt)  # reads model_name and overrides from the checkpoint's hyper-parameters
    return str(vlmoe.save_pretrained(model, out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a Lightning .ckpt from vlmoe fit")
    p.add_argument("out", help="output folder")
    a = p.parse_args(argv)
    print(export(a.checkpoint, a.out))


if __name__ == "__main__":
    sys.exit(run_console(main, "export.py"))
