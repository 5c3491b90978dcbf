"""SleepCallback: give any transformers / TRL `Trainer` a sleep every N steps.

    mem = attach_memory(model, MemoryConfig(...)); mem.freeze_all_but(mem.expand("fast"))
    trainer = SFTTrainer(model=model, args=..., train_dataset=data,
                         callbacks=[SleepCallback(every_n_steps=200, prompts=prompt_dataset)])
    trainer.train()

The trainer trains the fast level of the model's continuum memory (the wake). Every `every_n_steps` optimizer steps
(default: the fast level's `chunk_size`, i.e. its boundary in the memory schedule) the callback pauses training and
runs the sleep step of the Sleep cycle (`sleep_trl.sleep.consolidation.consolidate`, with the same defaults):
consolidate what the fast level holds into a newly unlocked slow expert, reset the fast level (its optimizer state
too), unlock a fresh fast slot and let training resume.

Its state (sleeps done, their history) is saved with the trainer's checkpoints (`trainer_state.json`, as a
`transformers.ExportableState`), and the memory with each checkpoint folder (`MemoryCheckpointCallback`, which it
extends), so `trainer.train(resume_from_checkpoint=...)` continues with the same memory and sleep count.
It runs in one process or under data-parallel `accelerate launch` (DDP: every process sleeps on the same prompts
and the sleep's own trainer reduces the gradients, so the processes keep one memory); DeepSpeed and FSDP are refused
(a sleep's trainer cannot re-wrap a module the running engine shards): the sleep job runs them, phase by phase.
"""

from __future__ import annotations

import copy
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..memory import find_memory, has_memory, load_memory
from .consolidation import consolidate, consolidation_fields


def prompts_from_dataset(dataset, limit: int, words: int = 8):
    """Consolidation prompts from a training dataset: its `prompt` column, the turns before the last one of a
    `messages` column, or the first `words` words of a `text` column."""
    columns = set(dataset.column_names)
    rows = dataset.select(range(min(limit, len(dataset))))
    if "prompt" in columns:
        prompts = list(rows["prompt"])
    elif "messages" in columns:
        prompts = [m[:-1] if m and m[-1].get("role") == "assistant" else m for m in rows["messages"]]
    elif "text" in columns:
        prompts = [" ".join(t.split()[:words]) for t in rows["text"]]
    else:
        raise ValueError(
            f"SleepCallback cannot find prompts in the training data (columns {sorted(columns)}): pass `prompts=`."
        )
    return Dataset.from_dict({"prompt": prompts})


def _memory_of(model):
    memory = find_memory(model)
    if memory is None:
        raise ValueError(
            "This callback needs a continuum memory on the trained model: `attach_memory(model, MemoryConfig())` and "
            "train its fast level (`mem.freeze_all_but(mem.expand('fast'))`)."
        )
    return memory


class MemoryCheckpointCallback(TrainerCallback):
    """Write the continuum memory (`memory.safetensors`, `memory_config.json`) into every checkpoint folder of a
    Trainer, so a checkpoint carries the memory's state (unlocked slots, history) as well as its tensors. Runs on
    every process (under ZeRO-3 the memory is gathered collectively); only the main process writes."""

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _memory_of(model).save(checkpoint, is_main_process=state.is_world_process_zero)


