"""tau (no-context QA, held-out demos) and dream prompt templates."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sleep_trl.dreaming.sft_data import encode_example
from sleep_trl.dreaming.tau import HeldOutDemoAccuracy, NoContextQA
from sleep_trl.dreaming.templates import (
    DREAM_TEMPLATES,
    build_dream_prompt,
    completion_text,
    resolve_template,
    split_dream,
)
from sleep_trl.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.padding_side = "left"
    return tok


def test_templates_and_prompts():
    messages = build_dream_prompt("implications", "C-TEXT", system_prompt="SYS")
    assert messages[0] == {"role": "system", "content": "SYS"}
    assert messages[1]["role"] == "user" and "C-TEXT" in messages[1]["content"]
    assert messages[1]["content"] == DREAM_TEMPLATES["implications"].replace("{context}", "C-TEXT")
    assert build_dream_prompt("Facts about {context}:", "X", conversational=False) == "Facts about X:\n\n"
    with pytest.raises(ValueError, match="dream_template"):
        resolve_template("no placeholder here")


def test_split_dream():
    text = "first line\n\n  second line \nthird\n\n\n"
    assert split_dream(text, "none") == [text.strip()]
    assert split_dream(text, "lines") == ["first line", "second line", "third"]
    assert split_dream(text, "paragraphs") == ["first line", "second line \nthird"]
    assert split_dream("  \n ", "lines") == [] and split_dream("", "none") == []
    with pytest.raises(ValueError, match="dream_split"):
        split_dream(text, "words")
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text("plain") == "plain"


def test_qa_scores_against_hand_values():
    exact = NoContextQA(metric="exact_match")
    refs = [["Idra Kestrel", "Kestrel"], ["1642"], ["blue glass"]]
    assert exact.score(["the Kestrel", "1643", "Blue glass."], refs) == [1.0, 0.0, 1.0]
    contains = NoContextQA(metric="contains")
    assert contains.score(["It was Idra Kestrel, I think", "in 16420", "glass"], refs) == [1.0, 0.0, 0.0]
    f1 = NoContextQA(metric="f1")
    # "blue glass lamps" vs "blue glass": precision 2/3, recall 1 -> F1 0.8
    assert f1.score(["x", "y", "blue glass lamps"], refs) == pytest.approx([0.0, 0.0, 0.8])


def test_semantic_metric_uses_the_judge_per_reference():
    calls = []

    def judge(predictions, references):
        calls.append((list(predictions), list(references)))
        return [1.0 if p.lower() == r.lower() else 0.0 for p, r in zip(predictions, references, strict=True)]

    tau = NoContextQA(metric="semantic", judge=judge)
    assert tau.score(["kestrel", "no"], [["Idra Kestrel", "Kestrel"], ["yes"]]) == [1.0, 0.0]
    assert calls == [(["kestrel", "kestrel", "no"], ["Idra Kestrel", "Kestrel", "yes"])]


def test_semantic_metric_with_the_packaged_minilm_judge():
    pytest.importorskip("sentence_transformers")
    try:
        tau = NoContextQA(metric="semantic", semantic_threshold=0.8)
        scores = tau.score(
            ["Paris is the capital city of France.", "Berlin is the capital of Germany."],
            [["The capital of France is Paris."], ["The capital of France is Paris."]],
        )
    except FileNotFoundError as err:  # the offline judge package is not installed here
        pytest.skip(str(err))
    assert scores == [1.0, 0.0]


def test_malformed_tasks_fail_clearly():
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        NoContextQA().queries({"questions": ["a", "b"], "answers": ["x"]})
    with pytest.raises(ValueError, match="'input' and 'output'"):
        HeldOutDemoAccuracy().queries({"demos": [{"question": "a"}]})
    with pytest.raises(ValueError, match="`metric`='bleu' is not supported"):
        NoContextQA(metric="bleu")


def test_tau_runs_greedy_and_restores_state(tokenizer):
    model = build_model(tokenizer, seed=0)
    model.train()
    tau = NoContextQA(metric="exact_match", max_new_tokens=4)
    task = {"questions": ["Who?", "Where?"], "answers": ["a", ["b", "c"]]}
    first = tau(model, tokenizer, task)
    assert first == tau(model, tokenizer, task)  # greedy: deterministic
    assert 0.0 <= first <= 1.0
    assert model.training and tokenizer.padding_side == "left"


def test_sft_examples_follow_the_prompt_format(tokenizer):
    chat = NoContextQA()
    [(prompt, target)] = chat.sft_examples(tokenizer, {"questions": ["Who?"], "answers": [["Ann", "Anna"]]})
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who?"}], tokenize=False, add_generation_prompt=True
    )
    assert target == "Ann"
    ids, labels = encode_example(tokenizer, prompt, target, 128)
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer("Ann", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt_ids + target_ids  # the answer ends the assistant turn with EOS
    assert labels == [-100] * len(prompt_ids) + target_ids  # only the answer is learned
    plain = NoContextQA(prompt_template="Q: {question}\nA:", use_chat_template=False)
    assert plain.sft_examples(tokenizer, {"questions": ["Who?"], "answers": ["Ann"]}) == [("Q: Who?\nA:", " Ann\n")]
    demos = HeldOutDemoAccuracy(prompt_template="{context}\n{input} ->", use_chat_template=False)
    task = {"context": "1 -> 2", "demos": [{"input": "3", "output": "4"}]}
    assert demos.sft_examples(tokenizer, task) == [("1 -> 2\n3 ->", " 4\n")]
