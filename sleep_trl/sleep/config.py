"""Configuration of the Sleep cycle (the `sleep` job): wake, consolidate, dream, evaluate, session after session."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

WAKE_MODES = ("fast", "context")


@dataclass
class SleepConfig:
    r"""
    Everything the Sleep cycle needs, flat so a YAML recipe (parsed by TRL's `TrlParser`) sets it in one place.

    The cycle, per session k of a stream of new knowledge (paper notes §1-§4):

    1. **Wake**: the model learns session k in its fast memory (`wake: fast`: the fast level of a continuum memory,
       trained with TRL's `SFTTrainer`), or only holds it in context (`wake: context`).
    2. **Sleep** (`sleep: true`), at the fast level's boundary, which is the end of the session:
       a. Knowledge Seeding: one new slow expert is unlocked; the teacher is the awake model (fast memory on, new
          expert masked: the continuum memory's teacher view, no second copy of the weights), the student the same
          weights with the fast memory suspended and the new expert on. `GeneralizedDistillationTrainer` trains only
          the new expert, on prompts of session k plus replayed prompts of earlier sessions (the teacher, i.e. the
          model itself, regenerates their answers).
       b. Apply: keep the new expert, reset the fast level (synaptic pruning).
       c. Dreaming (`dream: true`): `DreamTrainer` on session k's contexts, training the same new expert.
    3. **Evaluate** every session so far (and the future ones, for the zero-shot upper triangle): the accuracy
       matrix R[k][j].

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
            Seeds the world and every phase (phase i of session k uses `seed + 100 * k + i`), so a resumed run
            reproduces an uninterrupted one.
        torch_threads (`int` or `None`, defaults to `None`):
            CPU threads for torch. `None`: every core available to a single process (`accelerate launch` exports
            `OMP_NUM_THREADS=1`, which would halve the speed on 2 cores).

        > Data: the embedded world of new knowledge

        num_sessions (`int`, defaults to `3`), facts_per_session (`int`, defaults to `24`),
        doc_variants (`int`, defaults to `2`):
            Shape of the embedded fictional world (`sleep_trl.data.make_world`, seeded by `seed`).

        > Memory (continuum memory attached to the model)

        memory_layers (`str`, defaults to `"all"`):
            Decoder layers that get a memory: `"all"` or comma-separated indices (`"0,2,4"`).
        fast_rank (`int`, defaults to `16`):
            Rank of the fast expert (wake memory).
        slow_rank (`int`, defaults to `16`):
            Rank of each slow expert (one is unlocked per sleep).
        slow_slots (`int` or `None`, defaults to `None`):
            Pre-allocated slow experts; `None`: one per session.
        slow_gate (`str`, defaults to `"sigmoid"`):
            Gate of the slow level: `"sigmoid"` (a per-token router that learns with each new expert, so an expert
            can stay quiet on tokens of other sessions; random-expert sampling during dreams acts on it) or
            `"fixed"` (every unlocked expert always on; merges exactly into a dense checkpoint and serves from
            vLLM). Measured on SmolLM2-135M, two sessions: sigmoid kept session 0 at 0.33 and learnt session 1 to
            0.83, fixed kept 0.33 and learnt 0.46.

        > Wake

        wake (`str`, defaults to `"fast"`):
            `"fast"`: learn each session in the fast expert with `SFTTrainer`; `"context"`: no weight change while
            awake, the session's documents are the teacher's context during consolidation.
        wake_epochs (`float`, defaults to `8.0`):
            Passes over the session's training text (documents + question/answer pairs).
        wake_learning_rate (`float`, defaults to `1e-2`), wake_batch_size (`int`, defaults to `8`):
            Fresh low-rank experts (B starts at zero) need a larger rate than full fine-tuning; measured on
            SmolLM2-135M: 2e-3 left session 0 at 0.00 after 45 steps, 1e-2 reached 0.75 after 60.

        > Sleep: Knowledge Seeding (consolidation)

        sleep (`bool`, defaults to `True`):
            `False` runs the sequential fine-tuning baseline (see above).
        sleep_steps (`int`, defaults to `40`):
            Consolidation optimizer steps per session (measured on SmolLM2-135M: 24 steps carried 0.29 of the
            awake 0.75 into the new expert, 40 steps 0.67).
        sleep_learning_rate (`float`, defaults to `1e-2`), sleep_batch_size (`int`, defaults to `8`).
        replay_prompts (`int`, defaults to `16`):
            Prompts of each earlier session mixed into consolidation; their answers are regenerated by the long-term
            memory as it was before this sleep (fast level off, new expert masked), never read from the dataset.
        lmbda (`float`, defaults to `0.0`), alpha (`float`, defaults to `1.0`), beta (`float`, defaults to `0.0`),
        gamma (`float`, defaults to `0.5`), num_imitation_generations (`int`, defaults to `4`),
        temperature (`float`, defaults to `1.0`), max_completion_length (`int`, defaults to `24`):
            The GeneralizedDistillationConfig fields of the same names. The defaults favour teacher-written
            sequences and a forward-KL-like target (`beta: 0`): on a CPU budget the awake teacher knows the answers
            and the student must learn them; raise `lmbda` and lower `alpha` for the full objective.

        > Sleep: Dreaming

        dream (`bool`, defaults to `False`):
            Run `DreamTrainer` on the session's contexts after consolidation (costly on a CPU: one LoRA inner loop
            per kept dream).
        dream_steps (`int`, defaults to `2`):
            DreamTrainer optimizer steps per session; each step dreams on one of the session's documents (the
            `num_dreams` dreams of that document are the group). Tau is the session's no-context QA on its training
            phrasings (never the evaluation phrasings), scored with `eval_metric`.
        num_dreams (`int`, defaults to `4`), dream_keep (`int`, defaults to `2`), dream_random (`int`, defaults to
        `0`):
            m dreams per document; the top-k by gradient alignment with tau's data are kept, plus b at random.
        dream_learning_rate (`float`, defaults to `1e-3`), dream_policy_update (`str`, defaults to `"rest_em"`),
        dream_max_completion_length (`int`, defaults to `96`), dream_inner_steps (`int`, defaults to `8`):
            The DreamConfig fields `learning_rate`, `policy_update`, `max_completion_length`, `inner_steps`. Only the
            slow expert unlocked by this sleep learns; with `slow_gate: sigmoid` dreams are written with one random
            unlocked expert turned on per token (`random_expert_sampling`).

        > Evaluation

        eval_metric (`str`, defaults to `"contains"`):
            Answer scoring: `"contains"` (the normalised answer occurs in the reply), `"exact"` or `"f1"`.
        eval_max_new_tokens (`int`, defaults to `16`), eval_batch_size (`int`, defaults to `24`).
        eval_future_sessions (`bool`, defaults to `True`):
            Also evaluate sessions not learned yet (zero-shot upper triangle, and forward transfer).
    """

    model_name_or_path: str = field(default="smollm2-135m-instruct", metadata={"help": "The model that sleeps."})
    output_dir: str = field(default="outputs/sleep", metadata={"help": "Run directory (resumable, never overwritten)."})
    seed: int = field(default=0, metadata={"help": "Seed of the world and of every phase."})
    torch_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch."})
    # data
    num_sessions: int = field(default=3, metadata={"help": "Sessions in the stream of new knowledge."})
    facts_per_session: int = field(default=24, metadata={"help": "Facts per session."})
    doc_variants: int = field(default=2, metadata={"help": "Document rewrites per entity."})
    # memory
    memory_layers: str = field(default="all", metadata={"help": "'all' or comma-separated layer indices."})
    fast_rank: int = field(default=16, metadata={"help": "Rank of the fast expert."})
    slow_rank: int = field(default=16, metadata={"help": "Rank of each slow expert."})
    slow_slots: int | None = field(default=None, metadata={"help": "Slow experts pre-allocated (None: sessions)."})
    slow_gate: str = field(default="sigmoid", metadata={"help": "'fixed' or 'sigmoid' gate of the slow level."})
    # wake
    wake: str = field(default="fast", metadata={"help": "'fast' (fast expert, SFT) or 'context' (in context)."})
    wake_epochs: float = field(default=8.0, metadata={"help": "Passes over the session's training text."})
    wake_learning_rate: float = field(default=1e-2, metadata={"help": "Wake learning rate."})
    wake_batch_size: int = field(default=8, metadata={"help": "Wake batch size."})
    # sleep: consolidation
    sleep: bool = field(default=True, metadata={"help": "False: sequential fine-tuning baseline."})
    sleep_steps: int = field(default=40, metadata={"help": "Consolidation steps per session."})
    sleep_learning_rate: float = field(default=1e-2, metadata={"help": "Consolidation learning rate."})
    sleep_batch_size: int = field(default=8, metadata={"help": "Consolidation batch size."})
    replay_prompts: int = field(default=16, metadata={"help": "Prompts replayed from each earlier session."})
    lmbda: float = field(default=0.0, metadata={"help": "On-policy fraction of consolidation batches."})
    alpha: float = field(default=1.0, metadata={"help": "Distillation weight against imitation."})
    beta: float = field(default=0.0, metadata={"help": "Generalized JSD interpolation (0 forward KL)."})
    gamma: float = field(default=0.5, metadata={"help": "Semantic share of the imitation reward."})
    num_imitation_generations: int = field(default=4, metadata={"help": "Imitation group size."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling and loss temperature."})
    max_completion_length: int = field(default=24, metadata={"help": "Tokens per consolidation sample."})
    # sleep: dreaming
    dream: bool = field(default=False, metadata={"help": "Run DreamTrainer after consolidation."})
    dream_steps: int = field(default=2, metadata={"help": "DreamTrainer steps per session."})
    num_dreams: int = field(default=4, metadata={"help": "Dreams per context."})
    dream_keep: int = field(default=2, metadata={"help": "Dreams kept by importance (top-k) per context."})
    dream_random: int = field(default=0, metadata={"help": "Dreams kept at random (b) per context."})
    dream_learning_rate: float = field(default=1e-3, metadata={"help": "DreamTrainer learning rate."})
    dream_policy_update: str = field(default="rest_em", metadata={"help": "'rest_em' or 'grpo'."})
    dream_max_completion_length: int = field(default=96, metadata={"help": "Maximum tokens of one dream."})
    dream_inner_steps: int = field(default=8, metadata={"help": "Inner LoRA steps behind each dream's reward."})
    # evaluation
    eval_metric: str = field(default="contains", metadata={"help": "'contains', 'exact' or 'f1'."})
    eval_max_new_tokens: int = field(default=16, metadata={"help": "Tokens per evaluation answer."})
    eval_batch_size: int = field(default=24, metadata={"help": "Evaluation batch size."})
    eval_future_sessions: bool = field(default=True, metadata={"help": "Evaluate future sessions (zero-shot)."})

    def __post_init__(self):
        if self.wake not in WAKE_MODES:
            raise ValueError(f"`wake` must be one of {WAKE_MODES}, got {self.wake!r}.")
        if self.wake == "context" and not self.sleep:
            raise ValueError("`wake: context` learns nothing without sleep; use `wake: fast` for the baseline.")
        if self.slow_gate not in ("fixed", "sigmoid"):
            raise ValueError(f"`slow_gate` must be 'fixed' or 'sigmoid', got {self.slow_gate!r}.")
        if self.eval_metric not in ("contains", "exact", "f1"):
            raise ValueError(f"`eval_metric` must be 'contains', 'exact' or 'f1', got {self.eval_metric!r}.")
        if self.dream_policy_update not in ("rest_em", "grpo"):
            raise ValueError(f"`dream_policy_update` must be 'rest_em' or 'grpo', got {self.dream_policy_update!r}.")
        for name in ("num_sessions", "facts_per_session", "doc_variants", "fast_rank", "slow_rank", "wake_batch_size",
                     "sleep_batch_size", "max_completion_length", "eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("sleep_steps", "replay_prompts", "dream_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.slow_slots is not None and self.slow_slots < self.num_sessions:
            raise ValueError(
                f"`slow_slots` ({self.slow_slots}) is smaller than `num_sessions` ({self.num_sessions}): every sleep "
                "unlocks one slow expert. Raise `slow_slots` or leave it unset."
            )
        if self.dream and self.dream_keep + self.dream_random > self.num_dreams:
            raise ValueError(
                f"`dream_keep` + `dream_random` ({self.dream_keep} + {self.dream_random}) must not exceed `num_dreams` "
                f"({self.num_dreams}): lower them or raise `num_dreams`."
            )
        if self.dream and not self.sleep:
            raise ValueError("`dream: true` needs `sleep: true` (dreams train the expert a sleep unlocks).")
        if self.memory_layers != "all":
            try:
                [int(x) for x in str(self.memory_layers).split(",")]
            except ValueError:
                raise ValueError(
                    f"`memory_layers` must be 'all' or comma-separated layer indices, got {self.memory_layers!r}."
                ) from None

    @property
    def layers(self):
        return "all" if self.memory_layers == "all" else [int(x) for x in str(self.memory_layers).split(",")]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        """Every field's default value (fields with a default factory are left out)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    def fingerprint(self) -> dict:
        """Fields that change the results: a resumed run must have the same (output_dir, torch_threads excluded)."""
        data = self.to_dict()
        data.pop("output_dir")
        data.pop("torch_threads")
        return data
