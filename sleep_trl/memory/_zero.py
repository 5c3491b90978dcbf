"""DeepSpeed ZeRO-3 awareness, without importing DeepSpeed unless a parameter is actually partitioned.

Under ZeRO-3 a parameter outside its module's forward holds an empty placeholder (`ds_id` marks it); reading or
writing it needs `deepspeed.zero.GatheredParameters`. Everything else in `sleep_trl.memory` takes shapes from the
model config, never from `param.shape`, so attaching to a partitioned model is safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: Iterable[torch.Tensor], modify: bool = False):
    """Context in which `params` hold their full values; with `modify=True`, writes made inside are kept (every
    process must compute the same values: rank 0's are broadcast). A no-op for ordinary parameters."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reached when parameters are ZeRO-3 partitioned, so DeepSpeed is installed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
