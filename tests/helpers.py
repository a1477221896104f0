"""Helpers shared by the test modules (no test module imports another)."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0",
         "--trainer.log_every_n_steps=1"]


def script(name, *args, cwd, timeout=240, env=None):
    """An installed console script, as a user's shell runs it."""
    exe = BIN / name
    assert exe.exists(), f"{exe} is not installed: pip install -e ."
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def data_args(shards, **replace):
    d = {"train_shards": shards["train"], "val_shards": shards["val"], "zeroshot_shards": shards["zeroshot"],
         "classnames": shards["classnames"], "templates": shards["templates"], **replace}
    return [f"--data.{k}={v}" for k, v in d.items()]


def fit_args(shards, root, steps=2, config="limoe_tiny.yaml", extra=(), **data):
    cfg = ["--config", str(CONFIGS / config)] if config else []
    return ["fit", *cfg, *data_args(shards, **data), f"--trainer.max_steps={steps}", "--data.batch_size=8",
            "--data.val_batch_size=8", "--data.samples_per_epoch=16", "--model.warmup_steps=1",
            f"--trainer.default_root_dir={root}", *QUIET, *extra]


class Hang(BaseException):
    """Not an Exception: webdataset's error handlers must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (Hang) instead of hanging."""
    def boom(*_):
        raise Hang(f"still running after {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def truncate_images(paths, every: int = 10) -> int:
    """Rewrite tar shards in place with every `every`-th sample's JPEG truncated to a third;
    returns how many were truncated."""
    n = 0
    for p in paths:
        with tarfile.open(p) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(p, "w") as t:
            sample = -1
            for m, data in members:
                if m.name.endswith(".jpg"):
                    sample += 1
                    if sample % every == every - 1:
                        data, n = data[: len(data) // 3], n + 1
                        m.size = len(data)
                t.addfile(m, io.BytesIO(data))
    return n


def processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(d.name), ppid, cmd))
    return out


def descendants(pid: int) -> list[tuple[int, str]]:
    """The processes below `pid` (children, grandchildren...)."""
    procs = processes()
    found, frontier = [], {pid}
    while frontier:
        kids = [(p, c) for p, pp, c in procs if pp in frontier]
        found += kids
        frontier = {p for p, _ in kids}
    return found
