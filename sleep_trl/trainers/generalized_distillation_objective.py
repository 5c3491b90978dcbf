"""The pure pieces of Knowledge Seeding's objective (paper notes §3), unit-tested against hand-written references.

`GeneralizedDistillationTrainer._compute_loss` puts them together:

    J = E_x[ (1 - alpha) E_{y~student}[r(y)]  -  alpha D_beta(teacher || student)(y | x) ]

- `generalized_jsd`: the divergence D_beta (dense form, for the `prob_mean` teacher mixture; the single-teacher and
  `logit_mean` cases go through TRL's chunked kernel);
- Learning to Imitate: `cut_prefixes` (random prefix cuts of teacher samples), `imitation_rewards`
  (`gamma * r_sem + (1 - gamma) * r_abs`), `group_advantages` (GRPO-style, per group of continuations) and
  `clipped_policy_loss` (the PPO/GRPO clipped surrogate);
- `logit_scale_of`: the logit multiplier a model config declares, under the names TRL's loss reads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..rewards.edit_distance import edit_similarity


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages for rewards of shape `(num_groups, group_size)`: centred per group, optionally / group std."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(dim=-1, keepdim=True) + eps)
    return centred


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    normalizer: torch.Tensor | float,
) -> torch.Tensor:
    """PPO/GRPO clipped surrogate, summed over valid tokens and divided by `normalizer` (token count of the batch).

    `logps`, `old_logps`, `mask`: `(N, T)`; `advantages`: `(N,)` (one per sequence, broadcast over its tokens).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    return (per_token * mask).sum() / normalizer


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalized JSD between student logits and teacher log-probs (both `(N, V)`), TRL's convention.

    `beta = 0`: KL(teacher || student); `beta = 1`: KL(student || teacher); otherwise
    `beta * KL(teacher || m) + (1 - beta) * KL(student || m)` with `m = beta * p_teacher + (1 - beta) * p_student`.
    The teacher log-probs are expected already tempered. Dense: used for the `prob_mean` teacher mixture, which the
    chunked kernel (a single teacher `hidden @ weight`) cannot express.
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = teacher_logprobs.float()
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logaddexp(log_ps + torch.log(torch.tensor(1 - beta)), log_pt + torch.log(torch.tensor(beta)))
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def logit_scale_of(config) -> float:
    """The multiplier a model applies to its logits, under the config names TRL's distillation loss reads."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def cut_prefixes(
    prompt_ids: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    rng: random.Random,
    min_prefix: float,
    max_prefix: float,
) -> tuple[list[list[int]], list[list[int]]]:
    """Cut every teacher sample at a uniform random point between `min_prefix` and `max_prefix` of its length,
    leaving at least one token to imitate. Returns (prompt + prefix, remaining suffix) per sample."""
    prefixes, suffixes = [], []
    for p_ids, target in zip(prompt_ids, targets, strict=True):
        n = len(target)
        lo = int(n * min_prefix)
        hi = min(max(lo, int(n * max_prefix)), max(n - 1, 0))
        cut = rng.randint(min(lo, hi), hi) if n > 0 else 0
        prefixes.append(list(p_ids) + list(target[:cut]))
        suffixes.append(list(target[cut:]))
    return prefixes, suffixes


def imitation_rewards(
    continuations: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    *,
    gamma: float,
    decode: Callable[[Sequence[int]], str],
    judge: Callable[[Sequence[str], Sequence[str]], list[float]] | None,
    max_edit_distance: int | None = None,
    unit: str = "token",
    reference_embeddings=None,
) -> tuple[list[float], list[float]]:
    """`(r_abs, r_sem)` of each continuation against its reference (the teacher's own continuation).

    `r_abs`: 1 minus the normalised Levenshtein distance over token ids (`unit="token"`) or decoded characters
    (`"char"`), zero beyond `max_edit_distance`; `r_sem`: the judge's verdict on the decoded texts (all zeros when
    `gamma` is 0, without calling it). The reward is `gamma * r_sem + (1 - gamma) * r_abs`. With
    `reference_embeddings` (the judge's `embed` of the references, made once) and a judge that has `embed` and
    `compare` (`SemanticJudge`), only the continuations are embedded."""
    texts = [decode(c) for c in continuations] if unit == "char" or gamma > 0.0 else None
    if unit == "char":
        ref_texts = [decode(r) for r in references]
        r_abs = [edit_similarity(c, r, max_edit_distance) for c, r in zip(texts, ref_texts, strict=True)]
    else:
        r_abs = [edit_similarity(c, r, max_edit_distance) for c, r in zip(continuations, references, strict=True)]
    if gamma == 0.0:
        return r_abs, [0.0] * len(continuations)
    if reference_embeddings is not None and hasattr(judge, "embed") and hasattr(judge, "compare"):
        return r_abs, list(judge.compare(judge.embed(texts), reference_embeddings))
    return r_abs, list(judge(texts, [decode(r) for r in references]))


def router_gate_loss(gates: Sequence[torch.Tensor], token_mask: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of one expert's router gates: target 0 on replayed rows, 1 on new rows.

    `gates`: one `(B, L)` tensor per attached layer (`ContinuumMemory.recording_gates`); `token_mask`: `(B, L)`, the
    real tokens; `replay`: `(B,)` bool. Each class is the mean over its tokens and layers; the loss is the mean of the
    classes present (a zero that keeps the graph when neither is)."""
    g = torch.stack(list(gates)).float()  # (layers, B, L)
    valid = token_mask.bool().to(g.device)
    replay = replay.bool().to(g.device)
    terms = []
    for rows, target in ((valid & replay[:, None], 0.0), (valid & ~replay[:, None], 1.0)):
        if rows.any():
            chosen = g[:, rows]
            terms.append(F.binary_cross_entropy(chosen, torch.full_like(chosen, target)))
    if not terms:
        return g.sum() * 0.0
    return sum(terms) / len(terms)
