"""Data: webdataset pipelines, the LightningDataModule and shard writing. Each name is imported
on first use, so writing shards (`ShardWriter`) does not import Lightning and the models."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_NAMES = {
    "ClipDataModule": "datamodule", "model_input_spec": "datamodule",
    "collate": "pipeline", "decode_samples": "pipeline", "equalize_stream": "pipeline", "make_dataset": "pipeline",
    "ShardWriter": "shards", "count_samples": "shards", "expand_shards": "shards",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmoe.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})


if TYPE_CHECKING:
    from .datamodule import ClipDataModule, model_input_spec
    from .pipeline import collate, decode_samples, equalize_stream, make_dataset
    from .shards import ShardWriter, count_samples, expand_shards
