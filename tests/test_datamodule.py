"""ClipDataModule across ranks and DataLoader workers, through the data module itself (issue #24)."""
from types import SimpleNamespace

from conftest import write_split
from helpers import deadline
from vlmoe.data import ClipDataModule
import types
import torch
from vlmoe.data import ShardWriter, make_dataset
from vlmoe.data.pipeline import _rank_worker_seed


def _module(train, val, rank):
    dm = ClipDataModule(train_shards=train, val_shards=val, model_name="limoe-tiny", batch_size=4, val_batch_size=4,
                        num_workers=2, samples_per_epoch=64, shuffle_buffer=10, seed=3)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, strategy=None)
    return dm


def test_two_ranks_with_two_workers_each_read_different_streams_and_split_evaluation(tmp_path):
    """Planted: train_dataloader no longer passing the rank and world size to the training
    stream (every DDP rank would read the same shards in the same order: N GPUs doing the
    same work, the contrastive batch full of duplicate false negatives). Two ranks x two
    workers: the training streams differ, each rank gets its 64 / 2 samples per epoch; the 40
    evaluation samples (8 shards) are split across ranks and workers with none lost and none
    read twice."""
    train = write_split(str(tmp_path / "train-%06d.tar"), 64, 0, 8)
    val = write_split(str(tmp_path / "val-%06d.tar"), 40, 1, 5)
    train_spec, val_spec = str(tmp_path / "train-{000000..000007}.tar"), str(tmp_path / "val-{000000..000007}.tar")
    assert len(train) == len(val) == 8
    train_keys, val_keys = {}, {}
    with deadline(180):
        for rank in (0, 1):
            dm = _module(train_spec, val_spec, rank)
            train_keys[rank] = [k for b in dm.train_dataloader() for k in b["keys"]]
            val_keys[rank] = [k for loader in dm.val_dataloader() for b in loader for k in b["keys"]]
    assert len(train_keys[0]) == len(train_keys[1]) == 32  # 64 per epoch over 2 ranks
    same = sum(a == b for a, b in zip(train_keys[0], train_keys[1]))
    assert same < 8, (same, train_keys)  # the same stream would match at all 32 positions
    assert val_keys[0] and val_keys[1]
    assert not set(val_keys[0]) & set(val_keys[1])
    every = {f"01{i:06d}" for i in range(40)}  # conftest.write_split's keys: seed, then index
    assert sorted(val_keys[0] + val_keys[1]) == sorted(every)


def test_equalize_stream_pads_every_rank_to_the_same_count():
    """Audit plant: the bound without its +1 for a marker of bad samples. Rank 0 holds shards
    of 3 and 1 samples, rank 1 one shard of 2 (shard i goes to rank i % 2): every stream is
    padded to 4 + 1 (a possible marker) = 5 items, as equalize_stream documents; a marker
    becomes a stand-in that carries its count."""
    from vlmoe.data import equalize_stream

    stand_in = {"image": "stand-in"}
    good = lambda i: {"image": i, "skipped": 0}
    marker = {"image": None, "skipped": 2, "skip_reasons": {"corrupt image": 2}, "unreadable": [], "urls": ["s0"]}
    out0 = list(equalize_stream(iter([good(0), good(1), good(2), marker]), [3, 2, 1], stand_in, rank=0, world_size=2))
    out1 = list(equalize_stream(iter([good(5), good(6)]), [3, 2, 1], stand_in, rank=1, world_size=2))
    assert len(out0) == len(out1) == 5
    assert [o["image"] for o in out0] == [0, 1, 2, "stand-in", "stand-in"] and out0[3]["skipped"] == 2 and out0[3]["pad"]
    assert [o.get("pad", False) for o in out1] == [False, False, True, True, True]


# -- moved from test_promises (issues #11, #16) ------------------------------------------------------


def _keys_of(ds, n):
    out = []
    for s in ds:
        out.append(s["key"])
        if len(out) == n:
            return out


def test_training_shards_resampled_with_a_seed_per_rank_and_worker(tmp_path, monkeypatch):
    """README: each rank and DataLoader worker draws its own shard sequence (and the same
    one again for the same rank, worker and seed). Planted: the rank left out of the seed."""
    for i in range(8):
        with ShardWriter(str(tmp_path / f"s{i}-%06d.tar")) as w:
            from helpers import png

            w.write(f"shard{i}", png(), caption="x")
    urls = [str(tmp_path / f"s{i}-000000.tar") for i in range(8)]

    def keys(rank, seed=0):
        ds = make_dataset(urls, lambda im: im, lambda t: torch.zeros(1, 2), train=True, shuffle_buffer=0, seed=seed, rank=rank)
        return _keys_of(ds, 12)

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and keys(0) != keys(0, seed=1)
    assert _rank_worker_seed(rank=1) != _rank_worker_seed(rank=0)
    first_worker = keys(0)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: types.SimpleNamespace(id=1, num_workers=2))
    assert keys(0) != first_worker  # the second DataLoader worker of rank 0 draws its own sequence
    assert _rank_worker_seed(rank=0) == 1 and _rank_worker_seed(rank=1) == 1001


def test_pipe_urls_webp_and_json_fields(tmp_path):
    """README: `pipe:` commands and img2dataset's webp / json fields."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, format="WEBP", lossless=True)
    with ShardWriter(str(tmp_path / "w-%06d.tar")) as w:
        w.write("a", buf.getvalue(), caption="a green square", image_ext="webp", meta={"url": "http://x", "width": 20})
    path = str(tmp_path / "w-000000.tar")
    plain = list(make_dataset([path], lambda im: torch.tensor(list(im.getpixel((5, 5)))), lambda t: torch.zeros(1, 2), train=False))
    piped = list(make_dataset([f"pipe:cat {path}"], lambda im: torch.tensor(list(im.getpixel((5, 5)))), lambda t: torch.zeros(1, 2), train=False))
    assert len(plain) == len(piped) == 1
    assert plain[0]["image"].tolist() == piped[0]["image"].tolist() == [10, 200, 30]


_PARENT_STATE = {"set_at_run_time": None}


class _ReportsParentState(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield {"keys": [str(_PARENT_STATE["set_at_run_time"])]}


def test_workers_are_forked_in_a_rank_that_was_spawned(tmp_path):
    """Planted: WatchedLoader leaving the workers' start method to the process default. A rank
    that Lightning started with "spawn" inherits "spawn" as that default (multiprocessing's
    `prepare` sets it, as done here), and every DataLoader worker would then be a fresh
    interpreter importing torch, Lightning and open_clip again, at every validation. A forked
    worker sees state its parent set at run time; a spawned one re-imports this module and
    does not. The data module's loaders carry the same choice."""
    import multiprocessing

    from vlmoe.data.watch import WatchedLoader

    write_split(str(tmp_path / "t-%06d.tar"), 4, 0, 4)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    _PARENT_STATE["set_at_run_time"] = "parent"
    try:
        with deadline(120):
            batches = list(WatchedLoader(_ReportsParentState(), batch_size=None, num_workers=1, what="test"))
        dm = _module(str(tmp_path / "t-000000.tar"), str(tmp_path / "t-000000.tar"), 0)
        loader = dm.train_dataloader()
    finally:
        multiprocessing.set_start_method(before, force=True)
        _PARENT_STATE["set_at_run_time"] = None
    assert [b["keys"] for b in batches] == [["parent"]]
    assert loader.multiprocessing_context.get_start_method() == "fork"
    # a context the caller chose is kept
    spawned = WatchedLoader(_ReportsParentState(), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert spawned.multiprocessing_context.get_start_method() == "spawn"
