"""DreamTrainer on a tiny model with a continuous tau, run by `tests/test_distributed_dream.py` in one process or under
`accelerate launch` (DeepSpeed ZeRO-3, 2 processes) with the same global batch; writes the trained weights
(`save_model`) and the logged dream metrics into OUT.

    python tests/distributed/dream_parity.py OUT PER_DEVICE_BATCH

Dreams are sampled with `top_k=1` (every dream of a context is the greedy one; tokens that decode to nothing but
whitespace are suppressed, so that the random tiny model's dream is text), so both runs dream the same text and
must compute the same importance scores, inner-loop rewards and update.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from sleep_trl.dreaming.passages import demo_tasks
from sleep_trl.tiny import cached_tiny
from sleep_trl.trainers.dream_config import DreamConfig
from sleep_trl.trainers.dream_trainer import DreamTrainer


def answer_log_likelihood(model, tokenizer, task) -> float:
    """tau: mean log-likelihood per token of each reference answer after its question (higher is better)."""
    total, count = 0.0, 0
    for question, answer in zip(task["questions"], task["answers"], strict=True):
        prompt = tokenizer(f"Q: {question}\nA:")["input_ids"]
        target = tokenizer(f" {answer}")["input_ids"]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None])
        total, count = total + logp.sum().item(), count + len(target)
    return total / count


def main(out: str, per_device: int) -> None:
    torch.manual_seed(0)
    path = cached_tiny("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    args = DreamConfig(
        out, num_dreams=4, per_device_train_batch_size=per_device, max_steps=2, max_completion_length=12,
        top_k=1, generation_kwargs={"suppress_tokens": blank}, num_selected_dreams=2, num_random_dreams=0, importance_score="alignment",
        importance_target="context", reward_type="improvement", inner_steps=2, inner_lora_r=2, inner_lora_alpha=4,
        inner_learning_rate=1e-2, learning_rate=1e-3, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, num_dreams_to_print=0, seed=0,
    )  # fmt: skip
    trainer = DreamTrainer(str(path), args=args, train_dataset=Dataset.from_list(demo_tasks(2)),
                           tau=answer_log_likelihood)
    before = trainer.evaluate_tau()
    trainer.train()
    after = trainer.evaluate_tau()
    trainer.save_model(out)
    if trainer.accelerator.is_main_process:
        logs = [{k: v for k, v in h.items() if k.startswith(("dream/", "rest_em/", "loss"))
                 and "seconds" not in k} for h in trainer.state.log_history if "dream/reward_rate" in h]
        Path(out, "dream_metrics.json").write_text(json.dumps({"tau_before": before, "tau_after": after,
                                                               "logs": logs}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
