"""Data: webdataset pipelines, the LightningDataModule and shard writing."""
from .datamodule import ClipDataModule, model_input_spec
from .pipeline import collate, decode_samples, equalize_stream, make_dataset
from .shards import ShardWriter, count_samples, expand_shards

__all__ = ["ClipDataModule", "model_input_spec", "collate", "decode_samples", "equalize_stream", "make_dataset", "ShardWriter", "count_samples", "expand_shards"]