class SleepCallback(MemoryCheckpointCallback, ExportableState):
    """Consolidate the fast memory into a new slow expert every `every_n_steps` steps, then prune and resume.

    Args:
        every_n_steps: steps between sleeps; default the fast level's `chunk_size`.
        prompts: what the awake model is asked during sleep (a `datasets.Dataset` with a `prompt` column, or a list
            of prompts); default: taken from the trainer's training data (see `prompts_from_dataset`).
        consolidation_args: a `GeneralizedDistillationConfig` (or a dict of its fields) for the sleeps, on top of
            `CONSOLIDATION_DEFAULTS`; output directory, seed, device flags and the trainable slot are set per sleep.
        fast_level, slow_level: names of the memory levels to consolidate from and into.
        max_prompts: most prompts taken from the training data when `prompts` is not given.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        prompts=None,
        consolidation_args=None,
        fast_level: str = "fast",
        slow_level: str = "slow",
        max_prompts: int = 64,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.prompts = prompts
        self.consolidation_args = consolidation_args
        self.fast_level = fast_level
        self.slow_level = slow_level
        self.max_prompts = max_prompts
        self.num_sleeps = 0
        self.history: list[dict] = []
        self._train_dataset = None

    # -- state saved with checkpoints ---------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {"every_n_steps": self.every_n_steps, "fast_level": self.fast_level,
                     "slow_level": self.slow_level, "max_prompts": self.max_prompts},
            "attributes": {"num_sleeps": self.num_sleeps, "history": self.history},
        }

    # -- events -------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        sharded = PartialState().distributed_type
        if sharded in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            # A sleep trains the model with a trainer of its own; DeepSpeed and FSDP cannot wrap a module that the
            # running trainer's engine already shards (measured: ZeRO-3 fails in its parameter trace).
            raise ValueError(
                f"SleepCallback runs with one process or data-parallel processes (DDP), not under {sharded.value}: "
                "for sharded models run the sleep job instead (`accelerate launch --config_file "
                "recipes/accelerate/zero3.yaml -m sleep_trl RECIPE.yaml`), whose every phase is its own ZeRO-3 run."
            )
        memory = _memory_of(model)
        if self.every_n_steps is None:
            chunk = memory.config.level(self.fast_level).chunk_size
            if not chunk:
                raise ValueError(
                    f"The memory level {self.fast_level!r} has no chunk_size: pass `every_n_steps` to SleepCallback."
                )
            self.every_n_steps = chunk
        if train_dataloader is not None:
            self._train_dataset = getattr(train_dataloader, "dataset", None)
        if state.global_step > 0:  # resumed: the memory and our counters come from the checkpoint
            stored = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(stored, dict):
                for key, value in stored.get("attributes", {}).items():
                    setattr(self, key, value)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if has_memory(checkpoint):
                load_memory(model, checkpoint)
                self._restore_wake(memory)

    def on_step_end(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.sleep(model, processing_class, optimizer, args, state)
        return control

    # -- the sleep ----------------------------------------------------------------------------------------------------

    def _prompt_dataset(self):
        if self.prompts is None:
            if self._train_dataset is None:
                raise ValueError("SleepCallback has no prompts: pass `prompts=` (the trainer's data had none).")
            self.prompts = prompts_from_dataset(self._train_dataset, self.max_prompts)
        if isinstance(self.prompts, list):
            self.prompts = Dataset.from_dict({"prompt": self.prompts})
        return self.prompts

    def _restore_wake(self, memory) -> None:
        """After a sleep (or a resume), exactly the fast slot trains again, as during the wake before."""
        if memory.unlocked(self.fast_level) == 0:
            memory.expand(self.fast_level)
        fast = memory.parameters(self.fast_level, slots=range(memory.unlocked(self.fast_level)))
        memory.freeze_all_but(memory.names(fast))

    def sleep(self, model, processing_class, optimizer, args, state) -> dict:
        """Consolidate now: expand the slow level, distil the awake model into it, prune the fast level."""
        memory = _memory_of(model)
        was_training = model.training
        fields = consolidation_fields(
            self.consolidation_args,
            output_dir=str(Path(args.output_dir) / f"sleep-{self.num_sleeps}"),
            seed=args.seed + state.global_step,
            use_cpu=args.use_cpu, bf16=args.bf16, fp16=args.fp16, report_to="none", save_strategy="no",
        )
        result = consolidate(
            model, processing_class, copy.copy(self._prompt_dataset()), fields, fast_level=self.fast_level,
            slow_level=self.slow_level, optimizer=optimizer,
        )
        self._restore_wake(memory)
        model.train(was_training)
        record = {"step": state.global_step, "slow_slot": result.slot,
                  "consolidation_loss": round(result.train_loss, 6)}
        self.history.append(record)
        self.num_sleeps += 1
        return record
