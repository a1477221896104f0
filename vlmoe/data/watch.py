"""Data loading that cannot hang a run: a stalled source is named within bounded time, a
signal stops a run that waits for data, and no child process outlives the run.

* `WatchedLoader` (a DataLoader): while it waits for a batch, a note goes to stderr every
  `min(60, timeout / 4)` seconds, and after `timeout` seconds the run stops with a
  `DataError` naming the shards. SIGTERM received while it waits stops the run at once
  (Lightning's own handler only sets a flag that is read after the next training step,
  which never comes when the source is stalled).
* `pipe:` shards run in their own process group; the group is killed when the stream is
  closed, when the process exits normally or by SIGTERM, and the shell gets SIGKILL when
  the process that started it dies (even by SIGKILL). A plain command (no `|`, `;`, `&`,
  redirection or substitution) is `exec`-ed by the shell, so it dies with it too.
* DataLoader workers die with the main process (SIGTERM via PR_SET_PDEATHSIG) and kill their
  `pipe:` groups on the way out.
* On Linux the workers are forked, as under torchrun, also in ranks that Lightning started
  with "spawn": those inherit "spawn" as the default start method, and every worker would be a
  fresh interpreter importing torch, Lightning and open_clip again (seconds to tens of seconds
  a worker, at every validation, since workers are not persistent).

The watch uses SIGALRM in the main thread; where another part of the process already
handles SIGALRM, or outside the main thread, it only waits (no notes, no timeout).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref

from torch.utils.data import DataLoader
import webdataset.gopen  # noqa: F401 - the module (the package re-exports a function of the same name)

_gopen = sys.modules["webdataset.gopen"]

from ..errors import DataError

__all__ = ["WatchedLoader", "worker_init", "kill_pipes"]

_PR_SET_PDEATHSIG = 1
_LIVE: "weakref.WeakSet[_Pipe]" = weakref.WeakSet()
_SHELL_SPECIAL = re.compile(r"[|;&<>()$`\\\n]")


def _die_with_parent(sig: int) -> None:
    """Linux: `sig` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Pipe(_gopen.Pipe):
    """webdataset's Pipe, whose close() does not wait two hours for a child that never
    writes (a stalled `sleep`, a hung network copy): it kills the child's process group."""

    def close(self):
        if self.stream.closed:
            return
        self.stream.close()
        try:
            self.status = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            _killpg(self.proc)
            self.proc.wait()
            self.ignore_errors = True  # we killed it: not the command's failure
        _LIVE.discard(self)
        self.wait_for_child()


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _gopen_pipe(url, mode="rb", bufsize=8192):
    """webdataset's `pipe:` opener, with the child in its own process group and tied to its
    parent's life (see the module docstring)."""
    cmd = url[5:]
    if mode[0] not in "rw":
        raise ValueError(f"{mode}: unknown mode")
    if not _SHELL_SPECIAL.search(cmd):
        cmd = "exec " + cmd  # the command replaces the shell: killing the shell kills it
    pipe = _Pipe(cmd, mode=mode, shell=True, bufsize=bufsize, ignore_status=[141], start_new_session=True,
                 preexec_fn=lambda: _die_with_parent(signal.SIGKILL))
    _LIVE.add(pipe)
    return pipe


def kill_pipes() -> None:
    """Kill the process groups of this process's open `pipe:` shards."""
    for pipe in list(_LIVE):
        if pipe.proc.poll() is None:
            _killpg(pipe.proc)


_gopen.gopen_schemes["pipe"] = _gopen_pipe
atexit.register(kill_pipes)


def _worker_sigterm(signum, frame):
    kill_pipes()
    os._exit(128 + signum)


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker takes SIGTERM (DataLoader's shutdown, or its
    parent's death) as an order to kill its `pipe:` children and exit."""
    signal.signal(signal.SIGTERM, _worker_sigterm)
    _die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the line above
        _worker_sigterm(signal.SIGTERM, None)


class _WorkerInit:
    """`worker_init`, then the loader's own worker_init_fn (picklable, for spawned workers)."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        worker_init(worker_id)
        if self.inner is not None:
            self.inner(worker_id)


class _Stalled(BaseException):
    """Raised by the alarm inside the data pipeline: a BaseException, so that webdataset's
    error handlers (which skip bad shards) do not swallow it. Turned into a DataError."""


class WatchedLoader(DataLoader):
    """A DataLoader whose waits for a batch are bounded (see the module docstring).

    Args (beyond DataLoader's):
        what: what the batches are for ("training", "validation"...), for messages.
        sources: the shard URLs, named in messages.
        timeout_s: seconds without a batch before the run stops with a DataError.
    """

    def __init__(self, *args, what: str = "data", sources: tuple[str, ...] | list[str] = (), timeout_s: float = 600.0, **kw):
        if sys.platform.startswith("linux") and kw.get("num_workers", 0) > 0 and kw.get("multiprocessing_context") is None:
            kw["multiprocessing_context"] = "fork"
        super().__init__(*args, **kw)
        self.what, self.sources, self.timeout_s = what, list(sources), float(timeout_s)

    def _names(self) -> str:
        return ", ".join(self.sources[:3]) + (f" ... ({len(self.sources)} shards)" if len(self.sources) > 3 else "")

    def __iter__(self):
        if self.num_workers > 0 and not isinstance(self.worker_init_fn, _WorkerInit):
            # wrapped here, not in __init__: Lightning adds its per-worker seeding
            # (seed_everything(workers=True)) only to a loader that has no worker_init_fn yet
            self.worker_init_fn = _WorkerInit(self.worker_init_fn)
        it = super().__iter__()
        try:
            while True:
                try:
                    batch = self._next(it)
                except StopIteration:
                    return
                yield batch
        except GeneratorExit:  # closed early (limit_*_batches, max_steps): the pipes close with their streams
            raise
        except BaseException:  # a stall, a signal, an error: the run stops
            if self.num_workers == 0:
                kill_pipes()  # this process's pipe: children; a run that stops should not wait on them
            raise
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _next(self, it):
        if threading.current_thread() is not threading.main_thread():
            return next(it)
        every = min(60.0, self.timeout_s / 4)
        t0 = time.monotonic()

        def on_alarm(signum, frame):
            waited = time.monotonic() - t0
            if waited >= self.timeout_s - 1e-3:
                raise _Stalled(waited)
            print(f"vlmoe: waited {waited:.0f} s for a {self.what} batch from {self._names()} (the run stops after "
                  f"{self.timeout_s:g} s: --data.timeout)", file=sys.stderr, flush=True)

        def on_term(signum, frame):
            if callable(prev_term):
                prev_term(signum, frame)  # Lightning's: notes the signal (and stops DDP children)
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()

        prev_term = signal.signal(signal.SIGTERM, on_term)
        prev_alarm = signal.getsignal(signal.SIGALRM)
        armed = prev_alarm in (signal.SIG_DFL, signal.SIG_IGN, None)
        if armed:
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, every, every)
        try:
            return next(it)
        except _Stalled:
            raise DataError(
                f"no {self.what} batch within {self.timeout_s:g} s from {self._names()}: the source stalled (a pipe: command "
                f"that never writes, a hung network read?). If it is only slow, raise --data.timeout"
            ) from None
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, prev_alarm)
            if prev_term is not None:
                signal.signal(signal.SIGTERM, prev_term)
