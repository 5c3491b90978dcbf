"""Baseline: plain sequential LoRA fine-tuning on the embedded world, and how much it forgets.

SmolLM2-135M-Instruct (real, CPU) learns the sessions of the default world one after another with TRL's
`SFTTrainer` and one PEFT LoRA adapter that keeps training (no replay, no consolidation). After each session the
model answers every session's held-out questions closed-book, which fills the accuracy matrix R. This is the
forgetting that Sleep has to beat.

Training text per session: the session's documents (`doc_variants` rewrites per entity) plus its training QA pairs
rendered with the chat template (the evaluation questions are phrased differently and never trained on).

    # the measured default (about 10 minutes on 2 cores shared with other jobs):
    HF_HUB_OFFLINE=1 python benchmarks/baseline_forgetting.py --threads 1
    HF_HUB_OFFLINE=1 python benchmarks/baseline_forgetting.py --epochs 4 --output-dir out/baseline

Prints the base (zero-shot) row, R, average accuracy, BWT, forgetting and the wall time; `--output-dir` also writes
`accuracy_matrix.json` and `accuracy_matrix.png`.

Measured with the defaults (world seed 0: 3 sessions x 24 facts; 5 epochs = 40 steps per session, lr 2e-3, LoRA
r 16 on all linear layers, batch 8; 1 torch thread on 2 cores shared with other jobs): zero-shot 0.00 on every
session; R = [[0.75, 0, 0], [0, 0.92, 0], [0, 0, 0.96]]; average accuracy 0.319, BWT -0.833, forgetting 0.833,
accuracy on new knowledge 0.875; wall 598 s (382 s process CPU time). Each session is learned, then erased by the
next one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model path, or the packaged SmolLM2 name")
    p.add_argument("--sessions", type=int, default=3, help="number of sessions of the world")
    p.add_argument("--facts-per-session", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="world seed (training uses the same seed)")
    p.add_argument("--epochs", type=float, default=5.0, help="passes over each session's training text")
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--metric", default="contains", choices=["contains", "exact_match", "f1"])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a machine shared with other jobs, 1 avoids the\n"
        "slowdown of oversubscribed OpenMP threads",
    )
    p.add_argument("--output-dir", default=None, help="write accuracy_matrix.json / .png here (must not exist)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and out.exists():
        raise SystemExit(f"--output-dir {out} exists; choose a new directory (results are never overwritten).")

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from sleep_trl.assets import resolve_model_path
    from sleep_trl.data import make_world
    from sleep_trl.eval import AccuracyMatrix, ClosedBookQA, save_accuracy_matrix_plot
    from sleep_trl.sleep.data import wake_texts

    hf_logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console()
    start, cpu_start = time.perf_counter(), time.process_time()
    world = make_world(num_sessions=args.sessions, facts_per_session=args.facts_per_session, seed=args.seed)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eval_sets = [s.eval_qa for s in world.sessions]
    qa = ClosedBookQA(metric=args.metric, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    matrix = AccuracyMatrix(num_sessions=args.sessions, metric=args.metric)
    timings = {}

    t = time.perf_counter()
    matrix.evaluate_model(None, model, tokenizer, eval_sets, qa=qa)
    timings["eval_base"] = time.perf_counter() - t
    console.print(f"zero-shot accuracy before training: {[round(x, 3) for x in matrix.base]}")

    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    scratch = tempfile.mkdtemp(prefix="baseline_forgetting_")
    for i, session in enumerate(world.sessions):
        dataset = Dataset.from_dict({"text": wake_texts(session, tokenizer)})
        config = SFTConfig(
            output_dir=scratch,  # nothing is saved there (save_strategy="no")
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_length=256,
            gradient_checkpointing=False,  # 135M parameters fit easily; checkpointing would only cost time
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        t = time.perf_counter()
        result = trainer.train()
        timings[f"train_{i}"] = time.perf_counter() - t
        t = time.perf_counter()
        row = matrix.evaluate_model(i, model, tokenizer, eval_sets, qa=qa)
        timings[f"eval_{i}"] = time.perf_counter() - t
        console.print(
            f"session {i}: {result.global_step} steps, final loss {result.training_loss:.3f}, "
            f"train {timings[f'train_{i}']:.0f}s, R[{i}] = {[round(x, 3) for x in row]}"
        )

    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    matrix.print(console, title="Plain sequential LoRA fine-tuning: accuracy matrix R[i][j]")
    console.print(
        f"settings: epochs {args.epochs}, lr {args.lr}, LoRA r {args.rank} (alpha {2 * args.rank}, all linear), "
        f"batch {args.batch_size}, {len(dataset)} training texts per session, torch threads {torch.get_num_threads()}"
    )
    phases = ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    console.print(f"timings (s): {phases}; wall {wall:.0f}, process CPU time {cpu:.0f}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        matrix.save(out / "accuracy_matrix.json")
        save_accuracy_matrix_plot(matrix, out / "accuracy_matrix.png", title="Plain sequential LoRA")
    return matrix, wall


if __name__ == "__main__":
    main()
