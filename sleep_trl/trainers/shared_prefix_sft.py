"""`SharedPrefixSFTTrainer`: TRL's `SFTTrainer`, reading the prefix every row of a batch shares once.

Chat-formatted training rows start alike: the template's header and the system prompt (SmolLM2's default system
prompt makes 24 of a 46-token embedded-world question/answer row; an empty one leaves the 8-token header). A padded
batch runs that prefix once per row. Here a
batch whose rows share their first `n` tokens (same ids, same labels, no padding) runs in two forwards:

    prefix:  tokens [0, n-1) of one row          -> KV cache, and the loss of the tokens it predicts (x rows)
    rows:    tokens [n-1, L) of every row, attending to the prefix's cache (repeated along the batch)

The last shared token is left to the rows so that every target the prefix forward predicts is shared. Each row's
tokens see exactly the keys and values they would see in a row of their own (same positions, causal mask), the
prefix's loss is counted once per row and its gradient flows back from every row through the cache, so loss and
gradients are those of the plain forward to float rounding (tested to 1e-5). Both forwards go through TRL's fused
LM head (`fused_lm_head=True`), the same kernel and metrics as `SFTTrainer`.

Written here because neither TRL nor transformers shares a prefix across a training batch: TRL's packing
(`padding_free`) removes padding but still runs every row's prefix, and prefix caching in vLLM is inference-only.
Used only where it is exact and simple: one process without DeepSpeed/FSDP (a second forward of a wrapped model per
step is not what those wrappers expect), no gradient checkpointing, padded (not padding-free) batches of plain
`input_ids`/`labels`/`attention_mask`, in training. Any other batch takes `SFTTrainer`'s own path.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import DynamicCache
from trl import SFTTrainer

from ..generation.hf import cache_keyword
from .shared_prefix import MIN_SHARED_TOKENS, shared_prefix_length, sharing_applies

_PLAIN_KEYS = {"input_ids", "labels", "attention_mask", "use_cache"}


class SharedPrefixSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose training batches run the prefix their rows share once (see the module docstring).

    Args:
        share_prefix: use the shared-prefix path where it applies (`False`: exactly `SFTTrainer`).
        *args, **kwargs: `SFTTrainer`'s.

    `shared_prefix_stats` counts the batches and tokens: `batches`, `shared_batches`, `tokens` (the batch's real
    tokens) and `tokens_run` (what the forwards read)."""

    _tag_names: ClassVar[list[str]] = ["trl", "sft", "sleep-trl"]
    _name = "SFT"

    def __init__(self, *args, share_prefix: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.share_prefix = share_prefix
        self.shared_prefix_stats = {"batches": 0, "shared_batches": 0, "tokens": 0, "tokens_run": 0}

    def _sharing_applies(self, inputs) -> bool:
        return (
            self.share_prefix
            and sharing_applies(self)
            and not self.aux_loss_enabled
            and set(inputs) <= _PLAIN_KEYS
            and inputs["input_ids"].size(0) > 1
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        shared = 0
        if not return_outputs and self._sharing_applies(inputs):
            shared = shared_prefix_length(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]) - 1
        loss = None
        if shared >= MIN_SHARED_TOKENS:
            loss = self._shared_prefix_loss(model, inputs, shared, num_items_in_batch)
        self._count_batch(inputs, shared if loss is not None else 0)
        if loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return loss

    def _count_batch(self, inputs, shared: int) -> None:
        """`shared_prefix_stats` of one training batch (`shared`: the prefix its forwards read once, 0 if none)."""
        if not self.model.training:
            return
        stats = self.shared_prefix_stats
        rows, width = inputs["input_ids"].shape
        stats["batches"] += 1
        stats["shared_batches"] += int(shared > 0)
        stats["tokens"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else rows * width
        stats["tokens_run"] += rows * width - (rows - 1) * shared

    def _shared_prefix_loss(self, model, inputs, shared: int, num_items_in_batch):
        """The batch's mean token NLL with its first `shared` tokens run once (`shared` = common length - 1); None
        when the model filled no cache from the prefix (layers that drop it, e.g. under activation checkpointing
        switched on where `sharing_applies` cannot see it): the caller then runs SFT's own loss."""
        ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
        rows = ids.size(0)
        unwrapped = self.accelerator.unwrap_model(model)
        cache = DynamicCache(config=unwrapped.config)
        keyword = cache_keyword(unwrapped)  # `cache` or `past_key_values`, by transformers version
        # Position t predicts token t + 1: the prefix predicts tokens 1..shared (all shared), the rows the rest.
        prefix = model(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], **{keyword: cache},
                       shift_labels=labels[:1, 1 : shared + 1], fused_lm_head=True)
        if cache.get_seq_length() != shared:
            return None
        cache.batch_repeat_interleave(rows)
        tail_labels = torch.cat([labels[:, shared + 1 :], labels.new_full((rows, 1), -100)], dim=1)
        tail = model(input_ids=ids[:, shared:], attention_mask=mask, **{keyword: cache}, shift_labels=tail_labels,
                     fused_lm_head=True)
        nll = -(rows * prefix.log_probs.sum() + tail.log_probs.sum())
        num_valid = rows * prefix.label_mask.sum() + tail.label_mask.sum()
        num_tokens = num_valid if num_items_in_batch is None else num_items_in_batch
        loss = nll / torch.as_tensor(num_tokens).clamp(min=1)
        self._log_shared_metrics(prefix, tail, rows, num_valid, mask)
        return loss

    def _log_shared_metrics(self, prefix, tail, rows: int, num_valid, mask) -> None:
        """`SFTTrainer`'s own training metrics (entropy, token accuracy, tokens seen), prefix counted per row."""
        metrics = self._metrics["train"]
        with torch.no_grad():
            entropy = rows * prefix.entropy.sum() + tail.entropy.sum()
            correct = rows * prefix.is_top1.sum() + tail.is_top1.sum()
            valid = max(int(num_valid), 1)
            metrics["entropy"].append((entropy / valid).item())
            metrics["mean_token_accuracy"].append((correct / valid).item())
        self._total_train_tokens += int(mask.sum())
        metrics["num_tokens"] = [self._total_train_tokens]
