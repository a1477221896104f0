"""Expert parallelism on CPU processes (gloo): sharded experts give the model's outputs and
gradients, under the Lightning strategy too, and checkpoints do not depend on the EP size."""
import os
from datetime import timedelta

import lightning as L
import open_clip
import pytest
import torch
import torch.distributed as dist
from helpers import CONFIGS, FAST, NO_AUX, PairDataset, train_args, read_metrics
from torch.utils.data import DataLoader

from vlmoe.cli import cli_main
from vlmoe.errors import ConfigError
from vlmoe.data import collate, count_samples, expand_shards, make_dataset
from vlmoe.models.factory import load_model
from vlmoe.moe import SparseMoE
from vlmoe.moe import parallel as par
from vlmoe.train import ExpertParallelStrategy, LIMoEModule
from helpers import free_port, init_gloo, start_ranks
import types
import vlmoe
from vlmoe.data import ClipDataModule

# (name, SparseMoE kwargs, skew): with skew, every token prefers the first half of the experts,
# so the ranks holding the second half receive no rows at all.
LAYER_CASES = [
    ("topk2_bpr_cf1", dict(top_k=2, capacity_factor=1.0), 0.0),
    ("top1_dropless", dict(top_k=1, capacity_factor=None), 0.0),
    ("top2_cf0.5_drops", dict(top_k=2, capacity_factor=0.5, batch_priority=False), 0.0),
    ("skewed_zero_token_experts", dict(top_k=1, capacity_factor=None), 8.0),
    ("skewed_grouped_mm", dict(top_k=1, capacity_factor=None, implementation="grouped_mm"), 8.0),
    ("expert_choice", dict(router="expert_choice", capacity_factor=1.0), 0.0),
    ("mixtral_swiglu", dict(top_k=2, gate="topk_softmax", expert_type="swiglu", capacity_factor=1.25), 0.0),
]
E, D, H, TOKENS_PER_RANK = 8, 16, 32, 24


