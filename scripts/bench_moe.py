"""Benchmark SparseMoE against a dense MLP of the same active FLOPs, the one-hot einsum
(GShard/DeepSpeed-style) dispatch, and DeepSpeed's MoE layer (if installed).

All variants of one configuration are timed interleaved (A B C A B C ...) so machine
noise hits them alike; the table reports medians of forward+backward time, the ratio to
the dense MLP, and the activation memory kept for backward (bytes of saved tensors,
parameters excluded), which is what grows with the number of tokens.

    python scripts/bench_moe.py                       # the README table
    python scripts/bench_moe.py --tokens 256 --reps 2 --experts 4   # a quick look
    python scripts/bench_moe.py --malloc keep         # glibc keeps freed memory (no page faults)
    python scripts/bench_moe.py --compile             # torch.compile'd rows, with eager and DeepSpeed
    python scripts/bench_moe.py --page-faults [--malloc keep]   # what a fresh 32 MiB block costs
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from vlmoe.moe import SparseMoE, compute_capacity, top_k_gates


class OneHotEinsumMoE(nn.Module):
    """The GShard / DeepSpeed formulation: a [T, E, C] one-hot dispatch tensor and einsums.
    Same routing as SparseMoE (top-k, capacity, position priority), quadratic memory."""

    def __init__(self, moe: SparseMoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        m = self.moe
        x_TD = x.reshape(-1, m.dim)
        T, E, K = x_TD.shape[0], m.num_experts, m.top_k
        gates_TE = m.router_logits(x_TD).softmax(-1)
        C = compute_capacity(T, E, K, m.options.capacity_factor)
        w_TK, e_TK = top_k_gates(gates_TE, K)
        onehot_KTE = F.one_hot(e_TK.t(), E)
        pos_KTE = (onehot_KTE.reshape(K * T, E).cumsum(0).reshape(K, T, E) - 1) * onehot_KTE
        pos_KT = pos_KTE.sum(-1)
        keep_KT = pos_KT < C
        dispatch_TEC = torch.zeros(T, E, C, dtype=x.dtype)
        combine_TEC = torch.zeros(T, E, C, dtype=x.dtype)
        for k in range(K):
            oh = F.one_hot(pos_KT[k].clamp_max(C - 1), C).to(x.dtype) * keep_KT[k, :, None]
            d = onehot_KTE[k].to(x.dtype)[:, :, None] * oh[:, None, :]
            dispatch_TEC = dispatch_TEC + d
            combine_TEC = combine_TEC + d * w_TK[:, k, None, None]
        xe_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        ex = m.experts
        h = ex.act(torch.baddbmm(ex.b1[:, None], xe_ECD, ex.w1))
        ye_ECD = torch.baddbmm(ex.b2[:, None], h, ex.w2)
        return torch.einsum("tec,ecd->td", combine_TEC, ye_ECD).reshape(x.shape)


class DeepSpeedMoE(nn.Module):
    def __init__(self, dim, hidden, E, k):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(hidden_size=dim, expert=Mlp(dim, hidden), num_experts=E, ep_size=1, k=k,
                       capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=True)

    def forward(self, x):
        return self.moe(x)[0]


def _init_deepspeed():
    try:
        import deepspeed  # noqa: F401
        import torch.distributed as dist
    except Exception as e:  # noqa: BLE001 - optional extra
        return f"not installed ({type(e).__name__}); pip install -e '.[bench]'"
    if not dist.is_initialized():
        import os
        import tempfile

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    return None


@contextlib.contextmanager
def saved_bytes(params):
    """Counts bytes of tensors autograd saves for backward (each storage once, no parameters)."""
    seen, skip = set(), {p.untyped_storage().data_ptr() for p in params}
    total = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in skip:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def step(module, x, grad):
    y = module(x)
    y.backward(grad)


def bench(tokens=4096, dim=256, hidden=1024, experts=(8, 32), top_ks=(1, 2), reps=9, with_deepspeed=True):
    torch.manual_seed(0)
    ds_error = _init_deepspeed() if with_deepspeed else "skipped (--no-deepspeed)"
    rows = []
    for E in experts:
        for k in top_ks:
            moe = SparseMoE(dim, hidden, E, top_k=k, capacity_factor=1.0, batch_priority=True).train()

            def same_weights(impl, **kw):  # same router, so the same tokens are kept
                m = SparseMoE(dim, hidden, E, top_k=k, capacity_factor=1.0, implementation=impl, **kw).train()
                m.load_state_dict(moe.state_dict())
                return m

            variants = {
                "dense MLP": Mlp(dim, hidden * k),
                "vlmoe": moe,
                "vlmoe (bmm)": same_weights("bmm"),
                "vlmoe (grouped_mm)": same_weights("grouped_mm"),
                "vlmoe (loop)": same_weights("loop"),
                "one-hot einsum": OneHotEinsumMoE(same_weights("auto", batch_priority=False)),
            }
            if ds_error is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    variants["DeepSpeed MoE"] = DeepSpeedMoE(dim, hidden, E, k)
            x = torch.randn(1, tokens, dim, requires_grad=True)
            g = torch.randn(1, tokens, dim)
            mem = {}
            for name, mod in variants.items():
                step(mod, x, g)  # warm-up
                with saved_bytes(list(mod.parameters()) + [x]) as b:
                    mod(x)
                mem[name] = b[0]
            med = _interleaved(variants, x, g, reps)
            for name in variants:
                rows.append((E, k, name, med[name] * 1e3, med[name] / med["dense MLP"], mem[name] / 2**20))
    return rows, ds_error


def _interleaved(variants: dict, x, g, reps: int) -> dict[str, float]:
    """Median forward+backward seconds of each variant, timed A B C A B C ..."""
    for mod in variants.values():
        step(mod, x, g)  # warm-up
        mod.zero_grad(set_to_none=True)
    times = {n: [] for n in variants}
    for _ in range(reps):
        for name, mod in variants.items():
            t0 = time.perf_counter()
            step(mod, x, g)
            times[name].append(time.perf_counter() - t0)
            mod.zero_grad(set_to_none=True)
    return {n: statistics.median(t) for n, t in times.items()}


def bench_compiled(tokens=4096, dim=256, hidden=1024, experts=(8, 32), top_ks=(1,), reps=9, with_deepspeed=True):
    """torch.compile'd layers against the compiled dense MLP of the same active FLOPs, with the
    eager ones and DeepSpeed's MoE layer (eager; same tokens, d, h, E, top-k and capacity
    factor 1.0) timed in the same interleaved rounds."""
    torch.manual_seed(0)
    ds_error = _init_deepspeed() if with_deepspeed else "skipped (--no-deepspeed)"
    rows = []
    for E in experts:
        for k in top_ks:
            dense = Mlp(dim, hidden * k)
            moe = SparseMoE(dim, hidden, E, top_k=k, capacity_factor=1.0).train()
            variants = {"dense MLP": dense, "dense MLP, compiled": torch.compile(dense),
                        "vlmoe": moe, "vlmoe, compiled": torch.compile(moe, fullgraph=True)}
            if ds_error is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    variants["DeepSpeed MoE"] = DeepSpeedMoE(dim, hidden, E, k)
            x = torch.randn(1, tokens, dim, requires_grad=True)
            g = torch.randn(1, tokens, dim)
            for mod in variants.values():  # compile outside the timed rounds
                step(mod, x, g)
            med = _interleaved(variants, x, g, reps)
            for name in variants:
                base = med["dense MLP, compiled" if "compiled" in name else "dense MLP"]
                rows.append((E, k, name, med[name] * 1e3, med[name] / base,
                             med[name] / med["DeepSpeed MoE"] if "DeepSpeed MoE" in med else None))
    return rows, ds_error


def bench_designs(tokens=4096, dim=256, hidden=1024, reps=9, seq_len=8, granularity=4):
    """The designs since V-MoE against the dense MLP of the same active FLOPs, interleaved:
    Soft MoE with E=8 experts of one slot each on sequences of 8 tokens (8 slots per 8 tokens:
    the dense MLP's FLOPs plus dispatch and combine), fine-grained experts (E=8*m, top-m, each
    1/m as wide), and the coarse E=32 top-1 layer for reference."""
    from vlmoe.moe import SoftMoE

    torch.manual_seed(0)
    m = granularity
    variants = {
        "dense MLP": Mlp(dim, hidden),
        "Soft MoE, E=8, 1 slot each": SoftMoE(dim, hidden, 8, slots_per_expert=1).train(),
        f"fine-grained m={m}: E={8 * m}, top-{m}, h/{m}": SparseMoE(dim, hidden // m, 8 * m, top_k=m, capacity_factor=1.0).train(),
        "E=32, top-1": SparseMoE(dim, hidden, 32, top_k=1, capacity_factor=1.0).train(),
    }
    x = torch.randn(tokens // seq_len, seq_len, dim, requires_grad=True)  # Soft MoE mixes within each sequence
    g = torch.randn_like(x)
    med = _interleaved(variants, x, g, reps)
    return [(name, t * 1e3, t / med["dense MLP"]) for name, t in med.items()]


def memory_scaling(dim=256, hidden=1024, E=8, tokens=(1024, 2048, 4096, 8192)):
    """Activation memory kept for backward at growing token counts: SparseMoE's grows
    linearly, the one-hot einsum's quadratically (its [T, E, C] tensors, C ~ T/E)."""
    rows = []
    for T in tokens:
        x = torch.randn(1, T, dim, requires_grad=True)
        moe = SparseMoE(dim, hidden, E).train()
        row = [T]
        for mod in (moe, OneHotEinsumMoE(SparseMoE(dim, hidden, E, batch_priority=False))):
            with saved_bytes(list(mod.parameters()) + [x]) as b:
                mod(x)
            row.append(b[0] / 2**20)
        rows.append(row)
    lines = [f"Activation MiB for backward, E={E} top-1, d={dim}, h={hidden}:", "",
             "| tokens | vlmoe | one-hot einsum |", "|---|---|---|"]
    lines += [f"| {T} | {a:.1f} | {b:.1f} |" for T, a, b in rows]
    return "\n".join(lines)


