"""Benchmark the expert-parallel SparseMoE against the local one on CPU processes (gloo).

Each of `--procs` processes (one thread each) holds T tokens. Three variants, timed
interleaved (A B C A B C ...), forward + backward, medians over `--reps`:

  local         every rank holds all E experts and computes its own tokens (no traffic);
  local+reduce  the same plus the all-reduce of the expert gradients that data
                parallelism needs (what DDP would do for replicated experts);
  expert-par.   each rank holds E / P experts; tokens go to their expert's rank and back
                with all_to_all_single (forward and backward), no expert all-reduce.

The table also gives the all-to-all share of the expert-parallel step and the bytes each
rank sent per token, against the formula 4 * K * D * bytes * (P - 1) / P for uniform
routing (dispatch + combine, forward + backward).

    python scripts/bench_ep.py                  # the README table (2 processes)
    python scripts/bench_ep.py --tokens 512 --reps 3
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmoe.moe import SparseMoE
from vlmoe.moe import parallel as par


def _step(layer, x, reduce_group=None):
    t0 = time.perf_counter()
    y = layer(x)
    y.square().mean().backward()
    if reduce_group is not None:
        for p in layer.experts.parameters():
            dist.all_reduce(p.grad, group=reduce_group)
    dt = time.perf_counter() - t0
    layer.zero_grad(set_to_none=True)
    return dt


def _bytes_from_routing(layer, groups, dim, sent_here):
    """(bytes all ranks sent, bytes the routing says they must send): every kept row whose
    expert lives on another rank crosses twice forward (dispatch, combine) and twice
    backward, `dim` fp32 values each. Summed over the ranks, so asymmetric loads cancel."""
    counts_E = layer.aux[None].stats["tokens_per_expert"]
    local = counts_E.numel() // groups.ep_size
    own = counts_E[groups.ep_rank * local:(groups.ep_rank + 1) * local].sum()
    t = torch.tensor([float(sent_here), float(counts_E.sum() - own)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]), float(4 * t[1] * dim * 4)


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = par.init_expert_parallel(world)
    rows = []
    for E, K in args.configs:
        torch.manual_seed(0)
        kw = dict(num_experts=E, top_k=K, capacity_factor=args.capacity_factor, noise_scale=0.0)
        local = SparseMoE(args.dim, args.hidden, **kw)
        sharded = SparseMoE(args.dim, args.hidden, **kw)
        sharded.load_state_dict(local.state_dict())
        par.shard_experts(sharded, groups)
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        times = {"local": [], "local+reduce": [], "expert-par.": []}
        a2a, sent, exact = [], [], []
        for rep in range(args.reps + 1):  # the first round warms up
            for name in times:
                dist.barrier()
                par.all_to_all_meter.reset()
                if name == "expert-par.":
                    dt = _step(sharded, x)
                else:
                    dt = _step(local, x, dist.group.WORLD if name == "local+reduce" else None)
                if rep:
                    times[name].append(dt)
                    if name == "expert-par.":
                        a2a.append(par.all_to_all_meter.seconds)
                        sent.append(par.all_to_all_meter.bytes_sent)
                        exact.append(_bytes_from_routing(sharded, groups, args.dim, sent[-1]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(E=E, K=K, **med, a2a=statistics.median(a2a), sent=statistics.median(sent), exact=exact[-1]))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per process")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--configs", default="8x1,8x2,32x1,32x2", help="EXPERTSxTOP_K, comma separated")
    args = p.parse_args(argv)
    args.configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(args.procs, port, args, queue), nprocs=args.procs, join=True)
    rows = queue.get()
    P, D = args.procs, args.dim
    print(f"{P} processes x 1 thread, {args.tokens} tokens each, d={D}, h={args.hidden}, cf={args.capacity_factor}, "
          f"fp32, forward+backward, medians of {args.reps}")
    print("| E | top-k | local ms | local+reduce ms | expert-par. ms | EP / local | EP / local+reduce | all-to-all share | "
          "bytes sent / token (measured) | formula 4KDb(P-1)/P |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        formula = 4 * r["K"] * D * 4 * (P - 1) / P
        print(f"| {r['E']} | {r['K']} | {r['local'] * 1e3:.1f} | {r['local+reduce'] * 1e3:.1f} | "
              f"{r['expert-par.'] * 1e3:.1f} | {r['expert-par.'] / r['local']:.2f}x | "
              f"{r['expert-par.'] / r['local+reduce']:.2f}x | {r['a2a'] / r['expert-par.']:.0%} | "
              f"{r['sent'] / args.tokens:.0f} | {formula:.0f} |")
    for r in rows:  # the measured bytes against the routing's own count, to the byte
        print(f"E={r['E']} K={r['K']}: bytes sent by all ranks {r['exact'][0]:.0f}, from the routing {r['exact'][1]:.0f}")


if __name__ == "__main__":
    main()
