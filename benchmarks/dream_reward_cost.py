"""What one dream's reward costs, and what the shared-base inner loop saves.

The dream reward fine-tunes an isolated LoRA copy of the model on the dream and measures tau. `DreamTrainer` does it
without copying the model: one adapter is injected into the policy's own modules and reset between dreams
(`sleep_trl.dreaming.inner_loop`). This script measures, on the same dreams and tasks:

- shared base (ours): seconds per dream for the inner LoRA training and for tau, one injection for all dreams;
- copy per dream (the naive way): `copy.deepcopy` of the model and a new `get_peft_model` for every dream, then the
  same training and tau; the two must give the same tau (same seed, same steps), which is checked;
- importance scoring (selection): seconds per dream of the gradient-alignment score, the price of skipping the
  inner loop on dreams that are not selected.

    python benchmarks/dream_reward_cost.py                  # SmolLM2-135M-Instruct (packaged offline)
    python benchmarks/dream_reward_cost.py --tiny           # tiny local model
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from sleep_trl.assets import resolve_model_path
from sleep_trl.dreaming.inner_loop import InnerLoopConfig, default_target_modules, evaluate_dreams, train_adapter
from sleep_trl.dreaming.passages import demo_tasks
from sleep_trl.dreaming.selection import dream_importance, resolve_importance_parameters
from sleep_trl.dreaming.tau import NoContextQA


def dreams_for(task: dict) -> list[str]:
    """Stand-in dreams of realistic length: the passage itself and its facts as question-answer lines."""
    qa = "\n".join(f"Question: {q} Answer: {a[0]}" for q, a in zip(task["questions"], task["answers"], strict=True))
    return [task["context"], qa]


def copy_per_dream(model, tokenizer, tau, tasks, dreams, *, r, alpha, steps, lr, seed):
    """The naive isolated copy: a deep copy plus a fresh PEFT model for every dream."""
    from peft import LoraConfig, get_peft_model

    targets = default_target_modules(model)
    out = []
    for task, dream in zip(tasks, dreams, strict=True):
        t0 = time.perf_counter()
        clone = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft = get_peft_model(clone, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        peft.eval()
        t1 = time.perf_counter()
        params = [p for p in peft.parameters() if p.requires_grad]
        inner = SimpleNamespace(parameters=params, config=InnerLoopConfig(steps=steps, learning_rate=lr))
        train_adapter(peft, tokenizer, inner, [dream])
        t2 = time.perf_counter()
        after = tau(peft, tokenizer, task)
        t3 = time.perf_counter()
        out.append({"setup": t1 - t0, "train": t2 - t1, "eval": t3 - t2, "tau": after})
        del peft, clone
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="use a tiny locally built model")
    parser.add_argument("--num_tasks", type=int, default=3)
    parser.add_argument("--inner_steps", type=int, default=8)
    parser.add_argument("--inner_lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.tiny:
        from sleep_trl.tiny import cached_tiny

        path = cached_tiny(arch="llama")
    else:
        path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tau = NoContextQA(metric="contains", max_new_tokens=24)
    tasks, dreams = [], []
    for task in demo_tasks(args.num_tasks):
        for dream in dreams_for(task):
            tasks.append(task)
            dreams.append(dream)
    before = [tau(model, tokenizer, t) for t in tasks]
    kw = {"r": args.r, "alpha": 2 * args.r, "steps": args.inner_steps, "lr": args.inner_lr, "seed": 0}

    # Warm-up (first-call allocations), then the measured runs.
    evaluate_dreams(
        model,
        tokenizer,
        tau,
        tasks[:1],
        [[dreams[0]]],
        before[:1],
        InnerLoopConfig(r=args.r, lora_alpha=2 * args.r, steps=1, learning_rate=args.inner_lr),
    )
    t0 = time.perf_counter()
    shared = evaluate_dreams(
        model,
        tokenizer,
        tau,
        tasks,
        [[d] for d in dreams],
        before,
        InnerLoopConfig(r=args.r, lora_alpha=2 * args.r, steps=args.inner_steps, learning_rate=args.inner_lr, seed=0),
    )
    shared_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = copy_per_dream(model, tokenizer, tau, tasks, dreams, **kw)
    naive_total = time.perf_counter() - t0

    params = resolve_importance_parameters(model, ["auto"])
    t0 = time.perf_counter()
    for task, dream in zip(tasks, dreams, strict=True):
        dream_importance(model, tokenizer, [[dream]], tau.sft_examples(tokenizer, task), params)
    importance_per_dream = (time.perf_counter() - t0) / len(dreams)

    n = len(dreams)
    shared_per = shared_total / n
    naive_per = naive_total / n
    table = Table(title=f"Dream reward cost, {n} dreams, {args.inner_steps} inner steps, LoRA r={args.r} ({path})")
    for col in ("method", "s / dream", "of which setup", "inner training", "tau", "relative"):
        table.add_column(col, justify="right" if col != "method" else "left")
    table.add_row(
        "shared base, adapter reset (ours)",
        f"{shared_per:.2f}",
        "–",
        f"{sum(e.train_seconds for e in shared) / n:.2f}",
        f"{sum(e.eval_seconds for e in shared) / n:.2f}",
        "1.00x",
    )
    table.add_row(
        "deep copy + new PEFT model per dream",
        f"{naive_per:.2f}",
        f"{sum(x['setup'] for x in naive) / n:.2f}",
        f"{sum(x['train'] for x in naive) / n:.2f}",
        f"{sum(x['eval'] for x in naive) / n:.2f}",
        f"{naive_per / shared_per:.2f}x",
    )
    table.add_row(
        "importance score (selection)",
        f"{importance_per_dream:.2f}",
        "–",
        "–",
        "–",
        f"{importance_per_dream / shared_per:.2f}x",
    )
    Console(width=max(Console().width, 120)).print(table)
    diff = max(abs(e.tau_after - x["tau"]) for e, x in zip(shared, naive, strict=True))
    print(f"max |tau(shared) - tau(copy)| over dreams: {diff:.3g} (same seed and steps: should be 0)")
    print(f"tau before: {sum(before) / n:.3f}; after one dream (shared): {sum(e.tau_after for e in shared) / n:.3f}")
    peak = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"memory: the copy-per-dream method holds a second {peak:.0f} MiB model per dream; the shared base none.")


if __name__ == "__main__":
    main()
