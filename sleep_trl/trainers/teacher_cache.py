"""The frozen teacher's work done once per run: its samples for every prompt, and its hidden states on them.

During a sleep the teacher does not change (a separate frozen model, or the student's continuum memory with its
newest expert masked, which is the only thing that trains), so everything it computes on the training prompts can
be computed once, in large batches, before the first step, and reused by every step:

- **samples**: for each distinct prompt, as many teacher samples as the run will draw it (`teacher_samples_per_prompt`,
  by default the number of epochs the schedule covers, so every occurrence gets a fresh sample, as without the
  cache); off-policy batches and the imitation targets take the next unused one. The copies of a prompt sit
  together in the length-sorted work, and `TeacherSet.hf_generate` reads each distinct prompt once per call (a
  shared KV cache, `teacher_shared_prefill`) and, on a CPU, samples in rounds that drop the rows already ended
  (`teacher_sampling_rounds`). With `seq_kd: false` the dataset's own completion is the one sample.
- **hidden states**: the teacher's last hidden states over each sample's completion tokens, which the divergence
  projects through the teacher's head; off-policy batches then need no teacher forward at all. On-policy batches
  (the student writes the sequences) still run the teacher on them.
- **imitation cuts**: each sample's random prefix cut, so the semantic judge embeds the teacher's remaining text once.

Work is split over processes and gathered, so every process holds the whole cache. Replayed rows are written and
read through the replay view (in one call with the continuum memory's per-row view).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from trl.trainer.utils import pad

Key = tuple[tuple[int, ...], tuple[int, ...] | None, bool]


@dataclass
class CachedSample:
    """One teacher sample: its completion ids, each teacher's hidden states on it (`(len, hidden)`, or None), the
    imitation cut point, and the judge's embedding of the text after the cut (filled on first use)."""

    completion: list[int]
    hidden: list[torch.Tensor] | None = None
    cut: int | None = None
    suffix_embedding: torch.Tensor | None = field(default=None, repr=False)


class TeacherCache:
    """Samples (and hidden states) per distinct prompt; `take(key)` hands out the next one of a prompt."""

    def __init__(self, samples: dict[Key, list[CachedSample]], seconds: float = 0.0):
        self.samples = samples
        self.uses: Counter = Counter()
        self.seconds = seconds

    def __len__(self) -> int:
        return sum(len(v) for v in self.samples.values())

    def __contains__(self, key: Key) -> bool:
        return key in self.samples

    def take(self, key: Key) -> CachedSample:
        """The next unused sample of `key` (cycling when a prompt is drawn more often than it has samples)."""
        pool = self.samples[key]
        sample = pool[self.uses[key] % len(pool)]
        self.uses[key] += 1
        return sample

    @property
    def num_tokens(self) -> int:
        return sum(len(s.completion) for pool in self.samples.values() for s in pool)

    @property
    def hidden_bytes(self) -> int:
        return sum(
            h.numel() * h.element_size()
            for pool in self.samples.values() for s in pool for h in (s.hidden or [])
        )


def row_key(prompt_ids, teacher_prompt_ids, replay: bool) -> Key:
    return (tuple(prompt_ids), None if teacher_prompt_ids is None else tuple(teacher_prompt_ids), bool(replay))


def samples_per_prompt(trainer, num_rows: int, copies: int = 1) -> int:
    """How often the run draws a prompt that fills `copies` of the dataset's `num_rows` rows, at most: the epochs
    its schedule covers times `copies` (TRL's sampler permutes the whole dataset once per epoch)."""
    args = trainer.args
    if args.teacher_samples_per_prompt is not None:
        return args.teacher_samples_per_prompt
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer.accelerator.num_processes
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * num_rows / per_step)
    return max(1, math.ceil(steps * per_step * copies / max(num_rows, 1)))


def _shard(items: list, trainer) -> list:
    """This process's share of `items` (round robin), padded to the same length on every process with repeats of
    the first item (marked None), so every process runs the same number of batches."""
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    per = math.ceil(len(items) / world)
    mine = items[rank::world]
    return mine + [None] * (per - len(mine))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_teacher_cache(trainer, rows: list[dict]) -> TeacherCache:
    """Compute the teacher's samples (and hidden states) for every distinct row of the training data."""
    t0 = time.perf_counter()
    args = trainer.args
    column = args.teacher_prompt_column
    prompt_ids = trainer._tokenize_prompts([r["prompt"] for r in rows])[0]
    teacher_prompt_ids = (
        trainer._tokenize_prompts([r[column] for r in rows])[0] if rows and rows[0].get(column) is not None else None
    )
    replay = [bool(r.get(args.replay_column) or False) for r in rows]
    distinct: dict[Key, int] = {}
    copies: Counter = Counter()  # a prompt repeated in the dataset (`new_prompt_share`) is drawn that much more
    for i in range(len(rows)):
        key = row_key(prompt_ids[i], None if teacher_prompt_ids is None else teacher_prompt_ids[i], replay[i])
        distinct.setdefault(key, i)
        copies[key] += 1
    items = [(key, s) for key in distinct
             for s in range(samples_per_prompt(trainer, len(rows), copies[key]) if args.seq_kd else 1)]
    rng = random.Random(args.seed * 7919 + 17)
    assignment = trainer.teachers.assign(len(items), rng)
    capture = args.teacher_cache_hidden_states and args.seq_kd and trainer.teachers.can_capture_hidden
    completions, hidden = _completions(trainer, items, distinct, rows, prompt_ids, assignment, capture)
    samples = {key: [] for key in distinct}
    cut_rng = random.Random(args.seed * 104_729 + 3)
    for (key, _), completion, states in zip(items, completions, hidden, strict=True):
        sample = CachedSample(completion, cut=_cut(completion, args, cut_rng))
        sample.hidden = None if states is None else [states]
        samples[key].append(sample)
    if args.teacher_cache_hidden_states and not capture:
        _hidden_states(trainer, samples)
    return TeacherCache(samples, seconds=time.perf_counter() - t0)


