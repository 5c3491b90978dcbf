"""The Sleep cycle: wake on a session, sleep (consolidate, prune, dream), evaluate every session; resumable.

    from sleep_trl.sleep import SleepConfig, SleepCycle
    report = SleepCycle(SleepConfig(output_dir="outputs/sleep")).run()

Each finished phase is written to the run ledger (`cycle_state.json`) together with a checkpoint of the memory (the
host weights never change: only memory experts learn), so killing the run and starting it again with the same
configuration continues after the last finished phase and ends with the same report. The baselines of
`SleepConfig.method` run through the same loop (their wake trains other experts, on other data; they never sleep).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import RichProgressCallback

from ..assets import resolve_model_path
from ..data.sessions import SessionStream, load_stream
from ..dreaming.tau import NoContextQA
from ..eval import AccuracyMatrix, ClosedBookQA
from ..eval.qa import has_chat_template
from ..generation.distributed import is_main_process, mean_over_processes, release_engine, wait_for_everyone, world
from ..io import sha256_file
from ..memory import LevelConfig, MemoryConfig, attach_memory, load_memory
from ..trainers.dream_trainer import DreamTrainer
from ..trainers.shared_prefix_sft import SharedPrefixSFTTrainer
from .baselines import dream_texts, rehearsal_texts
from .config import SleepConfig, without_overridden_epochs
from .console import quiet_libraries, quiet_trainer
from .consolidation import consolidate, frozen_trunk_for
from .data import consolidation_prompts, length_grouped_order, wake_texts
from .guards import DivergenceGuard, RunLock, check_finite
from .ledger import Ledger, PhaseRecord
from .publish import check_can_push
from .report import MODEL_DIR, REPORT_NAME, finalize, finished_run

BASE = "base"  # the evaluation before any session (session index -1)


def _available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def _without_zero3_init():
    """Within the block, transformers does not build models partitioned for DeepSpeed ZeRO-3."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_config_stream(config: SleepConfig) -> SessionStream:
    """The stream a config names, checked (a `StreamError` names the problem) before anything else happens."""
    stream = load_stream(
        config.dataset_name, num_sessions=config.num_sessions, facts_per_session=config.facts_per_session,
        doc_variants=config.doc_variants, seed=config.seed, passages_per_session=config.passages_per_session,
        squad_train_questions=config.squad_train_questions, dataset_config=config.dataset_config,
        dataset_split=config.dataset_train_split,
    )
    if config.dream and any(not s.contexts for s in stream.sessions):
        empty = [s.name for s in stream.sessions if not s.contexts]
        raise ValueError(
            f"`dream: true` needs training questions in every session (dreaming's tau asks them), but sessions "
            f"{empty} have none. Add training pairs (`squad_train_questions`, `split: train` rows) or set `dream: false`."
        )
    if config.slow_slots is not None and config.slow_slots < len(stream):
        raise ValueError(f"`slow_slots` ({config.slow_slots}) is smaller than the {len(stream)} sessions of the data.")
    return stream


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
        if cfg.method != "sleep":
            return ["wake", "eval"]
        phases = ["wake"] if cfg.wake == "fast" else []
        phases.append("consolidate")
        if cfg.dream:
            phases.append("dream")
        phases.append("eval")
        return phases

    def fingerprint(self) -> dict:
        """The config's fingerprint plus the data's: a run directory belongs to one configuration and one stream."""
        return {**self.config.fingerprint(), "data": self.stream.fingerprint()}

    def run(self) -> dict:
        cfg = self.config
        # Before the run directory is made, so refused input leaves no trace: the data and the model path.
        self.stream = load_config_stream(cfg)
        self.model_path = resolve_model_path(cfg.model_name_or_path)
        check_can_push(cfg)
        self.main = is_main_process()  # under `accelerate launch` only the main process writes files
        if not self.main:
            self.console.quiet = True
        with RunLock(self.output_dir) if self.main else contextlib.nullcontext(), quiet_libraries():
            ledger = self._open_ledger()
            if ledger.finished and (self.output_dir / REPORT_NAME).exists() and (self.output_dir / MODEL_DIR).exists():
                self.console.print(f"[bold]{self.output_dir} holds a finished run; nothing to do.")
                return finished_run(self)
            return self._run(ledger)

    def _open_ledger(self) -> Ledger:
        """The main process opens (or starts) the ledger; the others read it once it is there."""
        opening = dict(defaults=type(self.config).defaults(), normalize=without_overridden_epochs)
        ledger = Ledger.open(self.output_dir, self.fingerprint(), **opening) if self.main else None
        wait_for_everyone()
        if ledger is None:
            ledger = Ledger.open(self.output_dir, self.fingerprint(), writer=False, **opening)
        return ledger

    def _run(self, ledger: Ledger) -> dict:
        cfg = self.config
        # `accelerate launch` exports OMP_NUM_THREADS=1 for every process; one process should use every core.
        threads = cfg.torch_threads or (_available_cores() if world()[0] == 1 else None)
        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self._setup(ledger)
        if cfg.eval_future_sessions and not ledger.done(-1, BASE):
            self._run_phase(ledger, -1, BASE, 0)
        for k in range(len(self.stream)):
            for index, phase in enumerate(self.phases()):
                if not ledger.done(k, phase):
                    self._run_phase(ledger, k, phase, index + 1)
        return finalize(self, ledger, time.perf_counter() - started)

    def _setup(self, ledger: Ledger) -> None:
        """The model with its memory (restored from the last checkpoint), the accuracy matrix."""
        cfg = self.config
        self.tokenizer, self.model = self._load_model()
        if not has_chat_template(self.tokenizer):
            self.system_prompt = None  # plain-text models have no system turn
            self.qa.system_prompt = None
        self.memory = attach_memory(self.model, self._memory_config())
        record = ledger.last_checkpointed()
        if record is not None:
            load_memory(self.model, ledger.verify(record))
            self.console.print(f"[bold]Resuming[/] after {len(ledger.phases)} finished phases ({record.checkpoint}).")
        names = [s.name for s in self.stream.sessions]
        if ledger.matrix is not None:
            self.matrix = AccuracyMatrix.from_dict(ledger.matrix)
        else:
            self.matrix = AccuracyMatrix(len(self.stream), metric=cfg.eval_metric, session_names=names)

    def _run_phase(self, ledger: Ledger, k: int, phase: str, index: int) -> None:
        cfg = self.config
        label = "before any session" if k < 0 else f"session {k}"
        self.console.rule(f"[bold]{phase}[/] · {label}")
        seed = cfg.seed + 100 * (k + 1) + index
        set_seed(seed)
        t0 = time.perf_counter()
        self._label = f"{phase} of {label}"
        metrics, changed = getattr(self, f"_{phase}")(k, seed)
        seconds = time.perf_counter() - t0
        checkpoint = checksum = None
        if changed:
            check_finite(self.memory, self._label)
            checkpoint = f"checkpoints/s{k}-{phase}"
            self.memory.save(self.output_dir / checkpoint, is_main_process=self.main)  # collective under ZeRO-3
            if self.main:
                checksum = sha256_file(self.output_dir / checkpoint / "memory.safetensors")
            wait_for_everyone()
        record = PhaseRecord(k, phase, round(seconds, 2), checkpoint, metrics, checksum)
        ledger.record(record, self.matrix.to_dict())
        self.console.print(f"[dim]{phase} · {label}: {seconds:.1f}s {metrics}")

    # -----------------------------------------------------------------------------------------------------------------
    # Setup
    # -----------------------------------------------------------------------------------------------------------------

    def _callbacks(self) -> list:
        return [RichProgressCallback(), DivergenceGuard(self._label)]

    def _load_model(self):
        path = self.model_path
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Loaded whole on every process, also under DeepSpeed ZeRO-3 (whose configs, built with the phase configs,
        # would otherwise partition it at load): the zero-shot evaluation runs before any trainer exists, and the
        # first phase's engine partitions it.
        with _without_zero3_init():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        return tokenizer, model

    def _memory_config(self) -> MemoryConfig:
        cfg = self.config
        slots = cfg.slow_slots or len(self.stream)
        # One fresh expert per session in the baselines that never sleep, as large as sleep's fast + slow pair.
        fresh = cfg.method in ("expert_per_session", "dream_only")
        slow_rank = cfg.fast_rank + cfg.slow_rank if fresh else cfg.slow_rank
        chunk = cfg.wake_steps(len(self._wake_texts(0)), world()[0])
        return MemoryConfig(
            layers=cfg.layers,
            levels=[
                LevelConfig(name="fast", num_slots=1, rank=cfg.fast_rank, chunk_size=chunk, gate="fixed"),
                LevelConfig(name="slow", num_slots=slots, rank=slow_rank, chunk_size=None, gate=cfg.slow_gate),
            ],
            seed=cfg.seed,
        )

    def _wake_texts(self, k: int) -> list[str]:
        return wake_texts(self.stream.sessions[k], self.tokenizer, self.system_prompt)

    def _document_prompts(self, k: int) -> int:
        cfg, session = self.config, self.stream.sessions[k]
        if cfg.document_prompts is not None:
            return cfg.document_prompts
        return 0 if session.train_qa or session.probes else 4

    @property
    def replay_document_prompts(self) -> int:
        """Prefixes per document in the pool replayed from an earlier documents-only session: what its own sleep
        was given (`document_prompts`, 4 when unset)."""
        return self.config.document_prompts or 4

    def _phase_dir(self, name: str) -> str:
        return str(self.output_dir / "trainer" / name)

    def _run_name(self, name: str) -> str:
        """The phase's run name for `report_to` integrations: `{run_name or output_dir's name}-{name}`."""
        return f"{self.config.run_name or self.output_dir.resolve().name}-{name}"

    # -----------------------------------------------------------------------------------------------------------------
    # Phases: each returns (metrics, whether the memory changed)
    # -----------------------------------------------------------------------------------------------------------------

    def _base(self, k: int, seed: int):
        return {"accuracy": self._evaluate(None, range(len(self.stream)))}, False

    def _wake_parameters(self) -> list[str]:
        """What learns during this wake: sleep's fresh fast expert; the same fast + slow pair every session for the
        sequential arms (never reset); a new slow expert per session for the fresh-expert arms."""
        mem, method = self.memory, self.config.method
        if method == "sleep":
            return mem.expand("fast")
        if method in ("expert_per_session", "dream_only"):
            return mem.expand("slow")
        if mem.unlocked("fast") == 0:
            mem.expand("fast")
            mem.expand("slow")
        return mem.names(mem.parameters("fast", slots=[0]) + mem.parameters("slow", slots=[0]))

    def _wake(self, k: int, seed: int):
        cfg, mem = self.config, self.memory
        texts = self._wake_texts(k)
        steps = cfg.wake_steps(len(texts), world()[0])  # the session's own texts set the budget
        if cfg.method != "sleep":  # the arms that never sleep get the steps a sleep on this session would take
            steps += cfg.consolidation_steps(len(self._consolidation_prompts(k, seed)), world()[0])
        metrics = {"steps": steps, "texts": len(texts)}
        if cfg.method == "replay" and k > 0:
            extra = rehearsal_texts(self, k, seed)
            texts, metrics["rehearsal_texts"] = texts + extra, len(extra)
        if cfg.method == "dream_only":
            extra = dream_texts(self, k, seed)
            texts, metrics["dream_texts"] = texts + extra, len(extra)
        mem.freeze_all_but(self._wake_parameters())
        args = cfg.phase_config("wake_args", output_dir=self._phase_dir(f"s{k}-wake"), seed=seed, max_steps=steps,
                               run_name=self._run_name(f"s{k}-wake"))
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        if args.max_length is not None and max(lengths) > args.max_length:
            long = sum(n > args.max_length for n in lengths)
            self.console.print(f"[yellow]{long} wake texts of session {k} are longer than wake_args.max_length "
                               f"({args.max_length} tokens) and are truncated: raise it to learn them whole.")
            metrics["truncated_texts"] = long
        if args.train_sampling_strategy == "group_by_length":
            # Batches of similar length, epochs laid out in the data (see `length_grouped_order`), read in order.
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            texts = [texts[i] for i in length_grouped_order(lengths, steps * per_step, per_step, seed)]
            args.train_sampling_strategy = "sequential"
        trainer = SharedPrefixSFTTrainer(
            model=self.model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=self.tokenizer, callbacks=self._callbacks(), share_prefix=cfg.shared_prefix,
        )
        # The wake reads its texts once per epoch: the frozen layers below the memory run once per text (exact; a
        # no-op with a memory in every layer). Rows read through a KV cache cannot be served from it, so the trunk,
        # where it is active, takes precedence over the shared prefix.
        trunk = frozen_trunk_for(trainer, mem, cfg.frozen_trunk)
        if trunk is not None and not trunk.disabled:
            trainer.share_prefix = False
        with trunk or contextlib.nullcontext():
            result = quiet_trainer(trainer).train()
        if trunk is not None and not trunk.disabled:
            metrics["trunk_served_rows"] = trunk.served_rows  # rows whose lower layers came from the cache
        stats = trainer.shared_prefix_stats
        if stats["shared_batches"]:  # tokens the forwards read against the padded batches' (shared prefix)
            metrics["shared_prefix_batches"] = stats["shared_batches"]
            metrics["tokens_read"] = stats["tokens_run"]
        release_engine(trainer)
        metrics["train_loss"] = round(mean_over_processes(result.training_loss), 4)
        if cfg.eval_awake and cfg.method == "sleep":  # what the fast memory knows, before the sleep consolidates it
            self.model.eval()
            awake = self.qa.evaluate(self.model, self.tokenizer, self.stream.sessions[k].eval_qa,
                                     distributed=world()[0] > 1)
            metrics["awake_accuracy"] = round(awake.accuracy, 4)
        return metrics, True

    def _consolidation_prompts(self, k: int, seed: int):
        """The rows a sleep on session `k` distils on (its own prompts and the replayed ones)."""
        cfg = self.config
        return consolidation_prompts(
            self.stream, k, cfg.replay_prompts, seed, with_context=cfg.wake == "context", tokenizer=self.tokenizer,
            system_prompt=self.system_prompt, document_prompts=self._document_prompts(k),
            replay_document_prompts=self.replay_document_prompts, new_share=cfg.new_prompt_share,
        )

    def _consolidate(self, k: int, seed: int):
        cfg = self.config
        in_context = cfg.wake == "context"
        data = self._consolidation_prompts(k, seed)
        fields = {
            **cfg.phase_fields("consolidation_args"), "use_cpu": not torch.cuda.is_available(),
            "output_dir": self._phase_dir(f"s{k}-consolidate"), "seed": seed,
            "run_name": self._run_name(f"s{k}-consolidate"),
        }
        result = consolidate(
            self.model, self.tokenizer, data, fields, fast_level=None if in_context else "fast",
            warm_start=cfg.warm_start, expand=cfg.expansion, callbacks=self._callbacks(), frozen_trunk=cfg.frozen_trunk,
        )
        return result.metrics(), True

    def _dream(self, k: int, seed: int):
        cfg, mem = self.config, self.memory
        # Dreaming rehearses into the expert this sleep just unlocked; every older expert stays frozen.
        mem.freeze_all_but(mem.names(mem.parameters("slow", slots=[mem.unlocked("slow") - 1])))
        args = cfg.phase_config(
            "dream_args", output_dir=self._phase_dir(f"s{k}-dream"), seed=seed, tau="qa", run_name=self._run_name(f"s{k}-dream"),
            tau_metric=cfg.eval_metric, tau_max_new_tokens=cfg.eval_max_new_tokens,
            dream_system_prompt=self.system_prompt,
            # each router also turns on one random unlocked expert while dreaming (routed slow levels only)
            random_expert_sampling=cfg.slow_gate == "sigmoid",
        )
        tasks = Dataset.from_list(self.stream.sessions[k].contexts)
        trainer = DreamTrainer(
            self.model, args=args, train_dataset=tasks, processing_class=self.tokenizer, tau=NoContextQA(self.qa),
            callbacks=self._callbacks(),
        )
        tau_before = trainer.evaluate_tau()
        quiet_trainer(trainer).train()
        tau_after = trainer.evaluate_tau()
        release_engine(trainer)
        rates = [h["dream/reward_rate"] for h in trainer.state.log_history if "dream/reward_rate" in h]
        metrics = {
            "steps": trainer.state.global_step, "tau_before": round(tau_before, 4), "tau_after": round(tau_after, 4)
        }
        if rates:
            metrics["reward_rate"] = round(sum(rates) / len(rates), 4)
        return metrics, True

    def _eval(self, k: int, seed: int):
        sessions = range(len(self.stream)) if self.config.eval_future_sessions else range(k + 1)
        return {"accuracy": self._evaluate(k, sessions)}, False

    def _evaluate(self, after: int | None, sessions) -> list[float]:
        self.model.eval()
        rows = [s.eval_qa for s in self.stream.sessions]
        accuracies = self.matrix.evaluate_model(
            after, self.model, self.tokenizer, rows, sessions=list(sessions), qa=self.qa, distributed=world()[0] > 1
        )
        return [round(a, 4) for a in accuracies]


def run_sleep(config: SleepConfig) -> dict:
    """Run (or resume) the Sleep cycle described by `config`; returns the report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SleepCycle(config).run()
