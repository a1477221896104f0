"""The GPU checks, as one script to run when a GPU is available (and as a CPU smoke run).

1. Correctness on the device: a tiny LIMoE in float32 gives the CPU's outputs and
   gradients; the SparseMoE grouped_mm path agrees with the per-expert loop in bf16.
2. The MoE layer against a dense MLP of the same active FLOPs at B/16 width (bf16 autocast,
   forward + backward, interleaved medians), for the grouped_mm and the auto path.
3. bf16-mixed training throughput of a LIMoE model against its dense CLIP twin (synthetic
   batch, forward + contrastive/aux loss + backward + AdamW step, interleaved medians).
4. The LIMoE training step compiled (torch.compile) against eager, and the host syncs of
   one step: the dispatch counter of the CPU tests and CUDA's own sync debug mode.

    python scripts/gpu_check.py --out results/              # on a GPU: B/16 sizes
    python scripts/gpu_check.py --tiny --reps 2             # CPU smoke run
Writes `gpu_check.json` and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from timm.layers import Mlp

import vlmoe
from vlmoe.data import model_input_spec
from vlmoe.moe import SparseMoE


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: dict, reps: int, device) -> dict[str, float]:
    for f in fns.values():  # warm-up (and kernel selection)
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def check_correctness(device) -> dict:
    """A tiny LIMoE on the device (float32) against the same model on the CPU, with
    per-modality and with joint routing (the towers in lockstep, one joint MoE call), and the
    designs since V-MoE: Soft MoE, bias balancing (a non-zero bias), shared and fine-grained
    experts."""
    out = {}
    dropless = {"capacity_factor": None, "noise_scale": 0.0}
    cases = {"per_modality": ("limoe-tiny", dropless), "joint": ("limoe-tiny", {**dropless, "routing_groups": "joint"}),
             "soft": ("limoe-tiny-soft", {}), "auxfree": ("limoe-tiny-auxfree", dropless),
             "auxfree-modality": ("limoe-tiny-auxfree-modality", dropless),
             "shared": ("limoe-tiny-shared", {**dropless, "shared_expert_gate": True}), "fine": ("limoe-tiny-fine", dropless)}
    for routing_groups, (name, moe_overrides) in cases.items():
        torch.manual_seed(0)
        model = vlmoe.create_model(name, moe=moe_overrides).train()
        for layer in model.moe_layers():
            if layer.balance == "bias":
                with torch.no_grad():
                    layer.expert_bias.copy_(torch.linspace(-0.05, 0.05, layer.num_experts))
        size, ctx = model_input_spec(name)
        images = torch.randn(8, 3, size, size)
        texts = vlmoe.get_tokenizer(model)([f"caption {i}" for i in range(8)])
        results = {}
        for dev in (torch.device("cpu"), device):
            m = model.to(dev)
            m.zero_grad(set_to_none=True)
            o = m(images.to(dev), texts.to(dev))
            (o["image_features"].square().sum() + o["text_features"].sum()).backward()
            results[dev.type] = (torch.cat([o["image_features"], o["text_features"]]).detach().cpu(),
                                 {n: p.grad.detach().cpu() for n, p in m.named_parameters() if p.grad is not None})
        (f_cpu, g_cpu), (f_dev, g_dev) = results["cpu"], results[device.type]
        out[f"{routing_groups}_features_max_abs_diff"] = float((f_cpu - f_dev).abs().max())
        out[f"{routing_groups}_grads_max_abs_diff"] = max(float((g_cpu[n] - g_dev[n]).abs().max()) for n in g_cpu)

    torch.manual_seed(0)
    moe = SparseMoE(256, 1024, num_experts=8, top_k=2, noise_scale=0.0).to(device)
    x = torch.randn(2048, 256, device=device)
    ys = {}
    for impl in ("grouped_mm", "loop"):
        moe.experts.implementation = impl
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            ys[impl] = moe(x).float()
    out["grouped_mm_vs_loop_bf16_max_rel_diff"] = float(
        (ys["grouped_mm"] - ys["loop"]).abs().max() / ys["loop"].abs().max().clamp_min(1e-9))
    return out


def check_layer(device, dim, tokens, reps) -> list[dict]:
    rows = []
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    dense = Mlp(dim, 4 * dim).to(device)
    for E, K in ((8, 1), (8, 2), (32, 1), (32, 2)):
        moe = SparseMoE(dim, 4 * dim, num_experts=E, top_k=K, noise_scale=0.0).to(device)
        variants = {"dense": dense}
        for impl in ("auto", "grouped_mm"):
            m = SparseMoE(dim, 4 * dim, num_experts=E, top_k=K, noise_scale=0.0, implementation=impl).to(device)
            m.load_state_dict(moe.state_dict())
            variants[impl] = m

        def step(module):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    y = module(x)
                y.float().square().mean().backward()
            return run

        t = _interleaved({k: step(m) for k, m in variants.items()}, reps, device)
        # the dense MLP does K times fewer FLOPs than top-K experts: compare per active FLOP
        rows.append({"E": E, "K": K, "dense_ms": t["dense"] * 1e3, "auto_ms": t["auto"] * 1e3,
                     "grouped_mm_ms": t["grouped_mm"] * 1e3,
                     "auto_per_dense_flop": t["auto"] / (K * t["dense"]),
                     "grouped_mm_per_dense_flop": t["grouped_mm"] / (K * t["dense"])})
    return rows


def check_training(device, names, batch_size, reps) -> dict:
    loss_fn = ClipLoss()
    setups = {}
    for n in names:
        torch.manual_seed(0)
        model = vlmoe.create_model(n).to(device).train()
        size, _ = model_input_spec(n)
        images = torch.randn(batch_size, 3, size, size, device=device)
        text = vlmoe.get_tokenizer(model)([f"a photo of thing {i}" for i in range(batch_size)]).to(device)
        setups[n] = (model, images, text, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(n):
        def run():
            model, images, text, opt = setups[n]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(images, text)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]) + out["aux_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    t = _interleaved({n: step(n) for n in names}, reps, device)
    return {n: batch_size / v for n, v in t.items()}


def check_compile_and_syncs(device, name, batch_size, reps, backend: str = "inductor") -> dict:
    """The training step of `name` eager and compiled (nn.Module.compile, as `--model.compile
    true`), bf16 autocast: the first step's losses side by side, samples/s interleaved, and the
    host syncs of one eager step, counted twice: by vlmoe.syncs.HostSyncCounter (what the CPU
    tests count) and, on CUDA, by torch.cuda.set_sync_debug_mode("warn") (every synchronizing
    call the driver sees, tolist included)."""
    import warnings

    from vlmoe.syncs import HostSyncCounter

    loss_fn = ClipLoss()
    setups = {}
    for label in ("eager", "compiled"):
        torch.manual_seed(0)
        model = vlmoe.create_model(name, moe={"noise_scale": 0.0}).to(device).train()
        if label == "compiled":
            model.compile(backend=backend)
        size, _ = model_input_spec(name)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
        text = vlmoe.get_tokenizer(model)([f"a photo of thing {i}" for i in range(batch_size)]).to(device)
        setups[label] = (model, images, text, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(label, opt_step=True):
        model, images, text, opt = setups[label]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(images, text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]) + out["aux_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_step:
            opt.step()
        return loss.detach()

    first = {label: float(step(label, opt_step=False)) for label in setups}  # compiles; same weights, no update
    with HostSyncCounter(stacks=True) as counter:
        step("eager", opt_step=False)
    cuda_syncs = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step("eager", opt_step=False)
                step("compiled", opt_step=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        cuda_syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message).lower()]
    t = _interleaved({label: (lambda label=label: step(label)) for label in setups}, reps, device)
    return {"model": name, "backend": backend, "first_loss": first, "dispatch_syncs": counter.total, "dispatch_where": dict(counter.where),
            "cuda_sync_warnings": None if cuda_syncs is None else len(cuda_syncs), "cuda_sync_examples": (cuda_syncs or [])[:5],
            "samples_per_s": {k: batch_size / v for k, v in t.items()}, "compiled_over_eager_time": t["compiled"] / t["eager"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=".", help="folder for gpu_check.json")
    p.add_argument("--skip-compile", action="store_true", help="leave out the compiled-vs-eager step and sync count")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled step (the CPU "
                   "smoke test: eager, dynamo alone, which skips inductor's minutes of C++ compiling)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dim, tokens = (64, 512) if a.tiny else (768, 197 * 64)
    names, batch = (["limoe-tiny", "clip-tiny"], 4) if a.tiny else (["limoe-b16-e8", "clip-b16"], 128)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    t0 = time.perf_counter()
    report["correctness"] = check_correctness(device)
    print("correctness:", json.dumps(report["correctness"]), flush=True)
    report["layer"] = check_layer(device, dim, tokens, a.reps)
    print(f"\nSparseMoE vs dense MLP, d={dim}, {tokens} tokens, bf16 autocast, fwd+bwd, medians of {a.reps}")
    print("| E | top-k | dense ms | auto ms | grouped_mm ms | auto / (K x dense) | grouped_mm / (K x dense) |")
    print("|---|---|---|---|---|---|---|")
    for r in report["layer"]:
        print(f"| {r['E']} | {r['K']} | {r['dense_ms']:.2f} | {r['auto_ms']:.2f} | {r['grouped_mm_ms']:.2f} | "
              f"{r['auto_per_dense_flop']:.2f}x | {r['grouped_mm_per_dense_flop']:.2f}x |", flush=True)
    report["training_samples_per_s"] = check_training(device, names, batch, a.reps)
    rate = report["training_samples_per_s"]
    print(f"\nbf16-mixed training, batch {batch}: " + ", ".join(f"{n} {v:.1f} samples/s" for n, v in rate.items())
          + f"; ratio {rate[names[0]] / rate[names[1]]:.2f}x")
    if not a.skip_compile:
        c = report["compile"] = check_compile_and_syncs(device, names[0], batch, a.reps, a.compile_backend)
        print(f"\n{c['model']} training step, compiled vs eager (bf16 autocast, batch {batch}): first loss "
              f"{c['first_loss']['eager']:.5f} / {c['first_loss']['compiled']:.5f}; samples/s "
              + ", ".join(f"{k} {v:.1f}" for k, v in c["samples_per_s"].items())
              + f"; compiled / eager time {c['compiled_over_eager_time']:.2f}x")
        print(f"host syncs in one eager step: {c['dispatch_syncs']} (dispatch counter), "
              f"{c['cuda_sync_warnings']} (CUDA sync debug mode, eager + compiled step)", flush=True)
    report["seconds"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'gpu_check.json'} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
