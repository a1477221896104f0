"""The package's user-facing errors.

A `VLMoEError` is a mistake the user can fix (a missing shard, an unknown model name, a bad
setting, a file that is not a checkpoint): the console scripts print its message as one line
on stderr and exit with status 2. Anything else is a bug and keeps its traceback. Every
subclass is also a `ValueError` (and the not-found one a `FileNotFoundError`), so code that
caught those before keeps working.
"""
from __future__ import annotations

__all__ = ["VLMoEError", "ConfigError", "DataError", "CheckpointError", "NotFound", "make_output_folder", "check_int",
           "check_number"]


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


def make_output_folder(path, what: str = "the output folder"):
    """Create `path` as a folder (parents too), or raise one ConfigError line: `path` is a
    file, a parent of it is a file, or the folder cannot be created."""
    from pathlib import Path

    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"is under {p}, which is a file"
            raise ConfigError(f"{what} {path} {where}: name a folder (new or existing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {what} {path}: {e.strerror}") from None
    return path


def check_int(name: str, value, minimum: int, hint: str = "") -> int:
    """`value` if it is an integer >= minimum; else one ConfigError line (2.5, "8", True, -4
    are refused). `hint` follows the bound, e.g. "(or None)"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{' ' + hint if hint else ''}; got {value!r}")
    return value


def check_number(name: str, value, minimum: float = 0.0, *, above: bool = False, maximum: float | None = None,
                 hint: str = "") -> float:
    """`value` if it is a finite number >= minimum (> minimum with `above`, <= maximum when
    given); else one ConfigError line. NaN, inf, strings and booleans are refused."""
    import math

    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if above else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        if maximum is not None:
            bound = f"in [{minimum:g}, {maximum:g}]"
        raise ConfigError(f"{name} must be a finite number {bound}{' ' + hint if hint else ''}; got {value!r}")
    return value
