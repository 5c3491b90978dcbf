"""Configuration of the GeneralizedDistillationTrainer (Knowledge Seeding, paper notes §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DistillationConfig

TEACHER_CACHES = ("auto", "on", "off")
TEACHER_COMBINATIONS = ("logit_mean", "prob_mean")
TEACHER_VIEWS = ("memory", "disable_adapter", "self")
EDIT_DISTANCE_UNITS = ("token", "char")


@dataclass
class GeneralizedDistillationConfig(DistillationConfig):
    r"""
    Configuration class for the [`GeneralizedDistillationTrainer`]: the paper's Knowledge Seeding objective, an upward,
    generalized distillation from one or several (possibly smaller) teachers into a student.

    It extends TRL's [`~trl.DistillationConfig`] (every field of it keeps its meaning: `beta` selects the generalized
    JSD, `temperature` softens both distributions and the sampling, `max_completion_length` bounds every generation,
    `use_vllm` and its `vllm_*` fields drive generation). The objective maximised is (notes §3d)

        J = E_x[ (1 - alpha) E_{y ~ student}[r(y)]  -  alpha * D(teacher || student)(y | x) ]

    where the divergence term follows GKD: with probability `lmbda` a batch's sequences are sampled by the student
    (on-policy), else they are teacher samples (`seq_kd=True`) or the dataset's completions.

    Parameters:
        > Knowledge Seeding objective

        lmbda (`float`, *optional*, defaults to `0.5`):
            Fraction of batches whose distillation sequences are sampled by the student (on-policy). The rest are
            off-policy: teacher samples or dataset completions (see `seq_kd`). The draw is per generation batch and
            identical on every process. The paper leaves the value open; 0.5 mixes both as GKD recommends.
        seq_kd (`bool`, *optional*, defaults to `True`):
            Off-policy batches use sequences sampled by the teacher from the prompts (during sleep there is no external
            data). `False` uses the dataset's `completion` column instead (required then).
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of distillation against imitation. `1.0` is pure on-policy-style distillation and reproduces TRL's
            `DistillationTrainer` loss on the same batch; `0.0` is pure Learning-to-Imitate RL. The loss minimised is
            `alpha * distillation + (1 - alpha) * imitation_policy_loss`.

        > Learning to Imitate (LTI)

        gamma (`float`, *optional*, defaults to `0.5`):
            Mix of the imitation reward: `r = gamma * r_sem + (1 - gamma) * r_abs`.
        max_edit_distance (`int` or `None`, *optional*, defaults to `None`):
            `z0`: `r_abs` is zero when the edit distance exceeds it. `None` never zeroes (the paper leaves z0 open).
        edit_distance_unit (`str`, *optional*, defaults to `"token"`):
            Unit of the edit distance: `"token"` compares token ids (z0 counts tokens, like `max_completion_length`),
            `"char"` compares decoded text.
        num_imitation_generations (`int`, *optional*, defaults to `4`):
            Student completions per teacher-sample prefix: the group over which advantages are normalised (>= 2).
        imitation_min_prefix (`float`, *optional*, defaults to `0.1`):
            Smallest fraction of a teacher sample kept as the prefix the student must continue.
        imitation_max_prefix (`float`, *optional*, defaults to `0.6`):
            Largest such fraction. The cut point is uniform in between, seeded; at least one token is left to imitate.
            The student continues from its own prompt (not a `teacher_prompt`) plus the prefix, with up to as many new
            tokens as the longest remaining target in the batch, and is scored against the remaining part of the
            teacher sample (not the shared prefix, which would inflate both rewards).
        imitation_prefix_sharing (`bool`, *optional*, defaults to `True`):
            Read each teacher prefix once: the student's continuations are sampled from one KV cache of the prefix
            (repeated along the batch), and its loss forward packs the distillation sequence and every continuation
            of a prompt into one row with a 4D attention mask (`prefix_sharing.py`; every token computes what it
            computes in a row of its own). `False` runs every continuation as a row of its own.
        student_shared_prefix (`bool`, *optional*, defaults to `True`):
            When the prompts of a batch start alike (a chat template's header and system prompt), the student's
            distillation forward reads that prefix once: one forward fills a KV cache, repeated along the batch, and
            each row's remaining tokens run after it (`shared_prefix.py`: the same hidden states and gradients to
            float rounding). One process without DeepSpeed/FSDP, no activation checkpointing, no frozen trunk serving
            the student, no router loss; other batches run TRL's plain forward. Activation checkpointing is read off
            the model too (a model another trainer turned it on for, like the `SFTTrainer` a `SleepCallback` serves,
            would drop the prefix's cache in training), and a prefix forward that filled no cache falls back to the
            plain forward.
        epsilon (`float`, *optional*, defaults to `0.2`):
            Clipping range of the policy ratio in the imitation objective (PPO/GRPO style).
        scale_advantages (`bool`, *optional*, defaults to `True`):
            Divide the group-centred rewards by the group's standard deviation (GRPO). `False` only centres them.
        semantic_judge (`str` or `None`, *optional*, defaults to `"all-minilm-l6-v2"`):
            The frozen model behind `r_sem`: a sentence-transformers folder, or `"all-minilm-l6-v2"` (packaged,
            offline). `None` disables `r_sem` (then `gamma` must be 0). A callable passed to the trainer replaces it.
        semantic_threshold (`float`, *optional*, defaults to `0.8`):
            Cosine similarity at or above which the judge says two texts mean the same (`r_sem = 1`).

        > Teachers

        teachers (`list[str]` or `None`, *optional*, defaults to `None`):
            Several teachers S_1..S_k (model ids or paths; e.g. smaller selves) instead of the single
            `teacher_model_name_or_path`. They must share the student's tokenizer; embedding tables padded to different
            sizes are fine (the loss uses the tokenizer's length).
        teacher_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weight of each teacher in the combination and in sampling (normalised; default uniform).
        teacher_combination (`str`, *optional*, defaults to `"logit_mean"`):
            How several teachers make one target distribution. `"logit_mean"`: weighted mean of their logits, i.e. the
            normalised weighted geometric mean (a product of experts: a token must be plausible to every teacher);
            computed by TRL's chunked divergence kernel without materialising vocabulary-sized logits. `"prob_mean"`:
            weighted mixture of their probabilities (a token plausible to any teacher keeps mass); materialises the
            logits of one micro-batch. Off-policy sequences are sampled from one teacher per prompt, drawn with
            `teacher_weights`.
        teacher_view (`str` or `None`, *optional*, defaults to `None`):
            Self-Knowledge Seeding without a second copy of the weights: the teacher is the student itself in a view
            that switches off its newly added parameters. `"memory"`: the continuum memory's `teacher_view()` (the
            model before its newest expansion); `"disable_adapter"`: the PEFT model with its adapter disabled;
            `"self"`: the student exactly as it is, which only makes sense with a `teacher_prompt` column (context
            distillation: the model with the knowledge in context teaches itself without it). A callable returning a
            context manager can be passed to the trainer instead. Used when no teacher model is given; with neither,
            an attached continuum memory is used.
        teacher_prompt_column (`str`, *optional*, defaults to `"teacher_prompt"`):
            When the dataset has this column, the teacher conditions on it (e.g. the prompt with the passage in
            context: the model "learned it in context") while the student sees `prompt`; both are compared on the same
            completion tokens.

        teacher_cache (`str`, *optional*, defaults to `"auto"`):
            Do the frozen teacher's work once per run (`teacher_cache.py`): before the first step, sample the
            teacher on every distinct prompt as often as the run draws it, in large batches (and compute its hidden
            states on the samples, see `teacher_cache_hidden_states`); every off-policy batch and every imitation
            target then takes a cached sample, and off-policy batches need no teacher forward. `"auto"`: when the
            teacher cannot change during training (separate teacher models; the `memory` view while only the newest
            expert trains; `disable_adapter` while only adapter weights train); `"on"`: also for a `teacher_view`
            callable you know to be frozen; `"off"`: the teacher samples and runs per batch (needed when it changes,
            e.g. `teacher_view: self`).
        teacher_cache_hidden_states (`bool`, *optional*, defaults to `True`):
            Keep the teacher's last hidden states on the cached samples (`samples x tokens x hidden_size` floats:
            about 8 MB for SmolLM2-135M and 400 samples of 8 tokens); `False` keeps only the samples and runs the
            teacher forward per batch.
        teacher_samples_per_prompt (`int` or `None`, *optional*, defaults to `None`):
            Cached samples per distinct prompt; `None`: as many as the schedule draws the prompt (the number of
            epochs `max_steps` covers, times the rows the prompt fills when the dataset repeats it), so no sample is
            used twice.
        teacher_cache_batch_size (`int`, *optional*, defaults to `64`):
            Prompts per batched `generate`/forward call while filling the cache.
        teacher_shared_prefill (`bool`, *optional*, defaults to `True`):
            When a batch of teacher samples holds a prompt several times (the cache samples each prompt once per epoch
            of the schedule, and sorts the work so its copies sit together), read that prompt once: one forward fills
            the KV cache of the distinct prompts, the cache is repeated along the batch, and every copy is sampled
            from there. The samples are drawn from the same distributions; `False` runs `generate` over every copy
            (for measuring). Off under DeepSpeed and FSDP and with beam search.
        teacher_sampling_rounds (`str`, *optional*, defaults to `"auto"`):
            Sample the teacher (transformers path) in rounds of 8, 16, 32, ... new tokens, only the rows that have not
            ended going on to the next round (their tokens so far read again in one forward). `generate` computes
            every row of a batch until the longest one ends; where a decoding step costs in proportion to its rows
            (a CPU) and most answers are short, rounds skip most of that. Continuing a row samples from the same
            distributions. `"auto"`: on a CPU device; `"on"`; `"off"`. Off under DeepSpeed and FSDP, with beam
            search and with `min_new_tokens`-style settings in `generation_kwargs`.
        replay_column (`str`, *optional*, defaults to `"replay"`):
            Rows whose value in this column is true are replayed old knowledge: with a teacher view they are taught
            by the replay view instead (for `teacher_view: memory`, the long-term memory as it was before this sleep,
            without the awake fast level, which may have overwritten old answers). Other teachers refuse the column.
        router_loss_weight (`float`, *optional*, defaults to `0.0`):
            With `teacher_view: memory` whose newest expert is routed (a `gate: sigmoid` level, the sleep's slow
            level), add `router_loss_weight` times a binary cross-entropy on that expert's router gates, averaged over
            the attached layers and the tokens that predict the distillation sequence (the last prompt token and the
            completion; the chat template's first tokens are alike in every row): gate 0 on replayed rows (old
            knowledge, where the model before this sleep is already what the student must be) and gate 1 on new rows.
            The new expert then learns to stay quiet on what it must not change, instead of only having its output
            pulled back by the distillation loss. Each class is averaged on its own (a batch of 1 replayed row in 8
            weighs it as much as the 7 new ones); a dataset without replayed rows (the first sleep) adds nothing.
            `0.0` turns it off.

        > Which parameters learn

        trainable_parameters (`list[str]` or `None`, *optional*, defaults to `None`):
            Names or regular expressions (`re.fullmatch`) of the parameters that learn; every other parameter is
            frozen (bit-identical after training). `None` keeps the model's own `requires_grad` flags (e.g. a PEFT
            adapter's). A pattern that matches nothing is an error.
    """

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS

    # Knowledge Seeding objective
    lmbda: float = field(
        default=0.5,
        metadata={"help": "Fraction of batches sampled on-policy by the student; the rest are off-policy."},
    )
    seq_kd: bool = field(
        default=True,
        metadata={"help": "Off-policy batches use teacher samples (True) or the dataset's `completion` column (False)."},
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Distillation weight; 1 - alpha weighs the Learning-to-Imitate RL term."},
    )
    # Learning to Imitate
    gamma: float = field(default=0.5, metadata={"help": "r = gamma * r_sem + (1 - gamma) * r_abs."})
    max_edit_distance: int | None = field(
        default=None, metadata={"help": "z0: r_abs is 0 when the edit distance exceeds it (None: never)."}
    )
    edit_distance_unit: str = field(
        default="token", metadata={"help": "Edit distance over 'token' ids or decoded 'char'acters."}
    )
    num_imitation_generations: int = field(
        default=4, metadata={"help": "Student completions per teacher-sample prefix (the advantage group, >= 2)."}
    )
    imitation_min_prefix: float = field(
        default=0.1, metadata={"help": "Smallest fraction of a teacher sample kept as the imitation prefix."}
    )
    imitation_max_prefix: float = field(
        default=0.6, metadata={"help": "Largest fraction of a teacher sample kept as the imitation prefix."}
    )
    imitation_prefix_sharing: bool = field(
        default=True, metadata={"help": "Read each teacher prefix once (shared KV cache, packed loss forward)."}
    )
    student_shared_prefix: bool = field(
        default=True, metadata={"help": "The student's forward reads the prefix a batch's prompts share once."}
    )
    epsilon: float = field(default=0.2, metadata={"help": "Clip range of the imitation policy ratio."})
    scale_advantages: bool = field(
        default=True, metadata={"help": "Divide group-centred rewards by the group std (GRPO)."}
    )
    semantic_judge: str | None = field(
        default="all-minilm-l6-v2",
        metadata={"help": "Sentence-embedding judge for r_sem (path or 'all-minilm-l6-v2'); None disables r_sem."},
    )
    semantic_threshold: float = field(
        default=0.8, metadata={"help": "Cosine similarity at or above which r_sem = 1."}
    )
    # Teachers
    teachers: list[str] | None = field(
        default=None, metadata={"help": "Several teacher ids/paths (S_1..S_k) instead of teacher_model_name_or_path."}
    )
    teacher_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each teacher (normalised; default uniform)."}
    )
    teacher_combination: str = field(
        default="logit_mean", metadata={"help": "'logit_mean' (product of experts) or 'prob_mean' (mixture)."}
    )
    teacher_view: str | None = field(
        default=None,
        metadata={"help": "Self-seeding teacher: 'memory' (continuum memory teacher view), 'disable_adapter', 'self'."},
    )
    teacher_prompt_column: str = field(
        default="teacher_prompt", metadata={"help": "Dataset column the teacher conditions on instead of `prompt`."}
    )
    teacher_cache: str = field(
        default="auto",
        metadata={"help": "Teacher samples (and hidden states) computed once per run: 'auto', 'on' or 'off'."},
    )
    teacher_cache_hidden_states: bool = field(
        default=True, metadata={"help": "Cache the teacher's hidden states on its samples too."}
    )
    teacher_samples_per_prompt: int | None = field(
        default=None, metadata={"help": "Cached samples per prompt (None: as many as the schedule draws it)."}
    )
    teacher_cache_batch_size: int = field(
        default=64, metadata={"help": "Prompts per batched call while filling the teacher cache."}
    )
    teacher_shared_prefill: bool = field(
        default=True,
        metadata={"help": "Read a prompt sampled several times in one teacher call once (a shared KV cache)."},
    )
    teacher_sampling_rounds: str = field(
        default="auto",
        metadata={"help": "Sample the teacher in rounds of 8, 16, 32... tokens, ended rows dropped: auto (CPU), on, off."},
    )
    replay_column: str = field(
        default="replay", metadata={"help": "Dataset column marking replayed rows (taught by the replay view)."}
    )
    router_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the new expert's router loss (gate 0 on replayed rows, 1 on new rows); 0: off."},
    )
    trainable_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Names or regexes (fullmatch) of the parameters that learn; all others are frozen."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0 (it divides the logits of both distributions and sets the sampling), got "
                f"{self.temperature}."
            )
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"`max_completion_length` must be >= 1, got {self.max_completion_length}.")
        for name in ("lmbda", "alpha", "gamma", "imitation_min_prefix", "imitation_max_prefix"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
        if self.imitation_min_prefix > self.imitation_max_prefix:
            raise ValueError(
                f"`imitation_min_prefix` ({self.imitation_min_prefix}) must not exceed `imitation_max_prefix` "
                f"({self.imitation_max_prefix})."
            )
        if self.alpha < 1.0 and self.num_imitation_generations < 2:
            raise ValueError(
                f"`num_imitation_generations` must be >= 2 when `alpha` < 1 (advantages are normalised within each "
                f"group of completions), got {self.num_imitation_generations}."
            )
        if self.max_edit_distance is not None and self.max_edit_distance < 0:
            raise ValueError(f"`max_edit_distance` must be >= 0 or None, got {self.max_edit_distance}.")
        if self.edit_distance_unit not in EDIT_DISTANCE_UNITS:
            raise ValueError(f"`edit_distance_unit` must be one of {EDIT_DISTANCE_UNITS}, got {self.edit_distance_unit!r}.")
        if self.epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0, got {self.epsilon}.")
        if self.semantic_judge in ("none", "None", ""):
            self.semantic_judge = None
        if self.alpha < 1.0 and self.gamma > 0.0 and self.semantic_judge is None:
            raise ValueError(
                "`gamma` > 0 weighs the semantic reward, but `semantic_judge` is None. Set `gamma: 0.0` or give a "
                "`semantic_judge` (e.g. 'all-minilm-l6-v2')."
            )
        if not 0.0 <= self.semantic_threshold <= 1.0:
            raise ValueError(f"`semantic_threshold` must be in [0, 1], got {self.semantic_threshold}.")
        if self.teacher_combination not in TEACHER_COMBINATIONS:
            raise ValueError(
                f"`teacher_combination` must be one of {TEACHER_COMBINATIONS}, got {self.teacher_combination!r}."
            )
        if self.teacher_sampling_rounds not in ("auto", "on", "off"):
            raise ValueError(
                f"`teacher_sampling_rounds` must be 'auto', 'on' or 'off', got {self.teacher_sampling_rounds!r}."
            )
        if self.teacher_cache not in TEACHER_CACHES:
            raise ValueError(f"`teacher_cache` must be one of {TEACHER_CACHES}, got {self.teacher_cache!r}.")
        if self.teacher_samples_per_prompt is not None and self.teacher_samples_per_prompt < 1:
            raise ValueError(f"`teacher_samples_per_prompt` must be >= 1 or None, got {self.teacher_samples_per_prompt}.")
        if self.teacher_cache_batch_size < 1:
            raise ValueError(f"`teacher_cache_batch_size` must be >= 1, got {self.teacher_cache_batch_size}.")
        if self.router_loss_weight < 0:
            raise ValueError(f"`router_loss_weight` must be >= 0, got {self.router_loss_weight}.")
        if self.router_loss_weight > 0 and self.teacher_view != "memory":
            raise ValueError(
                f"`router_loss_weight` > 0 trains the router of a continuum memory's newest expert, which needs "
                f"`teacher_view: memory` (got teacher_view={self.teacher_view!r}). Set `router_loss_weight: 0.0` or "
                "consolidate into a memory."
            )
        if self.teacher_view not in (None, *TEACHER_VIEWS):
            raise ValueError(f"`teacher_view` must be None or one of {TEACHER_VIEWS}, got {self.teacher_view!r}.")
        if self.teachers is not None and self.teacher_model_name_or_path is not None:
            raise ValueError(
                "Set either `teacher_model_name_or_path` (one teacher) or `teachers` (several), not both."
            )
        if self.teacher_weights is not None:
            # The count is checked against `teachers` here, and against teacher models given to the trainer there.
            if self.teachers and len(self.teacher_weights) != len(self.teachers):
                raise ValueError(
                    f"`teacher_weights` has {len(self.teacher_weights)} entries but `teachers` has "
                    f"{len(self.teachers)}."
                )
            if any(w < 0 for w in self.teacher_weights) or sum(self.teacher_weights) <= 0:
                raise ValueError(f"`teacher_weights` must be non-negative with a positive sum, got {self.teacher_weights}.")
