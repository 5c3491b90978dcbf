"""Gradient-based dream importance and top-k + b-random selection, against hand-computed references."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sleep_trl.dreaming.selection import (
    dream_importance,
    resolve_importance_parameters,
    select_dreams,
)
from sleep_trl.tiny import build_model, build_tokenizer

CONTEXT = "The town of Velmora was founded by the glassmaker Idra Kestrel on the river Ostrel."
DREAMS = [
    ["Monday Tuesday Wednesday Thursday"],
    [CONTEXT],  # identical to the target text: gradient alignment exactly 1
    ["Idra Kestrel founded Velmora.", "Velmora lies on the river Ostrel."],
    ["red orange yellow green blue purple violet"],
    [],  # empty dream: no score
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer, seed=0)


def reference_gradient(model, tokenizer, texts, names):
    """Hand reference: the model's own mean causal-LM loss over all tokens of `texts` (each + EOS), one batch."""
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    params = dict(model.named_parameters())
    grad = torch.cat([params[n].grad.reshape(-1) for n in names])
    model.zero_grad(set_to_none=True)
    return grad


def test_auto_parameters_are_last_mlp_down_proj_and_final_norm(model, tokenizer):
    names = [n for n, _ in resolve_importance_parameters(model, ["auto"])]
    assert names == ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    regex = [n for n, _ in resolve_importance_parameters(model, [r"layers\.0\.self_attn\.q_proj"])]
    assert regex == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        resolve_importance_parameters(model, ["no_such_parameter"])


def test_auto_parameters_under_peft_skip_adapter_weights(tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_model(tokenizer, seed=1), LoraConfig(r=2, target_modules=["down_proj"]))
    names = [n for n, _ in resolve_importance_parameters(peft_model, ["auto"])]
    assert names == [
        "base_model.model.model.layers.1.mlp.down_proj.base_layer.weight",
        "base_model.model.model.norm.weight",
    ]


@pytest.mark.parametrize("score", ["alignment", "dot", "grad_norm"])
def test_importance_matches_hand_computed_scores(model, tokenizer, score):
    params = resolve_importance_parameters(model, ["auto"])
    names = [n for n, _ in params]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    scores = dream_importance(model, tokenizer, DREAMS, [("", CONTEXT)], params, score=score)

    target = reference_gradient(model, tokenizer, [CONTEXT], names)
    expected = []
    for dream in DREAMS:
        if not dream:
            expected.append(math.nan)
            continue
        g = reference_gradient(model, tokenizer, dream, names)
        expected.append(
            {
                "alignment": float(torch.nn.functional.cosine_similarity(g, target, dim=0)),
                "dot": float(g @ target),
                "grad_norm": float(g.norm()),
            }[score]
        )
    assert math.isnan(scores[-1])
    assert scores[:-1] == pytest.approx(expected[:-1], rel=1e-4, abs=1e-6)
    # The policy is untouched: same weights, same flags, no stored gradients.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_identical_dream_is_perfectly_aligned_and_selected_first(model, tokenizer):
    params = resolve_importance_parameters(model, ["auto"])
    scores = dream_importance(model, tokenizer, DREAMS, [("", CONTEXT)], params, score="alignment")
    assert scores[1] == pytest.approx(1.0, abs=1e-5)
    keep = select_dreams(torch.tensor([scores]), num_top=1, num_random=0)
    assert keep.tolist() == [[False, True, False, False, False]]
    # Top-2 is the hand-ranked pair of the two highest cosines.
    ranked = sorted(range(4), key=lambda i: -scores[i])[:2]
    keep2 = select_dreams(torch.tensor([scores]), num_top=2, num_random=0)
    assert sorted(torch.nonzero(keep2[0]).flatten().tolist()) == sorted(ranked)


def test_select_top_k_plus_random():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3, 0.7, 0.2],
            [0.4, 0.4, math.nan, 0.8, 0.0, 0.4],  # ties go to the earlier dream; NaN never kept
        ]
    )
    keep = select_dreams(scores, num_top=2, num_random=0)
    assert keep.tolist() == [
        [False, True, False, False, True, False],
        [True, False, False, True, False, False],
    ]
    keep = select_dreams(scores, num_top=2, num_random=2, generator=torch.Generator().manual_seed(0))
    assert keep.sum(dim=1).tolist() == [4, 4]
    assert keep[0, 1] and keep[0, 4] and keep[1, 3] and keep[1, 0]  # the top-2 always stay
    assert not keep[1, 2]
    # Same seed, same random picks; the random picks come from the rest only.
    again = select_dreams(scores, num_top=2, num_random=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    # With k=0 and b random, exactly b are drawn among the scored dreams.
    only_random = select_dreams(scores, num_top=0, num_random=3, generator=torch.Generator().manual_seed(1))
    assert only_random.sum(dim=1).tolist() == [3, 3] and not only_random[1, 2]
    # No selection (k=None): every scored dream is kept.
    assert select_dreams(scores, None, 0).tolist() == (~torch.isnan(scores)).tolist()
