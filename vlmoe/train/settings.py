"""The checks of LIMoEModule's optimiser, schedule and compile settings: one ConfigError line
each, before anything is built."""
from __future__ import annotations

import torch

from ..errors import ConfigError, check_int, check_number


def check_training_args(**a) -> None:
    """One ConfigError line for an optimiser or schedule setting that cannot work."""
    for k in ("lr", "weight_decay", "aux_loss_weight"):  # lr 0: a frozen run (tests of what moves without training)
        check_number(f"--model.{k}", a[k])
    check_number("--model.eps", a["eps"], 0.0, above=True)
    check_number("--model.min_lr_ratio", a["min_lr_ratio"], 0.0, maximum=1.0)
    betas = a["betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"--model.betas must be two numbers in [0, 1), e.g. [0.9, 0.98]; got {betas!r}")
    check_int("--model.warmup_steps", a["warmup_steps"], 0)
    check_int("--model.checkpoint_every_n_steps", a["checkpoint_every_n_steps"], 1)
    if a["moe_log_every_n_steps"] is not None:
        check_int("--model.moe_log_every_n_steps", a["moe_log_every_n_steps"], 1)
    c = a["compile"]
    if not isinstance(c, bool) and not (isinstance(c, str) and c in torch._dynamo.list_backends(exclude_tags=())):
        raise ConfigError(f"compile must be true, false or a torch.compile backend (inductor, aot_eager, eager, cudagraphs, ...: "
                          f"torch._dynamo.list_backends(exclude_tags=())); got {c!r}")
