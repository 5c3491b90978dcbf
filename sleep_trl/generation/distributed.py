"""Work across the processes of an `accelerate launch` run, with or without DeepSpeed ZeRO-3.

`shard` gives each process an equal share of the work (the last ones padded with a repeat, dropped afterwards) and
`gather_in_order` puts the results back in the input order. Between two phases the model's parameters stay ZeRO-3
partitioned (`partitioned`); code that runs the model there does so inside `gathered_whole` (every parameter whole on
every process, ZeRO hooks lifted), so each process works on its own share with no collective call inside.
`release_engine` ends a phase's DeepSpeed engine; `main_decides`, `mean_over_processes` and `wait_for_everyone`
keep the processes' decisions and figures the same.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object


def world() -> tuple[int, int]:
    """(number of processes, this process's index); (1, 0) outside a distributed run."""
    state = PartialState()
    return state.num_processes, state.process_index


def is_main_process() -> bool:
    return PartialState().is_main_process


def wait_for_everyone() -> None:
    PartialState().wait_for_everyone()


def main_decides(decide):
    """`decide()` evaluated on the main process, the same answer on every process (e.g. whether a file the main
    process is about to write exists yet)."""
    num, rank = world()
    value = [decide() if rank == 0 else None]
    if num > 1:
        broadcast_object_list(value, from_process=0)
    return value[0]


def mean_over_processes(value: float) -> float:
    """The mean of a per-process number (e.g. a trainer's `training_loss`, which each process computes on its own
    batches) over every process; the value itself in a single process."""
    num, _ = world()
    if num == 1:
        return value
    values = gather_object([float(value)])
    return sum(values) / len(values)


def partitioned(model) -> bool:
    """Whether the model's parameters are DeepSpeed ZeRO-3 partitioned right now, so that every forward gathers them
    collectively (not inside a block that gathered them whole, such as TRL's `unwrap_model_for_generation`)."""
    return any(hasattr(p, "ds_id") and getattr(p.ds_status, "name", "") != "AVAILABLE" for p in model.parameters())


def shard(items: Sequence) -> tuple[list, int]:
    """This process's round-robin share of `items`, padded with repeats of the first item to the length every
    process gets; returns (share, number of real items in it)."""
    num, rank = world()
    mine = list(items[rank::num])
    per = math.ceil(len(items) / num) if items else 0
    return mine + [items[0]] * (per - len(mine)), len(mine)


def gather_in_order(results: list, real: int, total: int) -> list:
    """The inverse of `shard`: every process's real results, in the order of the original items."""
    num, rank = world()
    if num == 1:
        return results[:real]
    everything = gather_object([(rank, results[:real])])
    out: list = [None] * total
    for r, part in everything:
        out[r::num] = part
    return out


def _is_zero_hook(hook) -> bool:
    return getattr(hook, "__module__", "").startswith("deepspeed")


@contextlib.contextmanager
def gathered_whole(model):
    """Under DeepSpeed ZeRO-3: inside the block every parameter of `model` is whole on every process and the ZeRO
    module hooks are lifted, so forward and `torch.autograd.grad` run on ordinary tensors with no collective call,
    each process on its own data. A no-op for a model that is not partitioned.

    TRL's `unwrap_model_for_generation` lifts the hooks of the engine it is given; a model trained by several engines
    one after another (the sleep cycle's phases) carries the hooks of each, and any left in place would partition
    parameters again after each submodule's forward, mid-block. So every DeepSpeed hook is lifted here (found by the
    module of its function) and put back, in its place, on exit; nothing may change the weights inside the block.
    """
    if not partitioned(model):
        yield model
        return
    import deepspeed

    stashed = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            if any(_is_zero_hook(h) for h in hooks.values()):
                stashed.append((hooks, dict(hooks)))
                for key in [k for k, h in hooks.items() if _is_zero_hook(h)]:
                    del hooks[key]
    try:
        for param in model.parameters():
            getattr(param, "ds_active_sub_modules", set()).clear()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield model
    finally:
        for hooks, saved in stashed:
            hooks.clear()
            hooks.update(saved)


def release_engine(trainer) -> None:
    """End a phase's DeepSpeed engine (`DeepSpeedEngine.destroy`: its module hooks and optimizer go), so that the next
    phase's engine is the only one on the model. The parameters stay partitioned: code between phases that runs the
    model (evaluation, rehearsal generation) does so inside `gathered_whole`."""
    engine = getattr(trainer, "model_wrapped", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and engine is not trainer.model and hasattr(engine, "destroy"):
        engine.destroy()