def _cut(completion: list[int], args, rng: random.Random) -> int:
    """Where Learning to Imitate cuts this sample (uniform between the prefix fractions, one token left at least)."""
    n = len(completion)
    lo = int(n * args.imitation_min_prefix)
    hi = min(max(lo, int(n * args.imitation_max_prefix)), max(n - 1, 0))
    return rng.randint(min(lo, hi), hi) if n > 0 else 0


def _completions(trainer, items, distinct, rows, prompt_ids, assignment, capture: bool):
    """Teacher samples (or dataset completions) for every item, generated in large length-sorted batches and
    gathered from every process; with `capture`, the teacher's hidden states on each sample too (from the
    generation's own forward passes)."""
    if not trainer.args.seq_kd:
        firsts = [distinct[key] for key, _ in items]
        completions = trainer._dataset_completions([prompt_ids[i] for i in firsts], [rows[i] for i in firsts])
        return completions, [None] * len(items)
    work = sorted(range(len(items)), key=lambda i: len(_generation_prompt(items[i][0])))
    mine = _shard(work, trainer)
    done: list[tuple[int, list[int], torch.Tensor | None]] = []
    for chunk in _batches(mine, trainer.args.teacher_cache_batch_size):
        real = [i for i in chunk if i is not None]
        chosen = real or [work[0]]  # a process with nothing left still runs the call (ZeRO-3)
        prompts = [_generation_prompt(items[i][0]) for i in chosen]
        replay = [items[i][0][2] for i in chosen]
        generated = trainer.teachers.sample(
            prompts, replay, random.Random(0), assignment=[assignment[i] for i in chosen], capture_hidden=capture
        )
        ids, states = generated if capture else (generated, [None] * len(chosen))
        done += [(i, ids[j], states[j]) for j, i in enumerate(real)]
    completions: list = [None] * len(items)
    hidden: list = [None] * len(items)
    for i, ids, states in gather_object(done):
        completions[i], hidden[i] = ids, states
    return completions, hidden


def _generation_prompt(key: Key) -> list[int]:
    return list(key[1] if key[1] is not None else key[0])


@torch.no_grad()
def _hidden_states(trainer, samples: dict[Key, list[CachedSample]]) -> None:
    """Each teacher's hidden states over every cached completion, in batches laid out as the loss lays them out
    (left-padded prompt, right-padded completion)."""
    flat = [(key, s) for key, pool in samples.items() for s in pool]
    order = sorted(range(len(flat)), key=lambda i: len(_generation_prompt(flat[i][0])) + len(flat[i][1].completion))
    mine = _shard(order, trainer)
    student = trainer.accelerator.unwrap_model(trainer.model)
    pad_id = trainer._tokenizer.pad_token_id
    device = trainer.accelerator.device
    was_training = student.training
    student.eval()
    done = []
    try:
        for chunk in _batches(mine, trainer.args.teacher_cache_batch_size):
            real = [i for i in chunk if i is not None]
            chosen = real or [order[0]]
            prompts = [torch.tensor(_generation_prompt(flat[i][0])) for i in chosen]
            completions = [torch.tensor(flat[i][1].completion or [pad_id]) for i in chosen]
            lengths = [len(flat[i][1].completion) for i in chosen]
            p_ids = pad(prompts, pad_id, padding_side="left")
            p_mask = pad([torch.ones_like(p) for p in prompts], 0, padding_side="left")
            c_ids = pad(completions, pad_id, padding_side="right")
            c_mask = pad([torch.ones_like(c) for c in completions], 0, padding_side="right")
            ids = torch.cat([p_ids, c_ids], 1).to(device)
            mask = torch.cat([p_mask, c_mask], 1).to(device)
            replay = torch.tensor([flat[i][0][2] for i in chosen], device=device)
            hidden = trainer.teachers.hidden_states(student, ids, mask, c_ids.size(1), replay)
            for row, i in enumerate(real):
                done.append((i, [h[row, : lengths[row]].to("cpu", copy=True) for h in hidden]))
    finally:
        student.train(was_training)
    for i, hidden in gather_object(done):
        flat[i][1].hidden = hidden
