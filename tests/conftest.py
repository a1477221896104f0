"""Tiny synthetic image-text shards, written by the tests themselves (no downloads); the
thread budget of each pytest-xdist worker."""
import io
import os
import random

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N workers share the cores. Torch's default of one thread per core in every
    # worker (and in every subprocess a test starts) oversubscribes them, and OpenMP's spinning
    # threads then slow everything many times over. Each worker, and what it starts, gets its share.
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.update(OMP_NUM_THREADS=_threads, MKL_NUM_THREADS=_threads)
    import torch

    torch.set_num_threads(int(_threads))

import multiprocessing

import pytest
from PIL import Image, ImageDraw

# The multi-process tests that start their ranks themselves (helpers.start_ranks) use
# "forkserver": one server process per pytest process imports these once, and every rank after
# that is a fork of it, instead of a fresh interpreter importing torch, open_clip and Lightning
# again (about 10 s a rank here). The server is a clean single-threaded process: no OpenMP pool
# is forked.
multiprocessing.set_forkserver_preload(["torch", "lightning.pytorch", "open_clip", "vlmoe.train", "vlmoe.cli", "helpers"])

from vlmoe.data import ShardWriter

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ["square", "circle"]


def make_image(color, shape, size=32, seed=0, fmt="JPEG"):
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (rng.randint(0, 60),) * 3)
    d = ImageDraw.Draw(img)
    a, b = rng.randint(2, 8), rng.randint(20, 29)
    (d.rectangle if shape == "square" else d.ellipse)([a, a, b, b], fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_split(pattern, n, seed, per_shard, labelled=False, corrupt_every=0):
    names = list(COLORS)
    with ShardWriter(pattern, max_count=per_shard) as w:
        for i in range(n):
            color, shape = names[(i + seed) % 4], SHAPES[(i // 4) % 2]
            image = make_image(color, shape, seed=seed * 100_000 + i)
            caption = f"a {color} {shape}"
            if corrupt_every and i % corrupt_every == corrupt_every - 1:
                kind = (i // corrupt_every) % 4
                if kind == 0:
                    image = image[: len(image) // 3]  # truncated JPEG
                elif kind == 1:
                    image = b"not an image at all"
                elif kind == 2:
                    caption = "   "  # empty caption
                else:
                    caption = None  # missing caption
            w.write(f"{seed:02d}{i:06d}", image, caption=caption, label=names.index(color) if labelled else None)
    return w.paths


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs the suite in one process
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (the slow tests start processes of their own)."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _run_outside_the_checkout(tmp_path_factory):
    """Whatever a test writes to the working directory (Lightning's default_root_dir, say)
    lands in a temporary folder, never in the repository."""

    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_split(str(root / "train-%06d.tar"), 96, 0, 48)
    write_split(str(root / "val-%06d.tar"), 24, 1, 24)
    write_split(str(root / "zs-%06d.tar"), 24, 2, 24, labelled=True)
    write_split(str(root / "bad-%06d.tar"), 60, 3, 30, corrupt_every=10)
    (root / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    (root / "templates.txt").write_text("a {} shape.\na photo of something {}.\n")
    return {
        "root": root,
        "train": str(root / "train-{000000..000001}.tar"),
        "val": str(root / "val-000000.tar"),
        "zeroshot": str(root / "zs-000000.tar"),
        "bad": str(root / "bad-{000000..000001}.tar"),
        "classnames": str(root / "classnames.txt"),
        "templates": str(root / "templates.txt"),
    }
