"""Configuration of the Sleep cycle (the `sleep` job): the cycle's own fields, and one section per phase trainer.

A recipe sets the cycle's fields at the top level and each phase trainer's fields in its own section, by their own
names (every field of TRL's `SFTConfig`, of `GeneralizedDistillationConfig` and of `DreamConfig`):

    job: sleep
    num_sessions: 3
    wake_args:            {learning_rate: 1.0e-2, num_train_epochs: 8}
    consolidation_args:   {max_steps: 40, lmbda: 0.5, alpha: 0.5}
    dream_args:           {num_dreams: 4, num_selected_dreams: 2}

On the command line a section's field is `--consolidation_args.lmbda 0.5`. Each section starts from the cycle's
defaults (`WAKE_DEFAULTS`, `CONSOLIDATION_DEFAULTS`, `DREAM_DEFAULTS`) and is validated by building the trainer's
own config once, when the `SleepConfig` is made, so a bad value stops the run before anything loads.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from trl import SFTConfig

from ..errors import SleepTrlError
from ..rewards.qa import check_metric
from ..trainers.dream_config import DreamConfig
from ..trainers.generalized_distillation_config import GeneralizedDistillationConfig
from .consolidation import CONSOLIDATION_DEFAULTS, CONSOLIDATION_FIXED, PHASE_DEFAULTS

WAKE_MODES = ("fast", "context")
METHODS = ("sleep", "sequential", "replay", "expert_per_session", "dream_only")
REPLAY_SOURCES = ("model", "stored")

# Wake: fresh low-rank experts (B starts at zero) need a larger rate than full fine-tuning; measured on SmolLM2-135M:
# 2e-3 left session 0 at 0.00 after 45 steps, 1e-2 reached 0.75 after 60 (8 epochs of 60 texts at batch 8).
WAKE_DEFAULTS = {
    **PHASE_DEFAULTS,
    # Batches of similar lengths (the cycle lays the epochs out itself, see `sleep.data.length_grouped_order`).
    "train_sampling_strategy": "group_by_length",
    "num_train_epochs": 8.0,
    "learning_rate": 1e-2,
    "per_device_train_batch_size": 8,
    "max_length": 256,
    "dataset_text_field": "text",
}

# Dreaming: 2 rounds of 4 dreams, 2 kept by gradient alignment; a dream budget is a few steps, so no warmup.
DREAM_DEFAULTS = {
    **PHASE_DEFAULTS,
    "warmup_steps": 0,
    "max_steps": 2,
    "num_dreams": 4,
    "num_selected_dreams": 2,
    "num_random_dreams": 0,
    "learning_rate": 1e-3,
    "policy_update": "rest_em",
    "max_completion_length": 96,
    "inner_steps": 8,
    "num_dreams_to_print": 2,
}

# Fields the cycle sets per phase (a section that names one is refused, with the reason).
_CYCLE_SET = ("output_dir", "seed", "run_name", "push_to_hub", "hub_model_id")
_FIXED = {
    "wake_args": _CYCLE_SET,
    "consolidation_args": (*_CYCLE_SET, *CONSOLIDATION_FIXED),
    "dream_args": (
        *_CYCLE_SET, "tau", "tau_metric", "tau_prompt_template", "tau_use_chat_template", "tau_max_new_tokens",
        "tau_batch_size", "tau_stop_at_newline", "random_expert_sampling", "dream_system_prompt",
    ),
}
_WHY_FIXED = {
    "output_dir": "each phase writes under the cycle's `output_dir`",
    "seed": "each phase is seeded from the cycle's `seed`",
    "trainable_parameters": "only the expert a sleep unlocks learns",
    "teacher_view": "the teacher is the memory's teacher view",
    "teacher_model_name_or_path": "the teacher is the memory's teacher view",
    "teachers": "the teacher is the memory's teacher view",
    "random_expert_sampling": "it follows `slow_gate` (routed slow levels dream with random experts)",
    "dream_system_prompt": "every conversation of the run uses the cycle's `system_prompt`",
    "run_name": "each phase's run name is `{run_name}-s{k}-{phase}`, from the sleep config's `run_name`",
    "push_to_hub": "the sleep job pushes the final model: set the sleep config's `push_to_hub`",
    "hub_model_id": "the sleep job pushes the final model: set the sleep config's `hub_model_id`",
}
# Section fields that do not change what a run computes (left out of the resume fingerprint). `student_shared_prefix`
# changes what the student's forward reads, not its values (float rounding; the cycle test compares every weight).
_NOT_RESULTS = {"report_to", "logging_steps", "logging_first_step", "disable_tqdm", "num_dreams_to_print", "run_name",
                "logging_dir", "log_level", "logging_strategy", "log_completions", "student_shared_prefix"}


def without_overridden_epochs(flat: dict) -> dict:
    """A flattened fingerprint without `S.num_train_epochs` where `S.max_steps > 0` overrides it (the trainer then
    ignores the epochs): a run's identity does not hang on a field that changes nothing, so a run made with one
    recipe resumes with another that reaches the same steps (`--consolidation_args.max_steps 40` on the main job)."""
    def overridden(key: str) -> bool:
        section, _, name = key.rpartition(".")
        return name == "num_train_epochs" and (flat.get(f"{section}.max_steps") or 0) > 0

    return {k: v for k, v in flat.items() if not overridden(k)}


def parse_layers(spec) -> list[int]:
    """`"0,2,4"` or `"10-29"` (inclusive ranges, mixable: `"0,10-12"`) as a sorted list of layer indices."""
    layers: set[int] = set()
    for part in str(spec).split(","):
        first, dash, last = part.strip().partition("-")
        if dash and first:
            lo, hi = int(first), int(last)
            if hi < lo:
                raise ValueError(f"empty layer range {part!r}")
            layers.update(range(lo, hi + 1))
        else:
            layers.add(int(part))
    return sorted(layers)


# Fields of the sleep config itself that do not change what a run computes.
_NOT_IDENTITY = ("output_dir", "torch_threads", "frozen_trunk", "shared_prefix", "eval_awake", "report_to",
                 "run_name", "push_to_hub", "hub_model_id", "hub_private_repo")


class SectionError(SleepTrlError):
    """A phase section of the sleep config names an unknown field, a field the cycle sets, or a bad value."""


def _known_fields(cls) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


def closest(name: str, candidates, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.6)


def _as_section(value, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):  # from the command line as JSON, like TRL's `*_kwargs` fields
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise SectionError(f"`{name}` must be a mapping of field: value (or its JSON), got {value!r}: {err}.")
    if not isinstance(value, Mapping):
        raise SectionError(f"`{name}` must be a mapping of field: value, got {type(value).__name__}.")
    return {key: _number(v) for key, v in value.items()}


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number(value):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a section value that is a number in text is read as one."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value) if any(c in value for c in ".eE") else int(value)
    return value


@dataclass
class SleepConfig:
    r"""
    Everything the Sleep cycle needs. The cycle, per session k of a stream of new knowledge (paper notes §1-§4):

    1. **Wake**: the model learns session k in its fast memory (`wake: fast`: the fast level of a continuum memory,
       trained with TRL's `SFTTrainer`, settings in `wake_args`), or only holds it in context (`wake: context`).
    2. **Sleep** (`sleep: true`), at the fast level's boundary, which is the end of the session
       (`sleep_trl.sleep.consolidation.consolidate`, settings in `consolidation_args`): one new slow expert is
       unlocked and `GeneralizedDistillationTrainer` distils the awake model (the memory's teacher view) into it, on
       prompts of session k plus replayed prompts of earlier sessions; then the fast level is reset. With
       `dream: true`, `DreamTrainer` then trains the same new expert on session k's contexts (`dream_args`).
    3. **Evaluate** every session so far (and the future ones, for the zero-shot upper triangle): the accuracy
       matrix R[k][j], by closed-book QA (`eval_*`); dreaming's tau asks and scores the same way.

    With `sleep: false` the same run is the baseline: plain sequential fine-tuning of the same memory parameters
    (the fast expert and the slow experts the sleeping run would unlock, all trained together) with the same
    optimizer-step budget per session (wake steps + consolidation steps), and no consolidation, reset or replay.

    Parameters:
        > Model and output

        model_name_or_path (`str`, defaults to `"smollm2-135m-instruct"`):
            The model that sleeps: a path, a Hub id, `smollm2-135m-instruct` (packaged, offline) or a tiny local
            spec (`tiny:qwen2:hidden_size=128,...`).
        output_dir (`str`, defaults to `"outputs/sleep"`):
            Where the run keeps its ledger, phase checkpoints, final model, `sleep_report.json`,
            `accuracy_matrix.png` and model card. Re-running the same command resumes; a different configuration
            in an existing directory is refused (nothing there is ever overwritten).
        seed (`int`, defaults to `0`):
            Seeds the world and every phase (phase i of session k uses `seed + 100 * (k + 1) + i`), so a resumed
            run reproduces an uninterrupted one.
        torch_threads (`int` or `None`, defaults to `None`):
            CPU threads for torch. `None`: every core available to a single process (`accelerate launch` exports
            `OMP_NUM_THREADS=1`, which would halve the speed on 2 cores).
        frozen_trunk (`bool`, defaults to `True`):
            Serve the frozen decoder layers below the memory's lowest layer (`memory_layers`) from a cache
            (`sleep_trl.memory.FrozenTrunk`): in a wake each epoch after the first skips them; in a sleep the student
            reads the teacher's samples with the states recorded while they were generated. Exact (same loss and
            gradients to float rounding), so not part of the run's identity; a no-op when the memory starts at layer
            0, and off under DeepSpeed or FSDP. `false` only to measure what it saves.
        shared_prefix (`bool`, defaults to `True`):
            A wake batch whose rows start alike (the chat template's header and system prompt) runs that prefix
            once (`sleep_trl.trainers.SharedPrefixSFTTrainer`): exact (same loss and gradients to float rounding), so
            not part of the run's identity; one process without DeepSpeed/FSDP only, and off where the frozen trunk
            serves the wake. `false` only to measure what it saves.

        > Data: the stream of new knowledge (`sleep_trl.data.sessions`)

        dataset_name (`str` or `None`, defaults to `None`):
            Where the sessions come from: `None` (or `"world"`) the embedded fictional world; a SQuAD-format JSON file
            (recognised by its structure: one session per article, `passages_per_session` paragraphs each, their
            questions held out for evaluation); or any table TRL users pass as `dataset_name` (jsonl, json,
            parquet, csv, a `save_to_disk` folder, a Hub id) with a `session` column (schema in the README).
        dataset_config (`str` or `None`), dataset_train_split (`str`, defaults to `"train"`):
            Hub dataset configuration and split, as in TRL's `ScriptArguments`.
        num_sessions (`int` or `None`, defaults to `None`):
            Sessions of the world or of a SQuAD file (`None`: 3); a table brings its own (when set, it must match).
        facts_per_session (`int`, defaults to `24`), doc_variants (`int`, defaults to `2`):
            Shape of the embedded fictional world (`sleep_trl.data.make_world`, seeded by `seed`).
        passages_per_session (`int`, defaults to `4`), squad_train_questions (`int`, defaults to `0`):
            SQuAD streams: paragraphs per session, and how many of each paragraph's questions are training pairs
            (the rest are held out; `0`: documents only).

        > Memory (continuum memory attached to the model)

        memory_layers (`str`, defaults to `"all"`):
            Decoder layers that get a memory: `"all"`, or comma-separated indices and inclusive ranges (`"0,2,4"`,
            `"10-29"`). Layers below the lowest one are frozen and memory-free, so `frozen_trunk` skips them.
        fast_rank (`int`, defaults to `16`), slow_rank (`int`, defaults to `16`):
            Rank of the fast expert (wake memory) and of each slow expert (one is unlocked per sleep).
        slow_slots (`int` or `None`, defaults to `None`):
            Pre-allocated slow experts; `None`: one per session.
        slow_gate (`str`, defaults to `"sigmoid"`):
            Gate of the slow level: `"sigmoid"` (a per-token router that learns with each new expert, so an expert
            can stay quiet on tokens of other sessions; random-expert sampling during dreams acts on it) or
            `"fixed"` (every unlocked expert always on; merges exactly into a dense checkpoint and serves from
            vLLM). Measured on SmolLM2-135M, two sessions: sigmoid kept session 0 at 0.33 and learnt session 1 to
            0.83, fixed kept 0.33 and learnt 0.46.

        > The cycle

        method (`str`, defaults to `"sleep"`):
            What the run does with each session, every arm with the same optimizer steps per session (wake steps +
            consolidation steps: `consolidation_args.max_steps`, or with `max_steps: -1` the steps the sleep's
            epochs over its prompts take, `consolidation_steps`) and the same trainable parameters per session (two
            experts' worth):
            `"sleep"`: wake in the fast expert, consolidate into a new slow expert, prune (and dream); `"sequential"`:
            plain sequential fine-tuning of one fast and one slow expert, never reset; `"replay"`: the same, also
            rehearsing `replay_prompts` questions of every earlier session answered by the model itself before
            the session (pseudo-rehearsal; `replay_source: stored` uses the stored answers, an upper bound that keeps
            data); `"expert_per_session"`: one fresh expert (rank `fast_rank + slow_rank`) per session, earlier ones
            frozen, no distillation; `"dream_only"`: the same fresh expert learns the session plus dreams the model
            writes from its documents (`dream_args`: `dream_template`, `num_dreams`), no consolidation.
        sleep (`bool`, defaults to `True`):
            `False` is `method: sequential` (kept from earlier releases).
        replay_source (`str`, defaults to `"model"`):
            Answers of the `replay` arm's rehearsal: `"model"` (the model before the session, greedy) or `"stored"`.
        document_prompts (`int` or `None`, defaults to `None`):
            Sleep prompts per document: the document cut at that many sentence starts, the teacher continues it, so
            what a document said is consolidated even where no question asks about it. `None`: 4 for sessions with
            no training questions and no probes (documents-only data), else 0.
        system_prompt (`str` or `None`, defaults to `""`):
            The system turn of every conversation of the run (wake texts, sleep prompts, evaluation questions,
            dream prompts), for models with a chat template. `""`: an empty system turn. Some templates add a default
            system prompt when none is given (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by
            Hugging Face", 16 of the 45 tokens of a training pair): the wake would learn it (answers drift to
            "Hugging Face") and every step would pay for it. `None` keeps the template's default.
        wake (`str`, defaults to `"fast"`):
            `"fast"`: learn each session in the fast expert with `SFTTrainer`; `"context"`: no weight change while
            awake, the session's documents are the teacher's context during consolidation.
        warm_start (`bool`, defaults to `False`):
            Each sleep's new slow expert starts as a copy of the fast expert (constant gate 0.99 on a routed
            level), so the student starts where the awake model is; needs `fast_rank == slow_rank`. Measured on the
            main job (seed 0): the diagonal after sleep rose from 0.74 to 0.94 (`recipes/sleep.yaml` sets it).
        expansion (`bool`, defaults to `True`):
            Each sleep unlocks a new slow expert for what it consolidates. `False` is the ablation "without
            expansion": every sleep after the first trains the first sleep's slow expert again (no new capacity, no
            warm start); its teacher, the model before the sleep, is computed once before the first step (the
            teacher cache), so it needs `consolidation_args.lmbda: 0` and no `router_loss_weight`.
        replay_prompts (`int`, defaults to `16`):
            Prompts of each earlier session mixed into consolidation; their answers are regenerated by the long-term
            memory as it was before this sleep (fast level off, new expert masked), never read from the dataset.
            Measured on the main job with warm start (seed 0): 48 (twice the 24 facts of a session) took BWT from
            -0.33 to -0.08 (`recipes/sleep.yaml` sets 48).
        new_prompt_share (`float` or `None`, defaults to `None`):
            The least share of a sleep's rows that are the new session's own prompts, in `(0, 1)`: they are repeated
            (whole times, the fewest that reach the share) to get there. `None` keeps one row per prompt, so that the
            new session's share falls as replayed prompts accumulate (with `replay_prompts: 48` and 54 prompts per
            session: 100% in the first sleep, 14% in the eighth). With `max_steps` unset, the sleep's epochs count
            the repeated rows. Measured over 8 sessions of the main job with the router term (README, seed 0): 0.5
            raised the diagonal from 0.65 to 0.88 and the average from 0.43 to 0.58, but BWT fell from -0.26 to
            -0.34 (the replayed sessions get fewer rows).
        dream (`bool`, defaults to `False`):
            Run `DreamTrainer` on the session's contexts after consolidation (costly on a CPU: one LoRA inner loop
            per kept dream). Each step dreams on one of the session's documents (its dreams are the group); tau is
            the session's closed-book QA on its training phrasings (never the evaluation phrasings).

        > Phase trainers (each a mapping of that trainer's own config fields)

        wake_args (`dict`, defaults to `WAKE_DEFAULTS`):
            `SFTConfig` fields of the wake. `num_train_epochs` sets the wake's optimizer steps,
            `ceil(epochs * texts / batch)`, computed per session (unless `max_steps` is given).
        consolidation_args (`dict`, defaults to `CONSOLIDATION_DEFAULTS`):
            `GeneralizedDistillationConfig` fields of each sleep (`max_steps`, `learning_rate`, `lmbda`, `alpha`,
            `beta`, `gamma`, `num_imitation_generations`, `temperature`, `max_completion_length`, ...). The defaults
            favour teacher-written sequences and a forward-KL-like target (`beta: 0`): on a CPU budget the awake
            teacher knows the answers and the student must learn them; raise `lmbda` and lower `alpha` for the full
            objective.
        dream_args (`dict`, defaults to `DREAM_DEFAULTS`):
            `DreamConfig` fields of each dream phase (`max_steps`, `num_dreams`, `num_selected_dreams`,
            `num_random_dreams`, `learning_rate`, `policy_update`, `inner_steps`, ...). `per_device_train_batch_size`
            defaults to `num_dreams` (one context per round).

        Fields the cycle sets itself are refused in a section, with the reason: `output_dir` and `seed` (per phase),
        the trainable parameters and the teacher of a sleep, and tau (the cycle's closed-book QA) of a dream.

        > Evaluation

        eval_metric (`str`, defaults to `"contains"`):
            Answer scoring: `"contains"` (the normalised answer occurs in the reply), `"exact_match"`, `"f1"` or
            `"semantic"`.
        eval_max_new_tokens (`int`, defaults to `16`), eval_batch_size (`int`, defaults to `24`).
        eval_future_sessions (`bool`, defaults to `True`):
            Also evaluate sessions not learned yet (zero-shot upper triangle, and forward transfer).
        eval_awake (`bool`, defaults to `False`):
            After each wake, also ask the session's own questions before it sleeps (one session's evaluation more per
            session): the report's `consolidation` block then gives the awake accuracy, the diagonal after the sleep
            and their ratio, what consolidation keeps of what the fast memory knew. Changes no training. Needs
            `method: sleep` and `wake: fast`.

        > Logging and publishing (none of these change what a run computes, nor its resume fingerprint)

        report_to (`str`, `list[str]` or `None`, defaults to `None`):
            Where every phase's trainer reports its logs (`"tensorboard"`, `"trackio"`, `"wandb"`, ... as in
            `TrainingArguments`); `None`: nowhere (`"none"`). A section's own `report_to` wins for that phase.
        run_name (`str` or `None`, defaults to `None`):
            Prefix of the per-phase run names (`{run_name}-s{k}-{phase}`, e.g. `my-run-s1-consolidate`); `None`:
            the name of `output_dir`.
        push_to_hub (`bool`, defaults to `False`):
            Upload the final model folder (host weights, `memory.safetensors`, tokenizer, model card, report and
            accuracy-matrix plot) to the Hub when the run finishes. Checked before anything runs: the Hub must be
            reachable (`HF_HUB_OFFLINE` unset) and a token known (`HF_TOKEN` or `hf auth login`). A finished run
            re-run with `push_to_hub: true` uploads without training again.
        hub_model_id (`str` or `None`, defaults to `None`):
            The repository to push to (`user/name` or `name`, in your namespace); `None`: the name of `output_dir`.
        hub_private_repo (`bool` or `None`, defaults to `None`):
            Create the repository private (`None`: the Hub's default for your account).
    """

    # Phase sections and the trainer config each holds the fields of (read by the CLI for `--section.field`).
    sections: ClassVar[dict[str, type]] = {
        "wake_args": SFTConfig,
        "consolidation_args": GeneralizedDistillationConfig,
        "dream_args": DreamConfig,
    }

    model_name_or_path: str = field(default="smollm2-135m-instruct", metadata={"help": "The model that sleeps."})
    output_dir: str = field(default="outputs/sleep", metadata={"help": "Run directory (resumable, never overwritten)."})
    seed: int = field(default=0, metadata={"help": "Seed of the world and of every phase."})
    torch_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch."})
    frozen_trunk: bool = field(
        default=True, metadata={"help": "Serve the frozen layers below the memory from a cache (exact)."}
    )
    shared_prefix: bool = field(
        default=True, metadata={"help": "Run the prefix a wake batch's rows share once (exact)."}
    )
    # data
    dataset_name: str | None = field(
        default=None, metadata={"help": "None/'world', a SQuAD JSON file, or a table with a `session` column."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a table dataset."})
    num_sessions: int | None = field(default=None, metadata={"help": "Sessions (None: 3, or all of a table)."})
    facts_per_session: int = field(default=24, metadata={"help": "Facts per session of the world."})
    doc_variants: int = field(default=2, metadata={"help": "Document rewrites per entity of the world."})
    passages_per_session: int = field(default=4, metadata={"help": "SQuAD paragraphs per session."})
    squad_train_questions: int = field(default=0, metadata={"help": "SQuAD questions per paragraph trained on."})
    # memory
    memory_layers: str = field(default="all", metadata={"help": "'all', or layer indices and ranges ('10-29')."})
    fast_rank: int = field(default=16, metadata={"help": "Rank of the fast expert."})
    slow_rank: int = field(default=16, metadata={"help": "Rank of each slow expert."})
    slow_slots: int | None = field(default=None, metadata={"help": "Slow experts pre-allocated (None: sessions)."})
    slow_gate: str = field(default="sigmoid", metadata={"help": "'fixed' or 'sigmoid' gate of the slow level."})
    # the cycle
    method: str = field(default="sleep", metadata={"help": "sleep, sequential, replay, expert_per_session, dream_only."})
    replay_source: str = field(default="model", metadata={"help": "Replay arm's answers: 'model' or 'stored'."})
    document_prompts: int | None = field(
        default=None, metadata={"help": "Sleep prompts per document (None: 4 for documents-only sessions, else 0)."}
    )
    system_prompt: str | None = field(
        default="", metadata={"help": "System turn of every conversation ('' empty; None: the template's default)."}
    )
    wake: str = field(default="fast", metadata={"help": "'fast' (fast expert, SFT) or 'context' (in context)."})
    sleep: bool = field(default=True, metadata={"help": "False: method 'sequential' (kept from earlier releases)."})
    warm_start: bool = field(default=False, metadata={"help": "New slow expert starts as a copy of the fast one."})
    expansion: bool = field(
        default=True, metadata={"help": "False: every sleep trains the first sleep's slow expert again (ablation)."}
    )
    replay_prompts: int = field(default=16, metadata={"help": "Prompts replayed from each earlier session."})
    new_prompt_share: float | None = field(
        default=None, metadata={"help": "Least share of a sleep's rows from the new session (its rows repeated)."}
    )
    dream: bool = field(default=False, metadata={"help": "Run DreamTrainer after consolidation."})
    # phase trainers
    wake_args: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "SFTConfig fields of the wake (YAML mapping, or --wake_args.FIELD VALUE)."}
    )
    consolidation_args: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "GeneralizedDistillationConfig fields of each sleep (--consolidation_args.FIELD VALUE)."},
    )
    dream_args: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "DreamConfig fields of each dream phase (--dream_args.FIELD VALUE)."}
    )
    # evaluation
    eval_metric: str = field(default="contains", metadata={"help": "'contains', 'exact_match', 'f1' or 'semantic'."})
    eval_max_new_tokens: int = field(default=16, metadata={"help": "Tokens per evaluation answer."})
    eval_batch_size: int = field(default=24, metadata={"help": "Evaluation batch size."})
    eval_future_sessions: bool = field(default=True, metadata={"help": "Evaluate future sessions (zero-shot)."})
    eval_awake: bool = field(
        default=False, metadata={"help": "Also ask each session's questions after its wake, before it sleeps."}
    )
    # logging and publishing
    report_to: list[str] | None = field(default=None, metadata={"help": "Integrations every phase reports to."})
    run_name: str | None = field(default=None, metadata={"help": "Prefix of the per-phase run names."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository (None: output_dir's name)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repository private."})

    def __post_init__(self):
        self.wake_args = _as_section(self.wake_args, "wake_args")
        self.consolidation_args = _as_section(self.consolidation_args, "consolidation_args")
        self.dream_args = _as_section(self.dream_args, "dream_args")
        self._check_own_fields()
        for section in self.sections:
            self._check_section(section)

    def _check_own_fields(self) -> None:
        if self.method not in METHODS:
            close = closest(str(self.method), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}{hint}.")
        if not self.sleep:
            if self.method not in ("sleep", "sequential"):
                raise ValueError(f"`sleep: false` means `method: sequential`; it contradicts `method: {self.method}`.")
            self.method, self.sleep = "sequential", True
        if self.replay_source not in REPLAY_SOURCES:
            raise ValueError(f"`replay_source` must be one of {REPLAY_SOURCES}, got {self.replay_source!r}.")
        if self.wake not in WAKE_MODES:
            raise ValueError(f"`wake` must be one of {WAKE_MODES}, got {self.wake!r}.")
        if self.wake == "context" and self.method != "sleep":
            raise ValueError("`wake: context` learns nothing without sleep: it needs `method: sleep`.")
        if self.slow_gate not in ("fixed", "sigmoid"):
            raise ValueError(f"`slow_gate` must be 'fixed' or 'sigmoid', got {self.slow_gate!r}.")
        self._check_sleep_variants()
        check_metric(self.eval_metric, "eval_metric")
        optional = {"num_sessions": self.num_sessions, "slow_slots": self.slow_slots}
        for name in ("facts_per_session", "doc_variants", "fast_rank", "slow_rank", "eval_max_new_tokens",
                     "eval_batch_size", "passages_per_session", *[k for k, v in optional.items() if v is not None]):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        for name in ("replay_prompts", "squad_train_questions", *(["document_prompts"] if self.document_prompts
                                                                    is not None else [])):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if self.slow_slots is not None and self.num_sessions is not None and self.slow_slots < self.num_sessions:
            raise ValueError(
                f"`slow_slots` ({self.slow_slots}) is smaller than `num_sessions` ({self.num_sessions}): every sleep "
                "unlocks one slow expert. Raise `slow_slots` or leave it unset."
            )
        if self.warm_start and self.fast_rank != self.slow_rank:
            raise ValueError(
                f"`warm_start` copies the fast expert into the new slow one: `fast_rank` ({self.fast_rank}) and "
                f"`slow_rank` ({self.slow_rank}) must be equal."
            )
        if self.hub_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as err:
                raise ValueError(f"`hub_model_id` is not a Hub repository name ('user/name' or 'name'): {err}") from None
        if self.eval_awake and (self.method != "sleep" or self.wake != "fast"):
            raise ValueError("`eval_awake: true` asks each session after its wake, before it sleeps: it needs "
                             "`method: sleep` and `wake: fast` (the other arms are evaluated right after their wake).")
        if self.memory_layers != "all":
            try:
                parse_layers(self.memory_layers)
            except ValueError:
                raise ValueError(
                    f"`memory_layers` must be 'all' or comma-separated layer indices and ranges ('10-29', '0,2,4'), "
                    f"got {self.memory_layers!r}."
                ) from None

    def _check_sleep_variants(self) -> None:
        """What each variant of the sleep (no expansion, router loss, dreaming, the new session's share) needs."""
        if not self.expansion:
            given = {**CONSOLIDATION_DEFAULTS, **self.consolidation_args}
            if self.method != "sleep" or self.wake != "fast":
                raise ValueError("`expansion: false` is an ablation of sleep: it needs `method: sleep` and `wake: fast`.")
            for name in ("lmbda", "router_loss_weight"):
                if float(given.get(name, 0.0) or 0.0) != 0.0:
                    raise ValueError(
                        f"`expansion: false` needs `consolidation_args.{name}: 0.0` (got {given[name]}): without a new "
                        "expert the model before the sleep is no view of the student, only a teacher cache filled "
                        "before the first step."
                    )
        if self.slow_gate != "sigmoid" and float(self.consolidation_args.get("router_loss_weight", 0.0) or 0.0) > 0:
            raise ValueError(
                "`consolidation_args.router_loss_weight` trains the new slow expert's router, but `slow_gate` is "
                f"{self.slow_gate!r}: set `slow_gate: sigmoid` or `consolidation_args.router_loss_weight: 0.0`."
            )
        if self.dream and self.method != "sleep":
            raise ValueError("`dream: true` needs `method: sleep` (dreams train the expert a sleep unlocks).")
        share = self.new_prompt_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1):
            raise ValueError(
                f"`new_prompt_share` must be a number strictly between 0 and 1 (the least share of a sleep's rows that "
                f"are the new session's), or unset; got {share!r}."
            )
        if share is not None and self.method != "sleep":
            raise ValueError(
                f"`new_prompt_share` sets the new session's share of a sleep's rows; `method: {self.method}` does not "
                "sleep. Use `method: sleep` or leave `new_prompt_share` unset."
            )

    def _check_section(self, section: str) -> None:
        """Unknown or cycle-set keys are refused by name; values are validated by the trainer's own config."""
        given = getattr(self, section)
        known = _known_fields(self.sections[section])
        for key in given:
            if key not in known:
                close = closest(key, known)
                hint = f" (did you mean {', '.join(f'{section}.{c}' for c in close)}?)" if close else ""
                raise SectionError(
                    f"`{section}.{key}` is not a field of {self.sections[section].__name__}{hint}."
                )
            if key in _FIXED[section]:
                why = _WHY_FIXED.get(key, "dreaming's tau is the cycle's closed-book QA (set the `eval_*` fields)")
                raise SectionError(f"`{section}.{key}` is set by the cycle ({why}): remove it from the section.")
        try:
            self.phase_config(section, output_dir=f"{self.output_dir}/trainer/check", seed=self.seed)
        except (ValueError, TypeError) as err:
            raise SectionError(f"`{section}`: {err}") from err

    # ---- the phase configs ----------------------------------------------------------------------------------------
    def phase_fields(self, section: str) -> dict:
        """The section's fields: the cycle's defaults, overridden by the recipe's."""
        defaults = {"wake_args": WAKE_DEFAULTS, "consolidation_args": CONSOLIDATION_DEFAULTS,
                    "dream_args": DREAM_DEFAULTS}[section]
        given = getattr(self, section)
        merged = {**defaults, **given}
        if "report_to" not in given:
            merged["report_to"] = "none" if self.report_to is None else self.report_to
        if section == "dream_args":
            merged.setdefault("per_device_train_batch_size", merged["num_dreams"])  # one context per round
        return merged

    def phase_config(self, section: str, **fixed):
        """The trainer config of one phase (`fixed`: output_dir, seed, ... set by the cycle for this phase)."""
        merged = {"use_cpu": not torch.cuda.is_available(), **self.phase_fields(section), **fixed}
        if section == "consolidation_args":
            merged.update(teacher_view="memory", trainable_parameters=None)
        return self.sections[section](**merged)

    def wake_steps(self, num_texts: int, num_processes: int = 1) -> int:
        """Optimizer steps of a wake over `num_texts` training texts (`max_steps`, or from `num_train_epochs`, the
        batch being `per_device_train_batch_size x gradient_accumulation_steps x num_processes`)."""
        wake = self._step_fields("wake_args")
        if wake["max_steps"] > 0:
            return int(wake["max_steps"])
        per_step = wake["per_device_train_batch_size"] * wake["gradient_accumulation_steps"] * num_processes
        return max(1, math.ceil(wake["num_train_epochs"] * num_texts / per_step))

    def consolidation_steps(self, num_prompts: int, num_processes: int = 1) -> int:
        """Optimizer steps of a sleep over `num_prompts` consolidation rows: `consolidation_args.max_steps`, or, with
        `max_steps: -1`, what the trainer runs for `num_train_epochs`: TRL's sampler serves whole batches of
        `per_device_train_batch_size x gradient_accumulation_steps x num_processes` rows, one per step, and drops
        the partial one (a set smaller than one batch is repeated to fill it, `fill_one_batch`). The arms that never
        sleep get this budget too."""
        sleep = self._step_fields("consolidation_args")
        if sleep["max_steps"] > 0:
            return int(sleep["max_steps"])
        rows = sleep["per_device_train_batch_size"] * sleep["gradient_accumulation_steps"] * num_processes
        return max(1, math.ceil(sleep["num_train_epochs"] * max(1, num_prompts // rows)))

    def _step_fields(self, section: str) -> dict:
        """The fields that set a phase's optimizer steps: the recipe's, else the phase config's own defaults."""
        names = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")
        defaults = {f.name: f.default for f in fields(self.sections[section]) if f.name in names}
        return {**defaults, **{k: v for k, v in self.phase_fields(section).items() if k in names}}

    # ---- identity of a run ----------------------------------------------------------------------------------------
    @property
    def layers(self):
        return "all" if self.memory_layers == "all" else parse_layers(self.memory_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    def _flat(self, resolved: bool) -> dict:
        data = self.to_dict()
        for section in self.sections:
            values = self.phase_fields(section) if resolved else data[section]
            del data[section]
            data.update({f"{section}.{k}": v for k, v in values.items() if k not in _NOT_RESULTS})
        return data

    @classmethod
    def defaults(cls) -> dict:
        """Every field's default value, sections flattened (`consolidation_args.max_steps`, ...)."""
        own = {f.name: f.default for f in fields(cls) if f.default is not MISSING and f.name not in cls.sections}
        return {**own, **cls()._flat(resolved=True)}

    def fingerprint(self) -> dict:
        """Fields that change the results, sections resolved and flattened: a resumed run must have the same
        (output_dir, torch_threads, logging and publishing fields excluded)."""
        data = self._flat(resolved=True)
        for name in _NOT_IDENTITY:
            data.pop(name)
        return without_overridden_epochs(data)
