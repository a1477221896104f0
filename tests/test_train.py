import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import vlmoe
from vlmoe.cli import cli_main
from vlmoe.data import ClipDataModule, collate
from vlmoe.train import LIMoEModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0"]


def fit_args(shards, root, config="limoe_tiny.yaml", steps=4, extra=()):
    return [
        "fit", "--config", str(CONFIGS / config),
        f"--data.train_shards={shards['train']}", f"--data.val_shards={shards['val']}",
        f"--data.zeroshot_shards={shards['zeroshot']}", f"--data.classnames={shards['classnames']}",
        f"--data.templates={shards['templates']}", f"--trainer.max_steps={steps}", "--data.batch_size=8",
        "--data.val_batch_size=8", "--data.samples_per_epoch=16", "--model.warmup_steps=2",
        f"--trainer.default_root_dir={root}", *FAST, *extra,
    ]


def read_metrics(log_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(log_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    out.setdefault(k, []).append(float(v))
    return out


@pytest.mark.parametrize("config,moe", [("limoe_tiny.yaml", True), ("clip_tiny.yaml", False)])
def test_fit_end_to_end_through_the_cli(shards, tmp_path, config, moe):
    cli = cli_main(fit_args(shards, tmp_path, config))
    trainer = cli.trainer
    assert trainer.global_step == 4
    log_dir = Path(trainer.log_dir)
    metrics = read_metrics(log_dir)
    for key in ("train/loss", "train/clip_loss", "train/logit_scale", "train/lr", "perf/samples_per_sec",
                "val/image_to_text_R@1", "val/text_to_image_R@5", "val/zeroshot_top1", "val/zeroshot_top5"):
        assert key in metrics, key
    assert metrics["val/zeroshot_n"][-1] == 24 and metrics["val/retrieval_n"][-1] == 24
    moe_keys = [k for k in metrics if k.startswith("moe/")]
    if moe:
        assert any(k.endswith("/image/importance_loss") for k in moe_keys)
        assert any(k.endswith("/text/local_entropy_loss") for k in moe_keys)
        assert any("/text/expert_load/e" in k for k in moe_keys) and any(k.endswith("/image/dropped_frac") for k in moe_keys)
        pictures = sorted((log_dir / "routing").glob("val_step*.png"))
        assert pictures and pictures[-1].stat().st_size > 1000
    else:
        assert not moe_keys
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.exists()
    model = vlmoe.create_model("limoe-tiny" if moe else "clip-tiny", pretrained=last)
    torch.testing.assert_close(model.state_dict()["logit_scale"], cli.model.model.state_dict()["logit_scale"])


def test_validate_and_test_stages_report_metrics(shards, tmp_path):
    cli = cli_main(fit_args(shards, tmp_path, steps=2))
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    for stage in ("validate", "test"):
        args = [stage, "--config", str(CONFIGS / "limoe_tiny.yaml"), f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}",
                f"--data.val_shards={shards['val']}",
                f"--data.zeroshot_shards={shards['zeroshot']}", f"--data.test_shards={shards['val']}",
                f"--data.zeroshot_test_shards={shards['zeroshot']}", f"--data.classnames={shards['classnames']}",
                f"--data.templates={shards['templates']}", "--data.train_shards=null", "--data.val_batch_size=8", *FAST]
        c = cli_main(args)
        prefix = "val" if stage == "validate" else "test"
        m = c.trainer.callback_metrics
        assert f"{prefix}/image_to_text_R@10" in m
        # the same number as vlmoe-zeroshot on the same checkpoint, images, batches and prompts
        from vlmoe.cli import zeroshot_main

        rows = zeroshot_main(["--model", str(ckpt), "--data", shards["zeroshot"], "--classnames", shards["classnames"],
                              "--templates", shards["templates"], "--batch-size", "8", "--num-workers", "0", "--json"])
        assert float(m[f"{prefix}/zeroshot_top1"]) == pytest.approx(rows[0]["top1"]) and rows[0]["n"] == 24
        assert float(m[f"{prefix}/zeroshot_n"]) == 24


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path):
    # 60 samples, every 10th bad (truncated jpeg, not an image, empty and missing caption)
    dm = ClipDataModule(train_shards=shards["bad"], val_shards=shards["bad"], model_name="limoe-tiny", batch_size=4,
                        val_batch_size=4, num_workers=0)
    seen, skipped = 0, 0
    for batch in dm.val_dataloader()[0]:
        seen += batch["image"].shape[0] if "image" in batch else 0
        skipped += int(batch["skipped"])
    assert (seen, skipped) == (54, 6)
    cli = cli_main(fit_args({**shards, "train": shards["bad"]}, tmp_path, steps=6, extra=["--data.samples_per_epoch=48"]))
    metrics = read_metrics(Path(cli.trainer.log_dir))
    assert cli.trainer.global_step == 6 and metrics["data/skipped_samples"][-1] > 0


