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
import csv
import socket
from datetime import timedelta
import lightning as L
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
import vlmoe
from vlmoe.data import ShardWriter, collate
from vlmoe.moe import SparseMoE
from vlmoe.train import LIMoEModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent


def start_ranks(fn, world: int, *args) -> None:
    """torch.multiprocessing.spawn's contract (fn(rank, *args), join, errors re-raised), the
    ranks forked from the forkserver that conftest preloads: no rank imports torch again. Only
    for functions whose arguments hold no tensors (torch.multiprocessing would share their
    memory between the ranks); Lightning's launcher keeps "spawn", which copies them."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method="forkserver")


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0",
         "--trainer.log_every_n_steps=1"]


def script(name, *args, cwd, timeout=240, env=None):
    """An installed console script, as a user's shell runs it."""
    exe = BIN / name
    assert exe.exists(), f"{exe} is not installed: pip install -e ."
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def console(main, prog, args, capsys):
    """A console script's main through the same run_console as the installed script, in this
    process: for messages, once the installed script's exit statuses are checked in a
    subprocess (test_console_scripts; make_shards.py and vlmoe-benchmark in test_benchmark)."""
    from vlmoe.cli import run_console

    capsys.readouterr()
    status = run_console(main, prog, [str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out.out, out.err)


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


# -- moved from the test modules, which no longer import each other ----------------------------------


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


def constant_experts(moe: SparseMoE, value: float = 1.0) -> None:
    """Every expert outputs `value` in every feature, so a token's output is the sum of its
    kept combine weights times `value`."""
    with torch.no_grad():
        moe.experts.w1.zero_()
        moe.experts.b1.zero_()
        moe.experts.w2.zero_()
        moe.experts.b2.fill_(value)


def expert_out(moe, e, x):
    ex = moe.experts
    return ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


FAST = ["--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0"]


def train_args(shards, root, config="limoe_tiny.yaml", steps=4, extra=(), sanity=False):
    """An in-process `vlmoe fit` on the test shards. Lightning's sanity check (two validation
    batches before training) runs only with `sanity=True`: the end-to-end fit and the installed
    scripts' fits (`fit_args`) keep it; elsewhere it would only repeat the end-of-epoch validation."""
    return [
        "fit", "--config", str(CONFIGS / config),
        f"--data.train_shards={shards['train']}", f"--data.val_shards={shards['val']}",
        f"--data.zeroshot_shards={shards['zeroshot']}", f"--data.classnames={shards['classnames']}",
        f"--data.templates={shards['templates']}", f"--trainer.max_steps={steps}", "--data.batch_size=8",
        "--data.val_batch_size=8", "--data.samples_per_epoch=16", "--model.warmup_steps=2",
        f"--trainer.default_root_dir={root}", *FAST, *([] if sanity else ["--trainer.num_sanity_val_steps=0"]), *extra,
    ]


def read_metrics(log_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(log_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    out.setdefault(k, []).append(float(v))
    return out


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


def run_ddp_step(devices, per_device_batch, path, overrides=NO_AUX):
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def small_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return CLIP(32, CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                CLIPTextCfg(context_length=12, vocab_size=1000, width=48, heads=4, layers=2)).eval()


def shared_neurons(model, block):
    """The shared neurons sit in the first slots of every expert: find which dense neurons
    expert 0's first 8 w1 columns are."""
    cols = model.visual.transformer.resblocks[block].mlp.experts.w1[0, :, :8]  # [D, 8]
    dense_w1 = small_clip().visual.transformer.resblocks[block].mlp.c_fc.weight  # [H, D]
    return [int((dense_w1 - c).abs().sum(1).argmin()) for c in cols.t()]
