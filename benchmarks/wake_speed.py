"""A wake step with and without the shared prefix (`SharedPrefixSFTTrainer`), interleaved, on the main job's model.

Builds the main job's model with its memory as the cycle does for session `k`'s wake (SmolLM2-135M-Instruct, the
fast expert unlocked and trainable, the `k` earlier sessions' slow experts unlocked and frozen), lays out the wake's
batches as the cycle does (`length_grouped_order`), and times the forward and backward of each batch on both paths,
alternating which goes first, with no optimizer step (the model never changes, so both paths see the same weights
and batches). Prints the seconds per arm, their ratio, the tokens each arm's forwards read, and the largest loss
difference:

    python benchmarks/wake_speed.py --sessions 0 1 2 --batches 12 --threads 2

On 2 cores time one benchmark at a time; with another job running, both arms slow alike (interleaved), so the ratio
still holds roughly while the seconds do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from datasets import Dataset
from rich.console import Console
from rich.table import Table

from sleep_trl.assets import resolve_model_path
from sleep_trl.memory import attach_memory
from sleep_trl.sleep.config import SleepConfig
from sleep_trl.sleep.cycle import SleepCycle, load_config_stream
from sleep_trl.sleep.data import length_grouped_order
from sleep_trl.trainers.shared_prefix_sft import SharedPrefixSFTTrainer


def wake_setup(session: int, out: str):
    """The cycle's model, memory and wake trainer arguments before session `session`'s wake."""
    cfg = SleepConfig(model_name_or_path="smollm2-135m-instruct", output_dir=out)
    cycle = SleepCycle(cfg)
    cycle.stream = load_config_stream(cfg)
    cycle.model_path = resolve_model_path(cfg.model_name_or_path)
    cycle.tokenizer, cycle.model = cycle._load_model()
    cycle.memory = attach_memory(cycle.model, cycle._memory_config())
    for _ in range(session):  # earlier sessions' slow experts, consolidated (frozen)
        cycle.memory.expand("slow")
    cycle.memory.freeze_all_but(cycle._wake_parameters())
    texts = cycle._wake_texts(session)
    args = cfg.phase_config("wake_args", output_dir=out, seed=0, max_steps=1, run_name="bench")
    return cycle, texts, args


def batches(trainer, texts, args, count: int):
    rows = trainer.train_dataset
    per = args.per_device_train_batch_size
    lengths = [len(r["input_ids"]) for r in rows]
    order = length_grouped_order(lengths, count * per, per, 0)
    collate = trainer.data_collator
    return [collate([rows[i] for i in order[b : b + per]]) for b in range(0, count * per, per)]


def step(trainer, inputs) -> tuple[float, float]:
    trainer.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return time.perf_counter() - start, loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[0])
    parser.add_argument("--batches", type=int, default=12, help="wake batches timed per session and arm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    table = Table(title="wake forward+backward per batch: SFTTrainer path against the shared prefix")
    for col in ("session", "batches", "plain s", "shared s", "plain / shared", "tokens plain", "tokens shared",
                "max |loss diff|"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as out:
        for k in args.sessions:
            cycle, texts, wake_args = wake_setup(k, out)
            data = Dataset.from_dict({"text": texts})
            arms = {share: SharedPrefixSFTTrainer(model=cycle.model, args=wake_args, train_dataset=data,
                                                  processing_class=cycle.tokenizer, share_prefix=share)
                    for share in (False, True)}
            for t in arms.values():
                t.model.train()
            seconds = {False: [], True: []}
            diff = 0.0
            for i, inputs in enumerate(batches(arms[True], texts, wake_args, args.batches)):
                losses = {}
                for share in ((False, True) if i % 2 == 0 else (True, False)):
                    s, losses[share] = step(arms[share], inputs)
                    seconds[share].append(s)
                diff = max(diff, abs(losses[True] - losses[False]))
            plain, shared = sum(seconds[False]), sum(seconds[True])
            table.add_row(str(k), str(args.batches), f"{plain:.1f}", f"{shared:.1f}", f"{plain / shared:.2f}x",
                          str(arms[False].shared_prefix_stats["tokens_run"]),
                          str(arms[True].shared_prefix_stats["tokens_run"]), f"{diff:.1e}")
            console.print(f"session {k}: median batch {statistics.median(seconds[False]):.2f} s plain, "
                          f"{statistics.median(seconds[True]):.2f} s shared")
    console.print(table)


if __name__ == "__main__":
    main()