def test_resume_continues_steps_and_optimizer_state(shards, tmp_path):
    first = cli_main(fit_args(shards, tmp_path / "a", steps=3, extra=["--model.checkpoint_every_n_steps=2"]))
    ckpt_dir = Path(first.trainer.log_dir) / "checkpoints"
    assert (ckpt_dir / "step0000002.ckpt").exists() and (ckpt_dir / "last.ckpt").exists()
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and saved["optimizer_states"][0]["state"]
    second = cli_main(fit_args(shards, tmp_path / "b", steps=5, extra=[f"--ckpt_path={ckpt_dir / 'last.ckpt'}"]))
    assert second.trainer.global_step == 5
    opt_state = second.trainer.optimizers[0].state_dict()["state"]
    assert int(next(iter(opt_state.values()))["step"]) == 5  # Adam's step counter carried over


def test_bad_input_fails_early_and_clearly(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="1 of 2 train shards not found: .*train-000009.tar"):
        ClipDataModule(train_shards=str(Path(shards["root"]) / "train-{000000,000009}.tar"))
    with pytest.raises(ValueError, match="no train shards"):
        ClipDataModule(train_shards="::")
    with pytest.raises(ValueError, match="val_batch_size=64 is larger than the 24 samples"):
        ClipDataModule(val_shards=shards["val"], batch_size=64)
    with pytest.raises(ValueError, match="classnames"):
        ClipDataModule(zeroshot_shards=shards["zeroshot"], batch_size=8)
    with pytest.raises(ValueError, match="templates need"):
        bad = tmp_path / "t.txt"
        bad.write_text("a photo\n")
        ClipDataModule(zeroshot_shards=shards["zeroshot"], classnames=shards["classnames"], templates=str(bad), batch_size=8)
    with pytest.raises(vlmoe.errors.ConfigError, match="unrecognized arguments: --data.no_such_key=1"):  # one line, not usage
        cli_main(["fit", "--config", str(CONFIGS / "limoe_tiny.yaml"), "--data.no_such_key=1"])
    with pytest.raises(FileNotFoundError):
        cli_main(fit_args(shards, tmp_path, steps=1, extra=[f"--ckpt_path={tmp_path / 'missing.ckpt'}"]))


