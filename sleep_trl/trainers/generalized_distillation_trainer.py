"""GeneralizedDistillationTrainer: the paper's Knowledge Seeding (memory consolidation), on TRL's DistillationTrainer.

Where things are:
- the objective: `_compute_loss` (below) with its two parts `_distillation_loss` and `_imitation_loss`; their pure
  pieces (generalized JSD, group advantages, clipped policy loss, prefix cuts, imitation rewards) are in
  `generalized_distillation_objective.py`;
- the teachers (separate models or views of the student, replay views, sampling, hidden states): `teachers.py`;
- the frozen teacher's samples and hidden states computed once per run: `teacher_cache.py`;
- the data each part of the loss needs is produced once per generation batch in `_generate_and_score_completions`
  and travels in the batch dict, as in TRL.

What it adds to TRL's (always on-policy, always same-size, single-teacher) `DistillationTrainer`:
- GKD's mixture of on-policy (student) and off-policy (teacher-sampled or dataset) sequences, `lmbda`;
- Learning to Imitate: the student continues random prefixes of teacher samples, is rewarded by edit-distance and
  semantic similarity to the teacher's continuation, and learns by a clipped policy gradient with group-normalised
  advantages, weighed against distillation by `alpha`;
- upward seeding: teachers may be smaller than the student, several of them, with embedding tables padded to
  different sizes (the loss uses the tokenizer's length);
- Self-Knowledge Seeding: the teacher may be the student itself in a "teacher view" (no second copy of the weights);
- a `teacher_prompt` column: the teacher conditions on a richer prompt (e.g. with a passage in context);
- `trainable_parameters`: only the named parameters learn.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from trl import DistillationTrainer
from trl.data_utils import is_conversational
from trl.kernels import ChunkedLogProbFunction
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.distillation_trainer import _chunked_divergence_loss
from trl.trainer.utils import pad

from ..assets import resolve_model_path
from ..generation.hf import cache_keyword, sample_continuations
from ..generation.vllm_cpu import (
    model_weights,
    without_trl_engine,
)
from ..memory import FrozenTrunk, find_memory
from ..paper import SLEEP_PAPER
from ..rewards.semantic import SemanticJudge
from .batching import fill_one_batch, generation_batch_rows
from .generalized_distillation_config import GeneralizedDistillationConfig
from .generalized_distillation_objective import (
    clipped_policy_loss,
    cut_prefixes,
    generalized_jsd,
    group_advantages,
    imitation_rewards,
    logit_scale_of,
    router_gate_loss,
)
from .model_card import NamedBaseModelCardMixin
from .prefix_sharing import gather_positions, pack_rows
from .shared_prefix import last_hidden_shared_prefix, sharing_applies
from .teacher_cache import CachedSample, TeacherCache, build_teacher_cache, row_key
from .teachers import (
    Teacher,
    TeacherSet,
    backbone_of,
    load_teachers,
    match_parameters,
    teacher_sources,
    view_teacher,
)
from .vllm_engine import setup_colocate_engine

# Vocabulary tile of the chunked log-prob kernel (TRL's own default for the same kernel).
_LOGPROB_CHUNK = 32768


def _pad_hidden(states: list[torch.Tensor], width: int) -> torch.Tensor:
    """`(rows, width, hidden)`: per-row hidden states over the completion tokens, right-padded with zeros (masked
    out by the completion mask) to the batch's completion width."""
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
    for row, h in enumerate(states):
        out[row, : h.shape[0]] = h[:width]
    return out


@dataclass
class _GenerationBatch:
    """What one generation batch carries from `_generate_and_score_completions` down to `_generate_single_turn`
    (TRL passes only token ids there): who writes the sequences, the dataset rows, which rows are replayed, the
    teacher's own prompts, and the teacher samples written for it (reused as imitation targets)."""

    sampler: str
    rows: list[dict]
    replay: list[bool]
    teacher_prompt_ids: list[list[int]] | None
    teacher_completions: list[list[int]] | None = field(default=None)
    cached: list[CachedSample] | None = field(default=None)  # the teacher-cache samples the batch took
    teacher_hidden: list[torch.Tensor] | None = field(default=None)  # captured while the teacher sampled