def _make_layer(kwargs, bias, seed=0):
    torch.manual_seed(seed)
    kwargs = {"implementation": "loop", **kwargs}
    layer = SparseMoE(D, H, num_experts=E, noise_scale=0.0, importance_weight=0.01, load_weight=0.0, **kwargs)
    with torch.no_grad():  # input feature 0 is 3 under skew (see _inputs)
        layer.router.weight[: E // 2, 0] += bias
        layer.router.weight[E // 2:, 0] -= bias
    return layer


def _inputs(world: int, skew: float):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world, TOKENS_PER_RANK, D, generator=g)
    w = torch.randn(world, TOKENS_PER_RANK, D, generator=g)
    if skew:
        x[..., 0] = 3.0
    return x, w


def _reference(kwargs, bias, world):
    """Single process, all ranks' tokens at once, one routing group per rank's tokens."""
    layer = _make_layer(kwargs, bias)
    layer.group_size = TOKENS_PER_RANK
    x, w = _inputs(world, bias)
    x.requires_grad_(True)
    y = layer(x.reshape(-1, D))
    loss = (y * w.reshape(-1, D)).sum() / world + layer.aux[None].loss  # aux: mean over groups
    loss.backward()
    return y.detach().view(world, TOKENS_PER_RANK, D), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _layer_worker(rank, world, port, ep_sizes, out_dir):
    init_gloo(rank, world, port)
    results = {}
    for ep in ep_sizes:
        groups = par.init_expert_parallel(ep)
        for name, kwargs, bias in LAYER_CASES:
            layer = _make_layer(kwargs, bias, seed=rank)  # experts differ per rank: shard_experts broadcasts them
            dist.broadcast(layer.router.weight.data, src=0)  # DDP's job for dense parameters
            par.shard_experts(layer, groups)
            x, w = _inputs(world, bias)
            x = x[rank].clone().requires_grad_(True)
            par.all_to_all_meter.reset()
            y = layer(x)
            loss = (y * w[rank]).sum() + layer.aux[None].loss  # this rank's loss; the global one is the mean
            loss.backward()
            # what DDP would do for the router; what the strategy does for the experts
            dist.all_reduce(layer.router.weight.grad)
            layer.router.weight.grad /= world
            par.reduce_expert_gradients(layer, groups)
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            full = par.gather_expert_state_dict(layer.state_dict(), layer)
            results[(ep, name)] = dict(
                y=y.detach(), x_grad=x.grad, grads=grads, full=full, offset=layer.experts.expert_offset,
                local=layer.experts.num_experts, bytes=par.all_to_all_meter.bytes_sent,
                calls=par.all_to_all_meter.calls, rank_load=layer.aux[None].stats.get("rank_load"),
            )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(fn, world, *args):
    start_ranks(fn, world, world, free_port(), *args)


@pytest.mark.parametrize("world,ep_sizes", [(2, (2,)), (4, (1, 2, 4))])
def test_sharded_layer_equals_single_process(tmp_path, world, ep_sizes):
    _spawn(_layer_worker, world, ep_sizes, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name, kwargs, bias in LAYER_CASES:
        ref_y, ref_xg, ref_g = _reference(kwargs, bias, world)
        ref_layer = _make_layer(kwargs, bias)
        for ep in ep_sizes:
            for r, res in enumerate(ranks):
                got = res[(ep, name)]
                msg = f"{name}, EP={ep}, rank {r}"
                assert got["local"] == E // ep
                torch.testing.assert_close(got["y"], ref_y[r], atol=1e-6, rtol=1e-5, msg=msg)
                # x's gradient is of this rank's loss; the reference's of the mean
                torch.testing.assert_close(got["x_grad"] / world, ref_xg[r], atol=1e-6, rtol=1e-5, msg=msg)
                for n, g in got["grads"].items():
                    ref = ref_g[n] if "experts" not in n else ref_g[n].narrow(0, got["offset"], got["local"])
                    torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5, msg=f"{msg}: {n}")
                for n, t in got["full"].items():  # gathered state = rank 0's model, all experts
                    torch.testing.assert_close(t, ref_layer.state_dict()[n], msg=f"{msg}: {n}")
                if ep > 1:
                    assert got["calls"] == 4 and got["bytes"] > 0  # 2 exchanges forward, 2 backward
                    assert got["rank_load"].shape == (ep,)
                    torch.testing.assert_close(got["rank_load"].sum(), torch.tensor(1.0))
    for ep in ep_sizes[1:] if ep_sizes[0] == 1 else ep_sizes:  # the skew really left ranks without rows
        for name in ("skewed_zero_token_experts", "skewed_grouped_mm"):
            load = ranks[0][(ep, name)]["rank_load"]
            assert load[: ep // 2].sum() == 1 and (load[ep // 2:] == 0).all()


def test_forkserver_on_cpu_is_refused():
    """Lightning's launcher copies the model out of shared memory only under "spawn": under
    "forkserver" on CPU every rank would train one parameter storage (seen here: two ranks'
    updates summed into the weights), so the strategy refuses it when the Trainer is built."""
    with pytest.raises(ConfigError, match=r'start_method="forkserver"\) on CPU would share the parameters'):
        L.Trainer(accelerator="cpu", devices=2, strategy=ExpertParallelStrategy(expert_parallel_size=2, start_method="forkserver"),
                  logger=False, enable_progress_bar=False)
    L.Trainer(accelerator="cpu", devices=2, strategy=ExpertParallelStrategy(expert_parallel_size=2, start_method="spawn"),
              logger=False, enable_progress_bar=False)  # builds; no process starts before fit


def test_bad_expert_parallel_size_is_refused(monkeypatch):
    layer = SparseMoE(D, H, num_experts=6)
    groups = par.ExpertParallelGroups(world_size=4, ep_size=4, ep_rank=0, ep_group=None, edp_size=1, edp_rank=0, edp_group=None)
    with pytest.raises(ValueError, match="cannot be split evenly.*divides 6"):
        layer.shard_experts(groups)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        par.init_expert_parallel(2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"divisor of the world size 1; choose one of \[1\]"):
            par.init_expert_parallel(2)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="positive integer"):
        ExpertParallelStrategy(expert_parallel_size=0)


# -- the Lightning strategy ------------------------------------------------------------------

class Record(L.Callback):
    """Saves, per rank: the outputs on a probe batch when training starts (right after a
    checkpoint is restored) and every gradient as the optimizer used it (after expert
    reduction and clipping) with the rows of experts it holds."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        probe = PairDataset(n=4, seed=7)
        pl_module.model.eval()
        with torch.no_grad():  # a collective under EP: every rank runs it
            out = pl_module.model(probe.images, probe.texts)
        pl_module.model.train()
        self.probe = {k: out[k] for k in ("image_features", "text_features")}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads, offsets = {}, {}
        for n, p in pl_module.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()
        for n, m in pl_module.named_modules():
            if hasattr(m, "expert_offset"):
                offsets[n] = (m.expert_offset, m.num_experts)
        torch.save({"grads": grads, "offsets": offsets, "probe": self.probe},
                   f"{self.out_dir}/rank{trainer.global_rank}_step{trainer.global_step}.pt")


def _fit(out_dir, devices, ep, max_steps, ckpt_path=None, clip=0.05, **module_kwargs):
    out_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    module = LIMoEModule("limoe-tiny", model_overrides=NO_AUX, warmup_steps=1, lr=1e-3, **module_kwargs)
    strategy = "auto" if devices == 1 else ExpertParallelStrategy(
        expert_parallel_size=ep, start_method="spawn", timeout=timedelta(seconds=120))  # fail, don't hang
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, default_root_dir=str(out_dir),
        callbacks=[Record(str(out_dir))], logger=False, enable_checkpointing=True, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=clip, log_every_n_steps=1,
    )
    loader = DataLoader(PairDataset(), batch_size=8 // devices, shuffle=False, collate_fn=collate)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return out_dir / "checkpoints" / "last.ckpt", module


def _assert_same_grads(single_path, ep_paths):
    ref = torch.load(single_path, weights_only=True)["grads"]
    for path in ep_paths:
        got = torch.load(path, weights_only=True)
        assert len(got["grads"]) > 50 and set(ref) <= set(got["grads"])
        for n, g in got["grads"].items():
            owner = n.rsplit(".", 1)[0]
            r = ref[n] if n in ref else torch.zeros_like(g)  # an expert shard no row reached
            if owner in got["offsets"]:
                r = r.narrow(0, *got["offsets"][owner])
            torch.testing.assert_close(g, r, atol=2e-6, rtol=1e-4, msg=f"{path.name}: {n}")


def _assert_same_checkpoint(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], atol=2e-6, rtol=1e-4, msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sa[i][k], sb[i][k], atol=1e-8, rtol=1e-4, msg=f"optimizer state {i} {k}")


def test_strategy_step_checkpoints_and_resume_match_a_single_process(tmp_path):
    # one step: gradients (reduced, clipped by the global norm) and the updated model
    single_ckpt, _ = _fit(tmp_path / "single", 1, 1, max_steps=1)
    ep_ckpt, ep_module = _fit(tmp_path / "ep2", 2, 2, max_steps=1)
    _assert_same_grads(tmp_path / "single" / "rank0_step1.pt",
                       [tmp_path / "ep2" / "rank0_step1.pt", tmp_path / "ep2" / "rank1_step1.pt"])
    ref = torch.load(tmp_path / "single" / "rank0_step1.pt", weights_only=True)["grads"]
    norm = torch.stack([g.norm() for g in ref.values()]).norm()
    assert abs(norm - 0.05) < 1e-4  # clipping was active, so the EP norm had to be the global one
    offsets = torch.load(tmp_path / "ep2" / "rank1_step1.pt", weights_only=True)["offsets"]
    assert offsets and all(o == (4, 4) for o in offsets.values())  # rank 1 held experts 4..7 of 8
    # the EP=2 checkpoint has the single-device layout: all experts, Adam's moments too
    _assert_same_checkpoint(single_ckpt, ep_ckpt)
    # after fit the model in the caller's hands is whole
    assert all(m.experts.w1.shape[0] == m.num_experts and not m.experts.is_sharded for m in ep_module.model.moe_layers())

    # saved under EP=2, loaded on one CPU process: same outputs as the sharded model gave
    probe = PairDataset(n=4, seed=7)
    model = load_model(str(ep_ckpt)).eval()
    with torch.no_grad():
        out = model(probe.images, probe.texts)
    # resume both checkpoints under the other layout: EP=2 from the single-device one (its
    # probe runs sharded, right after loading) and one process from the EP=2 one; with
    # activation checkpointing, so the sharded blocks rerun their all-to-alls in backward
    _fit(tmp_path / "ep2_from_single", 2, 2, max_steps=2, ckpt_path=single_ckpt, grad_checkpointing=True)
    _fit(tmp_path / "single_from_ep2", 1, 1, max_steps=2, ckpt_path=ep_ckpt, grad_checkpointing=True)
    sharded_probe = torch.load(tmp_path / "ep2_from_single" / "rank0_step2.pt", weights_only=True)["probe"]
    for k in ("image_features", "text_features"):
        torch.testing.assert_close(sharded_probe[k], out[k], atol=1e-6, rtol=1e-5)
    _assert_same_grads(tmp_path / "single_from_ep2" / "rank0_step2.pt",
                       [tmp_path / "ep2_from_single" / f"rank{r}_step2.pt" for r in (0, 1)])
    _assert_same_checkpoint(tmp_path / "single_from_ep2" / "checkpoints" / "last.ckpt",
                            tmp_path / "ep2_from_single" / "checkpoints" / "last.ckpt")


def test_vlmoe_fit_under_expert_parallelism_with_uneven_evaluation_shards(shards, tmp_path, capfd):
    """Through the CLI, 2 processes, EP=2, bf16-mixed with gradient accumulation: the single
    validation shard goes to rank 0 only, so rank 1 runs stand-in batches to keep every
    expert all-to-all paired; metrics include the all-to-all time, bytes and load per rank;
    evaluation counts only real samples; `vlmoe validate` runs sharded from the checkpoint.
    The ranks' stderr carries no Lightning advice to sync the (already global) evaluation
    metrics: one line per metric, every validation."""
    extra = ["--trainer.devices=2", "--trainer.strategy=vlmoe.train.ExpertParallelStrategy",
             "--trainer.strategy.expert_parallel_size=2", "--trainer.strategy.start_method=spawn",
             "--data.num_workers=1", "--trainer.num_sanity_val_steps=0"]
    train = ["--data.samples_per_epoch=64", "--trainer.accumulate_grad_batches=2", "--trainer.precision=bf16-mixed"]
    cli_main(train_args(shards, tmp_path, steps=2, extra=extra + train))
    err = capfd.readouterr().err
    assert "Initializing distributed: GLOBAL_RANK: 1" in err  # the ranks' stderr is the one read here
    assert "sync_dist=True" not in err, [line for line in err.splitlines() if "sync_dist" in line][:3]
    metrics = read_metrics(tmp_path / "lightning_logs" / "version_0")
    for key in ("comm/all_to_all_ms", "comm/all_to_all_MB", "comm/all_to_all_share", "comm/rank_load/r0",
                "comm/rank_load/r1", "val/zeroshot_top1", "val/image_to_text_R@1"):
        assert key in metrics, key
    assert all(v > 0 for v in metrics["comm/all_to_all_MB"])
    assert any(k.endswith("rank_load/r1") and k.startswith("moe/") for k in metrics)
    # 24 validation pairs and 24 zero-shot images, all on rank 0: counted once, stand-ins left out
    assert set(metrics["val/retrieval_n"]) == {24.0} and set(metrics["val/zeroshot_n"]) == {24.0}
    path = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"]["model.visual.transformer.resblocks.1.mlp.experts.w1"].shape[0] == 8
    assert ckpt["global_step"] == 2

    args = ["validate", "--config", str(CONFIGS / "limoe_tiny.yaml"), f"--ckpt_path={path}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.val_shards={shards['val']}", f"--data.zeroshot_shards={shards['zeroshot']}",
            f"--data.classnames={shards['classnames']}", f"--data.templates={shards['templates']}",
            "--data.train_shards=null", "--data.val_batch_size=8", "--trainer.precision=bf16-mixed",
            *FAST, *extra, "--data.num_workers=0"]
    m = cli_main(args).trainer.callback_metrics
    assert float(m["val/zeroshot_n"]) == 24 and float(m["val/retrieval_n"]) == 24
    # the same weights and numerics as fit's last validation (which ran after the last step)
    assert float(m["val/zeroshot_top1"]) == pytest.approx(metrics["val/zeroshot_top1"][-1], abs=1e-6)
    assert float(m["val/image_to_text_R@1"]) == pytest.approx(metrics["val/image_to_text_R@1"][-1], abs=1e-6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluation_streams_give_every_rank_the_same_batches(shards, num_workers):
    """Corrupt samples (skipped) and shards that split unevenly over 3 ranks: every rank still
    yields the same number of batches, each real sample exactly once, skips all counted."""
    urls = expand_shards(shards["bad"], "bad") + expand_shards(shards["val"], "val")  # 30 + 30 + 24 samples
    counts = [count_samples([u]) for u in urls]
    stand_in = {"image": torch.zeros(3, 32, 32), "text": torch.zeros(16, dtype=torch.long)}
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    tf = open_clip.image_transform(32, is_train=False)
    n_batches, real, skipped = set(), 0, 0
    for rank in range(3):
        ds = make_dataset(urls, tf, tok, train=False, shard_counts=counts, stand_in=stand_in, rank=rank, world_size=3)
        batches = list(DataLoader(ds, batch_size=8, num_workers=num_workers, collate_fn=collate))
        n_batches.add(len(batches))
        for b in batches:
            assert "image" in b and "text" in b  # every batch runs the model
            valid = b.get("valid", torch.ones(b["image"].shape[0], dtype=torch.bool))
            real += int(valid.sum())
            skipped += int(b["skipped"])
            assert valid.all() or not valid.any()  # stand-ins never mix with real rows
    assert len(n_batches) == 1
    assert skipped == 6 and real == 84 - 6  # corrupt_every=10: 6 of the 60 "bad" samples are bad


# -- moved from test_promises (issues #11, #16) ------------------------------------------------------


def test_expert_parallel_refuses_remote_evaluation_shards(shards):
    """README: EP evaluation needs each shard's sample count; a remote shard is refused."""
    dm = ClipDataModule(val_shards=f"{shards['val']}::pipe:cat {shards['val']}", batch_size=8, num_workers=0)
    dm.trainer = types.SimpleNamespace(world_size=2, global_rank=0, strategy=types.SimpleNamespace(requires_equal_eval_batches=True))
    with pytest.raises(vlmoe.VLMoEError, match="is not a local file. Copy the val shards to local disk"):
        dm.val_dataloader()


def test_log_all_to_all_false_drops_the_timing_sync(monkeypatch):
    """README: `log_all_to_all=false` removes the CUDA sync of the all-to-all timing (and the
    monitor callback). Only the strategy's own part of setup runs here (no process group)."""
    from lightning.pytorch.strategies import DDPStrategy

    from vlmoe.moe.comm import all_to_all_meter
    from vlmoe.train import ExpertParallelMonitor, ExpertParallelStrategy

    monkeypatch.setattr(DDPStrategy, "setup", lambda self, trainer: None)
    old = all_to_all_meter.sync_cuda
    try:
        for flag in (False, True):
            trainer = types.SimpleNamespace(callbacks=[])
            ExpertParallelStrategy(expert_parallel_size=2, log_all_to_all=flag).setup(trainer)
            assert all_to_all_meter.sync_cuda is flag
            assert any(isinstance(c, ExpertParallelMonitor) for c in trainer.callbacks) is flag
    finally:
        all_to_all_meter.sync_cuda = old
