"""What broke when the package was tried as a new user would (issue #11): exit statuses of
the installed console scripts, hangs on unusable data, outputs outside default_root_dir,
silent wrong results, lost data and cryptic errors. Console scripts run as installed
scripts in subprocesses; anything that could hang runs under a deadline that fails the test."""
import ast
import csv
import importlib.util
import io
import json
import os
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlmoe
from vlmoe.cli import cli_main, folder_labels, one_line, zeroshot_main
from vlmoe.data import ClipDataModule, ShardWriter, make_dataset
from vlmoe.data.pipeline import _decode_image
from vlmoe.errors import CheckpointError, ConfigError, DataError, NotFound, VLMoEError
from vlmoe.moe import SparseMoE, losses
from vlmoe.train.lightning_cli import claim_version_dir

from helpers import BIN, CONFIGS, QUIET, ROOT, Hang, data_args, deadline, fit_args, last_line, script  # noqa: F401


def write_pairs(path, images, captions=None):
    """One shard of (image bytes, caption) pairs."""
    with ShardWriter(str(path).replace("000000", "%06d"), max_count=10_000) as w:
        for i, img in enumerate(images):
            w.write(f"{i:06d}", img, caption=(captions[i] if captions else f"caption {i}"))
    return str(path)


def png(color=(200, 0, 0), size=20, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# -- 1, 3, 14, 16: the installed console scripts ---------------------------------------------
def test_installed_scripts_exit_0_and_every_output_is_under_default_root_dir(shards, tmp_path):
    """Defect 1 (exit 1 after success, the CLI object / results list printed) and 3 (the
    shipped config's logger ignored --trainer.default_root_dir)."""
    cwd, root = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    p = script("vlmoe", *fit_args(shards, root), cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "object at 0x" not in p.stdout + p.stderr
    assert last_line(p.stderr) == "vlmoe: fit data: no samples skipped; every shard read"
    assert not any(cwd.iterdir()), list(cwd.iterdir())  # nothing lands in the working folder
    run = root / "lightning_logs" / "version_0"
    written = {str(f.relative_to(run)) for f in run.rglob("*") if f.is_file()}
    assert {"metrics.csv", "config.yaml", "hparams.yaml", "checkpoints/last.ckpt"} <= written, written
    assert any(w.startswith("routing/val_step") and w.endswith(".png") for w in written)
    assert {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()} == {f"lightning_logs/version_0/{w}" for w in written}
    ckpt = run / "checkpoints" / "last.ckpt"

    p = script("vlmoe", "validate", "--config", CONFIGS / "limoe_tiny.yaml", f"--ckpt_path={ckpt}",
               f"--trainer.default_root_dir={root}", *data_args(shards, train_shards="null"), "--data.val_batch_size=8", *QUIET, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert last_line(p.stderr) == "vlmoe: validate data: no samples skipped; every shard read"
    assert (root / "lightning_logs" / "version_1" / "config.yaml").is_file()  # a new run folder, not version_0's

    p = script("vlmoe-zeroshot", "--model", ckpt, "--data", shards["zeroshot"], "--classnames", shards["classnames"],
               "--templates", shards["templates"], "--json", "--num-workers", "0", cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout)  # stdout is pure JSON
    assert [r["n"] for r in rows] == [24] and rows[0]["model"] == str(ckpt)
    assert "[{" not in p.stderr

    p = script("vlmoe-info", "limoe-tiny", "--json", cwd=cwd)
    assert p.returncode == 0 and set(json.loads(p.stdout)) == {"limoe-tiny", "clip-tiny"}


def test_user_mistakes_are_one_line_with_status_2_and_bugs_keep_tracebacks(shards, tmp_path):
    """Defect 14: tracebacks for user mistakes."""
    missing = tmp_path / "gone-{000000..000001}.tar"
    p = script("vlmoe", *fit_args(shards, tmp_path / "r", train_shards=missing), cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert last_line(p.stderr).startswith("vlmoe: error: 2 of 2 train shards not found: ")

    p = script("vlmoe-zeroshot", "--model", "clip-tiny", "--data", shards["zeroshot"], "--classnames", tmp_path / "nope.txt",
               "--templates", "digits", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert last_line(p.stderr) == f"vlmoe-zeroshot: error: class-names file not found: {tmp_path / 'nope.txt'}"

    p = script("vlmoe-info", "limoe-huge", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown model 'limoe-huge'" in p.stderr, p.stderr
    p = script("vlmoe-info", "limoe-huge", cwd=tmp_path, env={"VLMOE_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr  # the traceback, on request


@pytest.mark.parametrize("kind", ["empty tar", "all corrupt"])
def test_fit_on_a_stream_that_yields_nothing_stops_with_a_message(shards, tmp_path, kind):
    """Defect 2: `vlmoe fit` spun forever (100% CPU, deaf to SIGTERM) on such shards."""
    shard = tmp_path / "bad-000000.tar"
    if kind == "empty tar":
        tarfile.open(shard, "w").close()
    else:
        write_pairs(shard, [b"\xff\xd8 not really a jpeg"] * 5)
    t0 = time.monotonic()
    p = script("vlmoe", *fit_args(shards, tmp_path / "r", train_shards=shard), cwd=tmp_path, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    line = last_line(p.stderr)
    assert line.startswith("vlmoe: error: the training shards") and str(shard) in line and "\n" not in line
    assert ("yield no samples" if kind == "empty tar" else "was skipped (corrupt image ") in line
    assert time.monotonic() - t0 < 180


def _first_train_sample(urls, caplog=None):
    ds = make_dataset(urls, lambda im: torch.zeros(1), lambda t: torch.zeros(1, 4, dtype=torch.long), train=True,
                      shuffle_buffer=10)
    with deadline(20):  # the guard stops these streams in well under a second
        return next(iter(ds))


@pytest.mark.parametrize("kind", ["zero-byte", "not a tar", "failing pipe", "undecodable captions"])
def test_training_stream_guard(tmp_path, kind, caplog):
    """Defect 2, the other triggers, and the rate-limited warnings."""
    shard = tmp_path / "s-000000.tar"
    if kind == "zero-byte":
        shard.write_bytes(b"")
    elif kind == "not a tar":
        shard.write_bytes(b"this is a text file, not a tar archive\n" * 100)
    elif kind == "undecodable captions":
        write_pairs(shard, [png()] * 4)
        with tarfile.open(shard) as t:  # rewrite every caption as invalid UTF-8
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(shard, "w") as t:
            for m, data in members:
                data = b"\xff\xfe\xfa" if m.name.endswith(".txt") else data
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))
    url = f"pipe:cat {tmp_path}/does-not-exist.tar" if kind == "failing pipe" else str(shard)
    with caplog.at_level("WARNING", logger="vlmoe.data"), pytest.raises(DataError, match="the training shards") as e:
        _first_train_sample([url])
    assert url in str(e.value)
    assert ("(undecodable caption " in str(e.value)) if kind == "undecodable captions" else ("yield no samples" in str(e.value))
    assert len([r for r in caplog.records if url in r.getMessage()]) <= 2  # 1st and 10th failure at most


def test_guard_lets_a_stream_with_some_bad_shards_run(tmp_path):
    """The guard must not stop a stream whose good shard is one of many broken ones."""
    bad = []
    for i in range(6):
        p = tmp_path / f"bad-{i:06d}.tar"
        p.write_bytes(b"")
        bad.append(str(p))
    good = write_pairs(tmp_path / "good-000000.tar", [png()] * 3)
    sample = _first_train_sample(bad + [good])
    assert sample["image"] is not None


def test_samples_per_epoch_below_one_batch_is_refused():
    """Defect 2: 0 steps per epoch repeated forever."""
    with pytest.raises(ConfigError, match=r"samples_per_epoch=8 gives each of the 1 data streams .* fewer than --data.batch_size=16"):
        ClipDataModule(train_shards=str(ROOT / "data/digits/train-000000.tar"), batch_size=16, samples_per_epoch=8, num_workers=0)
    with pytest.raises(ConfigError, match="val_batch_size must be an integer >= 1; got 0"):
        ClipDataModule(batch_size=8, val_batch_size=0)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1; got -2"):
        ClipDataModule(batch_size=-2)


# -- 4, 5: padding takes no capacity, all-padding groups do not dilute the losses -------------------
@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "expert_choice"])
def test_padding_takes_no_capacity_under_every_router(router):
    """Defect 4 (expert choice sized capacity from the padded length); also issue #16's
    planted `n_valid = S` (capacity from the padded length for every router). With 8 real tokens of
    40 and E=4, cf=0.5, multiple_of=1 the capacity is 1 (top-1) from the real tokens, 5 from
    the padded length: padding would let more real tokens through."""
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, capacity_factor=0.5, router=router, multiple_of=1).eval()
    real = torch.randn(1, 8, 16)
    padded = torch.cat([real, torch.randn(1, 32, 16)], 1)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[:, :8] = True
    y_real = moe(real)
    cap_real = float(moe.aux[None].stats["capacity"]) if router != "expert_choice" else None
    y_pad = moe(padded, mask=mask)
    torch.testing.assert_close(y_pad[:, :8], y_real, atol=1e-6, rtol=1e-5)
    assert (y_pad[:, 8:] == 0).all()
    if cap_real is not None:
        assert float(moe.aux[None].stats["capacity"]) == cap_real
    assert float(moe.aux[None].stats["dropped_token_frac"]) > 0  # capacity binds, so the test can see a change


LOSSES = {
    "importance": lambda g, l, m: losses.importance_loss(g, m),
    "load": lambda g, l, m: losses.load_loss(l, l + 0.3, 0.5, 1, m),
    "balance": lambda g, l, m: losses.balance_loss(g, m),
    "z": lambda g, l, m: losses.z_loss(l, m),
    "local_entropy": lambda g, l, m: losses.local_entropy_loss(g, m),
    "global_entropy": lambda g, l, m: losses.global_entropy_loss(g, m, threshold=1.5),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_average_ignores_all_padding_groups(name):
    """Defect 5: groups holding only padding added zeros (or tau) to the per-group mean."""
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 4)
    gates = logits.softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    fn = LOSSES[name]
    with_empty = fn(gates, logits, mask)
    real_only = fn(gates[:2], logits[:2], mask[:2])
    torch.testing.assert_close(with_empty, real_only)
    # and the real groups are averaged: the mean of each group's own loss
    each = torch.stack([fn(gates[i:i + 1], logits[i:i + 1], mask[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(with_empty, each.mean())


# -- 6, 7, 8: API surface, documented departures, a one-way import stack -----------------------------
def test_upcycling_is_importable_from_the_top_level():
    from vlmoe import upcycle_open_clip, upcycle_timm_vit  # noqa: F401
    assert vlmoe.upcycle_open_clip is vlmoe.models.upcycle.upcycle_open_clip


def test_switch_and_gshard_place_tokens_by_position_by_default():
    """Defect 7: Switch and GShard drop by position; V-MoE's top-k keeps BPR."""
    assert SparseMoE(8, router="switch").options.batch_priority is False
    assert SparseMoE(8, router="gshard").options.batch_priority is False
    assert SparseMoE(8, router="topk").options.batch_priority is True
    assert SparseMoE(8, router="switch", batch_priority=True).options.batch_priority is True
    # Every token prefers expert 0; capacity 2: position keeps tokens 0 and 1, whatever their gates.
    moe = SparseMoE(4, 8, num_experts=2, router="switch", capacity_factor=1.0, multiple_of=1).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0], [4.0, 0, 0, 0]])
    moe(x)
    kept = moe(x).abs().sum(-1) > 0
    assert kept.tolist() == [True, True, False, False]


def _import_graph() -> dict[str, set[str]]:
    """vlmoe module -> vlmoe modules it imports (anywhere in the file, lazy imports too)."""
    pkg = ROOT / "vlmoe"
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = (f, parts[-1] == "__init__")
    graph = {}
    for name, (f, is_pkg) in mods.items():
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = base[: len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
                else:
                    target = (node.module or "").split(".")
                t = ".".join(target)
                for alias in node.names:
                    sub = f"{t}.{alias.name}"
                    out.add(sub if sub in mods else t)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {t for t in out if t in mods and t != name}
    return graph


def test_modules_form_a_one_way_stack():
    """Defect 8: factory <-> upcycle and moe.layer <-> moe.parallel imported each other.
    A package's __init__ re-exporting its own submodules is not a cycle."""
    graph = _import_graph()

    def reach(a, b, seen=()):
        return any(n == b or (n not in seen and reach(n, b, (*seen, n))) for n in graph[a] if not b.startswith(n + "."))

    cycles = [(a, b) for a in graph for b in graph[a] if not a.startswith(b + ".") and reach(b, a) and not b.startswith(a + ".")]
    assert not cycles, cycles
    assert "vlmoe.moe.parallel" not in graph["vlmoe.moe.layer"] and "vlmoe.models.upcycle" not in graph["vlmoe.models.factory"]


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


def test_labels_outside_the_class_range_are_refused(shards, tmp_path):
    """Defect 9: cls -1 was scored as a miss in fit/validate and crashed vlmoe-zeroshot."""
    neg = tmp_path / "neg-000000.tar"
    with ShardWriter(str(tmp_path / "neg-%06d.tar")) as w:
        for i in range(8):
            w.write(f"{i:06d}", png(), label=-1 if i == 5 else i % 4)
    with pytest.raises(DataError, match=r"label -1 in the data is outside \[0, 4\)"):
        zeroshot_main(["--model", "clip-tiny", "--data", str(neg), "--classnames", shards["classnames"],
                       "--templates", shards["templates"], "--num-workers", "0"])
    with pytest.raises(DataError, match=r"label -1 in the data is outside \[0, 4\)"):
        cli_main(["validate", "--config", str(CONFIGS / "clip_tiny.yaml"), *data_args(shards, train_shards="null", zeroshot_shards=neg),
                  "--data.val_batch_size=8", f"--trainer.default_root_dir={tmp_path}", *QUIET])


def test_imagefolder_folders_are_matched_to_class_names_by_name(tmp_path):
    """Defect 9: folders sorted differently from the class-names file were scored against the wrong names."""
    assert folder_labels(["blue_thing", "red_thing"], ["red thing", "blue thing"]) == [1, 0]
    assert folder_labels(["Red", "blue"], ["blue", "red"]) == [1, 0]
    assert folder_labels(["0", "1", "2"], ["c", "b", "a"]) == [0, 1, 2]
    assert folder_labels(["cat"], ["dog", "cat"]) == [1]  # a subset of the classes
    with pytest.raises(DataError, match="do not match the 2 class names"):
        folder_labels(["a", "b"], ["alpha", "beta"])
    root = tmp_path / "f"
    for name, color in (("blue_thing", (0, 0, 250)), ("red_thing", (250, 0, 0))):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), color).save(root / name / "x.png")
    from vlmoe.cli import _zeroshot_loader

    batch = next(iter(_zeroshot_loader(str(root), (32, 32), 4, 0, ["red thing", "blue thing"])))
    assert batch["label"].tolist() == [1, 0]  # blue_thing first in the folder order, label of "blue thing"
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="not a usable ImageFolder"):
        _zeroshot_loader(str(tmp_path / "empty"), (32, 32), 4, 0, ["a"])


def test_sixteen_bit_images_keep_their_brightness():
    """Defect 9: a 16-bit grayscale PNG (mode I;16) decoded almost white."""
    a = np.full((16, 16), 32768, dtype=np.uint16)
    a[:, :8] = 6553  # 10%
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    img, why = _decode_image({"png": buf.getvalue()})
    assert why is None and img.mode == "RGB"
    rgb = np.asarray(img)
    assert abs(int(rgb[0, 12, 0]) - 128) <= 1 and abs(int(rgb[0, 2, 0]) - 26) <= 1
    img, _ = _decode_image({"png": png((30, 60, 90))})
    assert np.asarray(img)[0, 0].tolist() == [30, 60, 90]  # 8-bit images untouched


def _make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _keys(pattern_glob):
    out = []
    for p in sorted(pattern_glob):
        with tarfile.open(p) as t:
            out += [m.name for m in t.getmembers()]
    return out


def test_make_shards_refuses_to_mix_old_and_new_shards(tmp_path):
    """Defect 9: a rerun with fewer samples left the old extra shards in place."""
    main = _make_shards()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(png((i * 60, 0, 0)))
    (tmp_path / "three.csv").write_text("image,caption\n0.png,a\n1.png,b\n2.png,c\n")
    (tmp_path / "one.csv").write_text("image,caption\n0.png,a\n")
    out = tmp_path / "out"
    main(["captions", "--images", str(imgs), "--captions", str(tmp_path / "three.csv"), "--out", str(out / "s-%06d.tar"), "--max-count", "1"])
    assert len(list(out.glob("s-*.tar"))) == 3
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty"):
        main(["captions", "--images", str(imgs), "--captions", str(tmp_path / "one.csv"), "--out", str(out / "s-%06d.tar")])
    main(["captions", "--images", str(imgs), "--captions", str(tmp_path / "one.csv"), "--out", str(out / "s-%06d.tar"), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s-000000.tar"]


def test_make_shards_validates_every_row_and_never_leaves_a_partial_shard(tmp_path, capsys):
    """Defect 13."""
    main = _make_shards()
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    (imgs / "a.png").write_bytes(png())
    (imgs / "sub" / "b.jpg").write_bytes(png())  # a PNG named .jpg: stored by its real format
    (imgs / "fake.jpg").write_bytes(b"not an image")
    (tmp_path / "secret.png").write_bytes(png())
    out = lambda n: str(tmp_path / n / "s-%06d.tar")  # noqa: E731
    run = lambda *a: main(["captions", "--images", str(imgs), *a])  # noqa: E731

    (tmp_path / "header.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="lists no images"):
        run("--captions", str(tmp_path / "header.csv"), "--out", out("h"))
    (tmp_path / "latin.csv").write_bytes("image,caption\na.png,café crème\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv:2: not utf-8 \(byte 0xe9\); pass the file's encoding"):
        run("--captions", str(tmp_path / "latin.csv"), "--out", out("l"))
    assert run("--captions", str(tmp_path / "latin.csv"), "--out", out("l2"), "--encoding", "latin-1") == 1
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\na.png,hello\n".encode("utf-8"))
    assert run("--captions", str(tmp_path / "bom.csv"), "--out", out("b")) == 1

    rows = ["image,caption", "a.png,fine", "sub/b.jpg,also fine", "a.png,", f"{tmp_path / 'secret.png'},absolute",
            "../secret.png,escapes", "fake.jpg,not an image", "missing.png,gone"]
    (tmp_path / "mixed.csv").write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert run("--captions", str(tmp_path / "mixed.csv"), "--out", out("m")) == 2
    err = capsys.readouterr().err
    for line, why in ((4, "no caption"), (5, "is outside --images"), (6, "is outside --images"), (7, "fake.jpg is not a readable image"),
                      (8, "missing.png not found")):
        assert f"mixed.csv:{line}: skipped: " in err and why in err, (line, why, err)
    assert _keys((tmp_path / "m").glob("*.tar")) == ["000000000.png", "000000000.txt", "000000000.json",
                                                     "000000001.png", "000000001.txt", "000000001.json"]

    lines = ['{"image": "a.png", "caption": "ok"}', '{"image": "a.png", "caption": 7}', '{"image": "a.png"', '{"image": "a.png"}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert run("--captions", str(tmp_path / "c.jsonl"), "--out", out("j")) == 1
    err = capsys.readouterr().err
    assert "c.jsonl:2: skipped: the caption 7 is not text" in err and "c.jsonl:3: skipped: not a JSON line" in err
    assert "c.jsonl:4: skipped: no caption" in err
    assert not list(tmp_path.rglob("*.partial"))

    classes = tmp_path / "classes"
    (classes / "cat").mkdir(parents=True)
    (classes / "dog").mkdir()
    (classes / "cat" / "1.png").write_bytes(png())
    assert main(["classes", "--images", str(classes), "--out", out("k")]) == 1  # an empty class folder keeps its label
    assert (tmp_path / "k" / "classnames.txt").read_text() == "cat\ndog\n"
    assert "dog: no images" in capsys.readouterr().err


def test_shard_writer_drops_a_partial_shard_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path / "s-%06d.tar"), max_count=2) as w:
            for i in range(3):
                w.write(f"{i}", png(), caption="x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]  # the complete shard stays


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


# -- 11, 12: upcycling from a path, bad checkpoint files --------------------------------------------------
def test_upcycle_split_from_a_checkpoint_path(tmp_path):
    """Defect 11: method='split' with a path raised UnboundLocalError."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    torch.manual_seed(0)
    arch = {"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 500, "width": 32, "heads": 2, "layers": 2}}
    dense = CLIP(32, CLIPVisionCfg(**arch["vision_cfg"]), CLIPTextCfg(**arch["text_cfg"])).eval()
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path)
    moe = vlmoe.upcycle_open_clip(path, num_experts=4, model_config=arch, method="split", num_shared_neurons=1.0).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.randint(1, 400, (2, 8))
    torch.testing.assert_close(moe.encode_image(x), dense.encode_image(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe.encode_text(t), dense.encode_text(t), atol=1e-5, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


BAD_FILES = {
    "text": (lambda p: p.write_text("hello, I am a text file\n"), "is a text file"),
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "random": (lambda p: p.write_bytes(bytes(range(7, 200))), "is not a PyTorch checkpoint"),
    "list": (lambda p: torch.save([1, 2, 3], p), "holds a list, not"),
    "tensor": (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not"),
    "truncated": (lambda p: p.write_bytes(_saved_bytes()[:300]), "is truncated or corrupt"),
    "code": (lambda p: torch.save({"x": _Evil()}, p), "would import and run code"),
}


def _saved_bytes():
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(100)}}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_checkpoint_files_get_one_clear_line(tmp_path, kind, shards):
    """Defect 12: KeyError: 101, AttributeError, tensor truth errors, and torch's advice to
    use weights_only=False, which must never be given here."""
    write, says = BAD_FILES[kind]
    path = tmp_path / "model.ckpt"
    write(path)
    from vlmoe.models.factory import load_model

    calls = [lambda: vlmoe.create_model("clip-tiny", pretrained=path), lambda: load_model(path),
             lambda: cli_main(fit_args(shards, tmp_path / "r", steps=1, extra=[f"--ckpt_path={path}"]))]
    for call in calls:
        with pytest.raises(CheckpointError) as e:
            call()
        msg = one_line(e.value)
        assert says in msg and str(path) in msg, msg
        assert "weights_only" not in msg


# -- 15: small API checks ------------------------------------------------------------------------
def test_small_api_checks():
    for kwargs, says in (({"num_experts": 2.5}, "num_experts must be an integer >= 1; got 2.5"),
                         ({"num_experts": "8"}, "num_experts must be an integer >= 1; got '8'"),
                         ({"capacity_factor": "1.0"}, "capacity_factor must be a number > 0"),
                         ({"multiple_of": -4}, "multiple_of must be an integer >= 0"),
                         ({"modality_overrides": {"text": {"capacity_factor": "2"}}}, r"capacity_factor \(moe.text\) must be a finite number > 0")):
        with pytest.raises(ConfigError, match=says):
            SparseMoE(8, **kwargs)
    with pytest.raises(ConfigError, match="dim must be an integer >= 1; got 0"):
        SparseMoE(0)
    model = vlmoe.create_model("limoe-tiny")
    with pytest.raises(ConfigError, match="empty batch"):
        model.encode_image(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ConfigError, match="empty batch"):
        model.encode_text(torch.zeros(0, 16, dtype=torch.long))
    moe = SparseMoE(8, num_experts=4)
    moe(torch.randn(2, 5, 8), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert float(moe.aux[None].stats["dropped_frac"]) == 0.0  # no token, nothing dropped
    with pytest.raises(ConfigError, match="unknown model 'limoe-huge'"):
        vlmoe.dense_baseline("limoe-huge")
    assert issubclass(ConfigError, VLMoEError) and issubclass(NotFound, FileNotFoundError)


# -- 16: skipped samples are visible at the end of every run ------------------------------------------
def test_end_of_run_summary_names_reasons_and_unreadable_shards(shards, tmp_path, capsys):
    broken = tmp_path / "broken-000000.tar"
    broken.write_bytes(b"not a tar" * 100)
    args = ["validate", "--config", str(CONFIGS / "limoe_tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
            *data_args(shards, train_shards="null", val_shards=f"{shards['bad']}::{broken}", zeroshot_shards="null"),
            "--data.val_batch_size=4", *QUIET]
    capsys.readouterr()
    cli = cli_main(args)
    err = capsys.readouterr().err
    # 60 samples, every 10th bad: 4 corrupt images, 1 missing and 1 empty caption (see conftest.write_split)
    expected = f"vlmoe: validate data: 6 samples skipped (corrupt image 4, missing caption 1, empty caption 1); 1 unreadable shard(s): {broken}"
    assert expected in err.splitlines()
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for r in rows for k, v in r.items() if k.startswith("data/validate/") and v}
    assert logged["data/validate/skipped/corrupt_image"] == 4 and logged["data/validate/unreadable_shards"] == 1

    capsys.readouterr()
    cli_main(fit_args(shards, tmp_path / "f", steps=4, train_shards=shards["bad"], extra=["--data.samples_per_epoch=32"]))
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vlmoe: fit data: ")][-1]
    assert "samples skipped (corrupt image" in line  # a 4-step fit says so, with no log row needed
