"""Every user mistake is one `PROG: error:` line with status 2, no traceback (issue #23).
Console scripts' messages go through the same run_console in this process (`helpers.console`;
their installed scripts' exit statuses: test_console_scripts); API mistakes are raised in process."""
import json
import sys
import time

import pytest
import torch

from helpers import CONFIGS, QUIET, ROOT, console, data_args, fit_args, last_line
from vlmoe.errors import CheckpointError, ConfigError, DataError, NotFound, VLMoEError


def one_error_line(p, prog: str, *fragments: str) -> str:
    """The run failed as a user mistake: status 2, no traceback, the last stderr line is the
    error and names each fragment."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    line = last_line(p.stderr)
    assert line.startswith(f"{prog}: error: "), p.stderr[-2000:]
    for f in fragments:
        assert f in line, (f, line)
    return line


def zs(shards, *args):
    return ["--model", "clip-tiny", "--data", shards["zeroshot"], "--classnames", shards["classnames"],
            "--templates", shards["templates"], *args]


def test_zeroshot_and_routing_mistakes(shards, tmp_path, capsys):
    """--num-workers -3, a device torch does not know or the machine lacks, an --out that is
    a file, and a capacity factor with dropless routing were tracebacks or silently dropped."""
    from vlmoe.cli import routing_main, zeroshot_main

    p = console(zeroshot_main, "vlmoe-zeroshot", zs(shards, "--num-workers", "-3"), capsys)
    one_error_line(p, "vlmoe-zeroshot", "--num-workers must be >= 0", "-3")
    p = console(zeroshot_main, "vlmoe-zeroshot", zs(shards, "--device", "tpu9"), capsys)
    one_error_line(p, "vlmoe-zeroshot", "--device 'tpu9' is not a device name torch knows")
    if not torch.cuda.is_available():
        p = console(zeroshot_main, "vlmoe-zeroshot", zs(shards, "--device", "cuda"), capsys)
        one_error_line(p, "vlmoe-zeroshot", "--device cuda: this machine has no cuda device")
    p = console(zeroshot_main, "vlmoe-zeroshot", zs(shards, "--eval-routing", "dropless", "--eval-capacity-factor", "2"), capsys)
    one_error_line(p, "vlmoe-zeroshot", "--eval-capacity-factor has no effect with --eval-routing dropless")
    (tmp_path / "taken").write_text("x")
    p = console(routing_main, "vlmoe-routing", ["--model", "limoe-tiny", "--data", shards["val"], "--out", tmp_path / "taken"], capsys)
    one_error_line(p, "vlmoe-routing", f"--out {tmp_path / 'taken'} is a file")
    p = console(routing_main, "vlmoe-routing", ["--model", "limoe-tiny", "--data", shards["val"], "--out", tmp_path / "r",
                                                "--device", "nope"], capsys)
    one_error_line(p, "vlmoe-routing", "--device 'nope' is not a device name torch knows")


def test_a_model_name_without_weights_is_said_to_be_random(shards, tmp_path, capsys):
    """vlmoe-zeroshot --model limoe-tiny and `vlmoe validate` without a checkpoint reported
    10% top-1 with exit 0 and not a word about the weights being random."""
    from vlmoe.cli import cli_main, zeroshot_main

    p = console(zeroshot_main, "vlmoe-zeroshot", zs(shards, "--num-workers", "0", "--json"), capsys)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "vlmoe-zeroshot: note: clip-tiny is a model name, not weights: it is evaluated with random initial weights" in p.stderr
    assert json.loads(p.stdout)[0]["n"] == 24  # the note is on stderr: stdout stays JSON
    p = console(cli_main, "vlmoe", ["validate", "--config", CONFIGS / "limoe_tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'v'}",
                                     *data_args(shards, train_shards="null", zeroshot_shards="null"), "--data.val_batch_size=8",
                                     *QUIET], capsys)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "vlmoe: note: validate without --ckpt_path or --model.pretrained evaluates randomly initialised weights" in p.stderr


@pytest.mark.parametrize("case", ["unknown flag", "unknown key in a file", "wrong type", "bad yaml", "missing config",
                                  "predict", "lr -1", "noise NaN string", "negative loss weight", "timeout 0"])
def test_config_mistakes_are_one_line(shards, tmp_path, case, capsys):
    """jsonargparse printed ~73 lines of usage with the error last and no `vlmoe: error:`;
    `vlmoe predict` (offered by --help) and bad values failed late or not at all."""
    cfg = CONFIGS / "limoe_tiny.yaml"
    args, fragments = {
        "unknown flag": (["fit", "--config", cfg, "--model.nope", "1"], ["unrecognized arguments: --model.nope 1", "vlmoe fit --help"]),
        "unknown key in a file": (["fit", "--config", tmp_path / "unk.yaml"], ["does not accept option 'model.nope'"]),
        "wrong type": (["fit", "--config", cfg, "--trainer.max_steps", "many"], ['"trainer.max_steps"', "many"]),
        "bad yaml": (["fit", "--config", tmp_path / "bad.yaml"], ["Problems parsing config"]),
        "missing config": (["fit", "--config", tmp_path / "missing.yaml"], ["File does not exist", "missing.yaml"]),
        "predict": (["predict", "--config", cfg], ["invalid choice: 'predict'", "'fit', 'validate', 'test'"]),
        "lr -1": (fit_args(shards, tmp_path / "r", extra=["--model.lr=-1"]), ["--model.lr must be a finite number >= 0; got -1.0"]),
        "noise NaN string": (fit_args(shards, tmp_path / "r", extra=['--model.model_overrides={"moe": {"noise_scale": "NaN"}}']),
                             ["noise_scale must be a finite number >= 0; got 'NaN'"]),
        "negative loss weight": (fit_args(shards, tmp_path / "r", extra=['--model.model_overrides={"moe": {"z_loss_weight": -0.1}}']),
                                 ["z_loss_weight must be a finite number >= 0; got -0.1"]),
        "timeout 0": (fit_args(shards, tmp_path / "r", extra=["--data.timeout=0"]), ["--data.timeout must be a finite number > 0 (seconds); got 0"]),
    }[case]
    (tmp_path / "unk.yaml").write_text("model:\n  nope: 1\n")
    (tmp_path / "bad.yaml").write_text("model:\n  lr: [1\n")
    from vlmoe.cli import cli_main

    p = console(cli_main, "vlmoe", args, capsys)
    one_error_line(p, "vlmoe", *fragments)
    assert p.stderr.count("usage:") == 0 and len(p.stderr.splitlines()) < 12, p.stderr


def test_checkpoint_path_mistakes(shards, tmp_path, capsys):
    """A folder as --ckpt_path got "no such file"; a .safetensors file renamed .ckpt was told
    it should be "... or a .safetensors file"."""
    from safetensors.torch import save_file

    run = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, run / "last.ckpt")
    from vlmoe.cli import cli_main

    p = console(cli_main, "vlmoe", fit_args(shards, tmp_path / "r", extra=[f"--ckpt_path={tmp_path / 'run'}"]), capsys)
    one_error_line(p, "vlmoe", f"--ckpt_path {tmp_path / 'run'} is a folder", f"e.g. --ckpt_path {run / 'last.ckpt'}")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.ckpt"))
    from vlmoe.models.checkpoint import read_checkpoint

    with pytest.raises(CheckpointError, match=r"weights.ckpt is a safetensors file .* rename it to weights.safetensors"):
        read_checkpoint(tmp_path / "weights.ckpt")
    with pytest.raises(NotFound, match=r"is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path / "run")


def test_shard_spec_mistakes(tmp_path):
    """A glob that matches files was reported as "not found", with no word that only braces
    are expanded."""
    from vlmoe.data import expand_shards

    for i in range(2):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"is a glob pattern \(it matches 2 file\(s\)\); shard lists are brace-expanded"):
        expand_shards(str(tmp_path / "train-*.tar"))
    with pytest.raises(DataError, match=r"is a folder: name the .tar shards in it"):
        expand_shards(str(tmp_path))
    assert len(expand_shards(str(tmp_path / "train-{000000..000001}.tar"))) == 2


def test_script_outputs_under_a_file(shards, tmp_path, capsys):
    """make_shards.py with an output folder under a file, and export.py to a path that is a
    file, ended in tracebacks."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "caps.csv").write_text("image,caption\n")
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    p = subprocess.run([sys.executable, ROOT / "scripts" / "make_shards.py", "captions", "--images", tmp_path / "imgs", "--captions",
                        tmp_path / "caps.csv", "--out", tmp_path / "file" / "s-%06d.tar"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    one_error_line(p, "make_shards.py", f"the output folder {tmp_path / 'file'} is a file")
    p = console(make_shards.main, "make_shards.py", ["benchmark", "--shards", shards["zeroshot"], "--classnames", shards["classnames"],
                                                     "--templates", shards["templates"], "--out", tmp_path / "file" / "bench"], capsys)
    one_error_line(p, "make_shards.py", f"is under {tmp_path / 'file'}, which is a file")
    import vlmoe

    with pytest.raises(ConfigError, match=r"the export folder .*file is a file: name a folder"):
        vlmoe.save_pretrained(vlmoe.create_model("clip-tiny"), tmp_path / "file")


def test_benchmark_mistakes(shards, tmp_path, capsys):
    """vlmoe-benchmark with a missing or empty --dataset_root, and `build` of a missing JSON,
    ended in tracebacks from CLIP_benchmark."""
    common = ["eval", "--model_type", "vlmoe", "--model", "clip-tiny", "--pretrained", "none", "--dataset", "wds/digits",
              "--task", "zeroshot_classification", "--output", tmp_path / "out.json"]
    from vlmoe.eval.benchmark import main

    p = console(main, "vlmoe-benchmark", [*common, "--dataset_root", tmp_path / "nope"], capsys)
    one_error_line(p, "vlmoe-benchmark", f"--dataset_root {tmp_path / 'nope'}: no such folder", "make_shards.py benchmark")

    (tmp_path / "empty").mkdir()
    p = console(main, "vlmoe-benchmark", [*common, "--dataset_root", tmp_path / "empty"], capsys)
    one_error_line(p, "vlmoe-benchmark", "has no shards in", "test")
    p = console(main, "vlmoe-benchmark", ["build", tmp_path / "missing.json", "--output", tmp_path / "b.csv"], capsys)
    one_error_line(p, "vlmoe-benchmark", f"build: result file not found: {tmp_path / 'missing.json'}")
    (tmp_path / "notes.json").write_text('{"a": 1}')
    p = console(main, "vlmoe-benchmark", ["build", tmp_path / "notes.json", "--output", tmp_path / "b.csv"], capsys)
    one_error_line(p, "vlmoe-benchmark", "is not a result of vlmoe-benchmark eval")


def test_moe_values_are_checked_where_they_are_given():
    """NaN or negative noise trained as no noise; negative loss weights were accepted; a
    negative eval_capacity_factor was reported as capacity_factor."""
    from vlmoe.moe import SparseMoE

    for bad in (float("nan"), -1.0, "NaN", float("inf")):
        with pytest.raises(ConfigError, match="noise_scale must be a finite number >= 0"):
            SparseMoE(8, 16, num_experts=4, noise_scale=bad)
    for k in ("importance_weight", "load_weight", "balance_weight", "z_loss_weight", "local_entropy_weight", "global_entropy_weight"):
        with pytest.raises(ConfigError, match=f"^{k} must be a finite number >= 0; got -0.5$"):
            SparseMoE(8, 16, num_experts=4, **{k: -0.5})
        with pytest.raises(ConfigError, match=rf"^{k} \(moe.text\) must be a finite number >= 0; got -1$"):
            SparseMoE(8, 16, num_experts=4, modality_overrides={"text": {k: -1}})
    with pytest.raises(ConfigError, match=r"^eval_capacity_factor must be a finite number > 0; got -1.0$"):
        SparseMoE(8, 16, num_experts=4, eval_capacity_factor=-1.0)
    with pytest.raises(ConfigError, match=r"^eval_capacity_factor must be a finite number > 0; got -2$"):
        SparseMoE(8, 16, num_experts=4).configure_eval(eval_capacity_factor=-2)
    assert SparseMoE(8, 16, num_experts=4, noise_scale=0.5).noise_scale == 0.5


def test_upcycling_checks_its_settings_before_any_download(monkeypatch):
    """upcycle_open_clip(num_experts=0) spent 53 s on a download before checking."""
    from vlmoe.models import upcycle

    def no_download(*a, **k):
        raise AssertionError("a download was attempted before the settings were checked")

    monkeypatch.setattr(upcycle, "load_open_clip", no_download)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="num_experts must be an integer >= 1; got 0"):
        upcycle.upcycle_open_clip("ViT-B-32", pretrained="openai", num_experts=0)
    with pytest.raises(ConfigError, match="router_init_std must be a finite number >= 0"):
        upcycle.upcycle_open_clip("ViT-B-32", pretrained="openai", router_init_std=-1)
    with pytest.raises(ConfigError, match=r"top_k must be in \[1, num_experts=4\]"):
        upcycle.upcycle_timm_vit("nope.safetensors", num_experts=4, top_k=5, model_name="vit_tiny_patch16_224")
    assert time.monotonic() - t0 < 5


def test_push_to_hub_without_network_is_one_line(monkeypatch):
    """A raw connection error, where the loaders have an offline message."""
    import vlmoe
    from vlmoe.models.hub import push_to_hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(VLMoEError, match=r"^push_to_hub me/tiny: the Hub cannot be reached \(\w+\); nothing was uploaded"):
        push_to_hub(vlmoe.create_model("clip-tiny"), "me/tiny", token="hf_fake")


def test_zeroshot_batch_size_beyond_the_data(shards, tmp_path, capsys):
    """--batch-size 1e10 allocated until memory ran out (torch's BatchSampler builds a list of
    batch_size entries up front on an ImageFolder), and `1e10` itself printed the usage."""
    from conftest import make_image
    from vlmoe.cli import zeroshot_main

    for i, color in enumerate(("red", "green")):
        (tmp_path / "folder" / color).mkdir(parents=True)
        (tmp_path / "folder" / color / "a.jpg").write_bytes(make_image(color, "square", seed=i))
    rows = zeroshot_main(["--model", "clip-tiny", "--data", str(tmp_path / "folder"), "--classnames", shards["classnames"],
                          "--templates", shards["templates"], "--batch-size", str(10**10), "--num-workers", "0", "--json"])
    assert rows[0]["n"] == 2
    p = console(zeroshot_main, "vlmoe-zeroshot", zs(shards, "--batch-size", "1e10"), capsys)
    assert one_error_line(p, "vlmoe-zeroshot", "invalid int value: '1e10'") and "usage:" not in p.stderr
