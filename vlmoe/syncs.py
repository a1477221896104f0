"""Counting host syncs: the operations whose result the host must read back before it can
queue the next kernel (on a GPU each one stalls the step; under torch.compile each one
breaks the graph).

`HostSyncCounter` is a `TorchDispatchMode` that records every such operation as it is
dispatched, on any device, so the count is the same on a laptop CPU as on a GPU:

    with HostSyncCounter() as syncs:
        loss = model(images, texts).loss
        loss.backward()
    print(syncs.total, syncs.by_op)      # 0, {} for the capacity path

What it counts: reading a scalar back (`.item()`, `int(t)`, `bool(t)`, `if t:`), ops whose
output size depends on the data (`nonzero`, boolean indexing, `masked_select`, `unique`,
`bincount`, `repeat_interleave` without `output_size`), and copies from a GPU to the host.
On CPU `Tensor.tolist()` reads memory without dispatching an op, so it is not seen there;
`torch.cuda.set_sync_debug_mode` sees it on a GPU (`scripts/gpu_check.py` runs both).
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "count_host_syncs"]

_aten = torch.ops.aten
# Ops that always read data back to the host.
_ALWAYS = {
    _aten._local_scalar_dense.default: "scalar read (.item() / int / bool)",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.bincount.default: "bincount",
    _aten.equal.default: "torch.equal",
}


def _why(func, args, kwargs) -> str | None:
    name = _ALWAYS.get(func)
    if name is not None:
        return name
    if func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor):
        if kwargs.get("output_size") is None and not (len(args) > 2 and func is _aten.repeat_interleave.Tensor):
            return "repeat_interleave without output_size"
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return "boolean indexing"
    if func in (_aten._to_copy.default, _aten.copy_.default):
        src = args[1] if func is _aten.copy_.default else args[0]
        dst_device = args[0].device if func is _aten.copy_.default else kwargs.get("device")
        if torch.is_tensor(src) and src.device.type != "cpu" and dst_device is not None and \
                torch.device(dst_device).type == "cpu":
            return "device-to-host copy"
    return None


class HostSyncCounter(TorchDispatchMode):
    """Counts host syncs while active (see the module docstring). `by_op` maps each kind to
    its count; `where` (with `stacks=True`) keeps the innermost vlmoe frame of each, for
    finding them."""

    def __init__(self, stacks: bool = False):
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.stacks = stacks
        self.where: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why(func, args, kwargs)
        if why is not None:
            self.by_op[why] += 1
            if self.stacks:
                frames = [f for f in traceback.extract_stack()[:-1] if "/vlmoe/" in f.filename and "syncs.py" not in f.filename]
                at = f"{frames[-1].filename.split('/vlmoe/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
                self.where[f"{why} @ {at}"] += 1
        return func(*args, **kwargs)


def count_host_syncs(fn, *args, stacks: bool = False, **kwargs) -> HostSyncCounter:
    """Run fn(*args, **kwargs) under a HostSyncCounter and return the counter."""
    with HostSyncCounter(stacks=stacks) as counter:
        fn(*args, **kwargs)
    return counter
