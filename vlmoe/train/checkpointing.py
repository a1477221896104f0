"""Checkpoints of a training run: written atomically, and `last.ckpt` saved however fit ends
(max_steps, an exception, SIGTERM from a scheduler, SIGINT from a user)."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["AtomicCheckpointIO", "FinalCheckpoint", "SignalStop"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden `.NAME.partial` file beside it, then renames it into
    place: a run killed mid-write (SIGKILL, out of memory) leaves the previous checkpoint
    intact and its partial file in the run folder, where the next save replaces it,
    instead of a truncated temporary file in the system's temp folder."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)


class SignalStop(SIGTERMException):
    """SIGINT (Ctrl-C) during fit, stopped the way SIGTERM stops it: `last.ckpt` saved, then
    the console script exits 130 (Lightning's own KeyboardInterrupt path exits 1 and saves
    nothing)."""

    signum = signal.SIGINT


class FinalCheckpoint(Callback):
    """Writes `last.ckpt` when fit ends, however it ends (max_steps, max_epochs, interrupt),
    next to the periodic checkpoints. On SIGTERM (what cluster schedulers send before a
    kill) and SIGINT it saves `last.ckpt` too, once a step has run; the console script then
    exits 143 / 130."""

    def __init__(self):
        self.path: Path | None = None
        self._prev_sigint = None

    def _save(self, trainer):
        ckpt = trainer.checkpoint_callback
        dirpath = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        self.path = dirpath / "last.ckpt"
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, for resuming

    def on_fit_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                raise SignalStop()

            self._prev_sigint = signal.signal(signal.SIGINT, on_sigint)

    def _restore_sigint(self):
        if self._prev_sigint is not None:
            signal.signal(signal.SIGINT, self._prev_sigint)
            self._prev_sigint = None

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)

    def on_fit_end(self, trainer, pl_module):
        self._restore_sigint()

    def on_exception(self, trainer, pl_module, exception):
        self._restore_sigint()
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            exception.step = trainer.global_step
            if trainer.global_step > 0:  # before the first step there is nothing to resume
                self._save(trainer)
                exception.checkpoint = str(self.path)

