"""The Sleep cycle: wake on a session, sleep (consolidate, prune, dream), evaluate every session; resumable.

    from sleep_trl.sleep import SleepConfig, SleepCycle
    report = SleepCycle(SleepConfig(output_dir="outputs/sleep")).run()

Each finished phase is written to the run ledger (`cycle_state.json`) together with a checkpoint of the memory (the
host weights never change: only memory experts learn), so killing the run and starting it again with the same
configuration continues after the last finished phase and ends with the same report.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import RichProgressCallback, SFTTrainer

from ..assets import resolve_model_path
from ..data import make_world
from ..dreaming.tau import NoContextQA
from ..eval import AccuracyMatrix, ClosedBookQA
from ..eval.qa import has_chat_template
from ..memory import LevelConfig, MemoryConfig, attach_memory, load_memory
from ..trainers.dream_trainer import DreamTrainer
from .config import SleepConfig
from .consolidation import consolidate
from .data import consolidation_prompts, length_grouped_order, wake_texts
from .ledger import Ledger, PhaseRecord
from .report import finalize, load_report

BASE = "base"  # the evaluation before any session (session index -1)


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
        self.system_prompt = config.system_prompt
        self.qa = ClosedBookQA(
            metric=config.eval_metric, max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size,
            system_prompt=config.system_prompt,
        )

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
        self._setup(ledger)
        if cfg.eval_future_sessions and not ledger.done(-1, BASE):
            self._run_phase(ledger, -1, BASE, 0)
        for k in range(cfg.num_sessions):
            for index, phase in enumerate(self.phases()):
                if not ledger.done(k, phase):
                    self._run_phase(ledger, k, phase, index + 1)
        return finalize(self, ledger, time.perf_counter() - started)

    def _setup(self, ledger: Ledger) -> None:
        """The world, the model with its memory (restored from the last checkpoint), the accuracy matrix."""
        cfg = self.config
        self.world = make_world(cfg.num_sessions, cfg.facts_per_session, cfg.seed, doc_variants=cfg.doc_variants)
        self.tokenizer, self.model = self._load_model()
        if not has_chat_template(self.tokenizer):
            self.system_prompt = None  # plain-text models have no system turn
            self.qa.system_prompt = None
        self.wake_steps = cfg.wake_steps(len(self._wake_texts(0)))
        self.memory = attach_memory(self.model, self._memory_config())
        resume_from = ledger.last_checkpoint()
        if resume_from is not None:
            load_memory(self.model, self.output_dir / resume_from)
            self.console.print(f"[bold]Resuming[/] after {len(ledger.phases)} finished phases ({resume_from}).")
        if ledger.matrix is not None:
            self.matrix = AccuracyMatrix.from_dict(ledger.matrix)
        else:
            self.matrix = AccuracyMatrix(cfg.num_sessions, metric=cfg.eval_metric)

    def _run_phase(self, ledger: Ledger, k: int, phase: str, index: int) -> None:
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
        path = resolve_model_path(self.config.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_path = path
        return tokenizer, model

    def _memory_config(self) -> MemoryConfig:
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

    def _wake_texts(self, k: int) -> list[str]:
        return wake_texts(self.world.sessions[k], self.tokenizer, self.system_prompt)

    def _phase_dir(self, name: str) -> str:
        return str(self.output_dir / "trainer" / name)

    # -----------------------------------------------------------------------------------------------------------------
    # Phases: each returns (metrics, whether the memory changed)
    # -----------------------------------------------------------------------------------------------------------------

    def _base(self, k: int, seed: int):
        row = self._evaluate(None, range(self.config.num_sessions))
        return {"accuracy": row}, False

    def _wake(self, k: int, seed: int):
        cfg, mem = self.config, self.memory
        steps = self.wake_steps
        if cfg.sleep:
            names = mem.expand("fast")
        else:
            # The baseline trains the same memory parameters the sleeping run ends up with (the fast expert and one
            # slow expert per session, all at once, never reset) with the same optimizer steps per session.
            steps += cfg.phase_fields("consolidation_args")["max_steps"]
            if mem.unlocked("fast") == 0:
                mem.expand("fast")
                for _ in range(mem.config.level("slow").num_slots):
                    mem.expand("slow")
            names = [n for level in mem.levels
                     for n in mem.names(mem.parameters(level, slots=range(mem.unlocked(level))))]
        mem.freeze_all_but(names)
        args = cfg.phase_config("wake_args", output_dir=self._phase_dir(f"s{k}-wake"), seed=seed, max_steps=steps)
        texts = self._wake_texts(k)
        if args.train_sampling_strategy == "group_by_length":
            # Batches of similar length, epochs laid out in the data (see `length_grouped_order`), read in order.
            lengths = [len(self.tokenizer(t)["input_ids"]) for t in texts]
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            order = length_grouped_order(lengths, steps * per_step, per_step, seed)
            texts = [texts[i] for i in order]
            args.train_sampling_strategy = "sequential"
        data = Dataset.from_dict({"text": texts})
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=data, processing_class=self.tokenizer,
                             callbacks=[RichProgressCallback()])
        result = trainer.train()
        return {"steps": steps, "train_loss": round(result.training_loss, 4)}, True

    def _consolidate(self, k: int, seed: int):
        cfg = self.config
        in_context = cfg.wake == "context"
        data = consolidation_prompts(
            self.world, k, cfg.replay_prompts, seed, with_context=in_context, system_prompt=self.system_prompt
        )
        fields = {
            **cfg.phase_fields("consolidation_args"), "use_cpu": not torch.cuda.is_available(),
            "output_dir": self._phase_dir(f"s{k}-consolidate"), "seed": seed,
        }
        result = consolidate(
            self.model, self.tokenizer, data, fields, fast_level=None if in_context else "fast",
            callbacks=[RichProgressCallback()],
        )
        return result.metrics(), True

    def _dream(self, k: int, seed: int):
        cfg, mem = self.config, self.memory
        # Dreaming rehearses into the expert this sleep just unlocked; every older expert stays frozen.
        mem.freeze_all_but(mem.names(mem.parameters("slow", slots=[mem.unlocked("slow") - 1])))
        args = cfg.phase_config(
            "dream_args", output_dir=self._phase_dir(f"s{k}-dream"), seed=seed, tau="qa",
            tau_metric=cfg.eval_metric, tau_max_new_tokens=cfg.eval_max_new_tokens,
            dream_system_prompt=self.system_prompt,
            # each router also turns on one random unlocked expert while dreaming (routed slow levels only)
            random_expert_sampling=cfg.slow_gate == "sigmoid",
        )
        trainer = DreamTrainer(
            self.model, args=args, train_dataset=self.world.sessions[k].dream_tasks, processing_class=self.tokenizer,
            tau=NoContextQA(self.qa), callbacks=[RichProgressCallback()],
        )
        tau_before = trainer.evaluate_tau()
        trainer.train()
        tau_after = trainer.evaluate_tau()
        rates = [h["dream/reward_rate"] for h in trainer.state.log_history if "dream/reward_rate" in h]
        metrics = {"steps": args.max_steps, "tau_before": round(tau_before, 4), "tau_after": round(tau_after, 4)}
        if rates:
            metrics["reward_rate"] = round(sum(rates) / len(rates), 4)
        return metrics, True

    def _eval(self, k: int, seed: int):
        sessions = range(self.config.num_sessions) if self.config.eval_future_sessions else range(k + 1)
        return {"accuracy": self._evaluate(k, sessions)}, False

    def _evaluate(self, after: int | None, sessions) -> list[float]:
        self.model.eval()
        rows = [s.eval_qa for s in self.world.sessions]
        accuracies = self.matrix.evaluate_model(
            after, self.model, self.tokenizer, rows, sessions=list(sessions), qa=self.qa
        )
        return [round(a, 4) for a in accuracies]


def run_sleep(config: SleepConfig) -> dict:
    """Run (or resume) the Sleep cycle described by `config`; returns the report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SleepCycle(config).run()
