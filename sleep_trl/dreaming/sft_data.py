"""Tokenised SFT examples shared by the inner loop, the importance score and dream rehearsal.

An example is a (prompt, target) pair of strings; the loss covers the target tokens only. A dream sequence is the
pair ("", dream) (every token is learned); a question of tau's data is (rendered question, answer + end marker).
Target text ends with the tokenizer's EOS token unless it already ends with an explicit terminator, so a model
trained on a dream learns where the dream stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model):
    """Eval mode inside the block; afterwards every submodule gets back its own train/eval flag (`model.train(True)`
    would also switch on submodules a caller had deliberately left in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def encode_example(tokenizer, prompt: str, target: str, max_length: int, add_eos: bool = True) -> tuple[list, list]:
    """Token ids and labels (-100 on the prompt) for one (prompt, target) pair, truncated to `max_length` tokens.

    The prompt is tokenised with the tokenizer's special tokens (e.g. a BOS token), the target without, so the
    concatenation is what the model reads at inference; truncation drops the end of the target.
    """
    # An empty prompt still gets the special prefix tokens (e.g. BOS) the tokenizer adds to any text; a prompt rendered
    # by a chat template that already starts with the BOS text does not get a second one.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None and (not target_ids or target_ids[-1] != tokenizer.eos_token_id):
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels


def collate(examples: Sequence[tuple[list, list]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs into `input_ids`, `attention_mask` and `labels` tensors."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[tuple[list, list]], batch_size: int, pad_id: int, device) -> list[dict]:
    """Consecutive batches of at most `batch_size` examples, on `device`."""
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def token_nll_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of the negative log-likelihoods of the labelled tokens of `batch`, and how many there are.

    The causal-LM SFT loss is `sum / count` (over all batches of a set). Computed from the logits rather than through
    the model's `labels=` argument, so the reduction is explicit whatever loss function a model class installs.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((labels != -100).sum())
