"""The dream reward's inner loop: isolation of the policy, exact 1/0 rewards, no leakage between dreams."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sleep_trl.dreaming.inner_loop import (
    InnerLoopConfig,
    IsolatedAdapter,
    compute_reward,
    evaluate_dreams,
    train_adapter,
)
from sleep_trl.dreaming.sft_data import collate, encode_example, token_nll_sum
from sleep_trl.dreaming.tau import NoContextQA
from sleep_trl.tiny import build_model

QUESTION = "Who founded Velmora?"
ANSWER = "Idra Kestrel"
TASK = {"context": "Velmora was founded by Idra Kestrel.", "questions": [QUESTION], "answers": [[ANSWER]]}


@pytest.fixture(scope="module")
def tau():
    # Plain prompt, so the dream below is literally what tau asks plus the answer.
    return NoContextQA(
        metric="exact_match",
        prompt_template="Question: {question}\nAnswer:",
        use_chat_template=False,
        max_new_tokens=16,
    )


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [n for n, _ in model.named_modules()],
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "ids": [id(p) for p in model.parameters()],
    }


def assert_identical(before, after):
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["flags"] == before["flags"]
    assert after["modes"] == before["modes"]
    assert after["ids"] == before["ids"]


def _logits(model, tiny_tokenizer):
    enc = tiny_tokenizer(["Question: who? Answer: the lazy dog"], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _plain(tiny_tokenizer):
    return build_model(tiny_tokenizer, seed=1)


def _peft(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_model(tiny_tokenizer, seed=2),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model


def _with_memory(tiny_tokenizer):
    """A model carrying a continuum memory with two unlocked, trainable slow experts (as after two sleeps)."""
    from sleep_trl.memory import LevelConfig, MemoryConfig, attach_memory

    model = build_model(tiny_tokenizer, seed=3)
    memory = attach_memory(model, MemoryConfig(levels=[LevelConfig("slow", num_slots=3, rank=8)]))
    memory.expand("slow")
    names = memory.expand("slow")
    with torch.no_grad():  # make the unlocked experts do something (B starts at zero)
        for name, p in model.named_parameters():
            if name in names:
                p.normal_(std=0.05)
    memory.freeze_all_but(names)
    return model


@pytest.mark.parametrize("build", [_plain, _peft, _with_memory], ids=["plain", "peft", "memory"])
def test_inner_loop_leaves_policy_bit_identical(tiny_tokenizer, tau, build):
    model = build(tiny_tokenizer)
    model.train()
    before = snapshot(model)
    logits = _logits(model, tiny_tokenizer)
    peft_keys = list(getattr(model, "peft_config", {}))
    active = getattr(model, "active_adapters", None)

    with IsolatedAdapter(model, InnerLoopConfig(r=4, lora_alpha=8, seed=0, steps=3, learning_rate=1e-2)) as adapter:
        # Until it learns, the isolated copy is the policy (B = 0).
        assert torch.equal(_logits(model, tiny_tokenizer), logits)
        train_adapter(model, tiny_tokenizer, adapter, ["Question: who? Answer: a fox"])
        assert not torch.allclose(_logits(model, tiny_tokenizer), logits), "the inner adapter did not learn"
        # Only the adapter trains: every policy parameter is frozen inside the block.
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter.parameters}

    after = snapshot(model)
    assert_identical(before, after)
    assert torch.equal(_logits(model, tiny_tokenizer), logits)
    assert list(getattr(model, "peft_config", {})) == peft_keys
    assert getattr(model, "active_adapters", None) == active
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_dreams_leaves_peft_policy_identical(tiny_tokenizer, tau):
    model = _peft(tiny_tokenizer)
    before = snapshot(model)
    evaluate_dreams(
        model,
        tiny_tokenizer,
        tau,
        [TASK, TASK],
        [["Question: x\nAnswer: y"], []],
        [0.0, 0.0],
        InnerLoopConfig(r=4, lora_alpha=8, steps=2, learning_rate=1e-2),
    )
    assert_identical(before, snapshot(model))


def test_reward_is_one_when_the_dream_holds_the_answer_and_zero_when_it_cannot_help(tiny_tokenizer, tau):
    model = build_model(tiny_tokenizer, seed=0)
    tau_before = tau(model, tiny_tokenizer, TASK)
    assert tau_before == 0.0  # a random model does not know the answer
    answer_dream = [f"Question: {QUESTION}\nAnswer: {ANSWER}"]
    irrelevant = ["The quick brown fox jumps over the lazy dog."]
    results = evaluate_dreams(
        model,
        tiny_tokenizer,
        tau,
        [TASK, TASK],
        [answer_dream, []],
        [tau_before, tau_before],
        InnerLoopConfig(r=8, lora_alpha=16, steps=30, learning_rate=1e-2),
    )
    assert results[0].tau_after == 1.0 and results[0].reward == 1.0
    # An empty dream gives the copy nothing to learn: same tau, reward exactly 0.
    assert results[1].tau_after == tau_before and results[1].reward == 0.0 and results[1].num_tokens == 0
    # An inner loop that cannot move the adapter (learning rate 0: B stays 0) cannot change the answer either.
    frozen = evaluate_dreams(
        model,
        tiny_tokenizer,
        tau,
        [TASK, TASK],
        [irrelevant, answer_dream],
        [tau_before, tau_before],
        InnerLoopConfig(r=8, lora_alpha=16, steps=30, learning_rate=0.0),
    )
    assert [(r.tau_after, r.reward) for r in frozen] == [(0.0, 0.0), (0.0, 0.0)]


def test_adapter_is_reset_between_dreams(tiny_tokenizer):
    """A dream's tau does not depend on which dreams were evaluated before it with the same injected adapter."""
    model = build_model(tiny_tokenizer, seed=4)
    probe = collate([encode_example(tiny_tokenizer, "Question: who?", " the fox", 64)], tiny_tokenizer.pad_token_id)

    def neg_loss_tau(m, tok, task):
        with torch.no_grad():
            total, count = token_nll_sum(m, probe)
        return -float(total) / count

    dream_a, dream_b = ["Question: who? Answer: the fox"], ["Monday Tuesday Wednesday"]
    kw = InnerLoopConfig(r=4, lora_alpha=8, steps=4, learning_rate=5e-3, reward_type="improvement")
    both = evaluate_dreams(model, tiny_tokenizer, neg_loss_tau, [TASK, TASK], [dream_b, dream_a], [0.0, 0.0], kw)
    alone = evaluate_dreams(model, tiny_tokenizer, neg_loss_tau, [TASK], [dream_a], [0.0], kw)
    assert both[1].tau_after == pytest.approx(alone[0].tau_after, abs=1e-6)
    assert both[0].tau_after != pytest.approx(alone[0].tau_after, abs=1e-4)


def test_compute_reward():
    assert compute_reward(0.25, 0.5) == 1.0
    assert compute_reward(0.5, 0.5) == 0.0
    assert compute_reward(0.5, 0.25) == 0.0
    assert compute_reward(0.25, 0.5, threshold=0.25) == 0.0
    assert compute_reward(0.25, 0.75, threshold=0.25) == 1.0
    assert compute_reward(0.5, 0.25, reward_type="improvement") == -0.25
    with pytest.raises(ValueError, match="reward_type"):
        compute_reward(0.0, 1.0, reward_type="bogus")


def test_adapter_name_clash_is_an_error(tiny_tokenizer):
    model = build_model(tiny_tokenizer, seed=5)
    small = InnerLoopConfig(r=2, lora_alpha=4)
    with IsolatedAdapter(model, small), pytest.raises(ValueError, match="already has an adapter"):
        IsolatedAdapter(model, small).__enter__()
