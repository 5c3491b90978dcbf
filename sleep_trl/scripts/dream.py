"""Job `dream`: dream on a set of tasks and report tau before and after (recipe `recipes/dream.yaml`).

`ARGUMENT_CLASSES` are the dataclasses a recipe is parsed into (TRL's `TrlParser`), `run(*parsed)` runs the job:
load the model and the tasks, measure tau (the model's own, and after one dream on an isolated copy, SEAL's
protocol), train a `DreamTrainer`, measure again, print a table, write `dream_summary.json`, and save the model
with its model card.
"""

from __future__ import annotations

import json
import os
import time

import torch
from accelerate import PartialState
from datasets import Dataset
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..assets import resolve_model_path
from ..dreaming.passages import demo_tasks
from ..tiny import cached_tiny
from ..trainers.dream_config import DreamConfig, DreamScriptArguments
from ..trainers.dream_trainer import DreamTrainer

ARGUMENT_CLASSES = (DreamScriptArguments, DreamConfig)


def load_tasks(script_args: DreamScriptArguments):
    """The tasks as a `datasets.Dataset`: a JSON list / JSONL file, or the embedded demo passages."""
    if script_args.dataset_path is None:
        tasks = demo_tasks()
    else:
        with open(script_args.dataset_path) as f:
            text = f.read()
        if text.lstrip().startswith("["):
            tasks = json.loads(text)
        else:
            tasks = [json.loads(line) for line in text.splitlines() if line.strip()]
    if script_args.num_tasks is not None:
        tasks = tasks[: script_args.num_tasks]
    if not tasks:
        raise ValueError("No task to dream on: the dataset is empty (check `dataset_path` and `num_tasks`).")
    return Dataset.from_list(tasks)


def load_model(script_args: DreamScriptArguments):
    """(model, tokenizer, path): a local checkpoint, the packaged SmolLM2-135M-Instruct, or a tiny local model."""
    if script_args.tiny or script_args.model_name_or_path == "tiny":
        path = cached_tiny(arch="llama")
    else:
        path = resolve_model_path(script_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer, str(path)


def run(script_args: DreamScriptArguments, args: DreamConfig) -> dict:
    """Run the job; returns the summary written to `output_dir/dream_summary.json`."""
    main = PartialState().is_main_process  # under `accelerate launch` the main process alone prints and writes
    console = Console(quiet=not main)
    dataset = load_tasks(script_args)  # read (and fail) before loading the model
    model, tokenizer, path = load_model(script_args)
    console.print(
        f"[bold]Dreaming[/] with {path} on {len(dataset)} tasks, {args.num_generations} dreams each, "
        f"policy update: {args.policy_update}"
    )
    trainer = DreamTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    t0 = time.perf_counter()
    before = {"tau": trainer.evaluate_tau(), **trainer.evaluate_dreaming()}
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    after = {"tau": trainer.evaluate_tau(), **trainer.evaluate_dreaming()}
    t3 = time.perf_counter()

    history = trainer.state.log_history
    cost = [h["dream/reward_seconds_per_dream"] for h in history if "dream/reward_seconds_per_dream" in h]
    rate = [h["dream/reward_rate"] for h in history if "dream/reward_rate" in h]
    table = Table(title=f"tau ({args.tau}, {args.tau_metric}) before and after dreaming")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("tau of the model, no context", f"{before['tau']:.3f}", f"{after['tau']:.3f}")
    table.add_row(
        "tau after one dream (isolated LoRA copy)",
        f"{before['tau_after_dream']:.3f}",
        f"{after['tau_after_dream']:.3f}",
    )
    table.add_row(
        "dreams that improved tau", f"{before['improved_fraction']:.3f}", f"{after['improved_fraction']:.3f}"
    )
    console.print(table)
    if rate:
        per_step = ", ".join(f"{r:.2f}" for r in rate)
        console.print(f"reward rate during training: {sum(rate) / len(rate):.3f} (per round: {per_step})")
    if cost:
        console.print(f"reward cost: {sum(cost) / len(cost):.2f} s per evaluated dream (inner LoRA training + tau)")
    console.print(
        f"time: evaluation before {t1 - t0:.0f} s, training {t2 - t1:.0f} s, evaluation after {t3 - t2:.0f} s"
    )

    summary = {
        "model": path,
        "before": before,
        "after": after,
        "reward_rate": rate,
        "reward_seconds_per_dream": cost,
        "seconds": {"eval_before": t1 - t0, "train": t2 - t1, "eval_after": t3 - t2},
    }
    if main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "dream_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if script_args.save_model:
        trainer.save_model(args.output_dir)  # every process (ZeRO-3 gathers), the main one writes
        trainer.create_model_card(model_name=os.path.basename(os.path.normpath(args.output_dir)))
    return summary
