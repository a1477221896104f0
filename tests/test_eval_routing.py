"""Evaluation must not depend on the evaluation batch (issue #17): per-example routing by
default, batch-level routing and dropless as explicit choices, and every reported number
saying which it used."""
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import vlmoe
from vlmoe.cli import zeroshot_main
from vlmoe.data.text import DIGIT_NAMES, DIGIT_TEMPLATES
from vlmoe.eval.zeroshot import build_classifier
from vlmoe.errors import ConfigError
from vlmoe.moe import SparseMoE
from vlmoe.moe import parallel as par
from helpers import start_ranks


def _model(name, **moe):
    torch.manual_seed(0)
    model = vlmoe.create_model(name, moe=moe or {}).eval()
    with torch.no_grad():  # a skewed router, so capacity binds and batch-level routing drops tokens
        for layer in model.moe_layers():
            layer.router.weight.mul_(4.0)
    return model


def _logits(model, images, classifier, chunk, order=None):
    order = torch.arange(images.shape[0]) if order is None else order
    feats = torch.cat([model.encode_image(images[order][i:i + chunk], normalize=True) for i in range(0, len(order), chunk)])
    out = torch.empty_like(feats)
    out[order] = feats
    return out @ classifier


@pytest.mark.parametrize("name", ["limoe-tiny", "limoe-tiny-single"])
def test_default_evaluation_is_the_same_for_any_batch_size_and_order(name):
    """Planted: per-example groups off (the batch as one group); per-example capacity from
    the fullest caption of the batch."""
    model = _model(name)
    tok = vlmoe.get_tokenizer(model)
    assert model.eval_routing()["eval_routing"] == "per_example"
    torch.manual_seed(1)
    images = torch.randn(64, 3, 32, 32)
    classifiers = [build_classifier(model, tok, DIGIT_NAMES, DIGIT_TEMPLATES)]
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    classifiers.append(build_zero_shot_classifier(model, tok, DIGIT_NAMES, DIGIT_TEMPLATES, num_classes_per_batch=3,
                                                  device="cpu", use_tqdm=False))  # prompts in other batches
    torch.testing.assert_close(classifiers[0], classifiers[1], atol=1e-6, rtol=1e-5)
    ref = _logits(model, images, classifiers[0], 64)
    for chunk, order in ((1, None), (7, None), (64, torch.randperm(64, generator=torch.Generator().manual_seed(2)))):
        got = _logits(model, images, classifiers[0], chunk, order)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.argmax(1), ref.argmax(1))
    # captions: the same in any company, padding of any length beside them
    texts = tok(["a photo of the digit seven", "7", "a very very long caption about a handwritten number seven"])
    alone = torch.cat([model.encode_text(texts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(model.encode_text(texts), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["limoe-tiny", "limoe-tiny-single"])
def test_batch_routing_is_batch_dependent_when_capacity_binds(name):
    """eval_routing="batch" reproduces V-MoE's batch-level evaluation: the same images in
    other partitions give other logits when capacity binds."""
    model = _model(name, eval_routing="batch", eval_capacity_factor=0.5)
    torch.manual_seed(1)
    images = torch.randn(64, 3, 32, 32)
    classifier = build_classifier(model, vlmoe.get_tokenizer(model), DIGIT_NAMES, DIGIT_TEMPLATES)
    whole, chunks = _logits(model, images, classifier, 64), _logits(model, images, classifier, 7)
    assert (whole - chunks).abs().max() > 1e-3
    assert model.moe_layers()[0].aux["image"].stats["dropped_frac"] > 0
    # dropless is batch-invariant too
    model.set_eval_routing("dropless")
    torch.testing.assert_close(_logits(model, images, classifier, 64), _logits(model, images, classifier, 7), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_per_example_groups_respect_text_padding(router):
    """Each caption is routed alone, with capacity from its own real tokens: the same output
    as the caption without padding and without the others. Planted: capacity from the batch's
    fullest caption (per-group capacity off)."""
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, router=router, capacity_factor=0.5, noise_scale=0.0, multiple_of=1).eval()
    x = torch.randn(3, 12, 16)
    lengths = [12, 3, 7]
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    y = moe(x, mask=mask)
    assert (y[~mask] == 0).all()
    for i, n in enumerate(lengths):
        torch.testing.assert_close(y[i, :n], moe(x[i:i + 1, :n])[0], atol=1e-6, rtol=1e-5)
    assert float(moe.aux[None].stats["dropped_token_frac"]) > 0  # capacity binds


def test_eval_settings_are_checked_and_training_is_unchanged():
    with pytest.raises(ConfigError, match="unknown eval_routing 'sometimes'"):
        SparseMoE(8, eval_routing="sometimes")
    with pytest.raises(ConfigError, match="dropless' needs a router that picks experts per token"):
        SparseMoE(8, router="expert_choice", eval_routing="dropless")
    with pytest.raises(ConfigError, match=r"^eval_capacity_factor must be a finite number > 0; got -1.0$"):
        SparseMoE(8, eval_capacity_factor=-1.0)
    torch.manual_seed(0)
    a = SparseMoE(16, 32, num_experts=4, capacity_factor=0.5, noise_scale=0.0).train()
    b = SparseMoE(16, 32, num_experts=4, capacity_factor=0.5, noise_scale=0.0, eval_routing="batch").train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 10, 16)
    torch.testing.assert_close(a(x), b(x))  # training routes the batch as configured, whatever eval_routing says


def test_a_checkpoint_from_before_eval_routing_loads_with_the_new_default(tmp_path):
    model = _model("limoe-tiny")
    out = vlmoe.save_pretrained(model, tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    for k in ("eval_routing", "eval_capacity_factor"):
        del cfg["moe"][k]  # as an export written before this change
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = vlmoe.create_model(str(out)).eval()
    assert loaded.eval_routing() == {"eval_routing": "per_example", "eval_capacity_factor_image": 1.0, "eval_capacity_factor_text": 1.0}
    images = torch.randn(16, 3, 32, 32)
    whole = loaded.encode_image(images)
    torch.testing.assert_close(torch.cat([loaded.encode_image(images[i:i + 5]) for i in range(0, 16, 5)]), whole, atol=1e-5, rtol=1e-5)


def test_zeroshot_rows_and_validation_metrics_say_how_they_routed(shards, tmp_path):
    from vlmoe.cli import cli_main

    from helpers import train_args

    cli = cli_main(train_args(shards, tmp_path, steps=2))  # one epoch: validation at its end
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/eval_routing/per_example"]) == 1.0 and float(metrics["val/eval_capacity_factor/image"]) == 1.0
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    common = ["--data", shards["zeroshot"], "--classnames", shards["classnames"], "--templates", shards["templates"],
              "--num-workers", "0", "--json"]
    rows = zeroshot_main(["--model", str(ckpt), "--model", "clip-tiny", *common])
    assert rows[0]["eval_routing"] == "per_example" and rows[0]["eval_capacity_factor_text"] == 1.0
    assert rows[1]["eval_routing"] is None  # dense
    by_batch = [zeroshot_main(["--model", str(ckpt), "--batch-size", str(b), *common])[0]["top1"] for b in (1, 5, 24)]
    assert by_batch[0] == by_batch[1] == by_batch[2]
    rows = zeroshot_main(["--model", str(ckpt), "--eval-routing", "batch", "--eval-capacity-factor", "0.5", *common])
    assert rows[0]["eval_routing"] == "batch" and rows[0]["eval_capacity_factor_image"] == 0.5


# -- under expert parallelism ---------------------------------------------------------------------------
EP_CASES = [("topk", dict(top_k=2, capacity_factor=0.5)), ("expert_choice", dict(router="expert_choice", capacity_factor=0.5))]


def _ep_layer(kwargs):
    torch.manual_seed(0)
    return SparseMoE(16, 32, num_experts=4, noise_scale=0.0, multiple_of=1, implementation="loop", **kwargs).eval()


def _ep_inputs(rank):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(3, 9, 16, generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 7:] = False
    return x, mask


def _ep_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    groups = par.init_expert_parallel(world)
    out = {}
    for name, kwargs in EP_CASES:
        layer = _ep_layer(kwargs)
        par.shard_experts(layer, groups)
        x, mask = _ep_inputs(rank)
        with torch.no_grad():
            out[name] = layer(x, mask=mask)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_per_example_routing_under_expert_parallelism_equals_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_ep_worker, 2, 2, port, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        x, mask = _ep_inputs(rank)
        for name, kwargs in EP_CASES:
            torch.testing.assert_close(got[name], _ep_layer(kwargs)(x, mask=mask), atol=1e-6, rtol=1e-5, msg=f"{name} rank {rank}")