class PairDataset(Dataset):
    """A fixed global batch, served in order."""

    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        tok = vlmoe.get_tokenizer(16)
        self.texts = tok([f"a caption number {i} of {'many ' * (i % 3)}words" for i in range(n)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "text": self.texts[i], "skipped": 0}


class SaveGrads(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and trainer.global_rank == 0:
            torch.save({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}, self.path)


NO_AUX = {"moe": {"capacity_factor": None, "noise_scale": 0.0, "importance_weight": 0.0, "load_weight": 0.0,
                  "local_entropy_weight": 0.0, "global_entropy_weight": 0.0}}


def _run(devices, per_device_batch, path, overrides=NO_AUX):
    torch.manual_seed(0)
    module = LIMoEModule("limoe-tiny", model_overrides=overrides, warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=1,
        default_root_dir=str(path.parent),
        callbacks=[SaveGrads(path)], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(PairDataset(), batch_size=per_device_batch, shuffle=False, collate_fn=collate)
    trainer.fit(module, train_dataloaders=loader)
    assert not (path.parent / "checkpoints").exists()  # enable_checkpointing=False is respected
    return torch.load(path, weights_only=True)


def test_two_process_ddp_gradients_equal_single_process(tmp_path):
    single = _run(1, 8, tmp_path / "single.pt")
    ddp = _run(2, 4, tmp_path / "ddp.pt")  # each rank sees half, the loss the global batch
    assert single.keys() == ddp.keys() and len(single) > 50
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-4, msg=k)
    assert any(".experts." in k for k in single) and any(".router." in k for k in single)


def test_logit_scale_is_clamped_and_no_decay_groups():
    module = LIMoEModule("limoe-tiny", weight_decay=0.3)
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[i] for i in no_decay}
    for n in ("logit_scale", "positional_embedding", "token_embedding.weight", "ln_final.weight", "visual.class_embedding",
              "visual.transformer.resblocks.1.mlp.experts.b1", "transformer.resblocks.0.mlp.c_fc.bias"):
        assert n in no_decay_names, n
    for n in ("visual.transformer.resblocks.1.mlp.experts.w1", "visual.transformer.resblocks.1.mlp.router.weight",
              "transformer.resblocks.0.mlp.c_fc.weight", "visual.proj"):
        assert names_id(module, n) in decay, n
    with torch.no_grad():
        module.model.logit_scale.fill_(10.0)
    module._t_batch = None
    module.on_train_batch_end(None, {"image": torch.zeros(1)}, 0)
    assert module.model.logit_scale.item() == pytest.approx(math.log(100))


def names_id(module, name):
    return id(dict(module.model.named_parameters())[name])


def test_make_shards_and_export_scripts(tmp_path, shards):
    import importlib.util

    from PIL import Image

    from vlmoe.data import count_samples, expand_shards

    images = tmp_path / "imgs"
    (images / "red_thing").mkdir(parents=True)
    (images / "blue_thing").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (200, 0, 0)).save(images / "red_thing" / f"{i}.png")
        Image.new("RGB", (20, 20), (0, 0, 200)).save(images / "blue_thing" / f"{i}.jpg")
    (tmp_path / "caps.csv").write_text("image,caption\nred_thing/0.png,a red thing\nblue_thing/1.jpg,a blue thing\n")
    (tmp_path / "caps.jsonl").write_text('{"image": "red_thing/2.png", "caption": "red again"}\n')
    def run(script, *args):
        script = CONFIGS.parent / script
        spec = importlib.util.spec_from_file_location(script.stem, script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.main(list(args))
    run("scripts/make_shards.py", "captions", "--images", str(images), "--captions", str(tmp_path / "caps.csv"), "--out", str(tmp_path / "pairs" / "p-%06d.tar"), "--max-count", "1")
    run("scripts/make_shards.py", "captions", "--images", str(images), "--captions", str(tmp_path / "caps.jsonl"), "--out", str(tmp_path / "pairs2" / "p-%06d.tar"))
    run("scripts/make_shards.py", "classes", "--images", str(images), "--out", str(tmp_path / "cls" / "c-%06d.tar"))
    assert count_samples(expand_shards(str(tmp_path / "pairs" / "p-{000000..000001}.tar"))) == 2
    assert (tmp_path / "cls" / "classnames.txt").read_text().split("\n")[:2] == ["blue thing", "red thing"]
    dm = ClipDataModule(zeroshot_shards=str(tmp_path / "cls" / "c-000000.tar"), classnames=str(tmp_path / "cls" / "classnames.txt"),
                        templates="digits", batch_size=2, num_workers=0)
    labels = torch.cat([b["label"] for b in dm.val_dataloader()[0]])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]

    cli = cli_main(fit_args(shards, tmp_path / "run", steps=1, extra=['--model.model_overrides={"moe": {"num_experts": 4}}']))
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    run("scripts/export.py", str(ckpt), str(tmp_path / "export"))
    model = vlmoe.create_model(str(tmp_path / "export"))
    assert model.moe_layers()[0].num_experts == 4
    for k, v in cli.model.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("routing_groups", ["per_modality", "joint"])
