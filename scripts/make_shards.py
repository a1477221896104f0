"""Write webdataset shards in img2dataset's layout from local data.

Image-text pairs from a folder of images and a captions file:
    python scripts/make_shards.py captions --images photos/ --captions captions.csv --out shards/train-%06d.tar
    (CSV with columns `image,caption` (a header row), or JSONL lines {"image": ..., "caption": ...})

A classification set in torchvision ImageFolder layout (one folder per class):
    python scripts/make_shards.py classes --images imagenet/val --out shards/val-%06d.tar
    (writes `cls` labels and `classnames.txt` beside the shards, labels in sorted folder order)
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from vlmoe.data import ShardWriter

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def read_captions(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                if "image" not in obj or "caption" not in obj:
                    raise ValueError(f"{path}:{i}: each JSONL line needs 'image' and 'caption'")
                rows.append((obj["image"], obj["caption"]))
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the CSV needs a header with 'image' and 'caption' columns; got {reader.fieldnames}")
        return [(r["image"], r["caption"]) for r in reader]


def write_captions(images: Path, captions: Path, out: str, max_count: int) -> int:
    rows = read_captions(captions)
    missing = [name for name, _ in rows if not (images / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images named in {captions} are not in {images}: {missing[:5]}")
    with ShardWriter(out, max_count) as w:
        for i, (name, caption) in enumerate(rows):
            p = images / name
            w.write(f"{i:09d}", p.read_bytes(), caption=caption, image_ext=IMAGE_EXTS.get(p.suffix.lower(), "jpg"),
                    meta={"source": name})
    print(f"wrote {w.total} samples to {len(w.paths)} shards: {w.paths[0]} ...", file=sys.stderr)
    return w.total


def write_classes(images: Path, out: str, max_count: int) -> int:
    classes = sorted(d.name for d in images.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{images} has no class folders (ImageFolder layout: {images}/<class>/<image>)")
    with ShardWriter(out, max_count) as w:
        i = 0
        for label, cls in enumerate(classes):
            for p in sorted((images / cls).iterdir()):
                if p.suffix.lower() in IMAGE_EXTS:
                    w.write(f"{i:09d}", p.read_bytes(), label=label, image_ext=IMAGE_EXTS[p.suffix.lower()], meta={"source": f"{cls}/{p.name}"})
                    i += 1
    names = Path(out).parent / "classnames.txt"
    names.write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    print(f"wrote {w.total} samples of {len(classes)} classes to {len(w.paths)} shards and {names}", file=sys.stderr)
    return w.total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("captions", help="image folder + captions CSV/JSONL")
    c.add_argument("--images", type=Path, required=True)
    c.add_argument("--captions", type=Path, required=True)
    k = sub.add_parser("classes", help="ImageFolder classification set")
    k.add_argument("--images", type=Path, required=True)
    for s in (c, k):
        s.add_argument("--out", required=True, help="shard pattern with a %%d field, e.g. out/train-%%06d.tar")
        s.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
    a = p.parse_args(argv)
    if a.kind == "captions":
        return write_captions(a.images, a.captions, a.out, a.max_count)
    return write_classes(a.images, a.out, a.max_count)


if __name__ == "__main__":
    main()
