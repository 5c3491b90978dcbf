"""The teachers of Knowledge Seeding: separate (frozen) models, or the student itself seen through a view.

A `Teacher` is one source of next-token distributions and samples: a prepared model (a smaller self, another
checkpoint), or a *view* of the student (`teacher_view`: the continuum memory before its newest expansion, a PEFT
model with its adapter disabled, or the student as it is with a richer `teacher_prompt`), which holds no second copy
of the weights. `TeacherSet` holds every teacher of a trainer and does what the trainer asks of them: their last
hidden states on a batch (for the divergence), their samples for a batch of prompts (the off-policy sequences and
the imitation targets), the combined head of several teachers.

Replayed rows (`replay_column`) are taught by the teacher's *replay view* (for the memory view: the long-term memory
as it was before this sleep, fast level silent). `TeacherSet.view_groups` is the one place that splits a batch into
the rows of each view; under DeepSpeed ZeRO-3 every process runs every group (an empty one on a dummy row,
discarded), because parameters are gathered collectively and a process that skipped a forward would hang the others.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import AutoTokenizer
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, pad

from ..assets import resolve_model_path
from ..generation.hf import prefill_cache
from ..generation.vllm_cpu import TeacherEngine
from ..memory import FrozenTrunk, find_memory
from .generalized_distillation_objective import logit_scale_of


@dataclass
class Teacher:
    """One teacher: a separate (frozen, prepared) model, or the student itself seen through `view()`."""

    weight: float
    model: Any = None  # wrapped/prepared module, or None for a view of the student
    view: Callable[[], Any] | None = None
    replay_view: Callable[[], Any] | None = None  # the view that teaches replayed (old) rows, for a view teacher
    name: str = "teacher"
    # `row_view(replay_mask)`: one view in which replayed rows see the replay view and the others the teacher view,
    # so one forward or generate call serves a mixed batch (the continuum memory's per-row view).
    row_view: Callable[[torch.Tensor], Any] | None = None

    @property
    def is_view(self) -> bool:
        return self.model is None

    @property
    def splits_replay(self) -> bool:
        """Replayed rows need a view of their own (a separate forward/generate call)."""
        return self.is_view and self.replay_view is not None and self.replay_view is not self.view


def _rowless(view):
    """A `view_groups` context factory for a view that is the same for every row (`index` ignored); None: no view."""
    return lambda index=None: contextlib.nullcontext() if view is None else view()


def backbone_of(model):
    """The transformer backbone whose output is the last hidden state (what TRL's `_get_last_hidden_state` runs)."""
    if is_peft_model(model):
        model = model.base_model.model
    return model.base_model


def _capture_into(captured: list):
    """A forward hook that keeps, per forward of a generation, the last hidden state of each row's newest position
    (the prefill's last position, then each decoding step's single one)."""

    def hook(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden[:, -1:].detach())

    return hook


def tokenizer_fingerprint(tokenizer) -> tuple:
    return (tuple(sorted(tokenizer.get_vocab().items())), tokenizer.eos_token, tokenizer.pad_token)


def teacher_sources(teacher_model, args) -> list:
    """The teacher models to load (ids, paths or modules), from the trainer argument or the config."""
    if teacher_model is not None:
        sources = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    elif args.teachers:
        sources = list(args.teachers)
    elif args.teacher_model_name_or_path is not None:
        sources = [args.teacher_model_name_or_path]
    else:
        sources = []
    if args.teacher_weights is not None and sources and len(args.teacher_weights) != len(sources):
        raise ValueError(
            f"`teacher_weights` has {len(args.teacher_weights)} entries but {len(sources)} teachers were given."
        )
    if sources and args.teacher_view is not None:
        raise ValueError(
            f"Both a teacher model and `teacher_view: {args.teacher_view}` were given: choose a separate teacher "
            "or Self-Knowledge Seeding through a view, not both."
        )
    return sources


def view_teacher(student, args, teacher_view=None, replay_view=None) -> Teacher:
    """The teacher that is the student itself seen through a view: the teacher view, the replay view (who teaches
    rows marked in `replay_column`) and, for the continuum memory, the per-row view serving both in one call."""
    if teacher_view is not None:
        return Teacher(weight=1.0, view=teacher_view, replay_view=replay_view, name="teacher_view")
    if args.teacher_view == "self":
        return Teacher(weight=1.0, view=contextlib.nullcontext, replay_view=contextlib.nullcontext, name="self")
    if args.teacher_view == "disable_adapter":
        if not is_peft_model(student):
            raise ValueError("`teacher_view: disable_adapter` needs a PEFT student (pass a `peft_config`).")
        view = student.disable_adapter  # one bound method for both: replayed rows need no separate call
        return Teacher(weight=1.0, view=view, replay_view=view, name="disable_adapter")
    memory = find_memory(student)
    if memory is not None:
        # Replayed old knowledge is taught by the long-term memory as it was before this sleep: the levels the
        # student has suspended (the awake fast level, which may have overwritten old answers) stay silent.
        return Teacher(
            weight=1.0,
            view=memory.teacher_view,
            replay_view=lambda: memory.teacher_view(suspend=set(memory.state.suspended)),
            row_view=lambda replay: memory.teacher_view(
                rows_suspend={level: replay for level in memory.state.suspended}
            ),
            name="memory",
        )
    if args.teacher_view == "memory":
        raise ValueError(
            "`teacher_view: memory` needs a continuum memory attached to the student "
            "(`sleep_trl.memory.attach_memory`) and expanded once."
        )
    raise ValueError(
        "No teacher: give `teacher_model` (or `teacher_model_name_or_path` / `teachers` in the config), or a "
        "`teacher_view` for Self-Knowledge Seeding, or attach a continuum memory to the student."
    )


def load_teachers(trainer, sources: list, args) -> list[Teacher]:
    """Load, check (same tokenizer as the student) and prepare every teacher model, as TRL prepares its one."""
    weights = args.teacher_weights or [1.0] * len(sources)
    total = float(sum(weights))
    init_kwargs = dict(args.teacher_model_init_kwargs or {})
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        init_kwargs["device_map"] = None
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if args.teacher_model_revision is not None:
        init_kwargs.setdefault("revision", args.teacher_model_revision)
    student_fp = tokenizer_fingerprint(trainer._tokenizer)
    teachers = []
    for index, source in enumerate(sources):
        if isinstance(source, str):
            path = resolve_model_path(source)
            teacher_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
            model = create_model_from_path(path, **init_kwargs)
            name = Path(path).name
        else:
            model, name = source, getattr(source.config, "_name_or_path", f"teacher{index}") or f"teacher{index}"
            teacher_tok = None
            if name and Path(name, "tokenizer_config.json").exists():
                teacher_tok = AutoTokenizer.from_pretrained(name)
            else:
                warnings.warn(
                    f"Teacher {name!r} was given as a model object with no tokenizer beside it, so sleep-trl cannot "
                    "check that it shares the student's tokenizer (only that its embedding table is large enough). "
                    "Pass the teacher as a path, or `save_pretrained` it with its tokenizer, to have it checked.",
                    stacklevel=3,
                )
        if teacher_tok is not None and tokenizer_fingerprint(teacher_tok) != student_fp:
            raise ValueError(
                f"Teacher {name!r} uses a different tokenizer from the student. Knowledge Seeding compares "
                "next-token distributions over one vocabulary, so every teacher must share the student's tokenizer "
                "(embedding tables padded to different sizes are fine)."
            )
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if trainer.is_deepspeed_enabled:
            prepared = prepare_deepspeed(model, trainer.accelerator)
        else:
            prepared = trainer.accelerator.prepare_model(model, evaluation_mode=True)
        teachers.append(Teacher(weight=weights[index] / total, model=prepared, name=name))
    if len(teachers) > 1 and args.teacher_combination == "logit_mean":
        for t in teachers:
            cfg = trainer.accelerator.unwrap_model(t.model).config.get_text_config()
            if getattr(cfg, "final_logit_softcapping", None) is not None:
                raise ValueError(
                    f"Teacher {t.name!r} soft-caps its logits, which `teacher_combination: logit_mean` cannot fold "
                    "into one projection. Use `teacher_combination: prob_mean`."
                )
    return teachers


class TeacherSet:
    """Every teacher of one `GeneralizedDistillationTrainer`, and what the trainer asks of them.

    Args:
        trainer: the trainer (its accelerator, generation settings, vLLM engine and student are used).
        teachers: the teachers, weights normalised.
        has_replay: whether the training data marks replayed rows.
    """

    def __init__(self, trainer, teachers: list[Teacher], has_replay: bool = False):
        self.trainer = trainer
        self.teachers = teachers
        self.has_replay = has_replay
        self._concat_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._engines: dict[int, TeacherEngine] = {}

    def __len__(self) -> int:
        return len(self.teachers)

    def __getitem__(self, index: int) -> Teacher:
        return self.teachers[index]

    def __iter__(self):
        return iter(self.teachers)

    @property
    def first_model(self):
        """The first separate teacher model (TRL's `teacher_model` attribute), or None for a view."""
        return next((t.model for t in self.teachers if not t.is_view), None)

    def module(self, teacher: Teacher, student):
        """The module that computes as `teacher`: the student itself for a view, else the unwrapped teacher."""
        return student if teacher.is_view else self.trainer.accelerator.unwrap_model(teacher.model)

    # ---- which rows each view teaches --------------------------------------------------------------------------
    def view_groups(self, teacher: Teacher, replay: Sequence[bool], *, split: bool = False):
        """`(view, rows)` pairs covering the batch in as few calls as the teacher allows.

        A teacher with a per-row view (the continuum memory) serves new and replayed rows together: one group.
        Otherwise the teacher view takes the new rows and the replay view the replayed ones (only when they differ);
        empty groups are dropped, except under DeepSpeed, where every process must run the same calls (see the
        module docstring). `split=True` forces the two-call form (vLLM serves dense weights: no per-row view).
        Each `view` is a context factory: `view()` for a forward over the group's rows in order, `view(index)` for a
        forward over the rows `index` picks of them (a per-row view then follows the rows)."""
        n = len(replay)
        if not (teacher.splits_replay and self.has_replay):
            return [(_rowless(teacher.view), list(range(n)))]
        if teacher.row_view is not None and not split:
            mask = torch.tensor(list(replay), dtype=torch.bool)
            if not mask.any():
                return [(_rowless(teacher.view), list(range(n)))]
            return [(lambda index=None: teacher.row_view(mask if index is None else mask[index]), list(range(n)))]
        groups = [
            (_rowless(teacher.view), [i for i in range(n) if not replay[i]]),
            (_rowless(teacher.replay_view), [i for i in range(n) if replay[i]]),
        ]
        if self.trainer.is_deepspeed_enabled:
            return groups
        return [g for g in groups if g[1]]

    # ---- hidden states for the divergence ----------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, student, input_ids, attention_mask, logits_to_keep, replay_mask=None) -> list[torch.Tensor]:
        """Each teacher's last hidden states over the last `logits_to_keep` positions of the batch."""
        replay = replay_mask.tolist() if replay_mask is not None else [False] * input_ids.size(0)
        return [
            self._hidden(t, student, input_ids, attention_mask, logits_to_keep, replay) for t in self.teachers
        ]

    def _hidden(self, teacher: Teacher, student, input_ids, attention_mask, logits_to_keep, replay):
        trainer = self.trainer
        if not teacher.is_view:
            unwrapped = trainer.accelerator.unwrap_model(teacher.model)
            unwrapped.eval()
            # Through the teacher's own wrapper, so DeepSpeed/FSDP materialise its sharded parameters.
            return trainer._forward_redirection(
                teacher.model, unwrapped, trainer._get_last_hidden_state, unwrapped, input_ids, attention_mask,
                logits_to_keep,
            )
        groups = self.view_groups(teacher, replay)
        if len(groups) == 1 and len(groups[0][1]) == input_ids.size(0):
            with groups[0][0]():
                return trainer._get_last_hidden_state(student, input_ids, attention_mask, logits_to_keep)
        out = None
        for view, rows in groups:
            run = torch.tensor(rows or [0], device=input_ids.device)
            with view():
                h = trainer._get_last_hidden_state(student, input_ids[run], attention_mask[run], logits_to_keep)
            if out is None:
                out = h.new_zeros((input_ids.size(0), *h.shape[1:]))
            if rows:
                out[run] = h
        return out

    # ---- samples ------------------------------------------------------------------------------------------------
    def assign(self, n: int, rng: random.Random) -> list[int]:
        """Which teacher writes each of `n` prompts, drawn with the teachers' weights."""
        weights = [t.weight for t in self.teachers]
        return [rng.choices(range(len(self.teachers)), weights=weights)[0] for _ in range(n)]

    @property
    def can_capture_hidden(self) -> bool:
        """Whether sampling can return the teacher's hidden states on its own samples (one teacher, transformers
        generation): the divergence then needs no teacher forward on teacher-written sequences."""
        return len(self.teachers) == 1 and not self.trainer.use_vllm

    def sample(self, prompt_ids: list[list[int]], replay: Sequence[bool], rng: random.Random,
               assignment: list[int] | None = None, capture_hidden: bool = False):
        """Teacher samples for a batch of prompts: each prompt is written by one teacher (`assignment`, default drawn
        with the teachers' weights from `rng`), through the view that teaches its row. With `capture_hidden` (see
        `can_capture_hidden`), returns `(completions, hidden)`: the teacher's last hidden states over each sample."""
        trainer = self.trainer
        if capture_hidden and not self.can_capture_hidden:
            raise ValueError("Hidden states come with the samples only for a single teacher sampled by transformers.")
        assignment = self.assign(len(prompt_ids), rng) if assignment is None else assignment
        completions: list[list[int] | None] = [None] * len(prompt_ids)
        hidden: list[torch.Tensor | None] = [None] * len(prompt_ids)
        for index, teacher in enumerate(self.teachers):
            mine = [i for i, a in enumerate(assignment) if a == index]
            if not mine and not trainer.is_deepspeed_enabled:
                continue
            groups = self.view_groups(teacher, [replay[i] for i in mine], split=trainer.use_vllm)
            for view, group in groups:
                rows = [mine[g] for g in group]
                # Every process must enter the same generate calls under ZeRO-3 (parameters are gathered).
                batch = [prompt_ids[i] for i in rows] or [prompt_ids[0]]
                keys = [replay[i] for i in rows] or [replay[0]]  # rows alike in prompt and view are alike
                generated = self._generate(index, teacher, batch, view, capture_hidden, keys)
                ids_list, states = generated if capture_hidden else (generated, None)
                for j, i in enumerate(rows):
                    completions[i] = ids_list[j]
                    if states is not None:
                        hidden[i] = states[j]
        return (completions, hidden) if capture_hidden else completions

    def _generate(self, index: int, teacher: Teacher, prompt_ids: list[list[int]], view, capture_hidden=False,
                  keys: Sequence | None = None):
        trainer = self.trainer
        if trainer.use_vllm:
            return self._vllm_generate(index, teacher, prompt_ids, view)
        model = trainer.model_wrapped if teacher.is_view else teacher.model
        return self.hf_generate(model, prompt_ids, capture_hidden=capture_hidden, view=view if teacher.is_view else None,
                                keys=keys)

    def _shared_rows(self, prompt_ids: list[list[int]], keys: Sequence | None):
        """`(distinct, index)`: the distinct prompts of a batch (alike in prompt and `keys`, e.g. the replay flag
        that picks a row's view) and, per row, which of them it is; None when no prompt repeats or prompts may not
        share a prefill (`teacher_shared_prefill` off; DeepSpeed or FSDP, where every process must run the same
        forwards; beam search)."""
        if not (self.trainer.args.teacher_shared_prefill and self._rows_may_split()):
            return None
        keys = [None] * len(prompt_ids) if keys is None else keys
        first: dict = {}
        index = [first.setdefault((tuple(ids), key), len(first)) for ids, key in zip(prompt_ids, keys)]
        if len(first) == len(prompt_ids) or max(len(ids) for ids in prompt_ids) < 2:
            return None
        distinct = [None] * len(first)
        for row, i in enumerate(index):
            if distinct[i] is None:
                distinct[i] = row
        return distinct, index

    def sampling_rounds(self) -> list[int]:
        """Token budgets of the rounds `hf_generate` samples in: one round of `max_new_tokens`, or with
        `teacher_sampling_rounds` rounds of 8, 16, 32, ... tokens adding up to it."""
        config = self.trainer.generation_config
        total = config.max_new_tokens
        if not self._rounds_enabled() or not total:
            return [total]
        rounds, size = [], 8
        while sum(rounds) < total:
            rounds.append(min(size, total - sum(rounds)))
            size *= 2
        return rounds

    def _rounds_enabled(self) -> bool:
        trainer = self.trainer
        mode = trainer.args.teacher_sampling_rounds
        if mode == "off" or not self._rows_may_split():
            return False
        # Only where continuing a row is sampling it on: no processor that counts the tokens generated so far.
        config = trainer.generation_config
        if any(getattr(config, name, None) for name in ("min_new_tokens", "min_length", "exponential_decay_length_penalty")):
            return False
        return mode == "on" or trainer.accelerator.device.type == "cpu"

    def _rows_may_split(self) -> bool:
        """Whether a call's rows may be generated apart from the batch they came in (shared prefill, rounds): not
        under DeepSpeed or FSDP, where every process must run the same forwards, nor with beam search."""
        trainer = self.trainer
        beams = getattr(trainer.generation_config, "num_beams", None) or 1
        return beams == 1 and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)

    def hf_generate(self, model, prompt_ids: list[list[int]], capture_hidden: bool = False, view=None,
                    keys: Sequence | None = None):
        """Sample with `transformers.generate` from `model` (a teacher, or the student in `view`, a context factory
        from `view_groups`).

        Mirrors the transformers path of TRL's `_generate_single_turn`, which is bound to the student. Two things
        keep work that changes no sample out of it:

        - a prompt that appears several times in the batch (the teacher cache draws each prompt once per epoch) is
          read once: one forward fills the KV cache of the distinct prompts, the cache is repeated along the batch,
          and `generate` samples every row from there (`teacher_shared_prefill`);
        - with `teacher_sampling_rounds`, rows are sampled in rounds of 8, 16, 32, ... tokens, and only the rows
          that have not ended go on to the next round (their prompt and tokens so far read again in one forward):
          `generate` keeps computing every row of a batch until the longest ends, which on a CPU, where a decoding
          step costs in proportion to its rows, is most of the cost of short answers in a large batch. Continuing
          a row samples from the same distributions (every processor used looks only at the tokens so far).

        With `capture_hidden`, also returns each row's last hidden states over its completion (the position before
        each sampled token, what the divergence projects through the head), taken from the generation's own forward
        passes: no second forward over the sampled sequences. Returns completions, or (completions, hidden).
        """
        trainer = self.trainer
        if not prompt_ids:
            return ([], []) if capture_hidden else []
        view = view or _rowless(None)
        keys = [None] * len(prompt_ids) if keys is None else list(keys)
        eos = set(trainer.eos_token_ids)
        completions: list[list[int]] = [[] for _ in prompt_ids]
        hidden: list[list[torch.Tensor]] = [[] for _ in prompt_ids]
        with (
            unwrap_model_for_generation(
                model,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                generation_kwargs=trainer.generation_kwargs,
            ) as unwrapped,
            torch.no_grad(),
        ):
            was_training = unwrapped.training
            unwrapped.eval()
            # A frozen trunk serving this model keeps the lower layers' states of the samples: the student's forward
            # over them then skips those layers (rows stay in order without beam search).
            beams = getattr(trainer.generation_config, "num_beams", None) or 1
            trunk = FrozenTrunk.active_for(unwrapped) if beams == 1 else None
            live = list(range(len(prompt_ids)))
            rounds = self.sampling_rounds()
            try:
                with trunk.recording() if trunk is not None else contextlib.nullcontext():
                    for number, budget in enumerate(rounds):
                        index = torch.tensor(live)
                        rows_view = view if number == 0 else (
                            lambda sub=None, index=index: view(index if sub is None else index[sub]))
                        new, states = self._generate_round(
                            unwrapped, [prompt_ids[i] + completions[i] for i in live], budget, rows_view,
                            [keys[i] for i in live], capture_hidden, trunk,
                        )
                        going = []
                        for j, i in enumerate(live):
                            cut = next((t for t, token in enumerate(new[j]) if token in eos), None)
                            tokens = new[j] if cut is None else new[j][: cut + 1]
                            completions[i] += tokens
                            if states is not None:
                                hidden[i].append(states[j, : len(tokens)])
                            if cut is None and len(tokens) == budget:
                                going.append(i)
                        live = going
                        if not live:
                            break
            finally:
                unwrapped.train(was_training)
        if not capture_hidden:
            return completions
        return completions, [torch.cat(h) for h in hidden]  # a copy: no view keeps a round's whole batch alive

    def _generate_round(self, unwrapped, prompt_ids, budget, view, keys, capture_hidden, trunk):
        """One `generate` call of at most `budget` new tokens over `prompt_ids` (distinct prompts read once, see
        `hf_generate`): the new tokens of each row (padding included) and, with `capture_hidden`, the last hidden
        state before each of them, `(rows, tokens, hidden)`."""
        trainer = self.trainer
        device = trainer.accelerator.device
        shared = self._shared_rows(prompt_ids, keys)
        rows = prompt_ids if shared is None else [prompt_ids[r] for r in shared[0]]
        prompts = [torch.tensor(ids) for ids in rows]
        pad_id = trainer._tokenizer.pad_token_id
        input_ids = pad(prompts, padding_value=pad_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left").to(device)
        kwargs = {}
        if shared is not None:
            with view(torch.tensor(shared[0])):
                kwargs = prefill_cache(unwrapped, input_ids, attention_mask)
            index = torch.tensor(shared[1], device=device)
            next(iter(kwargs.values())).reorder_cache(index)
            input_ids, attention_mask = input_ids[index], attention_mask[index]
            if trunk is not None:
                trunk.repeat_generation(shared[1])
        config = trainer.generation_config
        if budget != config.max_new_tokens:
            config = copy.copy(config)
            config.max_new_tokens = budget
        captured: list[torch.Tensor] = []
        handle = backbone_of(unwrapped).register_forward_hook(_capture_into(captured)) if capture_hidden else None
        try:
            with view():
                out = unwrapped.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                         **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        new = out[:, input_ids.size(1) :].cpu().tolist()
        # (rows, forward passes, hidden): one position per sampled token
        return new, (torch.cat(captured, dim=1).cpu() if capture_hidden else None)

    def vllm_sampling(self) -> dict[str, Any]:
        """vLLM sampling parameters equal to the trainer's generation settings."""
        trainer = self.trainer
        vllm = trainer.vllm_generation
        return dict(
            max_tokens=vllm.max_completion_length, temperature=trainer.temperature, top_p=trainer.top_p,
            top_k=trainer.top_k or 0, min_p=trainer.min_p or 0.0, repetition_penalty=trainer.repetition_penalty,
            stop_token_ids=list(trainer.eos_token_ids), **dict(vllm.generation_kwargs),
        )

    def _vllm_generate(self, index: int, teacher: Teacher, prompt_ids: list[list[int]], view=None):
        """Teacher samples through vLLM: a view of the student is swapped into the student's engine (no second copy
        of the weights); a separate teacher checkpoint gets a frozen engine of its own, built on first use."""
        trainer = self.trainer
        sampling = self.vllm_sampling()
        if teacher.is_view:
            if trainer.state.global_step != trainer._last_loaded_step:
                trainer.vllm_generation.sync_weights()
                trainer._last_loaded_step = trainer.state.global_step

            def teacher_weights():
                with (view or teacher.view)():
                    return trainer.engine_weights()

            with trainer.vllm_generation.weights_swapped(teacher_weights):
                return trainer.vllm_generation.generate_token_ids(prompt_ids, **sampling)
        if index not in self._engines:
            unwrapped = trainer.accelerator.unwrap_model(teacher.model)
            path = getattr(unwrapped, "name_or_path", None)
            if not path or not Path(path, "config.json").exists():
                raise ValueError(
                    f"`use_vllm` samples teacher {teacher.name!r} with an engine of its own, built from its checkpoint "
                    "folder, but the model has none. Pass the teacher as a path, or `save_pretrained` it first."
                )
            self._engines[index] = TeacherEngine(
                path, max_num_seqs=trainer.vllm_generation.max_num_seqs, max_model_len=trainer.args.vllm_max_model_length,
                seed=trainer.args.seed,
            )
        return self._engines[index].generate(prompt_ids, **sampling)

    # ---- heads ---------------------------------------------------------------------------------------------------
    def head(self, module, sliced: bool, vocab_size: int):
        """(weight, bias) of a module's output head, sliced to the tokenizer's `vocab_size` when `sliced`."""
        head = module.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if sliced:
            weight = weight[:vocab_size]
            bias = bias[:vocab_size] if bias is not None else None
        return weight, bias

    def concatenated_head(self, student, scales, vocab_size: int):
        """`[W_1, ..., W_k]` and `sum_k s_k b_k` of several frozen teachers (built once), for `logit_mean`."""
        if self._concat_head is None:
            weights, bias = [], None
            for t, s in zip(self.teachers, scales, strict=True):
                w, b = self.head(self.module(t, student), sliced=True, vocab_size=vocab_size)
                weights.append(w.detach())
                if b is not None:
                    bias = s * b.detach() if bias is None else bias + s * b.detach()
            self._concat_head = (torch.cat(weights, dim=-1), bias)
        return self._concat_head

    def logit_scales(self, student) -> list[float]:
        """`w_k * s_k`: each teacher's weight times its config's logit scale."""
        return [t.weight * logit_scale_of(self.module(t, student).config.get_text_config()) for t in self.teachers]


def match_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> set[str]:
    """Names of the parameters matched by `patterns` (full names or `re.fullmatch` expressions); a pattern that
    matches nothing is an error naming close parameter names."""
    names = [n for n, _ in model.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if n == pattern or re.fullmatch(pattern, n)}
        if not hits:
            close = [n for n in names if pattern.split(".")[-1] in n][:5]
            raise ValueError(
                f"`trainable_parameters` entry {pattern!r} matches no parameter of the model. Use a full parameter "
                f"name or a regular expression (re.fullmatch), e.g. {close or names[:3]}."
            )
        selected |= hits
    return selected
