"""The Sleep cycle: wake on a session, sleep (consolidate, prune, dream), evaluate every session; resumable.

    from sleep_trl.sleep import SleepConfig, SleepCycle
    report = SleepCycle(SleepConfig(output_dir="outputs/sleep")).run()

Each finished phase is written to the run ledger (`cycle_state.json`) together with a checkpoint of the memory (the
host weights never change: only memory experts learn), so killing the run and starting it again with the same
configuration continues after the last finished phase and ends with the same report.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from rich.console import Console

from .config import SleepConfig
from .ledger import Ledger, PhaseRecord

BASE = "base"  # the evaluation before any session (session index -1)


# The evaluation's metric names and the same metrics as DreamTrainer's tau calls them.
TAU_METRIC_OF_EVAL_METRIC = {"contains": "contains", "exact": "exact_match", "f1": "token_f1"}


def _available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class SleepCycle:
    def __init__(self, config: SleepConfig, console: Console | None = None):
        self.config = config
        self.console = console or Console()
        self.output_dir = Path(config.output_dir)

    # -----------------------------------------------------------------------------------------------------------------
    # The run
    # -----------------------------------------------------------------------------------------------------------------

    def phases(self) -> list[str]:
        cfg = self.config
        if not cfg.sleep:
            return ["wake", "eval"]
        phases = ["wake"] if cfg.wake == "fast" else []
        phases.append("consolidate")
        if cfg.dream:
            phases.append("dream")
        phases.append("eval")
        return phases

    def run(self) -> dict:
        import torch

        from ..data import make_world
        from ..eval import AccuracyMatrix
        from ..memory import attach_memory, load_memory
        from .report import finalize, load_report

        cfg = self.config
        ledger = Ledger.open(self.output_dir, cfg.fingerprint(), defaults=type(cfg).defaults())
        if ledger.finished:
            self.console.print(f"[bold]{self.output_dir} holds a finished run; nothing to do.")
            return load_report(self.output_dir, self.console)
        # `accelerate launch` exports OMP_NUM_THREADS=1 for every process; one process should use every core.
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        threads = cfg.torch_threads or (_available_cores() if single else None)
        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.world = make_world(cfg.num_sessions, cfg.facts_per_session, cfg.seed, doc_variants=cfg.doc_variants)
        self.tokenizer, self.model = self._load_model()
        self.wake_steps = self._wake_steps()
        self.memory = attach_memory(self.model, self._memory_config())
        resume_from = ledger.last_checkpoint()
        if resume_from is not None:
            load_memory(self.model, self.output_dir / resume_from)
            self.console.print(f"[bold]Resuming[/] after {len(ledger.phases)} finished phases ({resume_from}).")
        if ledger.matrix is not None:
            self.matrix = AccuracyMatrix.from_dict(ledger.matrix)
        else:
            self.matrix = AccuracyMatrix(cfg.num_sessions, metric=cfg.eval_metric)

        if cfg.eval_future_sessions and not ledger.done(-1, BASE):
            self._run_phase(ledger, -1, BASE, 0)
        for k in range(cfg.num_sessions):
            for index, phase in enumerate(self.phases()):
                if not ledger.done(k, phase):
                    self._run_phase(ledger, k, phase, index + 1)
        return finalize(self, ledger, time.perf_counter() - started)

    def _run_phase(self, ledger: Ledger, k: int, phase: str, index: int) -> None:
        from transformers import set_seed

        cfg = self.config
        label = "before any session" if k < 0 else f"session {k}"
        self.console.rule(f"[bold]{phase}[/] · {label}")
        seed = cfg.seed + 100 * (k + 1) + index
        set_seed(seed)
        t0 = time.perf_counter()
        metrics, changed = getattr(self, f"_{phase}")(k, seed)
        seconds = time.perf_counter() - t0
        checkpoint = None
        if changed:
            checkpoint = f"checkpoints/s{k}-{phase}"
            self.memory.save(self.output_dir / checkpoint)
        ledger.record(PhaseRecord(k, phase, round(seconds, 2), checkpoint, metrics), self.matrix.to_dict())
        self.console.print(f"[dim]{phase} · {label}: {seconds:.1f}s {metrics}")

    # -----------------------------------------------------------------------------------------------------------------
    # Setup
    # -----------------------------------------------------------------------------------------------------------------

    def _load_model(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..assets import resolve_model_path

        path = resolve_model_path(self.config.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_path = path
        return tokenizer, model

    def _wake_texts(self, k: int) -> list[str]:
        from .data import wake_texts

        return wake_texts(self.world.sessions[k], self.tokenizer)

    def _wake_steps(self) -> int:
        """Optimizer steps of one session's wake (the fast level's chunk size)."""
        n = len(self._wake_texts(0))
        return max(1, math.ceil(self.config.wake_epochs * n / self.config.wake_batch_size))

    def _memory_config(self):
        from ..memory import LevelConfig, MemoryConfig

        cfg = self.config
        slots = cfg.slow_slots or cfg.num_sessions
        return MemoryConfig(
            layers=cfg.layers,
            levels=[
                LevelConfig(name="fast", num_slots=1, rank=cfg.fast_rank, chunk_size=self.wake_steps, gate="fixed"),
                LevelConfig(name="slow", num_slots=slots, rank=cfg.slow_rank, chunk_size=None, gate=cfg.slow_gate),
            ],
            seed=cfg.seed,
        )

    def _trainer_kwargs(self, seed: int, name: str) -> dict:
        import torch

        return dict(
            output_dir=str(self.output_dir / "trainer" / name),
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
            logging_steps=5,
            disable_tqdm=True,
            seed=seed,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=2,
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Phases: each returns (metrics, whether the memory changed)
    # -----------------------------------------------------------------------------------------------------------------

    def _base(self, k: int, seed: int):
        row = self._evaluate(None, range(self.config.num_sessions))
        return {"accuracy": row}, False

    def _wake(self, k: int, seed: int):
        from datasets import Dataset
        from trl import RichProgressCallback, SFTConfig, SFTTrainer

        cfg, mem = self.config, self.memory
        steps = self.wake_steps
        if cfg.sleep:
            names = mem.expand("fast")
        else:
            # The baseline trains the same memory parameters the sleeping run ends up with (the fast expert and one
            # slow expert per session, all at once, never reset) with the same optimizer steps per session.
            steps += cfg.sleep_steps
            if mem.unlocked("fast") == 0:
                mem.expand("fast")
                for _ in range(mem.config.level("slow").num_slots):
                    mem.expand("slow")
            names = [n for level in mem.levels
                     for n in mem.names(mem.parameters(level, slots=range(mem.unlocked(level))))]
        mem.freeze_all_but(names)
        args = SFTConfig(
            **self._trainer_kwargs(seed, f"s{k}-wake"),
            max_steps=steps,
            per_device_train_batch_size=cfg.wake_batch_size,
            learning_rate=cfg.wake_learning_rate,
            max_length=256,
            dataset_text_field="text",
        )
        data = Dataset.from_dict({"text": self._wake_texts(k)})
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=data, processing_class=self.tokenizer,
                             callbacks=[RichProgressCallback()])
        result = trainer.train()
        return {"steps": steps, "train_loss": round(result.training_loss, 4)}, True

    def _consolidate(self, k: int, seed: int):
        from trl import RichProgressCallback

        from ..trainers import GeneralizedDistillationConfig, GeneralizedDistillationTrainer
        from .data import consolidation_prompts

        cfg, mem = self.config, self.memory
        names = mem.expand("slow")
        if cfg.wake == "fast":
            mem.suspend("fast")  # the student must not see what the teacher (the awake model) holds in fast memory
        data = consolidation_prompts(self.world, k, cfg.replay_prompts, seed, with_context=cfg.wake == "context")
        args = GeneralizedDistillationConfig(
            **self._trainer_kwargs(seed, f"s{k}-consolidate"),
            max_steps=cfg.sleep_steps,
            per_device_train_batch_size=cfg.sleep_batch_size,
            learning_rate=cfg.sleep_learning_rate,
            lmbda=cfg.lmbda, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma if cfg.alpha < 1 else 0.0,
            num_imitation_generations=cfg.num_imitation_generations,
            temperature=cfg.temperature,
            max_completion_length=cfg.max_completion_length,
            trainable_parameters=names,
            teacher_view="memory",
        )
        trainer = GeneralizedDistillationTrainer(model=self.model, args=args, train_dataset=data,
                                                 processing_class=self.tokenizer, callbacks=[RichProgressCallback()])
        result = trainer.train()
        if cfg.wake == "fast":
            mem.reset("fast")  # synaptic pruning: the fast level is free for the next session
        logs = [h for h in trainer.state.log_history if "distill/loss" in h]
        metrics = {"steps": cfg.sleep_steps, "train_loss": round(result.training_loss, 4), "prompts": len(data)}
        if logs:
            metrics["distill_loss_last"] = round(logs[-1]["distill/loss"], 4)
        return metrics, True

    def _dream(self, k: int, seed: int):
        from trl import RichProgressCallback

        from ..trainers import DreamConfig, DreamTrainer

        cfg, mem = self.config, self.memory
        # Dreaming rehearses into the expert this sleep just unlocked; every older expert stays frozen.
        names = mem.names(mem.parameters("slow", slots=[mem.unlocked("slow") - 1]))
        mem.freeze_all_but(names)
        tasks = self.world.sessions[k].dream_tasks
        kwargs = self._trainer_kwargs(seed, f"s{k}-dream")
        kwargs["warmup_steps"] = 0  # a dream budget is a few steps; a warmup would spend the first at lr 0
        args = DreamConfig(
            **kwargs,
            max_steps=cfg.dream_steps,
            num_dreams=cfg.num_dreams,
            num_selected_dreams=cfg.dream_keep,
            num_random_dreams=cfg.dream_random,
            per_device_train_batch_size=cfg.num_dreams,  # one context per round: its m dreams form the group
            learning_rate=cfg.dream_learning_rate,
            policy_update=cfg.dream_policy_update,
            max_completion_length=cfg.dream_max_completion_length,
            tau="qa",
            tau_metric=TAU_METRIC_OF_EVAL_METRIC[cfg.eval_metric],
            tau_max_new_tokens=cfg.eval_max_new_tokens,
            inner_steps=cfg.dream_inner_steps,
            # each router also turns on one random unlocked expert while dreaming (routed slow levels only)
            random_expert_sampling=cfg.slow_gate == "sigmoid",
            num_dreams_to_print=2,
        )
        trainer = DreamTrainer(self.model, args=args, train_dataset=tasks, processing_class=self.tokenizer,
                               callbacks=[RichProgressCallback()])
        tau_before = trainer.evaluate_tau()
        trainer.train()
        tau_after = trainer.evaluate_tau()
        history = trainer.state.log_history
        rates = [h["dream/reward_rate"] for h in history if "dream/reward_rate" in h]
        metrics = {"steps": cfg.dream_steps, "tau_before": round(tau_before, 4), "tau_after": round(tau_after, 4)}
        if rates:
            metrics["reward_rate"] = round(sum(rates) / len(rates), 4)
        return metrics, True

    def _eval(self, k: int, seed: int):
        sessions = range(self.config.num_sessions) if self.config.eval_future_sessions else range(k + 1)
        row = self._evaluate(k, sessions)
        return {"accuracy": row}, False

    def _evaluate(self, after: int | None, sessions) -> list[float]:
        cfg = self.config
        self.model.eval()
        rows = [s.eval_qa for s in self.world.sessions]
        accuracies = self.matrix.evaluate_model(
            after, self.model, self.tokenizer, rows, sessions=list(sessions),
            batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens,
        )
        return [round(a, 4) for a in accuracies]


def run_sleep(config: SleepConfig) -> dict:
    """Run (or resume) the Sleep cycle described by `config`; returns the report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SleepCycle(config).run()
