"""Shard URLs (brace expansion, several sources joined with '::', local paths and pipe:),
sample counting and writing shards in img2dataset's layout."""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

from webdataset.shardlists import expand_urls
from ..errors import DataError, NotFound

__all__ = ["expand_shards", "count_samples", "ShardWriter", "IMAGE_KEYS", "read_lines"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> Path:
    return Path(url[len("file:"):] if url.startswith("file:") else url)


def expand_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """Expand `data/train-{000000..000099}.tar::other/{0..9}.tar` into URLs and check that
    local ones exist, so a typo fails at once with the missing names."""
    if isinstance(spec, (list, tuple)):
        urls = [u for s in spec for u in expand_urls(s)]
    else:
        urls = expand_urls(spec or "")
    urls = [u for u in urls if u.strip()]
    if not urls:
        raise DataError(f"no {what}: {spec!r} expands to an empty list")
    missing = [u for u in urls if _is_local(u) and not _local_path(u).is_file()]
    globbed = next((u for u in missing if any(c in u for c in "*?[") and glob.glob(u)), None)
    if globbed:
        n = len(glob.glob(globbed))
        raise DataError(
            f"{what} {globbed!r} is a glob pattern (it matches {n} file(s)); shard lists are brace-expanded, not globbed: "
            f"write e.g. data/train-{{000000..000099}}.tar, or join several with ::"
        )
    folder = next((u for u in missing if _local_path(u).is_dir()), None)
    if folder:
        raise DataError(f"{what} {folder!r} is a folder: name the .tar shards in it, e.g. {folder.rstrip('/')}/train-{{000000..000009}}.tar")
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NotFound(f"{len(missing)} of {len(urls)} {what} not found: {shown}")
    return urls


def count_samples(urls: list[str]) -> int | None:
    """Number of samples (distinct keys) in local tar shards, from the tar headers only;
    None if any shard is remote (unknown without reading it)."""
    if not all(_is_local(u) for u in urls):
        return None
    total = 0
    for u in urls:
        keys = set()
        try:
            with tarfile.open(_local_path(u)) as tar:
                for member in tar:
                    name = Path(member.name)
                    if member.isfile() and "." in name.name:  # webdataset's key: up to the first dot
                        keys.add(str(name.parent / name.name.split(".", 1)[0]))
        except (tarfile.TarError, OSError):
            continue  # unreadable shard: reported by the pipeline when it gets there
        total += len(keys)
    return total


class ShardWriter:
    """Writes samples as img2dataset does: `{key}.jpg`, `{key}.txt`, optional `{key}.json`
    and `{key}.cls`, into numbered tar shards of at most `max_count` samples. Each shard is
    written under a hidden `.NAME.partial` name and renamed when complete, and a writer
    left by an exception removes its partial shard: no reader ever sees half a shard."""

    def __init__(self, pattern: str, max_count: int = 10_000, compress: bool = False):
        if "%" not in pattern:
            raise DataError(f"shard pattern needs a %d-style field for the shard number, e.g. out/train-%06d.tar; got {pattern!r}")
        self.pattern, self.max_count, self.compress = pattern, max_count, compress  # compress: gzip (webdataset detects it)
        self._gz = None
        self.shard, self.count, self.total = 0, 0, 0
        self.tar: tarfile.TarFile | None = None
        self.paths: list[str] = []

    def _next(self):
        self.close()
        path = self.pattern % self.shard
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._partial = str(Path(path).with_name(f".{Path(path).name}.partial"))
        self._final = path
        if self.compress:
            self._gz = gzip.GzipFile(self._partial, "wb", mtime=0)  # reproducible bytes
            self.tar = tarfile.open(fileobj=self._gz, mode="w")
        else:
            self.tar = tarfile.open(self._partial, "w")
        self.paths.append(path)
        self.shard += 1
        self.count = 0

    def write(self, key: str, image_bytes: bytes, caption: str | None = None, label: int | None = None,
              meta: dict | None = None, image_ext: str = "jpg") -> None:
        if self.tar is None or self.count >= self.max_count:
            self._next()
        files = {image_ext: image_bytes}
        if caption is not None:
            files["txt"] = caption.encode("utf-8")
        if label is not None:
            files["cls"] = str(int(label)).encode()
        if meta is not None:
            files["json"] = json.dumps(meta).encode()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # reproducible shards
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.total += 1

    def _close_files(self):
        self.tar.close()
        self.tar = None
        if self._gz is not None:
            self._gz.close()
            self._gz = None

    def close(self):
        if self.tar is not None:
            self._close_files()
            os.replace(self._partial, self._final)

    def abort(self):
        """Drop the shard being written (the complete ones stay)."""
        if self.tar is not None:
            self._close_files()
            Path(self._partial).unlink(missing_ok=True)
            self.paths.pop()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def read_lines(path: str | Path, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"{what} file not found: {p}")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{what} file {p} is empty")
    return lines
