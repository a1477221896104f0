"""Write webdataset shards in img2dataset's layout from local data.

Image-text pairs from a folder of images and a captions file:
    python scripts/make_shards.py captions --images photos/ --captions captions.csv --out shards/train-%06d.tar
    (CSV with columns `image,caption` (a header row), or JSONL lines {"image": ..., "caption": ...};
    UTF-8, a byte-order mark is fine; `--encoding latin-1` for other files)

A classification set in torchvision ImageFolder layout (one folder per class):
    python scripts/make_shards.py classes --images imagenet/val --out shards/val-%06d.tar
    (writes `cls` labels and `classnames.txt` beside the shards, labels in sorted folder order)

Every row is checked while writing: a missing or non-image file, an image path outside
--images, a row without a caption, a caption that is not text and a broken JSONL line are
reported (file:line) and skipped. Shards are written under a temporary name and renamed when
complete. An output folder that already holds files is refused unless --overwrite, which
removes only the files this command writes there (the pattern's shards, classnames.txt).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

from PIL import Image

from vlmoe.cli import run_console
from vlmoe.data import ShardWriter
from vlmoe.errors import DataError, NotFound

PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the training pipeline reads as is
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class Report:
    """Skipped rows, reported on stderr as they are found and counted for the summary."""

    def __init__(self):
        self.skipped = 0

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        print(f"make_shards: {where}: skipped: {why}", file=sys.stderr)


def read_text(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise NotFound(f"captions file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not {encoding} (byte 0x{data[e.start]:02x}); pass the file's encoding, e.g. --encoding latin-1"
        ) from None
    except LookupError:
        raise DataError(f"unknown --encoding {encoding!r}") from None


def read_captions(path: Path, encoding: str, report: Report) -> list[tuple[str, str, str]]:
    """(where, image, caption) rows; bad rows are reported and left out."""
    text = read_text(path, encoding)
    rows = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.skip(where, f"not a JSON line ({e.msg})")
                continue
            if not isinstance(obj, dict) or "image" not in obj:
                report.skip(where, "each JSONL line needs an object with 'image' and 'caption'")
                continue
            rows.append((where, obj["image"], obj.get("caption")))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"image", "caption"} <= {f.strip() for f in reader.fieldnames}:
            raise DataError(f"{path}: the CSV needs a header row with 'image' and 'caption' columns; got {reader.fieldnames}")
        for r in reader:
            r = {(k or "").strip(): v for k, v in r.items()}
            rows.append((f"{path}:{reader.line_num}", r.get("image"), r.get("caption")))
    if not rows:
        raise DataError(f"{path} lists no images (a header and no rows?)")
    return rows


def load_image(path: Path) -> tuple[bytes, str]:
    """(bytes, extension) of a readable image; formats the pipeline does not read as is are
    re-encoded as PNG. Raises ValueError for anything that is not an image."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format
            if fmt in PIL_FORMATS:
                return data, PIL_FORMATS[fmt]
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue(), "png"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for non-images
        raise ValueError(f"{path.name} is not a readable image ({type(e).__name__})") from None


def inside(root: Path, name: str) -> Path | None:
    """root/name if it stays inside root (no absolute paths, no ../ out of it)."""
    if not name or Path(name).is_absolute():
        return None
    p = (root / name).resolve()
    return p if p.is_relative_to(root.resolve()) else None


def write_captions(images: Path, captions: Path, out: str, max_count: int, encoding: str = "utf-8") -> int:
    if not images.is_dir():
        raise NotFound(f"--images {images}: no such folder")
    report = Report()
    rows = read_captions(captions, encoding, report)
    with ShardWriter(out, max_count) as w:
        for where, name, caption in rows:
            if not isinstance(name, str):
                report.skip(where, f"the image name {name!r} is not text")
                continue
            if not isinstance(caption, str) or not caption.strip():
                report.skip(where, "no caption" if caption in (None, "") or (isinstance(caption, str) and not caption.strip())
                            else f"the caption {caption!r} is not text")
                continue
            p = inside(images, name)
            if p is None:
                report.skip(where, f"{name!r} is outside --images {images}")
                continue
            if not p.is_file():
                report.skip(where, f"{name} not found in {images}")
                continue
            try:
                data, ext = load_image(p)
            except ValueError as e:
                report.skip(where, str(e))
                continue
            w.write(f"{w.total:09d}", data, caption=caption.strip(), image_ext=ext, meta={"source": name})
    if w.total == 0:
        raise DataError(f"no usable rows in {captions}: all {len(rows) + report.skipped} were skipped (see above)")
    print(f"wrote {w.total} samples to {len(w.paths)} shards: {w.paths[0]} ...; skipped {report.skipped} rows", file=sys.stderr)
    return w.total


