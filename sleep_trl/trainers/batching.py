"""Datasets smaller than one generation batch, repeated until they fill it.

TRL's `RepeatSampler` (behind `DistillationTrainer` and `GRPOTrainer`) serves whole generation batches only: a
training set with fewer rows than one batch yields no batch at all, and the trainer then runs zero steps and reports
success. A sleep on a small session hit exactly that (4 SQuAD passages gave 7 sleep prompts for a batch of 8). Both
of sleep-trl's trainers therefore repeat such a set whole until it fills one batch, so every row is in every batch
and `max_steps` still sets how long training runs.
"""

from __future__ import annotations

import math
import warnings

from accelerate import PartialState
from datasets import Dataset, concatenate_datasets


def fill_one_batch(dataset, rows_per_batch: int, name: str = "train_dataset"):
    """`dataset` repeated whole until it holds at least `rows_per_batch` rows (a map-style `Dataset` only; any other
    dataset, or one already large enough, is returned as it is). An empty dataset is refused."""
    if not isinstance(dataset, Dataset):
        return dataset
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: there is nothing to train on.")
    if len(dataset) >= rows_per_batch:
        return dataset
    copies = math.ceil(rows_per_batch / len(dataset))
    warnings.warn(
        f"`{name}` has {len(dataset)} rows, fewer than one generation batch ({rows_per_batch}): it is repeated "
        f"{copies} times so that training runs (TRL's sampler serves no partial batch).",
        stacklevel=3,
    )
    return concatenate_datasets([dataset] * copies)


def generation_batch_rows(args) -> int:
    """Prompts in one generation batch of a distillation trainer, over all processes: `per_device_train_batch_size x
    gradient_accumulation_steps x processes` (TRL's `DistillationTrainer` sampler; GRPO-style trainers have
    `args.generation_batch_size / num_generations` instead)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * PartialState().num_processes
