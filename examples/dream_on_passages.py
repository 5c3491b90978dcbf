"""Dreaming on a few passages: the model learns to write the synthetic data that teaches it the passages.

Each task is a short fictional passage with questions about it. tau is the no-context QA score: the questions are
asked WITHOUT the passage, so the model can only answer from its weights. The script measures, before and after
dreaming:

- tau of the model itself (no context), which rehearsing the kept dreams should raise, and
- tau after one dream (SEAL's protocol): the model writes one dream per passage, an isolated LoRA copy learns it,
  and tau is measured on the copy; a better dream writer gives a higher score.

Runs offline on CPU. The default model is SmolLM2-135M-Instruct (packaged on PyPI, converted once into the cache);
`--tiny` uses a tiny locally built model instead (seconds, for a smoke run; its scores stay at zero).

    python examples/dream_on_passages.py                      # SmolLM2-135M-Instruct, a few minutes on 2 cores
    python examples/dream_on_passages.py --tiny               # smoke run
    python examples/dream_on_passages.py --config recipes/dream.yaml
    python examples/dream_on_passages.py --policy_update grpo --max_steps 8

Every `DreamConfig` field is a command-line flag (`--num_dreams`, `--num_selected_dreams`, `--tau_metric`, ...).
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import TrlParser  # noqa: E402

from sleep_trl.assets import resolve_model_path  # noqa: E402
from sleep_trl.dreaming.passages import demo_tasks  # noqa: E402
from sleep_trl.trainers.dream_config import DreamConfig, DreamScriptArguments  # noqa: E402
from sleep_trl.trainers.dream_trainer import DreamTrainer  # noqa: E402

# CPU-friendly defaults for this example (any flag or recipe key overrides them).
EXAMPLE_DEFAULTS = dict(
    output_dir="outputs/dream_on_passages",
    use_cpu=True,
    bf16=False,
    num_tasks=4,
    num_dreams=4,
    num_selected_dreams=1,
    num_random_dreams=1,
    per_device_train_batch_size=4,
    max_steps=12,
    num_iterations=3,  # each ReST-EM round (one generation batch) is learned for 3 optimizer steps
    learning_rate=1e-4,
    max_completion_length=96,
    temperature=1.0,
    tau_metric="contains",
    tau_max_new_tokens=24,
    inner_steps=8,
    inner_learning_rate=1e-3,
    logging_steps=1,
    num_dreams_to_print=2,
    save_strategy="no",
    report_to="none",
    gradient_checkpointing=False,
    seed=0,
)


def load_tasks(script_args: DreamScriptArguments) -> Dataset:
    if script_args.dataset_path is None:
        tasks = demo_tasks()
    else:
        with open(script_args.dataset_path) as f:
            text = f.read()
        tasks = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                      if line.strip()]
    if script_args.num_tasks is not None:
        tasks = tasks[: script_args.num_tasks]
    return Dataset.from_list(tasks)


def load_model(script_args: DreamScriptArguments):
    if script_args.tiny or script_args.model_name_or_path == "tiny":
        from sleep_trl.tiny import cached_tiny

        path = cached_tiny(arch="llama", hidden_size=64, num_hidden_layers=2)
    else:
        path = resolve_model_path(script_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer, str(path)


def main():
    parser = TrlParser((DreamScriptArguments, DreamConfig))
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    script_args, args = parser.parse_args_and_config()
    console = Console()
    model, tokenizer, path = load_model(script_args)
    dataset = load_tasks(script_args)
    console.print(f"[bold]Dreaming[/] with {path} on {len(dataset)} passages, {args.num_generations} dreams each, "
                  f"policy update: {args.policy_update}")
    trainer = DreamTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    t0 = time.perf_counter()
    before = {"tau": trainer.evaluate_tau(), **trainer.evaluate_dreaming()}
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    after = {"tau": trainer.evaluate_tau(), **trainer.evaluate_dreaming()}
    t3 = time.perf_counter()

    history = [h for h in trainer.state.log_history if "dream/reward_rate" in h or "dream/tau_before" in h]
    cost = [h["dream/reward_seconds_per_dream"] for h in history if "dream/reward_seconds_per_dream" in h]
    rate = [h["dream/reward_rate"] for h in history if "dream/reward_rate" in h]
    table = Table(title=f"tau ({args.tau}, {args.tau_metric}) before and after dreaming")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("tau of the model, no context", f"{before['tau']:.3f}", f"{after['tau']:.3f}")
    table.add_row("tau after one dream (isolated LoRA copy)", f"{before['tau_after_dream']:.3f}",
                  f"{after['tau_after_dream']:.3f}")
    table.add_row("dreams that improved tau", f"{before['improved_fraction']:.3f}", f"{after['improved_fraction']:.3f}")
    console.print(table)
    if rate:
        console.print(f"reward rate during training: {sum(rate) / len(rate):.3f} (per step: "
                      f"{', '.join(f'{r:.2f}' for r in rate)})")
    if cost:
        console.print(f"reward cost: {sum(cost) / len(cost):.2f} s per evaluated dream (inner LoRA training + tau)")
    console.print(f"time: evaluation before {t1 - t0:.0f} s, training {t2 - t1:.0f} s, evaluation after {t3 - t2:.0f} s")
    summary = {"before": before, "after": after, "reward_rate": rate, "reward_seconds_per_dream": cost,
               "seconds": {"eval_before": t1 - t0, "train": t2 - t1, "eval_after": t3 - t2}}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "dream_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