class GeneralizedDistillationTrainer(NamedBaseModelCardMixin, DistillationTrainer):
    """
    Knowledge Seeding (the consolidation stage of Sleep): an upward, generalized on-policy distillation from one or
    several teachers (possibly smaller, or the student itself in a teacher view) into a student, plus the
    Learning-to-Imitate RL term. Drop-in for TRL's [`~trl.DistillationTrainer`]: same arguments, same dataset format
    (a `prompt` column, standard or conversational), same vLLM and DeepSpeed support.

    Example:

    ```python
    from sleep_trl import GeneralizedDistillationConfig, GeneralizedDistillationTrainer

    trainer = GeneralizedDistillationTrainer(
        model="path/to/larger-student",
        teacher_model="path/to/smaller-teacher",  # or a list of teachers, or `teacher_view=...`
        args=GeneralizedDistillationConfig(output_dir="seeded", lmbda=0.5, alpha=0.5, beta=0.5),
        train_dataset=dataset,  # column "prompt" (+ optional "completion", "teacher_prompt")
    )
    trainer.train()
    ```

    Args:
        model: the student (id/path, `PreTrainedModel` or `PeftModel`), as in `DistillationTrainer`.
        teacher_model: a teacher (id/path or model), or a list of them (S_1..S_k). `None` falls back to
            `args.teacher_model_name_or_path` / `args.teachers`, then to a teacher view of the student.
        args: a [`GeneralizedDistillationConfig`].
        train_dataset, eval_dataset, processing_class, callbacks, optimizers, quantization_config, peft_config, tools:
            as in `DistillationTrainer`.
        teacher_view: Self-Knowledge Seeding: a callable returning a context manager under which the student computes
            as the teacher (e.g. `memory.teacher_view` or `peft_model.disable_adapter`). Overrides `args.teacher_view`.
        semantic_judge: a callable `(predictions, references) -> list[float]` replacing the configured judge for
            `r_sem`.
        replay_view: with a callable `teacher_view`, the view that teaches the rows marked in `replay_column`
            (built in for `teacher_view: memory`: the long-term memory before this sleep).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sleep-trl", "knowledge-seeding", "generalized-distillation"]
    _name = "Generalized Distillation (Knowledge Seeding)"
    _paper = SLEEP_PAPER

    def __init__(
        self,
        model,
        teacher_model=None,
        args: GeneralizedDistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        teacher_view: Callable[[], Any] | None = None,
        semantic_judge: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
        replay_view: Callable[[], Any] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GeneralizedDistillationConfig(f"{Path(str(name)).name}-KnowledgeSeeding")
        elif not isinstance(args, GeneralizedDistillationConfig):
            raise TypeError(
                f"`args` must be a GeneralizedDistillationConfig, got {type(args).__name__}. Build one with the same "
                "fields (it extends trl.DistillationConfig)."
            )
        if isinstance(model, str):
            model = resolve_model_path(model)
        self._check_dataset(train_dataset, args, "train_dataset")
        train_dataset = fill_one_batch(train_dataset, generation_batch_rows(args))
        if tools and (args.lmbda < 1.0 or args.alpha < 1.0):
            raise ValueError(
                "`tools` are only supported for pure on-policy distillation (`lmbda: 1.0`, `alpha: 1.0`): teacher "
                "samples and imitation rollouts are single-turn."
            )
        sources = teacher_sources(teacher_model, args)
        # On vLLM's CPU backend sleep-trl builds the colocate engine itself (TRL's cannot sync weights there).
        engine_context = without_trl_engine(args) if args.use_vllm else contextlib.nullcontext(False)
        # TRL's parent rejects any teacher whose vocab_size differs from the student's; the teachers are therefore
        # loaded and prepared here, after the parent's __init__ (same steps as the parent, per teacher).
        with engine_context as deferred_engine:
            super().__init__(
                model=model, teacher_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                quantization_config=quantization_config, peft_config=peft_config, tools=tools,
            )
        self.vocab_size = len(self._tokenizer)
        teachers = load_teachers(self, sources, args) if sources else [
            view_teacher(self.model, args, teacher_view, replay_view)
        ]
        self.teachers = TeacherSet(self, teachers, has_replay=self._check_replay(train_dataset, args, teachers))
        self.teacher_model = self.teachers.first_model
        self._check_teacher_heads()
        self._router_memory = self._check_router_loss(args)
        self.num_trainable_parameters = self._set_trainable(args.trainable_parameters)
        self.semantic_judge = semantic_judge
        if self.semantic_judge is None and args.alpha < 1.0 and args.gamma > 0.0:
            self.semantic_judge = SemanticJudge(args.semantic_judge, threshold=args.semantic_threshold)
        self._generation_round = 0
        self._shared_prefix_batches = 0  # student forwards that read their prompts' shared prefix once
        self._batch: _GenerationBatch | None = None
        self._teacher_cache: TeacherCache | None = None
        self.uses_teacher_cache = self._teacher_can_be_cached(args)
        if deferred_engine or (self.use_vllm and args.vllm_mode == "colocate"):
            self._setup_vllm(deferred_engine)
        self._suppress_padded_vocab()

    # ---------------------------------------------------------------------------------------------------------------
    # Setup
    # ---------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_dataset(dataset, args: GeneralizedDistillationConfig, name: str) -> None:
        if dataset is None or not hasattr(dataset, "column_names") or dataset.column_names is None:
            return
        columns = set(dataset.column_names)
        if "prompt" not in columns:
            raise ValueError(f"`{name}` needs a 'prompt' column; it has {sorted(columns)}.")
        if hasattr(dataset, "__len__"):
            if len(dataset) == 0:
                raise ValueError(f"`{name}` is empty: there is nothing to distil. Give it at least one prompt.")
            for index, prompt in enumerate(dataset["prompt"]):
                empty = not prompt or (isinstance(prompt, str) and not prompt.strip()) or (
                    isinstance(prompt, list) and not any(str(m.get("content") or "").strip() for m in prompt))
                if empty:
                    raise ValueError(
                        f"Row {index} of `{name}` has an empty prompt ({prompt!r}): every row needs text for the "
                        "teacher and the student to continue."
                    )
        if args.lmbda < 1.0 and not args.seq_kd and "completion" not in columns:
            raise ValueError(
                f"`seq_kd: false` takes off-policy sequences from the dataset's 'completion' column, which `{name}` "
                f"lacks (columns: {sorted(columns)}). Add it, or set `seq_kd: true` to sample them from the teacher."
            )

    @staticmethod
    def _check_replay(dataset, args: GeneralizedDistillationConfig, teachers: list[Teacher]) -> bool:
        """Whether the dataset marks replayed rows (refused unless a single teacher view can teach them)."""
        columns = getattr(dataset, "column_names", None) or []
        if args.replay_column not in columns or not any(dataset[args.replay_column]):
            return False
        if len(teachers) > 1 or not teachers[0].is_view or teachers[0].replay_view is None:
            raise ValueError(
                f"The dataset marks rows in `{args.replay_column}`, which are taught by a replay view of the student; "
                "that needs a single teacher view (`teacher_view: memory`, `disable_adapter`, `self`, or a "
                "`teacher_view` callable with a `replay_view`). Drop the column to teach every row alike."
            )
        return True

    def _check_router_loss(self, args: GeneralizedDistillationConfig):
        """The memory whose newest expert's router `router_loss_weight` trains (None when the term is off or the
        dataset replays nothing, so there is no row to stay quiet on)."""
        if args.router_loss_weight == 0.0 or not self.teachers.has_replay:
            return None
        memory = find_memory(self.model)
        level = memory.history[-1].level if memory is not None and memory.history else None
        if level is None or memory.config.level(level).resolved_gate != "sigmoid":
            raise ValueError(
                f"`router_loss_weight` > 0 trains the router of the continuum memory's newest expert, but "
                f"{'no memory is expanded' if level is None else f'its newest expert is in level {level!r}'}, "
                "whose gate is not 'sigmoid'. Expand a routed level (`LevelConfig(gate='sigmoid')`, the sleep's "
                "`slow_gate: sigmoid`) or set `router_loss_weight: 0.0`."
            )
        return memory

    def _set_trainable(self, patterns) -> int:
        """Apply `trainable_parameters` (when given) and return the number of trainable elements (> 0)."""
        if patterns is not None:
            keep = match_parameters(self.model, patterns)
            for name, param in self.model.named_parameters():
                param.requires_grad_(name in keep)
        # Under ZeRO-3 a parameter's local tensor is an empty shard: `ds_numel` holds its true size.
        count = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        if count == 0:
            raise ValueError(
                "No parameter of the student requires a gradient. Set `trainable_parameters`, pass a `peft_config`, "
                "or expand a continuum memory slot before training."
            )
        return count

    def _teacher_can_be_cached(self, args: GeneralizedDistillationConfig) -> bool:
        """Whether the teacher's samples and hidden states are computed once (`teacher_cache`): only when it cannot
        change while the student trains, or when the user vouches for it (`"on"`)."""
        if args.teacher_cache == "off" or self.tools:
            return False
        if args.teacher_cache == "on":
            return True
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        for teacher in self.teachers:
            if not teacher.is_view:
                continue
            if teacher.name == "memory":
                memory = find_memory(self.model)
                if not trainable <= set(memory.trainable_parameters(root=self.model)):
                    return False  # something the view still shows is training
            elif teacher.name == "disable_adapter":
                adapters = list(getattr(self.model, "peft_config", {}))
                if not all(any(f".{a}." in n for a in adapters) for n in trainable):
                    return False
            else:  # `self`, or a callable view: it may be the student as it trains
                return False
        return True

    def _head_rows(self, module) -> int:
        return self.accelerator.unwrap_model(module).config.get_text_config().vocab_size

    def _check_teacher_heads(self) -> None:
        student_rows = self._head_rows(self.model)
        if student_rows < self.vocab_size:
            raise ValueError(
                f"The student's embedding table has {student_rows} rows but the tokenizer has {self.vocab_size} tokens. "
                "Resize it with `model.resize_token_embeddings(len(tokenizer))`."
            )
        self._needs_vocab_slice = False
        for t in self.teachers:
            if t.is_view:
                continue
            rows = self._head_rows(t.model)
            if rows < self.vocab_size:
                raise ValueError(
                    f"Teacher {t.name!r} has {rows} embedding rows but the tokenizer has {self.vocab_size} tokens: it "
                    "cannot have been trained with this tokenizer."
                )
            if rows != student_rows:
                self._needs_vocab_slice = True
        if self._needs_vocab_slice and self.is_deepspeed_enabled and self.args.deepspeed_plugin.zero_stage == 3:
            raise ValueError(
                "Under DeepSpeed ZeRO-3 the student and the teachers must have embedding tables of the same size. "
                "Resize them to the tokenizer's length first: `model.resize_token_embeddings(len(tokenizer))`."
            )

    def _suppress_padded_vocab(self) -> None:
        """Never sample the padding rows beyond the tokenizer: a smaller teacher could not even embed them."""
        if not self._needs_vocab_slice:
            return
        rows = max([self._head_rows(self.model)] + [self._head_rows(t.model) for t in self.teachers if not t.is_view])
        padded = list(range(self.vocab_size, rows))
        suppress = list(self.generation_config.suppress_tokens or []) + padded
        self.generation_config.suppress_tokens = suppress
        self.generation_kwargs["suppress_tokens"] = suppress
        if self.use_vllm:
            vllm_kwargs = self.vllm_generation.generation_kwargs
            vllm_kwargs["allowed_token_ids"] = list(range(self.vocab_size))

    def _setup_vllm(self, deferred: bool) -> None:
        """The colocate engine (`vllm_engine.setup_colocate_engine`): built here on vLLM's CPU backend (TRL's cannot
        sync weights there), TRL's elsewhere; a continuum memory is served as its dense fold."""
        args = self.args
        group = args.num_imitation_generations if args.alpha < 1.0 else 1
        setup_colocate_engine(
            self, deferred, max_num_seqs=args.per_device_train_batch_size * args.gradient_accumulation_steps * group
        )

    def engine_weights(self):
        """Checkpoint-format weights the vLLM engine serves for the model as it computes right now (so, read inside
        a teacher view, the teacher's)."""
        memory = find_memory(self.model)
        if memory is not None:
            return list(memory.dense_state_dict().items())
        return list(model_weights(self.accelerator.unwrap_model(self.model)))

    # ---------------------------------------------------------------------------------------------------------------
    # Generation: who writes the distillation sequences, teacher samples, imitation rollouts
    # ---------------------------------------------------------------------------------------------------------------

    def _round_rng(self, salt: int) -> random.Random:
        # Identical on every process for the same round and salt (so every rank takes the same branch); the process
        # index enters only where per-rank draws are wanted.
        return random.Random((self.args.seed * 1_000_003 + self._generation_round) * 7919 + salt)

    def _choose_sampler(self, training: bool) -> str:
        """Who writes this generation batch's distillation sequences: `student`, `teacher` or `dataset`."""
        args = self.args
        if not training:
            return "student"
        if args.alpha == 0.0:
            # Pure imitation: the distillation term is off, so the batch's sequences are the teacher samples the
            # imitation term needs anyway (one generation pass fewer).
            return "teacher" if args.seq_kd else "dataset"
        on_policy = self._round_rng(0).random() < args.lmbda
        return "student" if on_policy else ("teacher" if args.seq_kd else "dataset")

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        args = self.args
        training = self.model.training
        self._generation_round += 1
        mode = "train" if training else "eval"
        column = args.teacher_prompt_column
        teacher_prompt_ids = None
        if column in inputs[0] and inputs[0][column] is not None:
            teacher_prompt_ids = self._tokenize_prompts([x[column] for x in inputs])[0]
        batch = _GenerationBatch(
            sampler=self._choose_sampler(training),
            rows=inputs,
            replay=[bool(x.get(args.replay_column) or False) for x in inputs],
            teacher_prompt_ids=teacher_prompt_ids,
        )
        self._metrics[mode]["distill/on_policy"].append(float(batch.sampler == "student"))
        if training and self.uses_teacher_cache and self._teacher_cache is None:
            self._fill_teacher_cache()
        self._batch = batch
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._batch = None
        device = self.accelerator.device
        if self.teachers.has_replay:  # on every rank (ZeRO-3 ranks must run the same teacher forwards)
            output["replay_mask"] = torch.tensor(batch.replay, device=device)
        if teacher_prompt_ids is not None:
            tp = [torch.tensor(ids) for ids in teacher_prompt_ids]
            output["teacher_prompt_ids"] = pad(tp, self._tokenizer.pad_token_id, padding_side="left").to(device)
            output["teacher_prompt_mask"] = pad([torch.ones_like(t) for t in tp], 0, padding_side="left").to(device)
        hidden = batch.teacher_hidden and [[h] for h in batch.teacher_hidden]
        if batch.cached is not None and all(c.hidden is not None for c in batch.cached):
            hidden = [c.hidden for c in batch.cached]
        if hidden:  # the teacher's hidden states on its own samples: the divergence runs no teacher forward
            width = output["completion_ids"].size(1)
            for t in range(len(self.teachers)):
                output[f"teacher_hidden_{t}"] = _pad_hidden([h[t] for h in hidden], width).to(device)
        if args.alpha < 1.0:
            prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"])]
            if batch.cached is None and self._teacher_cache is not None and training:
                batch.cached = self._cached_samples(prompt_ids, batch)  # on-policy batch: cached imitation targets
            targets = batch.teacher_completions
            if batch.cached is not None:
                targets = [c.completion for c in batch.cached]
            elif targets is None:  # on-policy batch: the imitation term still needs teacher data
                targets = (
                    self._teacher_samples(prompt_ids, batch) if args.seq_kd
                    else self._dataset_completions(prompt_ids, batch.rows)
                )
            shares = batch.sampler != "student"  # the distillation sequence is the sample the prefix is cut from
            output.update(self._imitation_rollouts(prompt_ids, targets, mode, batch.cached, shares))
        return output

    def _fill_teacher_cache(self) -> None:
        """Sample the frozen teacher on every distinct training prompt once (`teacher_cache.py`), and embed the
        texts Learning to Imitate will compare against."""
        cache = build_teacher_cache(self, list(self.train_dataset))
        if self.args.alpha < 1.0 and self.args.gamma > 0.0 and hasattr(self.semantic_judge, "embed"):
            flat = [s for pool in cache.samples.values() for s in pool]
            decode = self._tokenizer.decode
            embeddings = self.semantic_judge.embed([decode(s.completion[s.cut :], skip_special_tokens=True) for s in flat])
            for sample, embedding in zip(flat, embeddings, strict=True):
                sample.suffix_embedding = embedding
        self._teacher_cache = cache
        self._metrics["train"]["teacher_cache/seconds"].append(cache.seconds)
        self._metrics["train"]["teacher_cache/samples"].append(float(len(cache)))
        self._metrics["train"]["teacher_cache/hidden_megabytes"].append(cache.hidden_bytes / 2**20)

    def _cached_samples(self, prompt_ids: list[list[int]], batch: _GenerationBatch) -> list[CachedSample]:
        """The next cached teacher sample of every row of the batch."""
        teacher_ids = batch.teacher_prompt_ids or [None] * len(prompt_ids)
        keys = [row_key(p, t, r) for p, t, r in zip(prompt_ids, teacher_ids, batch.replay, strict=True)]
        missing = [k for k in keys if k not in self._teacher_cache]
        if missing:
            raise RuntimeError(
                f"{len(missing)} prompts of this batch are not in the teacher cache (built from `train_dataset` before "
                "the first step); was the dataset changed during training? Set `teacher_cache: off` to sample per batch."
            )
        return [self._teacher_cache.take(k) for k in keys]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        # The parent calls this to write the distillation sequences; off-policy batches are written by the teacher or
        # taken from the dataset instead of the student.
        batch = self._batch
        if batch is None or batch.sampler == "student":
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        if self._teacher_cache is not None and self.model.training:
            batch.cached = self._cached_samples(prompt_ids, batch)
            completions = [list(c.completion) for c in batch.cached]
        elif batch.sampler == "teacher" and self.teachers.can_capture_hidden:
            completions, batch.teacher_hidden = self._teacher_samples(prompt_ids, batch, capture_hidden=True)
        elif batch.sampler == "teacher":
            completions = self._teacher_samples(prompt_ids, batch)
        else:
            completions = self._dataset_completions(prompt_ids, batch.rows)
        batch.teacher_completions = completions
        return completions

    def _teacher_samples(self, prompt_ids: list[list[int]], batch: _GenerationBatch | None = None,
                         capture_hidden: bool = False):
        """Teacher samples for the batch's prompts (its `teacher_prompt`s when it has them), each prompt written by
        one teacher drawn with `teacher_weights`, replayed rows by the replay view (with `capture_hidden`, also the
        teacher's hidden states on them)."""
        if batch is not None and batch.teacher_prompt_ids is not None:
            prompt_ids = batch.teacher_prompt_ids
        replay = batch.replay if batch is not None and len(batch.replay) == len(prompt_ids) else None
        rng = self._round_rng(1 + self.accelerator.process_index)
        return self.teachers.sample(prompt_ids, replay or [False] * len(prompt_ids), rng, capture_hidden=capture_hidden)

    def _dataset_completions(self, prompt_ids: list[list[int]], rows: list[dict]) -> list[list[int]]:
        """Token ids of the batch's `completion` column, as the chat template renders them after the prompt."""
        out = []
        tok = self._tokenizer
        for example, p_ids in zip(rows, prompt_ids, strict=True):
            completion = example["completion"]
            if is_conversational(example):
                full = self.processing_class.apply_chat_template(
                    example["prompt"] + completion, tokenize=True, return_dict=False, **self.chat_template_kwargs
                )
                ids = list(full[len(p_ids) :]) if list(full[: len(p_ids)]) == list(p_ids) else None
                if ids is None:  # template does not render the prompt as a prefix: fall back to the raw text
                    text = " ".join(m["content"] for m in completion if isinstance(m.get("content"), str))
                    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                # Drop template whitespace after the end-of-turn token, which generation would never produce.
                while ids and ids[-1] not in self.eos_token_ids and tok.eos_token_id in ids:
                    ids.pop()
            else:
                ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append(ids[: self.max_completion_length])
        return out

    @contextlib.contextmanager
    def _max_new_tokens(self, n: int):
        """Temporarily bound generation length (transformers and vLLM paths alike)."""
        old_hf = self.generation_config.max_new_tokens
        vllm = getattr(self, "vllm_generation", None)
        old_vllm = getattr(vllm, "max_completion_length", None)
        self.generation_config.max_new_tokens = n
        if vllm is not None:
            vllm.max_completion_length = n
        try:
            yield
        finally:
            self.generation_config.max_new_tokens = old_hf
            if vllm is not None:
                vllm.max_completion_length = old_vllm

    def _student_continuations(self, prefixes: list[list[int]], num: int) -> list[list[int]]:
        """`num` student continuations of every prefix (consecutive), each prefix read once on the transformers path
        (`imitation_prefix_sharing`); vLLM and the unshared path sample repeated prompts."""
        if self.use_vllm or not self.args.imitation_prefix_sharing:
            return super()._generate_single_turn([p for p in prefixes for _ in range(num)], None, {})
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            return sample_continuations(
                unwrapped, prefixes, num, pad_id=self._tokenizer.pad_token_id, eos_token_ids=self.eos_token_ids,
                generation_config=self.generation_config,
            )

    def _imitation_rollouts(self, prompt_ids, targets, mode: str, cached=None, shares=False) -> dict[str, torch.Tensor]:
        """Learning to Imitate: cut teacher samples at random prefixes, let the student continue, reward, advantage.

        With cached teacher samples the cut points (and the judge's embeddings of the remaining text) come with
        them, drawn once when the cache was filled."""
        args = self.args
        G = args.num_imitation_generations
        device = self.accelerator.device
        if cached is not None:
            prefixes = [list(p) + c.completion[: c.cut] for p, c in zip(prompt_ids, cached, strict=True)]
            suffixes = [c.completion[c.cut :] for c in cached]
        else:
            rng = self._round_rng(10_000 + self.accelerator.process_index)
            prefixes, suffixes = cut_prefixes(
                prompt_ids, targets, rng, args.imitation_min_prefix, args.imitation_max_prefix
            )
        rollout_prompts = [p for p in prefixes for _ in range(G)]
        with self._max_new_tokens(max(1, max(len(s) for s in suffixes))):
            continuations = self._student_continuations(prefixes, G)
        refs = [s for s in suffixes for _ in range(G)]
        ref_embeddings = None
        if cached is not None and all(c.suffix_embedding is not None for c in cached):
            ref_embeddings = torch.stack([c.suffix_embedding for c in cached for _ in range(G)])
        r_abs, r_sem = imitation_rewards(
            continuations, refs, gamma=args.gamma, decode=lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True),
            judge=self.semantic_judge, max_edit_distance=args.max_edit_distance, unit=args.edit_distance_unit,
            reference_embeddings=ref_embeddings,
        )
        r_abs_t = torch.tensor(r_abs, dtype=torch.float32, device=device)
        r_sem_t = torch.tensor(r_sem, dtype=torch.float32, device=device)
        rewards = args.gamma * r_sem_t + (1 - args.gamma) * r_abs_t
        B = len(prompt_ids)
        advantages = group_advantages(rewards.view(B, G), scale=args.scale_advantages)

        gathered = self.accelerator.gather(torch.stack([rewards, r_sem_t, r_abs_t]).T.contiguous())
        self._metrics[mode]["imitation/reward"].append(gathered[:, 0].mean().item())
        self._metrics[mode]["imitation/reward_semantic"].append(gathered[:, 1].mean().item())
        self._metrics[mode]["imitation/reward_edit"].append(gathered[:, 2].mean().item())
        self._metrics[mode]["imitation/reward_group_std"].append(rewards.view(B, G).std(-1).mean().item())

        pad_id = self._tokenizer.pad_token_id
        p_t = [torch.tensor(p) for p in rollout_prompts]
        c_t = [torch.tensor(c if c else [pad_id]) for c in continuations]
        c_mask = [torch.tensor([1] * len(c) if c else [0]) for c in continuations]
        imit_prompt_ids = pad(p_t, pad_id, padding_side="left").to(device)
        imit_prompt_mask = pad([torch.ones_like(p) for p in p_t], 0, padding_side="left").to(device)
        imit_completion_ids = pad(c_t, pad_id, padding_side="right").to(device)
        imit_completion_mask = pad(c_mask, 0, padding_side="right").to(device)
        num_items = self.accelerator.gather(imit_completion_mask.sum()).sum()
        teacher_prefixes = [torch.tensor(p[len(q):] or [pad_id]) for p, q in zip(prefixes, prompt_ids, strict=True)]
        prefix_mask = [torch.tensor([1] * (len(p) - len(q)) or [0]) for p, q in zip(prefixes, prompt_ids, strict=True)]
        # Shaped (B, G, ...) so TRL's shuffle/split of the generation batch keeps each prompt's group together.
        return {
            "imit_prefix_ids": pad(teacher_prefixes, pad_id, padding_side="right").to(device),
            "imit_prefix_mask": pad(prefix_mask, 0, padding_side="right").to(device),
            "imit_shares_sequence": torch.full((B,), bool(shares), device=device),
            "imit_prompt_ids": imit_prompt_ids.view(B, G, -1),
            "imit_prompt_mask": imit_prompt_mask.view(B, G, -1),
            "imit_completion_ids": imit_completion_ids.view(B, G, -1),
            "imit_completion_mask": imit_completion_mask.view(B, G, -1),
            "imit_advantages": advantages,
            "imit_num_items": num_items,
        }

    # ---------------------------------------------------------------------------------------------------------------
    # The objective
    # ---------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        # `_compute_loss` runs inside the DDP/FSDP-wrapped forward; its parts are gathered here, outside it.
        for key, value in inputs.pop("loss_parts", {}).items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        self._metrics[mode]["trainable_parameters"].append(float(self.num_trainable_parameters))
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """J = (1 - alpha) E[r] - alpha D(teacher || student): minimise alpha * D + (1 - alpha) * imitation loss.

        Returns TRL's `(loss, entropy_sum, num_valid_tokens)`; the detached parts go back in `inputs["loss_parts"]`
        for logging."""
        alpha = self.args.alpha
        device = inputs["prompt_ids"].device
        loss = torch.zeros((), device=device)
        entropy_sum = torch.zeros((), device=device)
        n_valid = torch.zeros((), device=device, dtype=torch.long)
        parts = {}
        imitating = alpha < 1.0 and "imit_completion_ids" in inputs
        h_sequence = h_continuations = None
        routing = self._router_memory is not None and alpha > 0.0
        # The router loss reads the new expert's gates from the student's forward of the distillation sequences
        # (packed or not); teacher forwards inside mask that expert and record nothing.
        with self._router_memory.recording_gates() if routing else contextlib.nullcontext() as gates:
            positions = None  # packed rows: where each distillation token is predicted
            if imitating and alpha > 0.0 and self.args.imitation_prefix_sharing:
                h_sequence, h_continuations, positions = self._packed_student_hidden(unwrapped_student, inputs)
            if alpha > 0.0:
                distill, entropy_sum, n_valid = self._distillation_loss(
                    unwrapped_student, inputs, num_items_in_batch, student_hidden=h_sequence
                )
                loss = loss + alpha * distill
                parts["distill/loss"] = distill.detach()
        if routing:
            router = router_gate_loss(gates, self._answer_positions(inputs, positions, gates[0].size(1)),
                                      inputs["replay_mask"])
            # the distillation term is a token sum over `num_items_in_batch` (gradient accumulation and processes);
            # this micro-batch's share of those tokens scales its mean the same way
            share = 1.0 if num_items_in_batch is None else inputs["completion_mask"].sum() / num_items_in_batch
            loss = loss + self.args.router_loss_weight * share * router
            parts["router/loss"] = router.detach()
        if imitating:
            imitation = self._imitation_loss(unwrapped_student, inputs, hidden=h_continuations)
            loss = loss + (1 - alpha) * imitation
            parts["imitation/loss"] = imitation.detach()
        inputs["loss_parts"] = parts
        return loss, entropy_sum, n_valid

    def _packed_student_hidden(self, student, inputs):
        """The student's hidden states for the distillation sequence and every imitation continuation of each
        prompt, from one forward of shared-prefix rows (`prefix_sharing.py`): `(B, K, H)` and `(B * G, Kc, H)`, and
        the positions predicting each distillation token `(B, K)`."""
        packed = pack_rows(
            inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"],
            inputs["imit_prefix_ids"], inputs["imit_prefix_mask"], inputs["imit_shares_sequence"],
            inputs["imit_completion_ids"], inputs["imit_completion_mask"], self._tokenizer.pad_token_id,
        )
        hidden = backbone_of(student)(
            input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state
        return (
            gather_positions(hidden, packed.sequence_index),
            gather_positions(hidden, packed.continuation_index).flatten(0, 1),
            packed.sequence_index,
        )

    @staticmethod
    def _answer_positions(inputs, positions, length: int) -> torch.Tensor:
        """`(B, length)` bool: the tokens whose hidden states predict the distillation sequence (the last prompt token
        and every completion token but the last). The router loss is taken there: by then the row's own question has
        been read, whereas the chat template's opening tokens are the same in every row and cannot tell old from
        new. `positions`: those tokens' indices in packed rows (`PackedRows.sequence_index`); None: unpacked rows
        `[prompt | completion]`, where they are the `K` tokens before the last."""
        completion_mask = inputs["completion_mask"].bool()
        B, K = completion_mask.shape
        if positions is None:
            positions = torch.arange(length - K - 1, length - 1, device=completion_mask.device).expand(B, K)
        # amax: the padding entries of packed indices all point at token 0 and must not clear a real position
        mask = torch.zeros(B, length, device=completion_mask.device)
        return mask.scatter_reduce(1, positions.to(mask.device), completion_mask.float(), reduce="amax").bool()

    def _student_last_hidden(self, student, input_ids, attention_mask, K: int) -> torch.Tensor:
        """TRL's `_get_last_hidden_state`, with the prefix the batch's prompts share read once where that is exact and
        simple (`student_shared_prefix`, see its docstring)."""
        if (
            self.args.student_shared_prefix and sharing_applies(self) and not self._is_vlm
            and self._router_memory is None and FrozenTrunk.active_for(student) is None
        ):
            backbone = backbone_of(student)
            hidden = last_hidden_shared_prefix(backbone, input_ids, attention_mask, K, cache_keyword(backbone))
            if hidden is not None:
                self._shared_prefix_batches += 1
                return hidden
        return self._get_last_hidden_state(student, input_ids, attention_mask, K)

    def _head(self, module, sliced: bool):
        return self.teachers.head(module, sliced, self.vocab_size)

    def _distillation_loss(self, student, inputs, num_items_in_batch, student_hidden=None):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        if "teacher_prompt_ids" in inputs:
            t_ids = torch.cat([inputs["teacher_prompt_ids"], completion_ids], dim=1)
            t_mask = torch.cat([inputs["teacher_prompt_mask"], completion_mask], dim=1)
        else:
            t_ids, t_mask = input_ids, attention_mask
        K = completion_ids.size(1)
        if student_hidden is None:
            student_hidden = self._student_last_hidden(student, input_ids, attention_mask, K)
        h_s = student_hidden
        if "teacher_hidden_0" in inputs:  # off-policy batch with cached teacher hidden states: no teacher forward
            h_ts = [inputs[f"teacher_hidden_{t}"] for t in range(len(self.teachers))]
        else:
            h_ts = self.teachers.hidden_states(student, t_ids, t_mask, K, inputs.get("replay_mask"))
        sliced = self._needs_vocab_slice
        w_s, b_s = self._head(student, sliced)
        s_cfg = student.config.get_text_config()
        s_scale, s_cap = logit_scale_of(s_cfg), getattr(s_cfg, "final_logit_softcapping", None)
        h_s = h_s.to(w_s.device)
        loss_mask = loss_mask.to(w_s.device)

        if len(self.teachers) == 1:
            module = self.teachers.module(self.teachers[0], student)
            w_t, b_t = self._head(module, sliced)
            t_cfg = module.config.get_text_config()
            return _chunked_divergence_loss(
                h_s, h_ts[0].to(w_t.device), w_s, w_t, loss_mask, self.beta,
                num_items_in_batch=num_items_in_batch,
                student_lm_head_bias=b_s, teacher_lm_head_bias=b_t,
                student_logit_scale=s_scale, teacher_logit_scale=logit_scale_of(t_cfg),
                student_final_logit_softcapping=s_cap,
                teacher_final_logit_softcapping=getattr(t_cfg, "final_logit_softcapping", None),
                temperature=self.temperature,
            )
        if self.args.teacher_combination == "logit_mean":
            # sum_k w_k s_k (h_k W_k^T + b_k) = [w_1 s_1 h_1, ..., w_k s_k h_k] @ [W_1, ..., W_k]^T + sum_k w_k s_k b_k:
            # one projection of concatenated hidden states through concatenated heads, which TRL's chunked kernel
            # evaluates without materialising vocabulary-sized logits. The teachers are frozen, so the concatenated
            # head is built once.
            scales = self.teachers.logit_scales(student)
            w_t, b_t = self.teachers.concatenated_head(student, scales, self.vocab_size)
            h_t = torch.cat([s * h.to(w_t.device) for s, h in zip(scales, h_ts)], dim=-1)
            return _chunked_divergence_loss(
                h_s, h_t, w_s, w_t, loss_mask, self.beta, num_items_in_batch=num_items_in_batch,
                student_lm_head_bias=b_s, teacher_lm_head_bias=b_t, student_logit_scale=s_scale,
                student_final_logit_softcapping=s_cap, temperature=self.temperature,
            )
        return self._prob_mean_loss(student, h_s, h_ts, w_s, b_s, s_scale, s_cap, loss_mask, num_items_in_batch)

    def _prob_mean_loss(self, student, h_s, h_ts, w_s, b_s, s_scale, s_cap, loss_mask, num_items_in_batch):
        """Mixture of teacher probabilities: dense over the valid positions of this micro-batch."""
        valid = loss_mask.reshape(-1).bool()
        z_s = F.linear(h_s.reshape(-1, h_s.size(-1))[valid], w_s, b_s) * s_scale
        if s_cap is not None:
            z_s = s_cap * torch.tanh(z_s / s_cap)
        mix = None
        with torch.no_grad():
            for t, h in zip(self.teachers, h_ts):
                module = self.teachers.module(t, student)
                w_t, b_t = self._head(module, sliced=True)
                cfg = module.config.get_text_config()
                z_t = F.linear(h.reshape(-1, h.size(-1))[valid].to(w_t.device), w_t, b_t) * logit_scale_of(cfg)
                cap = getattr(cfg, "final_logit_softcapping", None)
                if cap is not None:
                    z_t = cap * torch.tanh(z_t / cap)
                term = F.log_softmax(z_t.float() / self.temperature, dim=-1) + torch.log(torch.tensor(t.weight))
                mix = term if mix is None else torch.logaddexp(mix, term)
        per_token = generalized_jsd(z_s, mix, self.beta, self.temperature)
        denom = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
        loss = per_token.sum() / denom
        with torch.no_grad():
            log_ps = F.log_softmax(z_s.float() / self.temperature, dim=-1)
            entropy_sum = -(log_ps.exp() * log_ps).sum()
        return loss, entropy_sum, valid.sum()

    def _imitation_loss(self, student, inputs, hidden=None) -> torch.Tensor:
        """Clipped policy gradient on the student's continuations of teacher prefixes, group-normalised advantages.

        One policy update per generation batch: the behaviour policy equals the current one, so `old_logps` is the
        detached current log-prob (ratio 1, as in GRPO with one iteration); the clip bounds the update if samples
        are ever reused.
        """
        prompt_ids = inputs["imit_prompt_ids"].flatten(0, 1)
        prompt_mask = inputs["imit_prompt_mask"].flatten(0, 1)
        completion_ids = inputs["imit_completion_ids"].flatten(0, 1)
        completion_mask = inputs["imit_completion_mask"].flatten(0, 1)
        advantages = inputs["imit_advantages"].flatten(0, 1)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        K = completion_ids.size(1)
        if hidden is None:  # every continuation as a row of its own
            hidden = self._get_last_hidden_state(student, input_ids, attention_mask, K)
        weight, bias = self._head(student, self._needs_vocab_slice)
        cfg = student.config.get_text_config()
        mask = completion_mask.bool().to(weight.device)
        hidden = hidden.to(weight.device)
        logps_valid = ChunkedLogProbFunction.apply(
            hidden[mask], weight, bias, completion_ids.to(weight.device)[mask], self.temperature, _LOGPROB_CHUNK,
            getattr(cfg, "final_logit_softcapping", None), logit_scale_of(cfg), (),
        )[0]
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero).
        logps = hidden.new_zeros(mask.shape, dtype=logps_valid.dtype).masked_scatter(mask, logps_valid)
        normalizer = (inputs["imit_num_items"].float().clamp(min=1.0) / self.accelerator.num_processes).to(logps.device)
        return clipped_policy_loss(
            logps, logps.detach(), advantages.to(logps.device), mask.float(), self.args.epsilon, normalizer
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Saving: the model card goes with every save
    # ---------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero() and (output_dir in (None, self.args.output_dir)):
            self.create_model_card(model_name=Path(self.args.output_dir).name)
