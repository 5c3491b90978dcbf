"""Batched generation with transformers' `generate`: the one path the evaluation, tau, dreams and teacher samples use.

Prompts are token-id lists (or strings, tokenized here); they are sorted by length so each batch pads little, left
padded (the last prompt token of every row sits at the same position, as `generate` with a KV cache needs), and
generated `batch_size` at a time. Results come back in the input order, without the prompt, cut after the first
end-of-sequence token. The model's train/eval mode is restored afterwards.

Runs under `torch.no_grad()` rather than `torch.inference_mode()`: tensors made under inference mode can never take
part in autograd again, and under DeepSpeed ZeRO-3 the parameters gathered for generation would become such tensors
(the next `requires_grad_(True)` on them fails).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS token; a clear error when it has neither."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("The tokenizer has neither a pad token nor an EOS token: set `tokenizer.pad_token`.")


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a model without parameters (never in practice): run on CPU
        return torch.device("cpu")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id rows, left padded to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            input_ids[i, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    cut = next((i for i, t in enumerate(row) if t in eos), None)
    return row if cut is None else row[: cut + 1]


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 16,
    eos_token_ids: Sequence[int] | None = None,
    synced_gpus: bool = False,
    **generate_kwargs,
) -> list[list[int]]:
    """Completions (token ids after the prompt, up to and including the first EOS) of every prompt.

    Args:
        model: a transformers causal LM (plain, PEFT-wrapped, or carrying a continuum memory).
        prompt_ids: one token-id list per prompt.
        pad_id: the padding id (`pad_token_id(tokenizer)`).
        batch_size: prompts per `generate` call.
        eos_token_ids: ids that end a completion; default the model's generation config's.
        synced_gpus: keep every process generating until all are done (DeepSpeed ZeRO-3: each step gathers the
            parameters collectively); every process must then make the same number of calls.
        generate_kwargs: passed to `model.generate` (`max_new_tokens`, `do_sample`, `temperature`, a
            `generation_config`, ...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("An empty prompt cannot be continued: every prompt needs at least one token.")
    if eos_token_ids is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    eos_set = set(eos_token_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in prompt_ids]
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in idx], pad_id)
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                pad_token_id=pad_id,
                synced_gpus=synced_gpus,
                **generate_kwargs,
            )
            width = input_ids.size(1)
            rows = generated[:, width:].cpu().tolist()
            copies = len(rows) // len(idx)  # num_return_sequences > 1 gives consecutive copies per prompt
            for j, i in enumerate(idx):
                out[i] = [_cut_at_eos(rows[j * copies + c], eos_set) for c in range(copies)]
                if copies == 1:
                    out[i] = out[i][0]
    finally:
        model.train(was_training)
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of already rendered prompt strings."""
    return [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]


def cache_keyword(model) -> str:
    """The keyword `model`'s forward and `generate` take a KV cache by: `cache` in recent transformers,
    `past_key_values` in older ones (the vLLM environment pins one), read from the model class's signature."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


@torch.no_grad()
def prefill_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """A KV cache holding every position but the last of left-padded prompts, for `generate(..., **returned)` to
    continue from (it then feeds only the last prompt token). Position ids are made as `generate` makes them, so the
    cache is exactly what `generate` would have computed; the head runs on one position only. Repeat or reorder the
    cache along the batch (`reorder_cache(index)`) to sample several rows from one read of a prompt. Needs prompts
    at least 2 tokens wide."""
    if input_ids.size(1) < 2:
        raise ValueError("prefill_cache needs prompts of at least 2 positions (the last one is left to `generate`).")
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
          use_cache=True, logits_to_keep=1, **{keyword: cache})
    return {keyword: cache}


@torch.no_grad()
def sample_continuations(
    model,
    prefixes: Sequence[Sequence[int]],
    num: int,
    *,
    pad_id: int,
    eos_token_ids: Sequence[int],
    generation_config,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """`num` continuations of every prefix, the prefix read once: one forward fills the KV cache for the prefixes
    (all but their last token, `prefill_cache`), the cache is repeated `num` times along the batch, and `generate`
    samples from there. `generate(num_return_sequences=num)` would re-read each prefix `num` times (on a CPU, where
    generation is compute-bound, that is most of the cost of Learning to Imitate's rollouts). Returns
    `len(prefixes) * num` completions, the `num` of a prefix consecutive, each cut after its first EOS."""
    device = model_device(model)
    if generation_config.pad_token_id is None:
        generation_config = copy.deepcopy(generation_config)
        generation_config.pad_token_id = pad_id
    input_ids, attention_mask = left_pad(prefixes, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        kwargs = {}
        if input_ids.size(1) > 1:
            kwargs = prefill_cache(model, input_ids, attention_mask)
            next(iter(kwargs.values())).batch_repeat_interleave(num)
        out = model.generate(
            input_ids=input_ids.repeat_interleave(num, 0), attention_mask=attention_mask.repeat_interleave(num, 0),
            generation_config=generation_config, synced_gpus=synced_gpus, **kwargs,
        )
    finally:
        model.train(was_training)
    eos = set(eos_token_ids)
    return [_cut_at_eos(row, eos) for row in out[:, input_ids.size(1) :].cpu().tolist()]
