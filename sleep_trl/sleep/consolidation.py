"""The sleep step: consolidate what the fast memory holds into a newly unlocked slow expert, then prune.

One function, `consolidate`, used by the Sleep cycle (`SleepCycle`) and by `SleepCallback` alike, with one set of
defaults (`CONSOLIDATION_DEFAULTS`). The steps (paper notes §2-§3):

1. `mem.expand(slow)`: one new low-rank expert in every attached layer of the slow level (B = 0: the function is
   unchanged); only it will train.
2. `mem.suspend(fast)`: the student must not see what the teacher (the awake model) holds in fast memory.
3. Knowledge Seeding with `GeneralizedDistillationTrainer`: the teacher is the memory's teacher view (the model
   before the expand, fast level on: no second copy of the weights), the student the same weights with the new
   expert on; replayed rows of earlier sessions are taught by the long-term memory before this sleep.
4. `mem.reset(fast)`: synaptic pruning; the fast level is free for the next wake (and with an optimizer, its
   moments are dropped too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

from transformers import TrainingArguments

from ..generation.distributed import mean_over_processes, release_engine
from ..memory import find_memory
from ..trainers.generalized_distillation_config import GeneralizedDistillationConfig
from ..trainers.generalized_distillation_trainer import GeneralizedDistillationTrainer
from .console import quiet_trainer

# transformers renamed `gradient_checkpointing` to `activation_checkpointing` (5.2x); TRL's configs still default the
# old name to True, so the new name is what turns it off without a deprecation warning.
CHECKPOINTING = next(
    (f.name for f in fields(TrainingArguments) if f.name == "activation_checkpointing"), "gradient_checkpointing"
)

# What every phase trainer of a sleep gets unless told otherwise: CPU-friendly, quiet, no checkpoints of its own
# (the cycle keeps its own per-phase checkpoints), a short warmup.
PHASE_DEFAULTS = {
    "bf16": False,
    CHECKPOINTING: False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 5,
    "logging_nan_inf_filter": False,  # a non-finite loss must show (and stop the phase), not be averaged away
    "disable_tqdm": True,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 2,
}

# Consolidation settings measured on SmolLM2-135M-Instruct on 2 CPU cores (README): teacher-written sequences, a
# forward-KL-like target, a learning rate fit for fresh low-rank experts (B starts at zero). 24 steps carried 0.29 of
# the awake 0.75 into the new expert, 40 steps 0.67.
CONSOLIDATION_DEFAULTS = {
    **PHASE_DEFAULTS,
    "max_steps": 40,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-2,
    "lmbda": 0.0,
    "alpha": 1.0,
    "beta": 0.0,
    "max_completion_length": 24,
}

# Fields the sleep step sets itself: the trainable slot and the teacher view (and no separate teacher).
CONSOLIDATION_FIXED = ("trainable_parameters", "teacher_view", "teacher_model_name_or_path", "teachers")


def config_fields(config) -> dict:
    """The init fields of a config dataclass as a dict (to rebuild it with some fields changed)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.init}


def consolidation_fields(given: GeneralizedDistillationConfig | Mapping | None = None, **fixed) -> dict:
    """`CONSOLIDATION_DEFAULTS`, then the caller's fields (a config or a dict), then `fixed` (per-sleep values such
    as `output_dir` and `seed`)."""
    if isinstance(given, GeneralizedDistillationConfig):
        merged = config_fields(given)
    else:
        merged = {**CONSOLIDATION_DEFAULTS, **dict(given or {})}
    merged.update(fixed)
    return merged


@dataclass
class ConsolidationResult:
    """What one sleep did: the slow slot it filled and the trainer's figures."""

    slot: int
    steps: int
    train_loss: float
    prompts: int
    distill_loss_last: float | None = None
    router_loss_last: float | None = None
    trunk_served_rows: int | None = None  # rows whose lower layers came from the frozen trunk (None: no trunk)
    shared_prefix_batches: int | None = None  # student forwards that read the prompts' shared prefix once

    def metrics(self) -> dict:
        out = {"steps": self.steps, "train_loss": round(self.train_loss, 4), "prompts": self.prompts}
        for name in ("distill_loss_last", "router_loss_last", "trunk_served_rows", "shared_prefix_batches"):
            if getattr(self, name) is not None:
                out[name] = round(getattr(self, name), 4)
        return out