def format_table(rows, tokens, dim, hidden) -> str:
    lines = [
        f"tokens={tokens}, d={dim}, h={hidden}, float32, capacity_factor=1.0, BPR; "
        f"{torch.get_num_threads()} threads; medians of interleaved forward+backward",
        "",
        "| E | top-k | layer | fwd+bwd ms | x dense | activation MiB |",
        "|---|---|---|---|---|---|",
    ]
    for E, k, name, ms, ratio, mib in rows:
        lines.append(f"| {E} | {k} | {name} | {ms:.1f} | {ratio:.2f} | {mib:.1f} |")
    return "\n".join(lines)


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse, as a caching allocator (jemalloc, tcmalloc, CUDA's)
    does. By default glibc serves blocks over its mmap threshold (at most 32 MiB) by mmap and
    unmaps them on free, so every step page-faults them in again (the kernel zeroes each page):
    an E=32 layer's two 32 MiB weight gradients cost ~9 ms each that way on this machine. Same
    effect as MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 in the
    environment."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise SystemExit("--malloc keep needs glibc's mallopt (Linux); use jemalloc or tcmalloc via LD_PRELOAD instead")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)):
        raise SystemExit("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, 1 GiB)")
    return "malloc: glibc keeps freed blocks < 1 GiB (mallopt)"


def page_fault_cost(tokens=4096, dim=256, hidden=1024, experts=32, reps=15) -> str:
    """The weight gradient of E experts' first projection ([E, C, D]^T x [E, C, H] -> [E, D, H],
    C = tokens / E) computed into fresh memory (what autograd does) and into reused memory, beside
    the dense MLP's gradient of the same FLOPs; and filling a fresh vs a reused block of that size."""
    C = tokens // experts
    x, dh = torch.randn(experts, C, dim), torch.randn(experts, C, hidden)
    out = torch.empty(experts, dim, hidden)
    xd, dhd = x.reshape(-1, dim), dh.reshape(-1, hidden)
    cases = {
        "expert weight grad, fresh memory": lambda: torch.bmm(x.transpose(1, 2), dh),
        "expert weight grad, reused memory": lambda: torch.bmm(x.transpose(1, 2), dh, out=out),
        "dense weight grad (same FLOPs)": lambda: xd.t() @ dhd,
        "fill a fresh block": lambda: torch.empty_like(out).fill_(1.0),
        "fill a reused block": lambda: out.fill_(1.0),
    }
    import resource

    times = {n: [] for n in cases}
    faults = {n: [] for n in cases}  # minor page faults per call: what the time goes to in fresh memory
    for f in cases.values():
        f()
    for _ in range(reps):
        for n, f in cases.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
            faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    mib = out.numel() * out.element_size() / 2**20
    pages = out.numel() * out.element_size() // resource.getpagesize()
    lines = [f"Fresh vs reused memory ({mib:g} MiB blocks = {pages} pages, E={experts}, C={C}, d={dim}, h={hidden}; "
             f"medians of {reps}):", "", "| operation | ms | minor page faults |", "|---|---|---|"]
    lines += [f"| {n} | {statistics.median(t) * 1e3:.2f} | {statistics.median(faults[n]):.0f} |" for n, t in times.items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--top-k", type=int, nargs="+", default=None, help="default: 1 2 (--compile: 1)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--memory-scaling", action="store_true", help="also print activation memory at 1k-8k tokens")
    p.add_argument("--compile", action="store_true", help="only the torch.compile'd layer and dense MLP (with the eager "
                   "ones and DeepSpeed's layer), top-1 unless --top-k says otherwise")
    p.add_argument("--designs", action="store_true", help="only the Soft MoE / fine-grained rows against the dense MLP")
    p.add_argument("--page-faults", action="store_true", help="only time a weight gradient into fresh vs reused memory")
    p.add_argument("--malloc", choices=["default", "keep"], default="default",
                   help="keep: glibc keeps freed memory instead of unmapping blocks over 32 MiB (see keep_freed_memory)")
    a = p.parse_args(argv)
    a.top_k = a.top_k or ([1] if a.compile else [1, 2])
    print(keep_freed_memory() if a.malloc == "keep" else "malloc: glibc default (blocks over its mmap threshold, <= 32 MiB, "
          "are unmapped on free)")
    if a.page_faults:
        print(page_fault_cost(a.tokens, a.dim, a.hidden))
        return None
    if a.designs:
        rows = bench_designs(a.tokens, a.dim, a.hidden, a.reps)
        print(f"tokens={a.tokens} (sequences of 8), d={a.dim}, h={a.hidden}, float32, capacity_factor=1.0; "
              f"{torch.get_num_threads()} threads; medians of interleaved forward+backward\n")
        print("| layer | fwd+bwd ms | x dense MLP of the same active FLOPs |\n|---|---|---|")
        print("\n".join(f"| {n} | {ms:.1f} | {r:.2f} |" for n, ms, r in rows))
        return rows
    if a.compile:
        rows, ds_error = bench_compiled(a.tokens, a.dim, a.hidden, a.experts, a.top_k, a.reps, not a.no_deepspeed)
        print(f"tokens={a.tokens}, d={a.dim}, h={a.hidden}, float32, capacity_factor=1.0, BPR; "
              f"{torch.get_num_threads()} threads; medians of interleaved forward+backward; compiled rows against the "
              f"compiled dense MLP, eager rows against the eager one\n")
        print("| E | top-k | layer | fwd+bwd ms | x dense of the same active FLOPs | x DeepSpeed MoE |\n|---|---|---|---|---|---|")
        print("\n".join(f"| {E} | {k} | {n} | {ms:.1f} | {r:.2f} | {'-' if d is None else f'{d:.2f}'} |"
                        for E, k, n, ms, r, d in rows))
        if ds_error:
            print(f"\nDeepSpeed MoE: {ds_error}")
        return rows
    rows, ds_error = bench(a.tokens, a.dim, a.hidden, a.experts, a.top_k, a.reps, not a.no_deepspeed)
    print(format_table(rows, a.tokens, a.dim, a.hidden))
    if a.memory_scaling:
        print("\n" + memory_scaling(a.dim, a.hidden))
    if ds_error:
        print(f"\nDeepSpeed MoE: {ds_error}")
    return rows


if __name__ == "__main__":
    main()
