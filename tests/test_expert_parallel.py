"""Expert parallelism on CPU processes (gloo): sharded experts give the model's outputs and
gradients, under the Lightning strategy too, and checkpoints do not depend on the EP size."""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmoe.moe import SparseMoE
from vlmoe.moe import parallel as par

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


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
    _init(rank, world, port)
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
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


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


def test_bad_expert_parallel_size_is_refused():
    layer = SparseMoE(D, H, num_experts=6)
    groups = par.ExpertParallelGroups(world_size=4, ep_size=4, ep_rank=0, ep_group=None, edp_size=1, edp_rank=0, edp_group=None)
    with pytest.raises(ValueError, match="cannot be split evenly.*divides 6"):
        layer.shard_experts(groups)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        par.init_expert_parallel(2)