def consolidate(
    model,
    tokenizer,
    prompts,
    args: Mapping,
    *,
    fast_level: str | None = "fast",
    slow_level: str = "slow",
    warm_start: bool = False,
    expand: bool = True,
    optimizer=None,
    callbacks=None,
    frozen_trunk: bool = True,
) -> ConsolidationResult:
    """Consolidate the fast level of `model`'s continuum memory into a new expert of `slow_level`.

    Args:
        model: a model carrying a continuum memory (`attach_memory`).
        tokenizer: its tokenizer.
        prompts: a `datasets.Dataset` with a `prompt` column (and optionally `teacher_prompt`, `replay`): what the
            awake model is asked during sleep.
        args: the `GeneralizedDistillationConfig` fields of this sleep (`consolidation_fields`); the trainable
            parameters and the teacher view are set here.
        fast_level: the level to consolidate from, suspended for the student and pruned afterwards; `None` when
            nothing is held in fast memory (wake in context: the teacher holds the knowledge in its prompt).
        slow_level: the level that receives the new expert.
        warm_start: the new expert starts as a copy of the fast expert (the paper's student: the expanded model
            with the fast block's update), so the student begins where the awake model is (`mem.copy_slot`).
        expand: False is the "no expansion" ablation: once `slow_level` has an expert, every later sleep trains
            that same expert again (no new capacity; no warm start, which would overwrite it). The model before
            this sleep is then no view of the student (the expert it changes is the one that held old knowledge),
            so the teacher's samples and hidden states are all computed before the first step (`teacher_cache:
            on`), which needs off-policy batches only (`lmbda: 0`).
        optimizer: the wake's optimizer, whose state for the pruned fast slot is dropped.
        callbacks: trainer callbacks (e.g. rich progress).
        frozen_trunk: the student reads the teacher's samples through the memory's frozen trunk (`FrozenTrunk`).
    """
    memory = find_memory(model)
    if memory is None:
        raise ValueError(
            "consolidate needs a continuum memory on the model: `attach_memory(model, MemoryConfig())` and train its "
            "fast level (`mem.freeze_all_but(mem.expand('fast'))`)."
        )
    views = {}
    if expand or memory.unlocked(slow_level) == 0:
        names = memory.expand(slow_level)
        if fast_level is not None and warm_start:
            memory.copy_slot((fast_level, 0), (slow_level, memory.unlocked(slow_level) - 1))
        teacher = {"teacher_view": "memory"}
    else:
        names = _retrain_newest(memory, slow_level, fast_level, args)
        views = {"teacher_view": lambda: _resumed(memory, fast_level), "replay_view": contextlib.nullcontext}
        teacher = {"teacher_view": None, "teacher_cache": "on", "teacher_cache_hidden_states": True}
    if fast_level is not None:
        memory.suspend(fast_level)
    config = GeneralizedDistillationConfig(
        **{**args, "trainable_parameters": names, "teacher_model_name_or_path": None, "teachers": None, **teacher}
    )
    trainer = GeneralizedDistillationTrainer(
        model=model, args=config, train_dataset=prompts, processing_class=tokenizer, callbacks=callbacks, **views
    )
    result, trunk = _train(trainer, memory, frozen_trunk)
    if config.max_steps > 0 and trainer.state.global_step < config.max_steps:
        raise RuntimeError(
            f"The sleep ran {trainer.state.global_step} of its {config.max_steps} consolidation steps: the prompt "
            "set gave the trainer too few batches. Please report this with your recipe."
        )
    release_engine(trainer)
    if fast_level is not None:
        memory.reset(fast_level, optimizer=optimizer)  # synaptic pruning (and the Adam moments of the fast slot)
    logs = [h for h in trainer.state.log_history if "distill/loss" in h]
    router = [h["router/loss"] for h in trainer.state.log_history if "router/loss" in h]
    return ConsolidationResult(
        slot=memory.unlocked(slow_level) - 1, steps=trainer.state.global_step,
        train_loss=mean_over_processes(result.training_loss), prompts=len(prompts),
        distill_loss_last=logs[-1]["distill/loss"] if logs else None,
        router_loss_last=router[-1] if router else None,
        trunk_served_rows=None if trunk is None or trunk.disabled else trunk.served_rows,
        shared_prefix_batches=trainer._shared_prefix_batches or None,
    )


def frozen_trunk_for(trainer, memory, enabled: bool, **kwargs):
    """The memory's frozen trunk for a phase's trainer, or None: turned off, or sharded (DeepSpeed, FSDP), whose
    processes must run every layer in step."""
    if not enabled or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return None
    return memory.frozen_trunk(**kwargs)


def _train(trainer, memory, frozen_trunk: bool):
    """Run the sleep's trainer through the memory's frozen trunk. Distillation never reads the output at a row's last
    token (it predicts past the row), the one position whose states a generation does not record."""
    trunk = frozen_trunk_for(trainer, memory, frozen_trunk, last_position_unused=True)
    with trunk or contextlib.nullcontext():
        return quiet_trainer(trainer).train(), trunk


def _retrain_newest(memory, slow_level: str, fast_level: str | None, args: Mapping) -> list[str]:
    """The no-expansion sleep: the slow level's newest expert trains again (every other parameter frozen)."""
    if fast_level is None:
        raise ValueError("A sleep without expansion consolidates a fast level (`wake: fast`), not a context.")
    for name, value in (("lmbda", 0.0), ("router_loss_weight", 0.0)):
        if float(args.get(name, value) or 0.0) != value:
            raise ValueError(
                f"A sleep without expansion needs `consolidation_args.{name}: {value}` (got {args[name]}): its teacher, "
                "the model before this sleep, exists only in the teacher cache filled before the first step."
            )
    slot = memory.unlocked(slow_level) - 1
    names = memory.names(memory.parameters(slow_level, slots=[slot]))
    memory.freeze_all_but(names)
    return names


@contextlib.contextmanager
def _resumed(memory, level: str):
    """The awake model while the student has `level` suspended: the teacher of new rows without expansion."""
    memory.resume(level)
    try:
        yield memory
    finally:
        memory.suspend(level)
