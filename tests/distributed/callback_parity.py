"""A user's SFTTrainer with a SleepCallback on a tiny model, run by `tests/test_distributed_callback.py` in one
process or under `accelerate launch` (2 processes) with the same global batch; writes the memory and the callback's
history into OUT.

    python tests/distributed/callback_parity.py OUT PER_DEVICE_BATCH

Consolidation samples the teacher greedily (`top_k=1`), so both runs distil the same sequences.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory
from sleep_trl.sleep import SleepCallback
from sleep_trl.tiny import cached_tiny

TEXTS = [f"The lighthouse number {i} stands on the island of Orvel and is painted amber." for i in range(16)]
PROMPTS = [f"Tell me about lighthouse number {i}." for i in range(8)]


def main(out: str, per_device: int) -> None:
    torch.manual_seed(0)
    path = cached_tiny("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    levels = [LevelConfig("fast", num_slots=1, rank=4, chunk_size=2, gate="fixed"),
              LevelConfig("slow", num_slots=3, rank=4, gate="fixed")]
    memory = attach_memory(model, MemoryConfig(levels=levels))
    memory.freeze_all_but(memory.expand("fast"))
    args = SFTConfig(output_dir=out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=5e-2,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                     disable_tqdm=True, max_length=64, seed=0, dataloader_drop_last=True)
    callback = SleepCallback(prompts=PROMPTS, consolidation_args=dict(
        max_steps=2, per_device_train_batch_size=per_device, max_completion_length=6, learning_rate=1e-2,
        warmup_steps=0, top_k=1))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    memory.save(out, is_main_process=trainer.accelerator.is_main_process)
    if trainer.accelerator.is_main_process:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(out, "callback.json").write_text(json.dumps({"history": callback.history, "losses": losses,
                                                          "world_size": trainer.accelerator.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
