"""A prefix every row of a batch shares, run once: the pure pieces.

Chat-formatted rows start alike (the template's header and system prompt: with SmolLM2's default system prompt 24 of
a 46-token embedded-world question/answer row, with an empty one the 8-token header). Both paths here read that
prefix once into a KV cache, repeat the cache along the batch, and run each row's remaining tokens after it:
`SharedPrefixSFTTrainer` for right-padded SFT rows (the wake), `last_hidden_shared_prefix` for `[left-padded prompt
| completion]` rows (the student's forward in a sleep). Written here because neither TRL nor transformers shares a
prefix across a training batch (TRL's `padding_free` removes padding but still runs every row's prefix; prefix
caching in vLLM is inference-only).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

# Below this many shared tokens the second forward's fixed cost outweighs what sharing saves.
MIN_SHARED_TOKENS = 4


def sharing_applies(trainer) -> bool:
    """Where a prefix may be read once for a whole batch: one process without DeepSpeed/FSDP (a second forward of a
    wrapped model per step is not what those wrappers expect), no activation checkpointing, in training.

    Checkpointing is read off the model as well as the trainer's arguments: a model another trainer enabled it on
    (`SleepCallback` consolidates the user's `SFTTrainer` model, and TRL's `SFTConfig` turns checkpointing on by
    default) runs its layers with `use_cache=False` in training, so a prefix forward fills no cache and the rows
    after it would silently attend to nothing."""
    args = trainer.args
    # transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name an alias)
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = args.gradient_checkpointing
    # the layers' own flag: `is_gradient_checkpointing` is deprecated in 5.2x, and a PEFT wrapper hides neither
    checkpointing = checkpointing or any(getattr(m, "gradient_checkpointing", False) is True
                                         for m in trainer.model.modules())
    return (
        trainer.model.training
        and trainer.accelerator.num_processes == 1
        and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or checkpointing)
    )


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the prefix every row of a right-padded batch shares: same token ids, same labels, no padding."""
    same = (input_ids == input_ids[:1]) & (labels == labels[:1]) & attention_mask.bool()
    diverged = (~same.all(dim=0)).nonzero()
    return int(diverged[0]) if len(diverged) else input_ids.size(1)


def last_hidden_shared_prefix(backbone, input_ids, attention_mask, logits_to_keep: int, keyword: str,
                              min_shared: int = MIN_SHARED_TOKENS):
    """TRL's `_get_last_hidden_state` (the backbone's last hidden states before each of the last `logits_to_keep`
    tokens) for rows `[left-padded prompt | right-padded completion]` whose real tokens start alike, the shared
    prefix read once; None when fewer than `min_shared` tokens are shared (run the plain forward then).

    The prefix (the common real tokens, short of the last `logits_to_keep + 1` positions of every row) runs once
    into a KV cache repeated along the batch; each row's remaining tokens follow it, left-padded again, at positions
    that keep every distance to the prefix (rotary attention depends only on those), so the hidden states are the
    plain forward's to float rounding and gradients flow back into the prefix from every row."""
    rows, width = input_ids.shape
    mask = attention_mask.bool()
    starts = (~mask).long().cumprod(dim=1).sum(dim=1)  # left padding per row
    # real tokens may be shared up to the shortest row's start of the kept positions
    limit = int((width - logits_to_keep - 1 - starts).min())
    if rows < 2 or limit < min_shared:
        return None
    index = starts[:, None] + torch.arange(limit, device=input_ids.device)
    head = input_ids.gather(1, index)
    same = ((head == head[:1]) & mask.gather(1, index)).all(dim=0)
    shared = int((~same).nonzero()[0]) if not bool(same.all()) else limit
    if shared < min_shared:
        return None
    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=input_ids[:1, int(starts[0]) : int(starts[0]) + shared], **{keyword: cache}, use_cache=True)
    if cache.get_seq_length() != shared:  # the model declined to fill the cache (see `sharing_applies`)
        return None
    cache.batch_repeat_interleave(rows)
    rest = width - starts - shared  # each row's tokens after the prefix (completion padding included)
    tail = int(rest.max())
    cols = torch.arange(tail, device=input_ids.device)
    real = cols[None, :] >= (tail - rest)[:, None]
    tail_ids = input_ids[:, width - tail :].masked_fill(~real, 0)
    tail_mask = mask[:, width - tail :] & real
    positions = (shared + (cols[None, :] - (tail - rest)[:, None])).clamp(min=shared)
    full_mask = torch.cat([mask.new_ones(rows, shared), tail_mask], dim=1).long()
    hidden = backbone(input_ids=tail_ids, attention_mask=full_mask, position_ids=positions, **{keyword: cache},
                      use_cache=True).last_hidden_state
    return hidden[:, :-1][:, -logits_to_keep:]
