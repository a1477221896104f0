"""ClipDataModule across ranks and DataLoader workers, through the data module itself (issue #24)."""
from types import SimpleNamespace

from conftest import write_split
from helpers import deadline
from vlmoe.data import ClipDataModule


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
