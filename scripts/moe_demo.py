"""Build a small SparseMoE, show how it routes (BPR vs vanilla, at two capacity factors),
then time it against a dense MLP. The Quickstart's first command runs this."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import bench, format_table  # noqa: E402

from vlmoe.moe import SparseMoE  # noqa: E402


def main():
    torch.manual_seed(0)
    T, D, E = 2048, 128, 8
    x = torch.randn(1, T, D)
    print(f"SparseMoE routing of {T} tokens, d={D}, {E} experts, top-1 (router skewed so experts overflow)\n")
    print("| routing | capacity factor | capacity | dropped tokens | tokens per expert |")
    print("|---|---|---|---|---|")
    for cf in (1.0, 0.5):
        for bpr in (True, False):
            torch.manual_seed(0)
            moe = SparseMoE(D, 4 * D, E, capacity_factor=cf, batch_priority=bpr).eval()
            with torch.no_grad():
                moe.router.weight[0] += 0.1  # make expert 0 popular, as early training often does
                moe(x)
            s = moe.aux[None].stats
            counts = " ".join(str(int(c)) for c in s["tokens_per_expert"])
            print(f"| {'BPR' if bpr else 'vanilla'} | {cf} | {int(s['capacity'])} | {s['dropped_token_frac']:.1%} | {counts} |")
    print("\nBenchmark (forward+backward, this machine):\n")
    rows, _ = bench(tokens=1024, dim=256, hidden=1024, experts=(8,), top_ks=(1,), reps=5, with_deepspeed=False)
    print(format_table(rows, 1024, 256, 1024))


if __name__ == "__main__":
    main()
