"""Training throughput of LIMoE-tiny against CLIP-tiny (interleaved A B A B on one synthetic
batch, forward + contrastive/aux loss + backward + AdamW step), and the data pipeline alone
(bundled digit shards: decode, augment, tokenize, batch).

    python scripts/bench_train.py [--reps 15] [--batch-size 64]
    python scripts/bench_train.py --compile     # eager and torch.compile'd training steps
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train_steps(names, batch_size, reps, compiled=()):
    """Samples/s of each model's training step, timed interleaved; a name in `compiled` is also
    timed with its forward compiled (nn.Module.compile, as `--model.compile true` does), as
    "NAME, compiled"."""
    from open_clip.loss import ClipLoss

    import vlmoe

    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32)
    captions = [f"a photo of the digit {i % 10}" for i in range(batch_size)]
    loss_fn = ClipLoss()
    setups = {}
    for n in [*names, *(f"{c}, compiled" for c in compiled)]:
        torch.manual_seed(0)
        model = vlmoe.create_model(n.removesuffix(", compiled")).train()
        if n.endswith(", compiled"):
            model.compile()
        text = vlmoe.get_tokenizer(model)(captions)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[n] = (model, text, opt)
    names = list(setups)

    def step(n):
        model, text, opt = setups[n]
        out = model(images, text)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]) + out["aux_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for n in names:  # warm-up (and compilation)
        step(n)
        step(n)
    times = {n: [] for n in names}
    for _ in range(reps):
        for n in names:
            t0 = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - t0)
    return {n: batch_size / statistics.median(ts) for n, ts in times.items()}


def pipeline_rate(batch_size, batches, num_workers):
    from vlmoe.data import ClipDataModule

    dm = ClipDataModule(train_shards=str(ROOT / "data/digits/train-{000000..000003}.tar"), model_name="limoe-tiny",
                        batch_size=batch_size, num_workers=num_workers, samples_per_epoch=batch_size * (batches + 2))
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up and shuffle-buffer fill are not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pipeline-batches", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="only the training steps, eager and compiled")
    a = p.parse_args(argv)
    if a.compile:
        rates = train_steps(["limoe-tiny", "clip-tiny"], a.batch_size, a.reps, compiled=["limoe-tiny", "clip-tiny"])
        print(f"batch {a.batch_size}, {torch.get_num_threads()} threads, median of {a.reps} interleaved steps "
              f"(compilation in the warm-up)\n")
        print("| training step | samples/s | x CLIP-tiny eager | compiled / eager |\n|---|---|---|---|")
        for n, r in rates.items():
            gain = f"{r / rates[n.removesuffix(', compiled')]:.2f}" if n.endswith("compiled") else "-"
            print(f"| {n} | {r:.0f} | {r / rates['clip-tiny']:.2f} | {gain} |")
        return rates
    rates = train_steps(["limoe-tiny", "clip-tiny"], a.batch_size, a.reps)
    data0 = pipeline_rate(a.batch_size, a.pipeline_batches, 0)
    data1 = pipeline_rate(a.batch_size, a.pipeline_batches, 1)
    print(f"batch {a.batch_size}, {torch.get_num_threads()} threads, median of {a.reps} interleaved steps\n")
    print("| what | samples/s | ratio |")
    print("|---|---|---|")
    print(f"| CLIP-tiny training step | {rates['clip-tiny']:.0f} | 1.00 |")
    print(f"| LIMoE-tiny training step (8 experts, top-1) | {rates['limoe-tiny']:.0f} | {rates['limoe-tiny'] / rates['clip-tiny']:.2f} x CLIP |")
    print(f"| data pipeline, in the main process | {data0:.0f} | {data0 / rates['limoe-tiny']:.1f} x LIMoE step |")
    print(f"| data pipeline, 1 worker process | {data1:.0f} | {data1 / rates['limoe-tiny']:.1f} x LIMoE step |")
    return rates, data0, data1


if __name__ == "__main__":
    main()
