"""The package's user-facing errors.

A `VLMoEError` is a mistake the user can fix (a missing shard, an unknown model name, a bad
setting, a file that is not a checkpoint): the console scripts print its message as one line
on stderr and exit with status 2. Anything else is a bug and keeps its traceback. Every
subclass is also a `ValueError` (and the not-found one a `FileNotFoundError`), so code that
caught those before keeps working.
"""
from __future__ import annotations

__all__ = ["VLMoEError", "ConfigError", "DataError", "CheckpointError", "NotFound"]


class VLMoEError(ValueError):
    """A user's mistake, with a message that names the problem and the fix."""


class ConfigError(VLMoEError):
    """A bad model, routing or training setting."""


class DataError(VLMoEError):
    """Shards, images, captions, labels or class names that cannot be used."""


class CheckpointError(VLMoEError):
    """A checkpoint file that cannot be read, or does not match the model."""


class NotFound(VLMoEError, FileNotFoundError):
    """A file or folder the user named does not exist."""
