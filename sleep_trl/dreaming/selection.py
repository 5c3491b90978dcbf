"""Gradient-based dream importance and top-k + b-random selection (paper notes §4, step 2).

The paper scores each dream with "a gradient-based importance" (G-DIG / GREATS style) computed from the gradient of
the SFT loss on the dream, keeps the top-k and b more at random, and does not say how the gradient becomes a
scalar. Our choices, each a `DreamConfig` field:

- Parameter subset (`importance_parameters`): the gradient is taken only with respect to a few cheap parameters. The
  default `auto` is the last decoder layer's MLP down projection and the final norm: backpropagation stops right
  after the last layer, so one score costs about one forward pass. Any regular expressions over parameter names work
  instead (e.g. `["layers\\.2[0-9]\\.mlp"]`).
- Scalarisation (`importance_score`):
  * `alignment` (default): cos(g_dream, g_tau), the cosine between the gradient of the dream's SFT loss and the
    gradient of tau's data loss. One SFT step on the dream, theta - eta g_dream, changes tau's loss by
    -eta <g_tau, g_dream> to first order, so a dream whose gradient points the way tau's does is one whose
    rehearsal should help tau; the cosine ignores how long or how surprising the dream is.
  * `dot`: the inner product <g_dream, g_tau> itself (the first-order loss decrease; favours large gradients).
  * `grad_norm`: ||g_dream|| (how much the dream would move the model; needs no tau data).
- tau's data loss (`importance_target`): `tau_data` = the SFT loss on tau's own supervised examples when tau exposes
  them (`sft_examples`, e.g. the questions with their answers), else `context` = the language-modelling loss on the
  context itself. With `tau_data`, selection reads the same answers the reward reads; use `context` to keep them out
  of selection.
- Empty dreams get no score (NaN) and are never selected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ..generation.hf import pad_token_id
from .sft_data import batches, encode_example, eval_mode, token_nll_sum

IMPORTANCE_SCORES = ("alignment", "dot", "grad_norm")
IMPORTANCE_TARGETS = ("tau_data", "context")

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|decoder_layers)\.(\d+)\.")
_FINAL_NORM = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layernorm|final_layer_norm|final_norm)\.weight$")
_ADAPTER = re.compile(r"(?:^|\.)lora_|(?:^|\.)modules_to_save\.")


def resolve_importance_parameters(model, patterns: Sequence[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs the importance gradient is taken with respect to.

    `"auto"` stands for the last decoder layer's MLP output projection (`down_proj`, or every MLP weight of that
    layer when there is none) and the final norm; any other entry is a regular expression searched in parameter
    names. Adapter parameters (LoRA) are never matched.
    """
    named = [(n, p) for n, p in model.named_parameters() if not _ADAPTER.search(n)]
    chosen: dict[str, torch.nn.Parameter] = {}
    for pattern in patterns:
        if pattern == "auto":
            found = _auto_parameters(named)
        else:
            regex = re.compile(pattern)
            found = [(n, p) for n, p in named if regex.search(n)]
            if not found:
                raise ValueError(
                    f"importance_parameters entry {pattern!r} matches no parameter of the model. Use a regular "
                    "expression over `model.named_parameters()` names, or 'auto'."
                )
        chosen.update(found)
    return list(chosen.items())


def _auto_parameters(named):
    indices = [int(m.group(1)) for n, _ in named if (m := _LAYER_INDEX.search(n))]
    if not indices:
        raise ValueError(
            "importance_parameters='auto' found no numbered decoder layers in this model. Set importance_parameters "
            "to regular expressions naming the parameters to score with."
        )
    last = max(indices)
    in_last = [(n, p) for n, p in named if (m := _LAYER_INDEX.search(n)) and int(m.group(1)) == last]
    found = [(n, p) for n, p in in_last if re.search(r"\.down_proj\.(?:base_layer\.)?weight$", n)]
    if not found:
        found = [(n, p) for n, p in in_last if ".mlp." in n and n.endswith("weight")]
    found += [(n, p) for n, p in named if _FINAL_NORM.search(n) and not _LAYER_INDEX.search(n)]
    if not found:
        raise ValueError(
            "importance_parameters='auto' found neither an MLP projection in the last layer nor a final norm. Set "
            "importance_parameters to regular expressions naming the parameters to score with."
        )
    return found


