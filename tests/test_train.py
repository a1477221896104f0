import math
from pathlib import Path

import lightning as L
import pytest
import torch

import vlmoe
from vlmoe.cli import cli_main
from vlmoe.data import ClipDataModule
from vlmoe.train import LIMoEModule
from helpers import FAST, read_metrics, run_ddp_step, train_args
import os
import threading
from vlmoe.errors import ConfigError
from vlmoe.moe import SparseMoE
from vlmoe.train.lightning_cli import claim_version_dir
from helpers import CONFIGS, fit_args  # noqa: F401
import types


@pytest.mark.parametrize("config,moe", [("limoe_tiny.yaml", True), ("clip_tiny.yaml", False)])
def test_fit_end_to_end_through_the_cli(shards, tmp_path, config, moe):
    cli = cli_main(train_args(shards, tmp_path, config, sanity=True))
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
    cli = cli_main(train_args(shards, tmp_path, steps=2))
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
    cli = cli_main(train_args({**shards, "train": shards["bad"]}, tmp_path, steps=6, extra=["--data.samples_per_epoch=48"]))
    metrics = read_metrics(Path(cli.trainer.log_dir))
    assert cli.trainer.global_step == 6 and metrics["data/skipped_samples"][-1] > 0


def test_resume_continues_steps_and_optimizer_state(shards, tmp_path):
    first = cli_main(train_args(shards, tmp_path / "a", steps=3, extra=["--model.checkpoint_every_n_steps=2"]))
    ckpt_dir = Path(first.trainer.log_dir) / "checkpoints"
    assert (ckpt_dir / "step0000002.ckpt").exists() and (ckpt_dir / "last.ckpt").exists()
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and saved["optimizer_states"][0]["state"]
    second = cli_main(train_args(shards, tmp_path / "b", steps=5, extra=[f"--ckpt_path={ckpt_dir / 'last.ckpt'}"]))
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
        cli_main(train_args(shards, tmp_path, steps=1, extra=[f"--ckpt_path={tmp_path / 'missing.ckpt'}"]))


def test_two_process_ddp_gradients_equal_single_process(tmp_path):
    single = run_ddp_step(1, 8, tmp_path / "single.pt")
    ddp = run_ddp_step(2, 4, tmp_path / "ddp.pt")  # each rank sees half, the loss the global batch
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

    cli = cli_main(train_args(shards, tmp_path / "run", steps=1, extra=['--model.model_overrides={"moe": {"num_experts": 4}}']))
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    run("scripts/export.py", str(ckpt), str(tmp_path / "export"))
    model = vlmoe.create_model(str(tmp_path / "export"))
    assert model.moe_layers()[0].num_experts == 4
    for k, v in cli.model.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("routing_groups", ["per_modality", "joint"])
