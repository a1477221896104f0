"""The installed console scripts as a user's shell runs them: exit statuses, one-line mistakes,
and every output under the run's folder. Each runs in a subprocess (`--debug`'s traceback: in process)."""
from __future__ import annotations

import json

import pytest
from helpers import CONFIGS, QUIET, data_args, fit_args, last_line, script  # noqa: F401


# -- moved from test_first_contact (issues #11, #16) -------------------------------------------------


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
               "--templates", shards["templates"], "--json", "--num-workers", "0", cwd=cwd, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout)  # stdout is pure JSON
    assert [r["n"] for r in rows] == [24] and rows[0]["model"] == str(ckpt)
    assert "[{" not in p.stderr
    # the commands that do not train start without importing Lightning (and, through it,
    # torchmetrics, scipy and matplotlib: seconds at every start), a Lightning checkpoint read too
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert {"vlmoe.models", "vlmoe.eval.zeroshot"} <= imported and "lightning" not in imported

    p = script("vlmoe-info", "limoe-tiny", "--json", cwd=cwd)
    assert p.returncode == 0 and set(json.loads(p.stdout)) == {"limoe-tiny", "clip-tiny"}


def test_user_mistakes_are_one_line_with_status_2_and_bugs_keep_tracebacks(shards, tmp_path, monkeypatch):
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
    # the traceback, on request (run_console re-raises; in this process)
    from vlmoe.cli import info_main, run_console
    from vlmoe.errors import ConfigError

    monkeypatch.setenv("VLMOE_DEBUG", "1")
    with pytest.raises(ConfigError, match="unknown model 'limoe-huge'"):
        run_console(info_main, "vlmoe-info", ["limoe-huge"])