def test_bf16_mixed_and_grad_checkpointing_fit(shards, tmp_path, routing_groups):
    cli = cli_main(fit_args(shards, tmp_path, steps=2, extra=[
        "--trainer.precision=bf16-mixed", "--model.grad_checkpointing=true",
        f'--model.model_overrides={{"moe": {{"routing_groups": "{routing_groups}"}}}}']))
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    metrics = read_metrics(Path(cli.trainer.log_dir))
    joint_keys = [k for k in metrics if "/joint/" in k]
    assert bool(joint_keys) == (routing_groups == "joint")
    if joint_keys:  # the union's balance losses, the entropy losses per modality
        assert any(k.endswith("/joint/importance_loss") for k in joint_keys)
        assert not any(k.endswith("/joint/local_entropy_loss") for k in joint_keys)
        assert any(k.endswith("/text/local_entropy_loss") for k in metrics)
    for m in ("image", "text"):  # validation reports LIMoE's collapse measure per layer and modality
        assert 1.0 <= metrics[f"val/effective_experts/layer0/{m}"][-1] <= 8.0


def test_unreadable_shard_is_reported_by_name(shards, tmp_path, caplog):
    broken = tmp_path / "broken-000000.tar"
    broken.write_bytes(b"definitely not a tar archive" * 50)
    dm = ClipDataModule(val_shards=f"{shards['val']}::{broken}", batch_size=8, num_workers=0)
    with caplog.at_level("WARNING", logger="vlmoe.data"):
        n = sum(b["image"].shape[0] for b in dm.val_dataloader()[0] if "image" in b)
    assert n == 24
    assert any(str(broken) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("routing", [{"capacity_factor": None}, {"capacity_factor": None, "routing_groups": "joint", "eval_routing": "batch"},
                                     {"capacity_factor": 0.5}])
def test_evaluation_routing_counts_cover_each_token_once(shards, tmp_path, routing):
    import open_clip

    # joint + batch: joint calls in validation; capacity 0.5: drops, counted in routing_dropped
    module = LIMoEModule("limoe-tiny", model_overrides={"moe": routing})
    dm = ClipDataModule(val_shards=shards["val"], zeroshot_shards=shards["zeroshot"], classnames=shards["classnames"],
                        templates=shards["templates"], batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.validate(module, datamodule=dm)
    assert len(list((tmp_path / "routing").glob("val_step???????.png"))) == 1
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    from vlmoe.data.pipeline import make_dataset

    captions = [s["text"] for s in make_dataset(dm.urls["val"], dm.eval_transform, tok, train=False)]
    n_text = int(sum((c != 0).sum() for c in captions))
    n_image = (24 + 24) * 65  # retrieval + zero-shot images, 64 patches + class token
    assert {m for _, m in module.routing_counts} == {"image", "text"}
    for layer in range(2):
        for m, n in (("text", n_text), ("image", n_image)):
            kept = int(module.routing_counts[(layer, m)].sum())
            dropped, choices = module.routing_dropped[(layer, m)].tolist()
            assert choices == n and dropped == pytest.approx(n - kept, abs=1e-3)  # top-1: one choice per token
            if routing["capacity_factor"] is None:
                assert kept == n
            elif m == "image":  # per example: 65 patches, 8 experts x 8 slots (ceil(65 * 0.5 / 8) rounded up to 4s)
                assert kept < n
            else:  # a caption's few tokens rarely overflow 4 slots per expert
                assert kept <= n
            torch.testing.assert_close(module.routing_mean_gates[(layer, m)].sum(), torch.tensor(1.0))
    assert float(trainer.callback_metrics["val/skipped_samples"]) == 0


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    """The GPU configs are not run here; they must at least be valid for `vlmoe fit`."""
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "trainer:" in printed
