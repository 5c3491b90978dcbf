"""GeneralizedDistillationTrainer: the paper's Knowledge Seeding (memory consolidation), on TRL's DistillationTrainer.

The whole objective lives in `_compute_loss` (below, with its two parts `_distillation_loss` and `_imitation_loss`);
the data each part needs is produced once per generation batch in `_generate_and_score_completions`.

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
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import DistillationTrainer
from trl.data_utils import is_conversational
from trl.kernels import ChunkedLogProbFunction
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.distillation_trainer import _chunked_divergence_loss
from trl.trainer.utils import create_model_from_path, pad

from .generalized_distillation_config import GeneralizedDistillationConfig
from .paper import SLEEP_PAPER

# Vocabulary tile of the chunked log-prob kernel (TRL's own default for the same kernel).
_LOGPROB_CHUNK = 32768


# --------------------------------------------------------------------------------------------------------------------
# Pure functions of the objective (unit-tested against hand-written references)
# --------------------------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages for rewards of shape `(num_groups, group_size)`: centred per group, optionally / group std."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(dim=-1, keepdim=True) + eps)
    return centred


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    normalizer: torch.Tensor | float,
) -> torch.Tensor:
    """PPO/GRPO clipped surrogate, summed over valid tokens and divided by `normalizer` (token count of the batch).

    `logps`, `old_logps`, `mask`: `(N, T)`; `advantages`: `(N,)` (one per sequence, broadcast over its tokens).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    return (per_token * mask).sum() / normalizer


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalized JSD between student logits and teacher log-probs (both `(N, V)`), TRL's convention.

    `beta = 0`: KL(teacher || student); `beta = 1`: KL(student || teacher); otherwise
    `beta * KL(teacher || m) + (1 - beta) * KL(student || m)` with `m = beta * p_teacher + (1 - beta) * p_student`.
    The teacher log-probs are expected already tempered. Dense: used for the `prob_mean` teacher mixture, which the
    chunked kernel (a single teacher `hidden @ weight`) cannot express.
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = teacher_logprobs.float()
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logaddexp(log_ps + torch.log(torch.tensor(1 - beta)), log_pt + torch.log(torch.tensor(beta)))
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def logit_scale_of(config) -> float:
    """The multiplier a model applies to its logits, under the config names TRL's distillation loss reads."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


# --------------------------------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------------------------------


class _Teacher:
    """One teacher: a separate (frozen, prepared) model, or the student itself seen through `view()`."""

    def __init__(
        self,
        weight: float,
        model=None,
        view: Callable[[], Any] | None = None,
        name: str = "teacher",
        replay_view: Callable[[], Any] | None = None,
    ):
        self.weight = weight
        self.model = model  # wrapped/prepared module, or None for a view of the student
        self.view = view
        self.replay_view = replay_view  # the view that teaches replayed (old) prompts, for a view teacher
        self.name = name

    @property
    def splits_replay(self) -> bool:
        """Replayed rows need a view of their own (a separate forward/generate call)."""
        return self.is_view and self.replay_view is not None and self.replay_view is not self.view

    @property
    def is_view(self) -> bool:
        return self.model is None


def _tokenizer_fingerprint(tokenizer) -> tuple:
    return (tuple(sorted(tokenizer.get_vocab().items())), tokenizer.eos_token, tokenizer.pad_token)


def _match_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> set[str]:
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


class GeneralizedDistillationTrainer(DistillationTrainer):
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

    _tag_names = ["trl", "sleep-trl", "knowledge-seeding", "generalized-distillation"]
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
            from ..assets import resolve_model_path

            model = resolve_model_path(model)
        self._check_dataset(train_dataset, args, "train_dataset")
        if tools and (args.lmbda < 1.0 or args.alpha < 1.0):
            raise ValueError(
                "`tools` are only supported for pure on-policy distillation (`lmbda: 1.0`, `alpha: 1.0`): teacher "
                "samples and imitation rollouts are single-turn."
            )

        teacher_sources = self._teacher_sources(teacher_model, args)
        if args.use_vllm:
            from ..generation.vllm_cpu import without_trl_engine

            engine_context = without_trl_engine(args)  # on vLLM's CPU backend we build the engine ourselves
        else:
            engine_context = contextlib.nullcontext(False)
        # TRL's parent rejects any teacher whose vocab_size differs from the student's; the teachers are therefore
        # loaded and prepared here, after the parent's __init__ (same steps as the parent, per teacher).
        with engine_context as deferred_engine:
            super().__init__(
                model=model,
                teacher_model=None,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
            )
        self.vocab_size = len(self._tokenizer)
        self.teachers = self._build_teachers(teacher_sources, args, teacher_view, replay_view)
        self._has_replay = self._check_replay(train_dataset, args)
        self.teacher_model = next((t.model for t in self.teachers if not t.is_view), None)
        self._check_teacher_heads()

        if args.trainable_parameters is not None:
            keep = _match_parameters(self.model, args.trainable_parameters)
            for name, param in self.model.named_parameters():
                param.requires_grad_(name in keep)
        # Under ZeRO-3 a parameter's local tensor is an empty shard: `ds_numel` holds its true size.
        self.num_trainable_parameters = sum(
            getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad
        )
        if self.num_trainable_parameters == 0:
            raise ValueError(
                "No parameter of the student requires a gradient. Set `trainable_parameters`, pass a `peft_config`, "
                "or expand a continuum memory slot before training."
            )

        self.semantic_judge = semantic_judge
        if self.semantic_judge is None and args.alpha < 1.0 and args.gamma > 0.0:
            from ..rewards.semantic import SemanticJudge

            self.semantic_judge = SemanticJudge(args.semantic_judge, threshold=args.semantic_threshold)

        self._generation_round = 0
        self._sampler = "student"  # who writes the current batch's distillation sequences
        self._batch_inputs: list[dict] | None = None
        self._batch_teacher_prompt_ids: list[list[int]] | None = None
        self._batch_replay: list[bool] = []  # per row of the current batch: taught by the replay view
        self._last_teacher_completions: list[list[int]] | None = None
        self._loss_parts: dict[str, torch.Tensor] = {}
        self._concat_teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._teacher_engines: dict[int, Any] = {}
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
        if args.lmbda < 1.0 and not args.seq_kd and "completion" not in columns:
            raise ValueError(
                f"`seq_kd: false` takes off-policy sequences from the dataset's 'completion' column, which `{name}` "
                f"lacks (columns: {sorted(columns)}). Add it, or set `seq_kd: true` to sample them from the teacher."
            )

    @staticmethod
    def _teacher_sources(teacher_model, args: GeneralizedDistillationConfig) -> list:
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

    def _resolve_view(self, args: GeneralizedDistillationConfig, teacher_view, replay_view):
        """The teacher view and the replay view (who teaches rows marked in `replay_column`)."""
        if teacher_view is not None:
            return teacher_view, replay_view
        student = self.model
        if args.teacher_view == "self":
            return contextlib.nullcontext, contextlib.nullcontext
        if args.teacher_view == "disable_adapter":
            if not is_peft_model(student):
                raise ValueError("`teacher_view: disable_adapter` needs a PEFT student (pass a `peft_config`).")
            view = student.disable_adapter  # one bound method for both: replayed rows need no separate call
            return view, view
        try:
            from ..memory import find_memory
        except ImportError:  # pragma: no cover - memory package absent
            find_memory = None
        memory = find_memory(student) if find_memory is not None else None
        if memory is not None:
            # Replayed old knowledge is taught by the long-term memory as it was before this sleep: the levels the
            # student has suspended (the awake fast level, which may have overwritten old answers) stay silent.
            return memory.teacher_view, lambda: memory.teacher_view(suspend=set(memory.state.suspended))
        if args.teacher_view == "memory":
            raise ValueError(
                "`teacher_view: memory` needs a continuum memory attached to the student "
                "(`sleep_trl.memory.attach_memory`) and expanded once."
            )
        raise ValueError(
            "No teacher: give `teacher_model` (or `teacher_model_name_or_path` / `teachers` in the config), or a "
            "`teacher_view` for Self-Knowledge Seeding, or attach a continuum memory to the student."
        )

    def _build_teachers(
        self, sources: list, args: GeneralizedDistillationConfig, teacher_view, replay_view
    ) -> list[_Teacher]:
        if not sources:
            view, replay = self._resolve_view(args, teacher_view, replay_view)
            return [_Teacher(weight=1.0, view=view, replay_view=replay, name="teacher_view")]
        from transformers import AutoTokenizer

        weights = args.teacher_weights or [1.0] * len(sources)
        total = float(sum(weights))
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        if args.teacher_model_revision is not None:
            init_kwargs.setdefault("revision", args.teacher_model_revision)
        student_fp = _tokenizer_fingerprint(self._tokenizer)
        teachers = []
        for index, source in enumerate(sources):
            if isinstance(source, str):
                from ..assets import resolve_model_path

                path = resolve_model_path(source)
                teacher_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
                model = create_model_from_path(path, **init_kwargs)
                name = Path(path).name
            else:
                model, name = source, getattr(source.config, "_name_or_path", f"teacher{index}") or f"teacher{index}"
                teacher_tok = None
                if name and Path(name, "tokenizer_config.json").exists():
                    teacher_tok = AutoTokenizer.from_pretrained(name)
            if teacher_tok is not None and _tokenizer_fingerprint(teacher_tok) != student_fp:
                raise ValueError(
                    f"Teacher {name!r} uses a different tokenizer from the student. Knowledge Seeding compares "
                    "next-token distributions over one vocabulary, so every teacher must share the student's tokenizer "
                    "(embedding tables padded to different sizes are fine)."
                )
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if self.is_deepspeed_enabled:
                prepared = prepare_deepspeed(model, self.accelerator)
            else:
                prepared = self.accelerator.prepare_model(model, evaluation_mode=True)
            teachers.append(_Teacher(weight=weights[index] / total, model=prepared, name=name))
        if len(teachers) > 1 and args.teacher_combination == "logit_mean":
            for t in teachers:
                cfg = self.accelerator.unwrap_model(t.model).config.get_text_config()
                if getattr(cfg, "final_logit_softcapping", None) is not None:
                    raise ValueError(
                        f"Teacher {t.name!r} soft-caps its logits, which `teacher_combination: logit_mean` cannot fold "
                        "into one projection. Use `teacher_combination: prob_mean`."
                    )
        return teachers

    def _check_replay(self, dataset, args: GeneralizedDistillationConfig) -> bool:
        """Whether the dataset marks replayed rows (refused unless a single teacher view can teach them)."""
        columns = getattr(dataset, "column_names", None) or []
        if args.replay_column not in columns or not any(dataset[args.replay_column]):
            return False
        teacher = self.teachers[0]
        if len(self.teachers) > 1 or not teacher.is_view or teacher.replay_view is None:
            raise ValueError(
                f"The dataset marks rows in `{args.replay_column}`, which are taught by a replay view of the student; "
                "that needs a single teacher view (`teacher_view: memory`, `disable_adapter`, `self`, or a "
                "`teacher_view` callable with a `replay_view`). Drop the column to teach every row alike."
            )
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
        """The colocate engine: built here on vLLM's CPU backend (TRL's cannot sync weights there), TRL's elsewhere.

        A student carrying a continuum memory is served as its dense fold (`mem.export_dense`: every fixed-gate
        expert becomes extra FFN neurons), and each sync pushes `mem.dense_state_dict()`, so the engine computes
        exactly what the student computes (the fast level suspended, the new expert on)."""
        from ..generation.vllm_cpu import attach_vllm_generation, enable_cpu_weight_sync

        args = self.args
        group = args.num_imitation_generations if args.alpha < 1.0 else 1
        kwargs: dict[str, Any] = {
            "max_num_seqs": args.per_device_train_batch_size * args.gradient_accumulation_steps * group
        }
        memory = self._memory()
        if memory is not None:
            routed = [lv.name for lv in memory.config.levels if lv.resolved_gate != "fixed"]
            if routed:
                raise ValueError(
                    f"`use_vllm` needs every continuum-memory level to fold into dense weights, but {routed} use a "
                    "per-token router. Use `gate='fixed'` for those levels, or `use_vllm: false`."
                )
            if not deferred:
                raise ValueError(
                    "`use_vllm` with a continuum memory is supported with the CPU colocate engine only for now; on "
                    "GPU export the model with `mem.export_dense(dir)` first, or set `use_vllm: false`."
                )
            folder = Path(args.output_dir) / "vllm-engine"
            if self.accelerator.is_main_process:
                memory.export_dense(folder, tokenizer=self._tokenizer, overwrite=True)
            self.accelerator.wait_for_everyone()
            kwargs["model_path"] = folder
        generation = attach_vllm_generation(self, **kwargs) if deferred else enable_cpu_weight_sync(self.vllm_generation)
        if memory is not None:
            generation.weights_fn = lambda: memory.dense_state_dict().items()

    def _memory(self):
        try:
            from ..memory import find_memory
        except ImportError:  # pragma: no cover
            return None
        return find_memory(self.model)

    def _engine_weights(self):
        """Checkpoint-format weights the vLLM engine serves for the model as it computes right now (so, read inside
        a teacher view, the teacher's)."""
        memory = self._memory()
        if memory is not None:
            return list(memory.dense_state_dict().items())
        from ..generation.vllm_cpu import model_weights

        return list(model_weights(self.accelerator.unwrap_model(self.model)))

    # ---------------------------------------------------------------------------------------------------------------
    # Generation: who writes the distillation sequences, teacher samples, imitation rollouts
    # ---------------------------------------------------------------------------------------------------------------

    def _round_rng(self, salt: int) -> random.Random:
        # Identical on every process for the same round and salt (so every rank takes the same branch); the process
        # index enters only where per-rank draws are wanted.
        return random.Random((self.args.seed * 1_000_003 + self._generation_round) * 7919 + salt)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        args = self.args
        training = self.model.training
        self._generation_round += 1
        if not training:
            self._sampler = "student"
        elif args.alpha == 0.0:
            # Pure imitation: the distillation term is off, so the batch's sequences are the teacher samples the
            # imitation term needs anyway (one generation pass fewer).
            self._sampler = "teacher" if args.seq_kd else "dataset"
        else:
            on_policy = self._round_rng(0).random() < args.lmbda
            self._sampler = "student" if on_policy else ("teacher" if args.seq_kd else "dataset")
        mode = "train" if training else "eval"
        self._metrics[mode]["distill/on_policy"].append(float(self._sampler == "student"))

        self._batch_inputs = inputs
        self._batch_replay = [bool(x.get(args.replay_column) or False) for x in inputs]
        self._last_teacher_completions = None
        column = args.teacher_prompt_column
        if column in inputs[0] and inputs[0][column] is not None:
            self._batch_teacher_prompt_ids = self._tokenize_prompts([x[column] for x in inputs])[0]
        else:
            self._batch_teacher_prompt_ids = None

        output = super()._generate_and_score_completions(inputs)
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"])]

        if self._has_replay:  # on every rank (ZeRO-3 ranks must run the same teacher forwards)
            output["replay_mask"] = torch.tensor(self._batch_replay, device=self.accelerator.device)
        if self._batch_teacher_prompt_ids is not None:
            device = self.accelerator.device
            tp = [torch.tensor(ids) for ids in self._batch_teacher_prompt_ids]
            output["teacher_prompt_ids"] = pad(tp, self._tokenizer.pad_token_id, padding_side="left").to(device)
            output["teacher_prompt_mask"] = pad(
                [torch.ones_like(t) for t in tp], 0, padding_side="left"
            ).to(device)

        if args.alpha < 1.0:
            targets = self._last_teacher_completions
            if targets is None:  # on-policy batch: the imitation term still needs teacher data
                targets = (
                    self._dataset_completions(prompt_ids) if not args.seq_kd else self._teacher_generate(prompt_ids)
                )
            output.update(self._imitation_rollouts(prompt_ids, targets, mode))
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        # The parent calls this to write the distillation sequences; off-policy batches are written by the teacher or
        # taken from the dataset instead of the student.
        if self._sampler == "teacher":
            completions = self._teacher_generate(prompt_ids)
        elif self._sampler == "dataset":
            completions = self._dataset_completions(prompt_ids)
        else:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        self._last_teacher_completions = completions
        return completions

    def _dataset_completions(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Token ids of the batch's `completion` column, as the chat template renders them after the prompt."""
        out = []
        tok = self._tokenizer
        for example, p_ids in zip(self._batch_inputs, prompt_ids, strict=True):
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

    def _hf_generate(self, model, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Sample with `transformers.generate` from `model` (a teacher, or the student in a view).

        Mirrors the transformers path of TRL's `_generate_single_turn`, which is bound to the student.
        """
        if not prompt_ids:
            return []
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left").to(device)
        with (
            unwrap_model_for_generation(
                model,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
            ) as unwrapped,
            torch.no_grad(),
        ):
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                out = unwrapped.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
                )
            finally:
                unwrapped.train(was_training)
        completions = out[:, input_ids.size(1) :].cpu()
        result = []
        eos = set(self.eos_token_ids)
        for row in completions.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            result.append(row if cut is None else row[: cut + 1])
        return result

    def _teacher_generate(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Teacher samples for the batch: each prompt is written by one teacher, drawn with `teacher_weights`."""
        if self._batch_teacher_prompt_ids is not None:
            prompt_ids = self._batch_teacher_prompt_ids
        rng = self._round_rng(1 + self.accelerator.process_index)
        weights = [t.weight for t in self.teachers]
        assignment = [rng.choices(range(len(self.teachers)), weights=weights)[0] for _ in prompt_ids]
        replay = self._batch_replay if len(self._batch_replay) == len(prompt_ids) else [False] * len(prompt_ids)
        completions: list[list[int] | None] = [None] * len(prompt_ids)
        groups = [(index, flag) for index, teacher in enumerate(self.teachers)
                  for flag in ((False, True) if teacher.splits_replay and self._has_replay else (None,))]
        for index, flag in groups:
            teacher = self.teachers[index]
            rows = [i for i, a in enumerate(assignment) if a == index and (flag is None or replay[i] == flag)]
            # Every rank must enter the same generate calls under ZeRO-3 (parameters are gathered collectively).
            if not rows and not self.is_deepspeed_enabled:
                continue
            batch = [prompt_ids[i] for i in rows] or [prompt_ids[0]]
            view = teacher.replay_view if flag else teacher.view
            if self.use_vllm:
                generated = self._vllm_teacher_generate(index, teacher, batch, view)
            elif teacher.is_view:
                with view():
                    generated = self._hf_generate(self.model_wrapped, batch)
            else:
                generated = self._hf_generate(teacher.model, batch)
            for i, ids in zip(rows, generated):
                completions[i] = ids
        return completions  # type: ignore[return-value]

    def _vllm_sampling(self) -> dict[str, Any]:
        vllm = self.vllm_generation
        return dict(
            max_tokens=vllm.max_completion_length, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty,
            stop_token_ids=list(self.eos_token_ids), **dict(vllm.generation_kwargs),
        )

    def _vllm_teacher_generate(self, index: int, teacher: _Teacher, prompt_ids: list[list[int]], view=None):
        """Teacher samples through vLLM: a view of the student is swapped into the student's engine (no second copy
        of the weights); a separate teacher checkpoint gets a frozen engine of its own, built on first use."""
        sampling = self._vllm_sampling()
        if teacher.is_view:
            if self.state.global_step != self._last_loaded_step:
                self.vllm_generation.sync_weights()
                self._last_loaded_step = self.state.global_step

            def teacher_weights():
                with (view or teacher.view)():
                    return self._engine_weights()

            with self.vllm_generation.weights_swapped(teacher_weights):
                return self.vllm_generation.generate_token_ids(prompt_ids, **sampling)
        if index not in self._teacher_engines:
            from ..generation.vllm_cpu import TeacherEngine

            unwrapped = self.accelerator.unwrap_model(teacher.model)
            path = getattr(unwrapped, "name_or_path", None)
            if not path or not Path(path, "config.json").exists():
                raise ValueError(
                    f"`use_vllm` samples teacher {teacher.name!r} with an engine of its own, built from its checkpoint "
                    "folder, but the model has none. Pass the teacher as a path, or `save_pretrained` it first."
                )
            self._teacher_engines[index] = TeacherEngine(
                path, max_num_seqs=self.vllm_generation.max_num_seqs, max_model_len=self.args.vllm_max_model_length,
                seed=self.args.seed,
            )
        return self._teacher_engines[index].generate(prompt_ids, **sampling)

    def _imitation_rollouts(self, prompt_ids, targets, mode: str) -> dict[str, torch.Tensor]:
        """Learning to Imitate: cut teacher samples at random prefixes, let the student continue, reward, advantage."""
        args = self.args
        G = args.num_imitation_generations
        device = self.accelerator.device
        rng = self._round_rng(10_000 + self.accelerator.process_index)
        prefixes, suffixes = [], []
        for p_ids, target in zip(prompt_ids, targets, strict=True):
            n = len(target)
            lo = int(n * args.imitation_min_prefix)
            hi = min(max(lo, int(n * args.imitation_max_prefix)), max(n - 1, 0))
            cut = rng.randint(min(lo, hi), hi) if n > 0 else 0
            prefixes.append(list(p_ids) + list(target[:cut]))
            suffixes.append(list(target[cut:]))
        longest = max(1, max(len(s) for s in suffixes))
        rollout_prompts = [p for p in prefixes for _ in range(G)]
        sampler, self._sampler = self._sampler, "student"
        try:
            with self._max_new_tokens(longest):
                continuations = super()._generate_single_turn(rollout_prompts, None, {})
        finally:
            self._sampler = sampler

        refs = [s for s in suffixes for _ in range(G)]
        from ..rewards.edit_distance import edit_similarity

        decode = self._tokenizer.decode
        if args.edit_distance_unit == "char":
            r_abs = [
                edit_similarity(decode(c, skip_special_tokens=True), decode(r, skip_special_tokens=True),
                                args.max_edit_distance)
                for c, r in zip(continuations, refs)
            ]
        else:
            r_abs = [edit_similarity(c, r, args.max_edit_distance) for c, r in zip(continuations, refs)]
        if args.gamma > 0.0:
            r_sem = self.semantic_judge(
                [decode(c, skip_special_tokens=True) for c in continuations],
                [decode(r, skip_special_tokens=True) for r in refs],
            )
        else:
            r_sem = [0.0] * len(continuations)
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
        # Shaped (B, G, ...) so TRL's shuffle/split of the generation batch keeps each prompt's group together.
        return {
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
        for key, value in self._loss_parts.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        self._metrics[mode]["trainable_parameters"].append(float(self.num_trainable_parameters))
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """J = (1 - alpha) E[r] - alpha D(teacher || student): minimise alpha * D + (1 - alpha) * imitation loss."""
        alpha = self.args.alpha
        device = inputs["prompt_ids"].device
        loss = torch.zeros((), device=device)
        entropy_sum = torch.zeros((), device=device)
        n_valid = torch.zeros((), device=device, dtype=torch.long)
        parts = {}
        if alpha > 0.0:
            distill, entropy_sum, n_valid = self._distillation_loss(unwrapped_student, inputs, num_items_in_batch)
            loss = loss + alpha * distill
            parts["distill/loss"] = distill.detach()
        if alpha < 1.0 and "imit_completion_ids" in inputs:
            imitation = self._imitation_loss(unwrapped_student, inputs)
            loss = loss + (1 - alpha) * imitation
            parts["imitation/loss"] = imitation.detach()
        self._loss_parts = parts
        return loss, entropy_sum, n_valid

    def _head(self, module, sliced: bool):
        head = module.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if sliced:
            weight = weight[: self.vocab_size]
            bias = bias[: self.vocab_size] if bias is not None else None
        return weight, bias

    def _teacher_hidden(
        self, teacher: _Teacher, unwrapped_student, input_ids, attention_mask, logits_to_keep, replay_mask=None
    ):
        with torch.no_grad():
            split = teacher.splits_replay and replay_mask is not None
            if split and (bool(replay_mask.any()) or self.is_deepspeed_enabled):
                # Rows marked as replay are taught by the replay view, the others by the teacher view. Under ZeRO-3
                # every rank runs both forwards (parameters are gathered collectively): an empty group runs on
                # row 0 and is discarded.
                out = None
                for flag, view in ((False, teacher.view), (True, teacher.replay_view)):
                    rows = (replay_mask == flag).nonzero().squeeze(-1)
                    if rows.numel() == 0 and not self.is_deepspeed_enabled:
                        continue
                    run = rows if rows.numel() else rows.new_zeros(1)
                    with view():
                        h = self._get_last_hidden_state(
                            unwrapped_student, input_ids[run], attention_mask[run], logits_to_keep
                        )
                    if out is None:
                        out = h.new_zeros((input_ids.size(0), *h.shape[1:]))
                    if rows.numel():
                        out[rows] = h
                return out
            if teacher.is_view:
                with teacher.view():
                    return self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep)
            unwrapped = self.accelerator.unwrap_model(teacher.model)
            unwrapped.eval()
            # Through the teacher's own wrapper, so DeepSpeed/FSDP materialise its sharded parameters.
            return self._forward_redirection(
                teacher.model, unwrapped, self._get_last_hidden_state, unwrapped, input_ids, attention_mask,
                logits_to_keep,
            )

    def _teacher_module(self, teacher: _Teacher, unwrapped_student):
        return unwrapped_student if teacher.is_view else self.accelerator.unwrap_model(teacher.model)

    def _distillation_loss(self, student, inputs, num_items_in_batch):
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
        h_s = self._get_last_hidden_state(student, input_ids, attention_mask, K)
        replay_mask = inputs.get("replay_mask")
        h_ts = [self._teacher_hidden(t, student, t_ids, t_mask, K, replay_mask) for t in self.teachers]
        sliced = self._needs_vocab_slice
        w_s, b_s = self._head(student, sliced)
        s_cfg = student.config.get_text_config()
        s_scale, s_cap = logit_scale_of(s_cfg), getattr(s_cfg, "final_logit_softcapping", None)
        h_s = h_s.to(w_s.device)
        loss_mask = loss_mask.to(w_s.device)

        if len(self.teachers) == 1:
            module = self._teacher_module(self.teachers[0], student)
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
            scales = [
                t.weight * logit_scale_of(self._teacher_module(t, student).config.get_text_config())
                for t in self.teachers
            ]
            w_t, b_t = self._concatenated_teacher_head(student, scales)
            h_t = torch.cat([s * h.to(w_t.device) for s, h in zip(scales, h_ts)], dim=-1)
            return _chunked_divergence_loss(
                h_s, h_t, w_s, w_t, loss_mask, self.beta, num_items_in_batch=num_items_in_batch,
                student_lm_head_bias=b_s, teacher_lm_head_bias=b_t, student_logit_scale=s_scale,
                student_final_logit_softcapping=s_cap, temperature=self.temperature,
            )
        return self._prob_mean_loss(student, h_s, h_ts, w_s, b_s, s_scale, s_cap, loss_mask, num_items_in_batch)

    def _concatenated_teacher_head(self, student, scales):
        if self._concat_teacher_head is None:
            weights, bias = [], None
            for t, s in zip(self.teachers, scales):
                w, b = self._head(self._teacher_module(t, student), sliced=True)
                weights.append(w.detach())
                if b is not None:
                    bias = s * b.detach() if bias is None else bias + s * b.detach()
            self._concat_teacher_head = (torch.cat(weights, dim=-1), bias)
        return self._concat_teacher_head

    def _prob_mean_loss(self, student, h_s, h_ts, w_s, b_s, s_scale, s_cap, loss_mask, num_items_in_batch):
        """Mixture of teacher probabilities: dense over the valid positions of this micro-batch."""
        valid = loss_mask.reshape(-1).bool()
        z_s = F.linear(h_s.reshape(-1, h_s.size(-1))[valid], w_s, b_s) * s_scale
        if s_cap is not None:
            z_s = s_cap * torch.tanh(z_s / s_cap)
        mix = None
        with torch.no_grad():
            for t, h in zip(self.teachers, h_ts):
                module = self._teacher_module(t, student)
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

    def _imitation_loss(self, student, inputs) -> torch.Tensor:
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