def write_classes(images: Path, out: str, max_count: int) -> int:
    if not images.is_dir():
        raise NotFound(f"--images {images}: no such folder")
    classes = sorted(d.name for d in images.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{images} has no class folders (ImageFolder layout: {images}/<class>/<image>)")
    report = Report()
    with ShardWriter(out, max_count) as w:
        for label, cls in enumerate(classes):
            files = sorted(p for p in (images / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                print(f"make_shards: {images / cls}: no images; the class keeps label {label}", file=sys.stderr)
            for p in files:
                try:
                    data, ext = load_image(p)
                except ValueError as e:
                    report.skip(str(p), str(e))
                    continue
                w.write(f"{w.total:09d}", data, label=label, image_ext=ext, meta={"source": f"{cls}/{p.name}"})
    if w.total == 0:
        raise DataError(f"no images in the class folders of {images}")
    names = Path(out).parent / "classnames.txt"
    names.write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    print(f"wrote {w.total} samples of {len(classes)} classes to {len(w.paths)} shards and {names}; skipped {report.skipped}",
          file=sys.stderr)
    return w.total


def prepare_output(out: str, kind: str, overwrite: bool) -> None:
    """Refuse an output folder that holds files, unless --overwrite: then remove what this
    command writes there (shards matching the pattern, their partial files, classnames.txt)."""
    if "%" not in out:
        raise DataError(f"--out needs a %d-style field for the shard number, e.g. out/train-%06d.tar; got {out!r}")
    folder = Path(out).parent
    if not folder.exists():
        return
    existing = [p for p in folder.iterdir()]
    if not existing:
        return
    if not overwrite:
        raise DataError(
            f"the output folder {folder} is not empty ({len(existing)} entries, e.g. {existing[0].name}): old shards would "
            f"mix with the new ones. Use an empty folder, or --overwrite to replace this command's shards there"
        )
    name = Path(out).name
    field = re.search(r"%0?(\d*)d", name)
    if field is None:
        raise DataError(f"--out {out!r}: use a %d-style shard number field such as %06d")
    owned = re.compile(re.escape(name[: field.start()]) + r"\d+" + re.escape(name[field.end():]))
    for p in existing:
        plain = p.name[1:-len(".partial")] if p.name.startswith(".") and p.name.endswith(".partial") else p.name
        if p.is_file() and (owned.fullmatch(plain) or (kind == "classes" and p.name == "classnames.txt")):
            p.unlink()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("captions", help="image folder + captions CSV/JSONL")
    c.add_argument("--images", type=Path, required=True)
    c.add_argument("--captions", type=Path, required=True)
    c.add_argument("--encoding", default="utf-8", help="text encoding of the captions file (default utf-8, BOM allowed)")
    k = sub.add_parser("classes", help="ImageFolder classification set")
    k.add_argument("--images", type=Path, required=True)
    for s in (c, k):
        s.add_argument("--out", required=True, help="shard pattern with a %%d field, e.g. out/train-%%06d.tar")
        s.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
        s.add_argument("--overwrite", action="store_true", help="replace this command's earlier shards in --out's folder")
    a = p.parse_args(argv)
    if a.max_count < 1:
        raise DataError(f"--max-count must be >= 1; got {a.max_count}")
    prepare_output(a.out, a.kind, a.overwrite)
    if a.kind == "captions":
        return write_captions(a.images, a.captions, a.out, a.max_count, a.encoding)
    return write_classes(a.images, a.out, a.max_count)


if __name__ == "__main__":
    sys.exit(run_console(main, "make_shards.py"))