def test_bf16_mixed_and_grad_checkpointing_fit(shards, tmp_path, routing_groups):
    cli = cli_main(train_args(shards, tmp_path, steps=2, extra=[
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
            # issue #27: every real token's first choice counted once, dropped or not
            top1 = module.routing_top1[(layer, m)].double()
            assert int(top1.sum()) == n
            share = top1[top1 > 0] / n
            logged = float(trainer.callback_metrics[f"val/effective_experts_top1/layer{layer}/{m}"])
            assert logged == pytest.approx(float(torch.exp(-(share * share.log()).sum())), rel=1e-5)
    assert float(trainer.callback_metrics["val/skipped_samples"]) == 0


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    """The GPU configs are not run here; they must at least be valid for `vlmoe fit`."""
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "trainer:" in printed


# -- moved from test_first_contact (issues #11, #16) -------------------------------------------------


# -- 9: silent wrong results and lost data ---------------------------------------------------------
def test_ckpt_path_never_silently_replaces_the_configured_model(shards, tmp_path, capsys):
    first = cli_main(fit_args(shards, tmp_path / "a", steps=1, config="clip_tiny.yaml"))
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="holds a clip-tiny model .* but the config asks for limoe-tiny"):
        cli_main(fit_args(shards, tmp_path / "b", steps=2, config="limoe_tiny.yaml", extra=[f"--ckpt_path={ckpt}"]))
    # a flag given on a resume wins, and the run's config says what ran
    resumed = cli_main(fit_args(shards, tmp_path / "c", steps=2, config="clip_tiny.yaml", extra=[f"--ckpt_path={ckpt}", "--model.lr=0.5"]))
    assert resumed.model.hparams.lr == 0.5 and resumed.trainer.global_step == 2
    assert "--model.lr=0.5 from the config / command line replaces the checkpoint's 0.001" in capsys.readouterr().err
    saved = (Path(resumed.trainer.log_dir) / "config.yaml").read_text()
    assert "lr: 0.5" in saved and "model_name: clip-tiny" in saved
    # nothing said about the model: the checkpoint's model is resumed
    adopted = cli_main(fit_args(shards, tmp_path / "d", steps=2, config=None, extra=[f"--ckpt_path={ckpt}", "--trainer.accelerator=cpu"]))
    assert adopted.model.hparams.model_name == "clip-tiny" and adopted.model.hparams.lr == 1e-3


def test_runs_started_at_once_claim_distinct_output_folders(tmp_path):
    """Defect 9: two fits into the same folder both wrote version_0."""
    barrier = threading.Barrier(12)
    got = []

    def claim():
        barrier.wait()
        got.append(claim_version_dir(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == list(range(12))
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    if os.geteuid() != 0:  # root writes anyway
        with pytest.raises(ConfigError, match="cannot create the output folder"):
            claim_version_dir(tmp_path / "readonly" / "x")


# -- 10: interrupted runs ----------------------------------------------------------------------
def test_checkpoint_writes_stay_in_the_run_folder(tmp_path, monkeypatch):
    """Defect 10: a killed save left a truncated file in the system temp folder. Here the
    rename is made to fail, as if the process died before it."""
    import tempfile

    from vlmoe.train.module import AtomicCheckpointIO

    sysdir = tmp_path / "systmp"
    sysdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sysdir))
    path = tmp_path / "ckpts" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        io_.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}  # the previous checkpoint is intact
    assert (tmp_path / "ckpts" / ".last.ckpt.partial").exists() and not list(sysdir.iterdir())


# -- moved from test_promises (issues #11, #16) ------------------------------------------------------


def test_learning_rate_is_linear_warmup_then_cosine():
    """README: linear warmup + cosine to min_lr_ratio * lr at max_steps. Planted: the
    warmup off by one step, the cosine without its min_lr floor."""
    module = LIMoEModule("clip-tiny", lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=14)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.25, 0.5, 0.75, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    assert lrs == pytest.approx(expected)


def test_routing_picture_goes_to_tensorboard_when_the_logger_has_one(shards, tmp_path):
    """README: the routing picture is a PNG in <log_dir>/routing and is sent to TensorBoard
    (any logger whose experiment has add_figure)."""
    from lightning.pytorch.loggers import CSVLogger

    figures = []

    class FigureLogger(CSVLogger):
        @property
        def experiment(self):
            exp = super().experiment
            exp.add_figure = lambda tag, fig, step: figures.append((tag, step, fig.axes[0].get_title()))
            return exp

    module = LIMoEModule("limoe-tiny")
    dm = ClipDataModule(val_shards=shards["val"], batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=FigureLogger(str(tmp_path)), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(module, datamodule=dm)
    assert figures == [("val/routing", 0, "val routing at step 0")]
    assert module.last_routing_picture.is_file() and module.last_routing_picture.parent.name == "routing"


def test_bf16_and_activation_checkpointing_are_active_in_the_fit_that_claims_them(shards, tmp_path, monkeypatch):
    """README: --trainer.precision bf16-mixed and --model.grad_checkpointing true. Planted:
    grad_checkpointing not applied by the module."""
    from vlmoe.cli import cli_main

    from helpers import train_args

    calls = {"checkpoint": 0, "bf16": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls["checkpoint"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    orig_forward = SparseMoE.forward

    def record(self, x, *a, **k):
        calls["bf16"] += x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
        return orig_forward(self, x, *a, **k)

    monkeypatch.setattr(SparseMoE, "forward", record)
    cli = cli_main(train_args(shards, tmp_path, steps=1, extra=["--trainer.precision=bf16-mixed", "--model.grad_checkpointing=true",
                                                               "--data.val_shards=null", "--data.zeroshot_shards=null"]))
    assert cli.trainer.global_step == 1
    assert calls["checkpoint"] >= 8  # 4 image + 4 text blocks of limoe-tiny, one training step
    assert calls["bf16"] >= 4  # every MoE call of the step ran under bf16 autocast
