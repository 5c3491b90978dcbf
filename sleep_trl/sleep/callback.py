"""SleepCallback: give any transformers / TRL `Trainer` a sleep every N steps.

    mem = attach_memory(model, MemoryConfig(...)); mem.freeze_all_but(mem.expand("fast"))
    trainer = SFTTrainer(model=model, args=..., train_dataset=data,
                         callbacks=[SleepCallback(every_n_steps=200, prompts=prompt_dataset)])
    trainer.train()

The trainer trains the fast level of the model's continuum memory (the wake). Every `every_n_steps` optimizer steps
(default: the fast level's `chunk_size`, i.e. its boundary in the memory schedule) the callback pauses training and
consolidates what the fast level holds into a newly unlocked slow expert (Knowledge Seeding with the
GeneralizedDistillationTrainer: the teacher is the model as it is, the student the same weights with the fast level
suspended, only the new expert learns), resets the fast level (its optimizer state too), unlocks a fresh fast slot
and lets training resume.

Its state (sleeps done, their history) is saved with the trainer's checkpoints (`trainer_state.json`, as a
`transformers.ExportableState`), and the memory with each checkpoint folder, so `trainer.train(resume_from_checkpoint=
...)` continues with the same memory and sleep count. Single-process training (CPU or one GPU) is supported.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


def prompts_from_dataset(dataset, limit: int, words: int = 8):
    """Consolidation prompts from a training dataset: its `prompt` column, the turns before the last one of a
    `messages` column, or the first `words` words of a `text` column."""
    from datasets import Dataset

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


class SleepCallback(TrainerCallback, ExportableState):
    """Consolidate the fast memory into a new slow expert every `every_n_steps` steps, then prune and resume.

    Args:
        every_n_steps: steps between sleeps; default the fast level's `chunk_size`.
        prompts: what the awake model is asked during sleep (a `datasets.Dataset` with a `prompt` column, or a list
            of prompts); default: taken from the trainer's training data (see `prompts_from_dataset`).
        consolidation_args: a `GeneralizedDistillationConfig` (or a dict of its fields) for the sleeps; output
            directory, seed, device flags and `trainable_parameters` are filled in per sleep.
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

    def _memory(self, model):
        from ..memory import find_memory

        memory = find_memory(model)
        if memory is None:
            raise ValueError(
                "SleepCallback needs a continuum memory on the trained model: `attach_memory(model, MemoryConfig())` "
                "and train its fast level (`mem.freeze_all_but(mem.expand('fast'))`)."
            )
        return memory

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if args.world_size > 1:
            raise ValueError("SleepCallback supports single-process training (one CPU or GPU process).")
        memory = self._memory(model)
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
            from ..memory import has_memory, load_memory

            if has_memory(checkpoint):
                load_memory(model, checkpoint)
                self._restore_wake(memory)

    def on_step_end(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.sleep(model, processing_class, optimizer, args, state)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        # Trainer checkpoints of a PEFT-wrapped or ZeRO model may not carry the memory: write it explicitly.
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            self._memory(model).save(checkpoint)

    # -- the sleep ----------------------------------------------------------------------------------------------------

    def _consolidation_config(self, args, state, names):
        from ..trainers import GeneralizedDistillationConfig

        given = self.consolidation_args
        if isinstance(given, GeneralizedDistillationConfig):
            base = {f.name: getattr(given, f.name) for f in fields(given) if f.init}
        else:
            base = dict(given or {})
            base.setdefault("max_steps", 20)
            base.setdefault("per_device_train_batch_size", 8)
            base.setdefault("learning_rate", 1e-3)
            base.setdefault("lmbda", 0.0)
            base.setdefault("alpha", 1.0)
            base.setdefault("beta", 0.0)
            base.setdefault("max_completion_length", 32)
        base.update(
            output_dir=str(Path(args.output_dir) / f"sleep-{self.num_sleeps}"),
            seed=args.seed + state.global_step,
            use_cpu=args.use_cpu,
            bf16=args.bf16,
            fp16=args.fp16,
            report_to="none",
            save_strategy="no",
            trainable_parameters=names,
            teacher_view="memory",
            teacher_model_name_or_path=None,
            teachers=None,
        )
        if base.get("alpha", 1.0) >= 1.0:
            base["gamma"] = 0.0
        return GeneralizedDistillationConfig(**base)

    def _prompt_dataset(self):
        from datasets import Dataset

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
        from ..trainers import GeneralizedDistillationTrainer

        memory = self._memory(model)
        was_training = model.training
        names = memory.expand(self.slow_level)
        memory.suspend(self.fast_level)
        trainer = GeneralizedDistillationTrainer(
            model=model,
            args=self._consolidation_config(args, state, names),
            train_dataset=copy.copy(self._prompt_dataset()),
            processing_class=processing_class,
        )
        result = trainer.train()
        memory.reset(self.fast_level, optimizer=optimizer)  # synaptic pruning, Adam moments of the fast slot too
        self._restore_wake(memory)
        model.train(was_training)
        record = {
            "step": state.global_step,
            "slow_slot": memory.unlocked(self.slow_level) - 1,
            "consolidation_loss": round(result.training_loss, 6),
        }
        self.history.append(record)
        self.num_sleeps += 1
        return record
