"""Expert parallelism in Lightning: DDP for the dense parameters, experts sharded over
expert-parallel groups (vlmoe.moe.parallel) for the MoE layers."""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..moe import parallel as par
from ..errors import ConfigError

__all__ = ["ExpertParallelStrategy", "ExpertParallelMonitor"]


class _ClosingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn / fork launcher, whose workers close their process groups together
    once the run is over. Otherwise each worker's groups (the EP subgroups too) die at
    interpreter exit on the worker's own schedule, and gloo can abort a rank whose peer
    closed first: seen once in CI as SIGABRT of rank 1 after a finished two-process fit."""

    def _wrapping_function(self, *args, **kwargs) -> None:
        super()._wrapping_function(*args, **kwargs)
        if dist.is_available() and dist.is_initialized():  # every rank finished: none is gone yet
            dist.barrier()
            par.forget_expert_parallel()
            dist.destroy_process_group()


class ExpertParallelStrategy(DDPStrategy):
    """DDP whose MoE experts are sharded over groups of `expert_parallel_size` ranks.

    Dense parameters are replicated and all-reduced by DDP as usual. Each MoE layer keeps
    E / P experts per rank (P = expert_parallel_size) and exchanges tokens with all-to-all;
    the expert shards are left out of DDP's broadcast and all-reduce, and their gradients
    are summed over the ranks holding the same shard (W / P of them). Gradient clipping by
    norm uses the norm of the whole model. Checkpoints hold every expert, in the layout of a
    single-device model, and load under any P (1 included), so runs resume on another
    number of devices. When fit, validate or test ends, the model is whole again.

    From the CLI: `--trainer.strategy vlmoe.train.ExpertParallelStrategy
    --trainer.strategy.expert_parallel_size 4`.

    Args:
        expert_parallel_size: P, ranks sharing one copy of the experts; must divide the
            world size and every MoE layer's number of experts. 1: plain DDP.
        start_method: "popen" (torchrun / SLURM / a script, the default), "spawn" or "fork";
            "forkserver" on CPU is refused (Lightning's launcher would share the parameters).
        process_group_backend: "nccl" on GPUs, "gloo" on CPUs (default: chosen by device).
        timeout: collective timeout.
        log_all_to_all: log all-to-all time, bytes and load per rank (see ExpertParallelMonitor).
        **kwargs: passed to DistributedDataParallel (e.g. find_unused_parameters=True).
    """

    requires_equal_eval_batches = True  # every MoE forward is a collective over the EP group

    def __init__(
        self,
        expert_parallel_size: int = 1,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        log_all_to_all: bool = True,
        **kwargs: Any,
    ):
        super().__init__(start_method=start_method, process_group_backend=process_group_backend, timeout=timeout, **kwargs)
        if not isinstance(expert_parallel_size, int) or expert_parallel_size < 1:
            raise ConfigError(f"expert_parallel_size must be a positive integer; got {expert_parallel_size!r}")
        self.expert_parallel_size = expert_parallel_size
        self.log_all_to_all = log_all_to_all
        self.groups: par.ExpertParallelGroups | None = None
        self._expert_names: list[str] = []
        self._failed = False

    # -- setup / teardown ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer) -> None:
        par.all_to_all_meter.sync_cuda = self.log_all_to_all  # the timing's device sync
        if self.log_all_to_all and self.expert_parallel_size > 1 and not any(
            isinstance(c, ExpertParallelMonitor) for c in trainer.callbacks
        ):
            trainer.callbacks.append(ExpertParallelMonitor())
        super().setup(trainer)

    def model_to_device(self) -> None:
        # Shard once the model is on its device (NCCL broadcasts device tensors) and before
        # DDP wraps it and the optimizers see its parameters.
        super().model_to_device()
        if self.expert_parallel_size == 1:
            return
        self.groups = par.init_expert_parallel(self.expert_parallel_size)
        module = self.lightning_module
        self._expert_names = par.shard_experts(module, self.groups)
        if not self._expert_names:
            rank_zero_warn("ExpertParallelStrategy: the model has no SparseMoE layer; it runs as plain DDP")
        ignore = set(getattr(module, "_ddp_params_and_buffers_to_ignore", [])) | set(self._expert_names)
        module._ddp_params_and_buffers_to_ignore = sorted(ignore)
        self._patch_clipping()

    def _patch_clipping(self) -> None:
        plugin = self.precision_plugin
        if getattr(plugin, "_vlmoe_expert_parallel", None) is self:
            return

        def clip_grad_by_norm(optimizer, clip_val):
            par.clip_grad_norm_(list(plugin.main_params(optimizer)), clip_val, self.lightning_module, self.groups)

        plugin.clip_grad_by_norm = clip_grad_by_norm
        plugin._vlmoe_expert_parallel = self

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # no collectives on the way out: the other ranks may be gone
        super().on_exception(exception)

    def teardown(self) -> None:
        module = self.lightning_module
        if self.groups is not None and module is not None and not self._failed:
            par.unshard_experts(module)
            names = set(self._expert_names)
            module._ddp_params_and_buffers_to_ignore = [
                n for n in getattr(module, "_ddp_params_and_buffers_to_ignore", []) if n not in names
            ]
        self.groups, self._expert_names = None, []
        super().teardown()

    def _configure_launcher(self) -> None:
        if self._start_method == "forkserver" and self.root_device.type == "cpu":
            # Lightning's launcher pickles the model to the ranks through torch.multiprocessing,
            # which puts CPU tensors in shared memory; it copies them back out only under
            # "spawn". Under "forkserver" every rank would train the same parameter storage.
            raise ConfigError('ExpertParallelStrategy(start_method="forkserver") on CPU would share the '
                              'parameters between the ranks: use start_method "spawn" or "popen"')
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _ClosingLauncher(self, start_method=self._start_method)

    # -- gradients ------------------------------------------------------------------------
    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        if self.groups is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_reduce():
            # after the last backward of the step, before clipping and the update
            out = closure()
            par.reduce_expert_gradients(self.lightning_module, self.groups)
            return out

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    # -- checkpoints ----------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        return par.gather_expert_state_dict(state, self.lightning_module) if self.groups is not None else state

    def optimizer_state(self, optimizer) -> dict:
        state = super().optimizer_state(optimizer)
        if self.groups is None:
            return state
        raw = getattr(optimizer, "_optimizer", optimizer)
        return par.gather_expert_optimizer_state(state, raw, self.lightning_module)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if self.groups is not None:
            states = [
                par.slice_expert_optimizer_state(s, opt, self.lightning_module)
                for s, opt in zip(checkpoint["optimizer_states"], self.optimizers)
            ]
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)


class ExpertParallelMonitor(L.Callback):
    """Logs, per training batch, the expert all-to-alls of this rank (forward and backward):
    `comm/all_to_all_ms`, `comm/all_to_all_MB` (bytes sent to other ranks),
    `comm/all_to_all_share` (of the step's wall time), and the load per EP rank,
    `comm/rank_load/r{i}` (rows each rank of this rank's EP group computed, over the
    mean; 1.0 is perfect balance). Added by ExpertParallelStrategy."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        par.all_to_all_meter.reset()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        meter = par.all_to_all_meter
        groups = getattr(trainer.strategy, "groups", None)
        if groups is None or not meter.calls:
            return
        step = time.perf_counter() - self._t0
        metrics = {
            "comm/all_to_all_ms": meter.seconds * 1e3,
            "comm/all_to_all_MB": meter.bytes_sent / 2**20,
            "comm/all_to_all_share": meter.seconds / max(step, 1e-9),
        }
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and meter.rows_to_rank is not None:
            rows = meter.rows_to_rank.to(pl_module.device)
            dist.all_reduce(rows, group=groups.ep_group)  # same step on every rank: safe
            load = rows / rows.mean().clamp_min(1e-9)
            metrics.update({f"comm/rank_load/r{i}": float(x) for i, x in enumerate(load)})
        pl_module.log_dict({k: torch.tensor(float(v)) for k, v in metrics.items()}, batch_size=1)
