"""Write webdataset shards in img2dataset's layout from local data.

Image-text pairs from a folder of images and a captions file:
    python scripts/make_shards.py captions --images photos/ --captions captions.csv --out shards/train-%06d.tar
    (CSV with columns `image,caption` (a header row), or JSONL lines {"image": ..., "caption": ...};
    UTF-8, a byte-order mark is fine; `--encoding latin-1` for other files)

A classification set in torchvision ImageFolder layout (one folder per class):
    python scripts/make_shards.py classes --images imagenet/val --out shards/val-%06d.tar
    (writes `cls` labels and `classnames.txt` beside the shards, labels in sorted folder order)

A labelled set in CLIP_benchmark's local webdataset layout (for vlmoe-benchmark / clip_benchmark
`--dataset wds/NAME --dataset_root OUT`), from `cls`-labelled shards or an ImageFolder:
    python scripts/make_shards.py benchmark --shards 'data/digits/test-000000.tar' \
        --classnames data/digits/classnames.txt --templates data/digits/templates.txt --out data/digits/wds
    (writes OUT/test/0.tar ..., OUT/test/nshards.txt, OUT/classnames.txt and
    OUT/zeroshot_classification_templates.txt with `{c}` where the class name goes)

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
from vlmoe.errors import DataError, NotFound, make_output_folder

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


def read_labelled(urls: list[str], num_classes: int, report: Report):
    """(key, image bytes, extension, label) of each sample of `cls`-labelled shards, in order.
    Samples without an image or a valid label are reported and left out."""
    import tarfile

    for url in urls:
        if not Path(url).is_file():
            raise NotFound(f"shard not found: {url}")
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(url, "r:*") as tar:
                for m in tar:
                    folder, _, base = m.name.rpartition("/")
                    stem, dot, ext = base.partition(".")  # webdataset: the key ends at the name's first dot
                    if not m.isfile() or not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    samples.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise DataError(f"{url} is not a readable tar shard ({e})") from None
        for key, files in samples.items():
            where = f"{url}:{key}"
            ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in files), None)
            if ext is None:
                report.skip(where, f"no png/jpg/jpeg/webp image (has {sorted(files)})")
                continue
            try:
                label = int(files["cls"].decode().strip())
            except (KeyError, ValueError, UnicodeDecodeError):
                report.skip(where, "no integer `cls` label")
                continue
            if not 0 <= label < num_classes:
                report.skip(where, f"label {label} outside [0, {num_classes}) for the {num_classes} class names")
                continue
            yield key, files[ext], ext, label


def write_benchmark(out: Path, split: str, classnames: list[str], templates: list[str], samples, max_count: int,
                    report: Report, gzip: bool) -> int:
    """CLIP_benchmark's wds layout: OUT/SPLIT/{0..n-1}.tar + nshards.txt, OUT/classnames.txt,
    OUT/zeroshot_classification_templates.txt."""
    with ShardWriter(str(out / split / "%d.tar"), max_count, compress=gzip) as w:
        for key, data, ext, label in samples:
            w.write(f"s{w.total:09d}", data, label=label, image_ext=ext, meta={"source": key})
    if w.total == 0:
        raise DataError(f"no usable labelled images: all {report.skipped} samples were skipped (see above)")
    (out / split / "nshards.txt").write_text(f"{len(w.paths)}\n")
    (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates) + "\n")
    print(f"wrote {w.total} samples of {len(classnames)} classes to {out}/{split}/0..{len(w.paths) - 1}.tar with nshards.txt, "
          f"classnames.txt and zeroshot_classification_templates.txt; skipped {report.skipped}", file=sys.stderr)
    return w.total


def benchmark(a) -> int:
    from vlmoe.data import expand_shards
    from vlmoe.data.text import load_classnames, load_templates

    report = Report()
    templates = load_templates(a.templates)
    out = make_output_folder(a.out)
    if any(out.iterdir()):
        if not a.overwrite:
            raise DataError(f"the output folder {out} is not empty: use an empty folder, or --overwrite to replace this "
                            f"command's files there")
        owned = [out / "classnames.txt", out / "zeroshot_classification_templates.txt", out / a.split / "nshards.txt"]
        owned += list((out / a.split).glob("*.tar")) if (out / a.split).is_dir() else []
        for p in owned:
            if p.is_file() and (p.suffix != ".tar" or p.stem.isdigit()):
                p.unlink()
    if (a.shards is None) == (a.images is None):
        raise DataError("benchmark needs exactly one source: --shards (cls-labelled shards, with --classnames) or --images (an ImageFolder)")
    if a.shards is not None:
        if a.classnames is None:
            raise DataError("--shards needs --classnames (a file, one name per label in label order, or a built-in set)")
        classnames = load_classnames(a.classnames)
        samples = read_labelled(expand_shards(a.shards, "--shards"), len(classnames), report)
    else:
        if not a.images.is_dir():
            raise NotFound(f"--images {a.images}: no such folder")
        folders = sorted(d.name for d in a.images.iterdir() if d.is_dir())
        if not folders:
            raise DataError(f"{a.images} has no class folders (ImageFolder layout: {a.images}/<class>/<image>)")
        classnames = load_classnames(a.classnames) if a.classnames else [c.replace("_", " ") for c in folders]
        from vlmoe.cli import folder_labels

        labels = folder_labels(folders, classnames, str(a.images))

        def from_folders():
            for folder, label in zip(folders, labels):
                for p in sorted(q for q in (a.images / folder).iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
                    try:
                        data, ext = load_image(p)
                    except ValueError as e:
                        report.skip(str(p), str(e))
                        continue
                    yield f"{folder}/{p.name}", data, ext, label

        samples = from_folders()
    return write_benchmark(out, a.split, classnames, templates, samples, a.max_count, report, a.gzip)


def prepare_output(out: str, kind: str, overwrite: bool) -> None:
    """Refuse an output folder that holds files, unless --overwrite: then remove what this
    command writes there (shards matching the pattern, their partial files, classnames.txt)."""
    if "%" not in out:
        raise DataError(f"--out needs a %d-style field for the shard number, e.g. out/train-%06d.tar; got {out!r}")
    folder = Path(out).parent
    if not folder.exists():
        make_output_folder(folder)
        return
    if not folder.is_dir():
        make_output_folder(folder)  # raises: the folder is a file
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
    b = sub.add_parser("benchmark", help="a labelled set in CLIP_benchmark's wds layout")
    b.add_argument("--shards", help="cls-labelled shards (brace patterns allowed)")
    b.add_argument("--images", type=Path, help="or an ImageFolder (one folder per class)")
    b.add_argument("--classnames", help="class names in label order (file or built-in set); an ImageFolder's default: its folder names")
    b.add_argument("--templates", required=True, help="prompt templates (file with {} or {c}, or a built-in set)")
    b.add_argument("--split", default="test", help="split folder name (CLIP_benchmark's --split)")
    b.add_argument("--gzip", action="store_true", help="gzip-compress the shards (webdataset and CLIP_benchmark read them)")
    for s in (c, k, b):
        s.add_argument("--out", required=True, help="shard pattern with a %%d field, e.g. out/train-%%06d.tar" if s is not b
                       else "output folder (CLIP_benchmark's --dataset_root)")
        s.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
        s.add_argument("--overwrite", action="store_true", help="replace this command's earlier files in the output folder")
    a = p.parse_args(argv)
    if a.max_count < 1:
        raise DataError(f"--max-count must be >= 1; got {a.max_count}")
    if a.kind == "benchmark":
        return benchmark(a)
    prepare_output(a.out, a.kind, a.overwrite)
    if a.kind == "captions":
        return write_captions(a.images, a.captions, a.out, a.max_count, a.encoding)
    return write_classes(a.images, a.out, a.max_count)


if __name__ == "__main__":
    sys.exit(run_console(main, "make_shards.py"))
