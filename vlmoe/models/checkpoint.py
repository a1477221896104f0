"""Checkpoint I/O. Checkpoints are untrusted input: only safetensors or
`torch.load(weights_only=True)` are used, so a pickle that would run code is refused."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn
from ..errors import ConfigError, CheckpointError, NotFound, make_output_folder

__all__ = ["read_checkpoint", "read_state_dict", "load_state_dict_strict", "save_pretrained", "CheckpointError", "find_export"]

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _describe_start(head: bytes) -> str:
    """What a file that is not a checkpoint looks like, from its first bytes."""
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return f"a text file (it starts with {text[:24]!r})"
    except UnicodeDecodeError:
        pass
    return f"not a PyTorch checkpoint (it starts with bytes {head[:8].hex(' ')})"


def _torch_load(path: Path):
    """torch.load(weights_only=True) with one clear line for every way a file can be wrong.
    The advice is never to load with weights_only=False: checkpoints are untrusted."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    expected = "expected a PyTorch checkpoint (a .ckpt from vlmoe fit, or a .pt/.bin written by torch.save) or a .safetensors file"
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint: was its write interrupted? {expected}")
    if _is_safetensors(head):
        raise CheckpointError(
            f"{path} is a safetensors file (weights only), not a PyTorch checkpoint, whatever its name: rename it to "
            f"{path.with_suffix('.safetensors').name} and load it as weights (--model.pretrained, load_model, "
            f"create_model(pretrained=...)); resuming a run (--ckpt_path) needs the .ckpt that vlmoe fit wrote"
        )
    if not (head.startswith(_ZIP) or head.startswith(_PICKLE)):
        raise CheckpointError(f"{path} is {_describe_start(head)}: {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
        if blocked:
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that would import and run code ({blocked}). "
                f"Checkpoints are loaded as tensors and plain containers only; convert it to safetensors "
                f"(vlmoe.save_pretrained or safetensors.torch.save_file) where you trust its origin"
            ) from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        raise CheckpointError(
            f"refusing to load {path}: the safe loader (tensors and plain containers only) cannot read the pickle inside "
            f"({detail}): the file is corrupt, or holds objects whose loading could run code. Convert it to safetensors "
            f"where you trust its origin, or {expected[0].lower() + expected[1:]}"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip/pickle readers raise many types for damaged files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {detail[:120]}): {expected}") from None


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning / torch checkpoint as a dict (safely loaded), or one clear error."""
    path = Path(path)
    if path.is_dir():
        raise NotFound(f"{path} is a folder, not a checkpoint file: name the .ckpt inside it "
                       f"(vlmoe fit writes <run>/checkpoints/last.ckpt and step*.ckpt)")
    if not path.is_file():
        raise NotFound(f"checkpoint not found: {path}")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict: expected a .ckpt written by vlmoe fit")
    return obj


def read_state_dict(path: str | Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from .safetensors, .pt/.pth/.bin or a Lightning .ckpt.

    Unwraps {"state_dict": ...} / {"model": ...} containers and strips DDP's `module.`
    prefix. With `prefix` (e.g. "model." for our Lightning checkpoints) only keys under it
    are kept, without it."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"checkpoint not found: {path}")
    if path.is_dir():
        path = path / WEIGHTS_NAME
        if not path.exists():
            raise NotFound(f"{path.parent} has no {WEIGHTS_NAME}; pass the weights file itself")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    else:
        sd = _torch_load(path)
        for key in ("state_dict", "model", "module"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict ({{name: tensor}})")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        bad = next(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{path} does not hold a state dict of tensors (entry {bad!r} is a {type(sd[bad]).__name__})")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names of the model's state-dict entries grouped by shared storage (shared MoE layers
    and the single LIMoE tower appear under several names)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else ("empty", name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True, source: str = "checkpoint") -> dict:
    """Load with a clear report: missing, unexpected and mis-shaped keys raise a
    CheckpointError that lists them (strict), or are skipped and returned (strict=False).
    A tensor shared under several names needs to be present under one of them."""
    expected = model.state_dict()
    filled = dict(sd)
    for names in _alias_groups(model):
        present = [n for n in names if n in sd]
        if present:
            for n in names:
                filled.setdefault(n, sd[present[0]])
    missing = sorted(k for k in expected if k not in filled)
    unexpected = sorted(k for k in sd if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(filled[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in filled and filled[k].shape != expected[k].shape
    )
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        lines = [f"{source} does not match the model:"]
        for what, keys in report.items():
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {what} ({len(keys)}): " + ", ".join(shown))
        if any(".mlp.c_fc." in k or ".mlp.fc1." in k for k in unexpected) and any(".mlp.experts." in k for k in missing):
            lines.append("  this looks like a dense checkpoint: turn it into a MoE model with vlmoe.upcycle_open_clip")
        lines.append("  pass strict=False to load what matches and skip the rest")
        raise CheckpointError("\n".join(lines))
    bad = {k.split(":")[0] for k in mismatched}
    model.load_state_dict({k: v for k, v in filled.items() if k in expected and k not in bad}, strict=False)
    return report


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """vlmoe's export: `path/model.safetensors` (shared tensors stored once) and
    `path/config.json` (the model config, so `create_model(path, pretrained=path)` rebuilds it)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("save_pretrained needs a vlmoe model (with a .config); got " + type(model).__name__)
    path = make_output_folder(path, "the export folder")
    save_model(model, str(path / WEIGHTS_NAME), metadata={"format": "vlmoe"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


def find_export(path: str | Path) -> tuple[Path, dict] | None:
    """(weights file, config) if `path` is an export folder or a .safetensors file with a
    config.json beside it; else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    cfg = folder / CONFIG_NAME
    if weights.exists() and weights.suffix == ".safetensors" and cfg.exists():
        return weights, json.loads(cfg.read_text())
    return None
