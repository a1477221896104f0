"""Host syncs of a LIMoE training step and of evaluation, per configuration (the table in
docs/benchmarks.md, "Host syncs"). Counted with `vlmoe.syncs.HostSyncCounter`, which sees the
same operations on CPU as on a GPU.

    python scripts/count_syncs.py                    # the table
    python scripts/count_syncs.py --where            # and where each sync comes from
    python scripts/count_syncs.py --models limoe-tiny --joint

Rows: one training forward + backward (the CLIP loss plus the auxiliary loss) at batch 16,
and evaluation (`encode_image` + `encode_text` under no_grad, per-example routing).
"""
from __future__ import annotations

import argparse

import torch
from open_clip.loss import ClipLoss

from vlmoe import create_model
from vlmoe.syncs import HostSyncCounter

DEFAULT = ["clip-tiny", "limoe-tiny", "limoe-tiny:joint", "limoe-tiny-single:joint", "limoe-tiny-fine",
           "limoe-tiny-mixtral", "limoe-tiny-auxfree-modality", "limoe-tiny-shared", "limoe-tiny-soft",
           "limoe-tiny:switch", "limoe-tiny:gshard", "limoe-tiny:expert_choice"]


def build(spec: str):
    name, _, variant = spec.partition(":")
    overrides = {}
    if variant == "joint":
        overrides = {"moe": {"routing_groups": "joint"}}
    elif variant:
        overrides = {"moe": {"router": variant}}
    torch.manual_seed(0)
    return create_model(name, **overrides)


def batch(model, B: int):
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    image = torch.randn(B, 3, *size, generator=g)
    text = torch.randint(1, 400, (B, model.context_length), generator=g)
    lengths = torch.randint(4, 16, (B,), generator=g)
    text[torch.arange(model.context_length) >= lengths[:, None]] = 0  # padded captions
    return image, text


def count(spec: str, B: int, where: bool):
    model = build(spec)
    image, text = batch(model, B)
    loss_fn = ClipLoss()
    model.train()
    with HostSyncCounter(stacks=where) as train:
        out = model(image, text)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]) + out["aux_loss"]
        loss.backward()
    model.eval()
    with torch.no_grad(), HostSyncCounter(stacks=where) as evaluation:
        model.encode_image(image)
        model.encode_text(text)
    return train, evaluation


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT, help="model names; NAME:joint for joint routing, "
                   "NAME:ROUTER for another router")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--where", action="store_true", help="list where each sync comes from")
    args = p.parse_args(argv)
    print(f"| model | training forward + backward (batch {args.batch}) | evaluation (encode_image + encode_text) |")
    print("|---|---|---|")
    details = []
    for spec in args.models:
        train, evaluation = count(spec, args.batch, args.where)

        def cell(c):
            return str(c.total) + (" (" + ", ".join(f"{n} {k}" for k, n in sorted(c.by_op.items())) + ")" if c.total else "")

        print(f"| {spec} | {cell(train)} | {cell(evaluation)} |", flush=True)
        details.append((spec, train, evaluation))
    if args.where:
        for spec, train, evaluation in details:
            for what, c in (("train", train), ("eval", evaluation)):
                for k, n in sorted(c.where.items()):
                    print(f"{spec} {what}: {n} x {k}")


if __name__ == "__main__":
    main()