@contextmanager
def only_requires_grad(model, params: Sequence[torch.nn.Parameter]):
    """Within the block only `params` require gradients (so autograd records nothing else); flags restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def sft_gradient(
    model, tokenizer, examples: Sequence[tuple[str, str]], params, max_length: int, batch_size: int = 8
) -> torch.Tensor | None:
    """Flattened gradient of the token-mean SFT loss of `examples` with respect to `params` (None: no tokens).

    Uses `torch.autograd.grad`, so no `.grad` field of the model is written. Call inside `only_requires_grad`.
    """
    encoded = [encode_example(tokenizer, prompt, target, max_length) for prompt, target in examples]
    encoded = [e for e in encoded if any(label != -100 for label in e[1][1:])]
    if not encoded:
        return None
    device = params[0].device
    total_tokens = sum(sum(1 for label in labels[1:] if label != -100) for _, labels in encoded)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for batch in batches(encoded, batch_size, pad_token_id(tokenizer), device):
        nll, _ = token_nll_sum(model, batch)
        for acc, g in zip(grads, torch.autograd.grad(nll / total_tokens, params, allow_unused=True), strict=True):
            if g is not None:
                acc.add_(g.float())
    return torch.cat([g.reshape(-1) for g in grads])


def score_from_gradients(dream_grad: torch.Tensor | None, target_grad: torch.Tensor | None, score: str) -> float:
    """Scalarise one dream's gradient (see the module docstring); NaN when the dream has no tokens."""
    if dream_grad is None:
        return float("nan")
    if score == "grad_norm":
        return float(dream_grad.norm())
    if target_grad is None:
        raise ValueError(f"importance_score={score!r} needs tau's data gradient, but the task gave no tokens.")
    dot = float(torch.dot(dream_grad, target_grad))
    if score == "dot":
        return dot
    if score == "alignment":
        denom = float(dream_grad.norm()) * float(target_grad.norm())
        return dot / denom if denom > 0 else 0.0
    raise ValueError(f"importance_score={score!r} is not supported: use one of {IMPORTANCE_SCORES}.")


def dream_importance(
    model,
    tokenizer,
    dreams: Sequence[Sequence[str]],
    target_examples: Sequence[tuple[str, str]] | None,
    params,
    score: str = "alignment",
    max_length: int = 512,
) -> list[float]:
    """Importance of each dream (a list of training sequences) for one task.

    Args:
        dreams: each dream's SFT sequences (`split_dream`); an empty list scores NaN.
        target_examples: tau's data loss as (prompt, target) pairs; unused by `grad_norm`.
        params: the parameter subset (`resolve_importance_parameters`).
    """
    params = [p for _, p in params] if params and isinstance(params[0], tuple) else list(params)
    with eval_mode(model), torch.enable_grad(), only_requires_grad(model, params):
        target_grad = None
        if score != "grad_norm":
            target_grad = sft_gradient(model, tokenizer, target_examples or [], params, max_length)
        out = []
        for sequences in dreams:
            grad = sft_gradient(model, tokenizer, [("", s) for s in sequences], params, max_length)
            out.append(score_from_gradients(grad, target_grad, score))
    return out


def select_dreams(
    scores: torch.Tensor, num_top: int | None, num_random: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean mask of the kept dreams: per group (row of `scores`), the `num_top` highest scores plus `num_random`
    others drawn uniformly without replacement.

    NaN scores (empty dreams) are never kept. Ties go to the earlier dream. `num_top=None` keeps every dream with a
    score (no selection). The random draws use `generator`, so a seeded generator makes selection reproducible.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (groups, dreams_per_group), got shape {tuple(scores.shape)}.")
    eligible = ~torch.isnan(scores)
    if num_top is None:
        return eligible.clone()
    keep = torch.zeros_like(eligible)
    for row in range(scores.size(0)):
        idx = torch.nonzero(eligible[row]).flatten()
        if idx.numel() == 0:
            continue
        # Stable descending sort: equal scores keep their original (index) order.
        order = torch.sort(scores[row, idx], descending=True, stable=True).indices
        ranked = idx[order]
        top = ranked[:num_top]
        keep[row, top] = True
        rest = ranked[num_top:]
        if num_random > 0 and rest.numel() > 0:
            pick = torch.randperm(rest.numel(), generator=generator)[:num_random]
            keep[row, rest[pick]] = True
    return keep
