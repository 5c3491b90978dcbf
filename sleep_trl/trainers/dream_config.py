"""Configuration of the `DreamTrainer` (Dreaming, the second stage of sleep; paper notes §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..dreaming.inner_loop import REWARD_TYPES, InnerLoopConfig
from ..dreaming.selection import IMPORTANCE_SCORES, IMPORTANCE_TARGETS
from ..dreaming.tau import TAUS
from ..dreaming.templates import DREAM_SPLITS, resolve_template
from ..rewards.qa import METRICS

POLICY_UPDATES = ("rest_em", "grpo")


@dataclass
class DreamConfig(GRPOConfig):
    r"""
    Configuration for [`DreamTrainer`]: the model writes m dreams per context, the most promising are kept, each kept
    dream is scored by fine-tuning an isolated LoRA copy on it and measuring tau, and the dream writer learns from the
    rewards (ReST-EM or GRPO). All [`~trl.GRPOConfig`] fields apply (generation, vLLM, batching, logging); the ones
    below are the knobs of dreaming. `num_generations` is m, the number of dreams per context (`num_dreams` is an
    alias).

    Parameters:
        > Dreams

        num_dreams (`int` or `None`, *optional*):
            m, the number of dreams sampled per context. When set, it overrides `num_generations`.
        dream_template (`str`, *optional*, defaults to `"implications"`):
            What to dream: a built-in template (`implications`, `qa_pairs`, `rewrite`, `demonstrations`) or a string
            with a `{context}` placeholder. Used when the dataset has no `prompt` column.
        dream_system_prompt (`str` or `None`, *optional*):
            An optional system message placed before the dream request.
        context_column (`str`, *optional*, defaults to `"context"`):
            Dataset column holding the context (passage or demonstrations) of each task.
        dream_split (`str`, *optional*, defaults to `"none"`):
            How a dream becomes training sequences for the inner loop and the importance score: `none` (the whole
            dream), `lines` (one sequence per non-empty line, SEAL-style lists of implications) or `paragraphs`.
        max_dream_tokens (`int`, *optional*, defaults to `512`):
            Truncation length of one training sequence (dream, tau example or rehearsal row).
        random_expert_sampling (`bool`, *optional*, defaults to `False`):
            While sampling dreams, let each router of the model's continuum memory also pick one random expert (the
            paper's novel-combination mechanism). Needs a model carrying a `sleep_trl.memory` memory, and
            transformers generation (`use_vllm=False`).

        > tau, the downstream score

        tau (`str`, *optional*, defaults to `"qa"`):
            `qa`: no-context question answering on the task's `questions`/`answers`; `demos`: accuracy on held-out
            `demos`. A `tau` callable passed to the trainer replaces it.
        tau_metric (`str`, *optional*, defaults to `"exact_match"`):
            Per-item metric: `exact_match`, `f1`, `contains` or `semantic` (offline MiniLM judge), the metric names
            of `sleep_trl.eval.qa.ClosedBookQA`, which asks and scores tau's questions.
        tau_prompt_template (`str` or `None`, *optional*):
            How a question (`{question}`) or held-out input (`{input}`, `{context}`) is asked; `None` = the item alone.
        tau_use_chat_template (`bool` or `None`, *optional*):
            Ask through the tokenizer's chat template; `None` = whenever the tokenizer has one.
        tau_max_new_tokens (`int`, *optional*, defaults to `24`):
            Greedy generation budget per answer.
        tau_batch_size (`int`, *optional*, defaults to `16`):
            Questions answered together.
        tau_stop_at_newline (`bool`, *optional*, defaults to `True`):
            Keep only the first line of each answer.
        semantic_model (`str`, *optional*, defaults to `"all-minilm-l6-v2"`):
            Sentence-transformers model of the `semantic` metric (the packaged offline default).
        semantic_threshold (`float`, *optional*, defaults to `0.8`):
            Cosine similarity at which the `semantic` metric counts an answer as right.

        > Selection (top-k by gradient importance, plus b random)

        num_selected_dreams (`int` or `None`, *optional*):
            k, the dreams kept per context by importance; `None` keeps all m (no selection, no importance cost).
        num_random_dreams (`int`, *optional*, defaults to `0`):
            b, further dreams kept per context uniformly at random among the rest.
        importance_score (`str`, *optional*, defaults to `"alignment"`):
            How a dream's gradient becomes a score (the paper leaves it open): `alignment` = cosine between the
            dream's SFT gradient and the gradient of tau's data loss, `dot` = their inner product, `grad_norm` = the
            norm of the dream's gradient.
        importance_target (`str`, *optional*, defaults to `"tau_data"`):
            tau's data loss for `alignment`/`dot`: `tau_data` (SFT loss on tau's questions and answers, when tau
            exposes them; else the context) or `context` (language-modelling loss on the context).
        importance_parameters (`list[str]`, *optional*, defaults to `["auto"]`):
            Parameters the importance gradient is taken with respect to: regular expressions over parameter names, or
            `auto` = the last decoder layer's MLP down projection and the final norm (cheap: backpropagation stops
            after the last layer).
        selection_seed (`int` or `None`, *optional*):
            Seed of the random part of selection (combined with the step); `None` = `seed`.

        > Reward: inner LoRA loop on an isolated copy

        inner_lora_r (`int`, *optional*, defaults to `16`), inner_lora_alpha (`int`, *optional*, defaults to `32`),
        inner_lora_dropout (`float`, *optional*, defaults to `0.0`):
            Shape of the inner adapter.
        inner_lora_target_modules (`list[str]` or `None`, *optional*):
            Modules of the inner adapter (PEFT names or suffixes); `None` = every linear layer of the blocks.
        inner_steps (`int`, *optional*, defaults to `10`):
            AdamW steps of the inner loop per dream.
        inner_learning_rate (`float`, *optional*, defaults to `1e-3`):
            Learning rate of the inner loop.
        inner_batch_size (`int`, *optional*, defaults to `8`):
            Sequences per inner step.
        inner_weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay of the inner loop.
        reward_type (`str`, *optional*, defaults to `"binary"`):
            `binary` (the paper): 1 when the copy's tau beats the model's by more than `improvement_threshold`, else
            0; `improvement`: the difference tau_after - tau_before.
        improvement_threshold (`float`, *optional*, defaults to `0.0`):
            Margin for `binary`; also the level above which a reward counts as "kept" for ReST-EM and rehearsal.

        > Policy update

        policy_update (`str`, *optional*, defaults to `"rest_em"`):
            `rest_em` (the paper): supervised fine-tuning of the dream writer on the kept dreams (reward above
            `improvement_threshold`), token-averaged over the generation batch; each generation batch is one ReST-EM
            round, `num_iterations` its SFT epochs. `grpo`: GRPO's clipped policy gradient with advantages
            normalised over the m dreams of a context. In both, dreams that were not selected carry no reward: they
            are left out of the GRPO baseline and get a zero advantage / no SFT weight.
        rehearsal_coef (`float`, *optional*, defaults to `1.0`):
            Weight of rehearsal: the policy also learns the kept dreams themselves as plain text (the sequences the
            isolated copy learned), so the knowledge that helped the copy reaches the model. `0` trains the dream
            writer only (SEAL-style).
        num_dreams_to_print (`int`, *optional*, defaults to `6`):
            Rows of the dream table printed at each log (context, dream, importance, selected, tau before/after,
            reward); `0` disables it.
    """

    # ---- GRPOConfig defaults tuned for dreaming -------------------------------------------------------------------
    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the policy update."})
    num_generations: int | None = field(
        default=4, metadata={"help": "m, the number of dreams per context (see also `num_dreams`)."}
    )
    max_completion_length: int | None = field(default=256, metadata={"help": "Maximum length of one dream."})

    # ---- dreams -----------------------------------------------------------------------------------------------------
    num_dreams: int | None = field(
        default=None, metadata={"help": "m, the number of dreams per context; overrides `num_generations` when set."}
    )
    dream_template: str = field(
        default="implications",
        metadata={
            "help": "Built-in template (implications, qa_pairs, rewrite, demonstrations) or a string with '{context}'."
        },
    )
    dream_system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    context_column: str = field(default="context", metadata={"help": "Dataset column holding the context."})
    dream_split: str = field(
        default="none", metadata={"help": "How a dream becomes training sequences: none, lines or paragraphs."}
    )
    max_dream_tokens: int = field(default=512, metadata={"help": "Truncation length of one training sequence."})
    random_expert_sampling: bool = field(
        default=False, metadata={"help": "Route through one extra random memory expert while dreaming."}
    )

    # ---- tau --------------------------------------------------------------------------------------------------------
    tau: str = field(
        default="qa", metadata={"help": "Downstream score: qa (no-context QA) or demos (held-out demos)."}
    )
    tau_metric: str = field(default="exact_match", metadata={"help": "exact_match, f1, contains or semantic."})
    tau_prompt_template: str | None = field(default=None, metadata={"help": "How one question/input is asked."})
    tau_use_chat_template: bool | None = field(
        default=None, metadata={"help": "Ask through the chat template (None: when the tokenizer has one)."}
    )
    tau_max_new_tokens: int = field(default=24, metadata={"help": "Greedy generation budget per answer."})
    tau_batch_size: int = field(default=16, metadata={"help": "Questions answered together."})
    tau_stop_at_newline: bool = field(default=True, metadata={"help": "Keep only the first line of each answer."})
    semantic_model: str = field(
        default="all-minilm-l6-v2", metadata={"help": "Sentence-transformers model of the semantic metric."}
    )
    semantic_threshold: float = field(default=0.8, metadata={"help": "Cosine threshold of the semantic metric."})

    # ---- selection --------------------------------------------------------------------------------------------------
    num_selected_dreams: int | None = field(
        default=None, metadata={"help": "k, dreams kept per context by importance (None: keep all)."}
    )
    num_random_dreams: int = field(default=0, metadata={"help": "b, further dreams kept at random per context."})
    importance_score: str = field(default="alignment", metadata={"help": "alignment, dot or grad_norm."})
    importance_target: str = field(default="tau_data", metadata={"help": "tau_data or context."})
    importance_parameters: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={"help": "Regular expressions over parameter names, or 'auto' (last MLP down_proj + final norm)."},
    )
    selection_seed: int | None = field(default=None, metadata={"help": "Seed of random selection (None: seed)."})

    # ---- reward -----------------------------------------------------------------------------------------------------
    inner_lora_r: int = field(default=16, metadata={"help": "Rank of the inner LoRA."})
    inner_lora_alpha: int = field(default=32, metadata={"help": "Alpha of the inner LoRA."})
    inner_lora_dropout: float = field(default=0.0, metadata={"help": "Dropout of the inner LoRA."})
    inner_lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules of the inner LoRA (None: every linear layer of the blocks)."}
    )
    inner_steps: int = field(default=10, metadata={"help": "AdamW steps of the inner loop per dream."})
    inner_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the inner loop."})
    inner_batch_size: int = field(default=8, metadata={"help": "Sequences per inner step."})
    inner_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the inner loop."})
    reward_type: str = field(default="binary", metadata={"help": "binary (paper) or improvement."})
    improvement_threshold: float = field(default=0.0, metadata={"help": "Margin a dream must beat."})

    # ---- policy update ----------------------------------------------------------------------------------------------
    policy_update: str = field(default="rest_em", metadata={"help": "rest_em (paper) or grpo."})
    rehearsal_coef: float = field(default=1.0, metadata={"help": "Weight of the SFT loss on the kept dreams' text."})
    num_dreams_to_print: int = field(default=6, metadata={"help": "Rows of the dream table per log (0: none)."})

    def __post_init__(self):
        if self.num_dreams is not None:
            if self.num_dreams < 2:
                raise ValueError(
                    f"num_dreams must be at least 2 (dreams are compared per context), got {self.num_dreams}."
                )
            self.num_generations = self.num_dreams
        self._check_dreaming_fields()
        super().__post_init__()

    def _check_dreaming_fields(self) -> None:
        def choice(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported: use one of {tuple(allowed)}.")

        resolve_template(self.dream_template)
        choice("dream_split", self.dream_split, DREAM_SPLITS)
        choice("tau", self.tau, tuple(TAUS))
        choice("tau_metric", self.tau_metric, METRICS)
        choice("importance_score", self.importance_score, IMPORTANCE_SCORES)
        choice("importance_target", self.importance_target, IMPORTANCE_TARGETS)
        choice("reward_type", self.reward_type, REWARD_TYPES)
        choice("policy_update", self.policy_update, POLICY_UPDATES)
        m = self.num_generations
        if self.num_selected_dreams is not None:
            if self.num_selected_dreams < 0:
                raise ValueError(f"num_selected_dreams must be >= 0, got {self.num_selected_dreams}.")
            if self.num_selected_dreams + self.num_random_dreams > m:
                raise ValueError(
                    f"num_selected_dreams + num_random_dreams = {self.num_selected_dreams + self.num_random_dreams} "
                    f"exceeds the {m} dreams per context (num_generations / num_dreams). Lower k or b, or raise m."
                )
            if self.num_selected_dreams + self.num_random_dreams == 0:
                raise ValueError("num_selected_dreams + num_random_dreams is 0: no dream would ever be rewarded.")
        elif self.num_random_dreams:
            raise ValueError(
                "num_random_dreams is set but num_selected_dreams is None (keep all dreams): set num_selected_dreams "
                "to k to select k by importance plus b at random."
            )
        if self.num_random_dreams < 0:
            raise ValueError(f"num_random_dreams must be >= 0, got {self.num_random_dreams}.")
        for name in ("inner_steps", "inner_lora_r", "inner_batch_size", "max_dream_tokens", "tau_batch_size"):
            if getattr(self, name) < (0 if name == "inner_steps" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.inner_learning_rate < 0:
            raise ValueError(f"inner_learning_rate must be >= 0, got {self.inner_learning_rate}.")
        if self.rehearsal_coef < 0:
            raise ValueError(f"rehearsal_coef must be >= 0, got {self.rehearsal_coef}.")
        if not self.importance_parameters:
            raise ValueError(
                "importance_parameters is empty: give regular expressions over parameter names or 'auto'."
            )
        if self.random_expert_sampling and self.use_vllm:
            raise ValueError(
                "random_expert_sampling=True acts on the model's torch modules, but use_vllm=True samples from vLLM's "
                "own copy of the weights. Set use_vllm=False to dream with random experts."
            )


    def inner_loop(self) -> InnerLoopConfig:
        """The isolated inner loop these fields describe (`inner_*`, `max_dream_tokens`, the reward rule, `seed`)."""
        targets = self.inner_lora_target_modules
        return InnerLoopConfig(
            r=self.inner_lora_r, lora_alpha=self.inner_lora_alpha, lora_dropout=self.inner_lora_dropout,
            target_modules=tuple(targets) if isinstance(targets, list) else targets, steps=self.inner_steps,
            learning_rate=self.inner_learning_rate, batch_size=self.inner_batch_size,
            weight_decay=self.inner_weight_decay, max_length=self.max_dream_tokens, reward_type=self.reward_type,
            threshold=self.improvement_threshold, seed=self.seed,
        )


@dataclass
class DreamScriptArguments:
    """What a dreaming script needs besides `DreamConfig` (model and data), for `TrlParser` recipes.

    Args:
        model_name_or_path: a local checkpoint, `smollm2-135m-instruct` (the packaged offline default) or `tiny` (a
            tiny locally built model, for tests and smoke runs).
        tiny: shortcut for `model_name_or_path=tiny` (`--tiny` on the command line).
        dataset_path: a JSON/JSONL file of tasks (`context` plus tau's columns); `None` = the embedded demo passages.
        num_tasks: how many tasks of the dataset to dream on (`None` = all).
        save_model: save the dreamed model (and tokenizer) into `output_dir` at the end.
    """

    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Local checkpoint, 'smollm2-135m-instruct' (packaged offline) or 'tiny'."},
    )
    tiny: bool = field(default=False, metadata={"help": "Use a tiny locally built model (smoke runs)."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "JSON/JSONL tasks file; None = the embedded demo passages."}
    )
    num_tasks: int | None = field(default=None, metadata={"help": "Number of tasks to dream on (None: all)."})
    save_model: bool = field(default=True, metadata={"help": "Save the dreamed model into output_dir."})
