"""Closed-book QA (the one path of the evaluation and of tau) on a real (tiny, randomly initialised) causal LM:
batching, prompts, scoring, several references, and tau asking exactly as the accuracy matrix does."""

from __future__ import annotations

import os

import pytest
import torch

from sleep_trl.data import make_world
from sleep_trl.dreaming.tau import NoContextQA
from sleep_trl.eval import AccuracyMatrix, ClosedBookQA, evaluate_qa
from sleep_trl.tiny import cached_tiny

MAX_NEW = 8


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


@pytest.fixture(scope="module")
def tiny(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cached_tiny(arch="llama", extra_texts=world.all_texts())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # Large random weights make greedy choices decisive and varied (the default 0.02 init gives near-uniform logits
    # and repeats one token), so comparing batched with unbatched outputs means something.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model, tokenizer


def _reference(model, tokenizer, prompts):
    """One prompt at a time, no padding at all: what greedy decoding must give."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def build_prompts(tokenizer, questions, **qa_kwargs):
    return ClosedBookQA(**qa_kwargs).prompts(tokenizer, ({"question": q} for q in questions))


def test_scores_on_hand_written_strings():
    preds = ["Varnholt lives in Quinmere.", "Quinmeres", "The Quinmere!", "plum cake today", "no idea"]
    answers = [["Quinmere"], ["Quinmere"], ["quinmere"], ["plum cake"], ["plum cake"]]
    assert ClosedBookQA(metric="contains").score(preds, answers) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert ClosedBookQA(metric="exact_match").score(preds, answers) == [0.0, 0.0, 1.0, 0.0, 0.0]
    # "plum cake today" vs "plum cake": precision 2/3, recall 1 -> F1 = 0.8
    assert ClosedBookQA(metric="f1").score(preds, answers) == pytest.approx([2 / 5, 0.0, 1.0, 0.8, 0.0])
    with pytest.raises(ValueError, match="metric"):
        ClosedBookQA(metric="bleu")


def test_several_references_score_the_best_of_them():
    """SQuAD's rule: a prediction is scored against each accepted answer and keeps the best score."""
    refs = [["Denver Broncos", "Broncos"], ["Santa Clara, California", "Levi's Stadium"]]
    preds = ["the Broncos", "Levi's Stadium in Santa Clara"]
    assert ClosedBookQA(metric="exact_match").score(preds, refs) == [1.0, 0.0]
    assert ClosedBookQA(metric="contains").score(preds, refs) == [1.0, 1.0]
    # F1 of "levis stadium in santa clara" against "levis stadium" (2/5 precision, recall 1) and against "santa
    # clara california" (2/5 precision, 2/3 recall): the best is 4/7.
    assert ClosedBookQA(metric="f1").score(preds, refs) == pytest.approx([1.0, 4 / 7])


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny, world):
    model, tokenizer = tiny
    rows = world.sessions[0].eval_rows[:7]
    prompts = build_prompts(tokenizer, [r["question"] for r in rows])
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) > 2  # the batch really needs padding
    reference = _reference(model, tokenizer, prompts)
    assert any(reference)
    batched = ClosedBookQA(batch_size=4, max_new_tokens=MAX_NEW).answer(model, tokenizer, prompts)
    assert batched == reference
    tokenizer.padding_side = "right"  # the QA path pads by itself: the tokenizer's setting cannot matter
    try:
        again = ClosedBookQA(batch_size=7, max_new_tokens=MAX_NEW).answer(model, tokenizer, prompts)
    finally:
        tokenizer.padding_side = "left"
    assert again == reference


def test_evaluate_qa_scores_what_the_model_said(tiny, world):
    model, tokenizer = tiny
    rows = world.sessions[1].eval_rows[:6]
    prompts = build_prompts(tokenizer, [r["question"] for r in rows])
    reference = _reference(model, tokenizer, prompts)
    # Known outcome without touching the model: rows 0, 2, 4 take a word the model will say as their answer.
    staged = [
        {**r, "answer": reference[k].split()[0] if k % 2 == 0 and reference[k].split() else r["answer"]}
        for k, r in enumerate(rows)
    ]
    expected = [1.0 if k % 2 == 0 and reference[k].split() else 0.0 for k in range(len(rows))]
    model.train()
    result = evaluate_qa(model, tokenizer, staged, batch_size=4, max_new_tokens=MAX_NEW)
    assert model.training  # mode restored
    assert [r["prediction"] for r in result.records] == reference
    assert [r["score"] for r in result.records] == expected
    assert result.accuracy == pytest.approx(sum(expected) / len(expected))
    assert [r["fact_id"] for r in result.records] == [r["fact_id"] for r in rows]  # other columns kept, in order
    exact = evaluate_qa(
        model, tokenizer, [{"question": rows[0]["question"], "answer": reference[0]}], metric="exact_match",
        max_new_tokens=MAX_NEW,
    )
    assert exact.accuracy == 1.0


def test_prompts_follow_the_chat_template_or_the_plain_layout(tiny):
    _, tokenizer = tiny
    chat = build_prompts(tokenizer, ["Who founded Jorick Company?"])[0]
    assert chat == "<|im_start|>user\nWho founded Jorick Company?<|im_end|>\n<|im_start|>assistant\n"
    with_system = build_prompts(tokenizer, ["Q?"], system_prompt="Answer briefly.")[0]
    assert with_system.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nQ?")
    plain = build_prompts(tokenizer, ["Who founded Jorick Company?"], use_chat_template=False)[0]
    assert plain == "Question: Who founded Jorick Company?\nAnswer:"
    custom = build_prompts(tokenizer, ["Q?"], use_chat_template=False, prompt_template="Q: {question} A:")[0]
    assert custom == "Q: Q? A:"
    with pytest.raises(ValueError, match="placeholder"):
        build_prompts(tokenizer, ["Q?"], prompt_template="no placeholder")
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert build_prompts(tokenizer, ["Q?"])[0] == "Question: Q?\nAnswer:"
        with pytest.raises(ValueError, match="chat template"):
            build_prompts(tokenizer, ["Q?"], use_chat_template=True)
    finally:
        tokenizer.chat_template = template


def test_bad_rows_and_metric_fail_before_generating(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="metric"):
        evaluate_qa(None, tokenizer, [{"question": "q", "answer": "a"}], metric="rouge")
    with pytest.raises(ValueError, match="reference answer"):
        evaluate_qa(None, tokenizer, [{"question": "q"}])
    with pytest.raises(ValueError, match="non-empty string `question`"):
        evaluate_qa(None, tokenizer, [{"question": "  ", "answer": "a"}])
    with pytest.raises(ValueError, match="No evaluation rows"):
        evaluate_qa(model, tokenizer, [])


def test_peft_model_with_untrained_adapter_answers_like_its_base(tiny, world):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    rows = world.sessions[2].eval_rows[:5]
    base = evaluate_qa(model, tokenizer, rows, max_new_tokens=MAX_NEW)
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    try:
        wrapped = evaluate_qa(peft_model, tokenizer, rows, max_new_tokens=MAX_NEW)
    finally:
        peft_model.unload()  # give the shared fixture its plain model back
    assert [r["prediction"] for r in wrapped.records] == [r["prediction"] for r in base.records]


def test_accuracy_matrix_evaluates_a_model_on_every_session(tiny, world):
    model, tokenizer = tiny
    sessions = [s.eval_rows[:3] for s in world.sessions]
    m = AccuracyMatrix(num_sessions=3, metric="contains")
    qa = ClosedBookQA(metric="contains", max_new_tokens=4)
    row = m.evaluate_model(0, model, tokenizer, sessions, qa=qa)
    assert len(row) == 3 and m.R[0] == row
    assert set(m.records) == {"0,0", "0,1", "0,2"}
    assert [r["fact_id"] for r in m.records["0,2"]] == [r["fact_id"] for r in sessions[2]]
    with pytest.raises(ValueError, match="metric"):
        m.evaluate_model(1, model, tokenizer, sessions, qa=ClosedBookQA(metric="exact_match"))


def test_tau_asks_and_scores_exactly_as_the_accuracy_matrix(tiny, world):
    """Through one ClosedBookQA, tau's score of a task is the matrix's accuracy on the same questions, for every
    metric: staged answers (words the model will say) make the scores non-trivial."""
    model, tokenizer = tiny
    rows = world.sessions[0].eval_rows[:6]
    said = ClosedBookQA(max_new_tokens=MAX_NEW).answer(model, tokenizer, build_prompts(tokenizer, [r["question"] for r in rows]))
    staged = [{**r, "answer": said[k].split()[0] if k % 3 == 0 and said[k].split() else r["answer"]}
              for k, r in enumerate(rows)]
    task = {"questions": [r["question"] for r in staged], "answers": [r["answer"] for r in staged]}
    for metric in ("contains", "exact_match", "f1"):
        qa = ClosedBookQA(metric=metric, max_new_tokens=MAX_NEW)
        matrix = AccuracyMatrix(num_sessions=1, metric=metric)
        [accuracy] = matrix.evaluate_model(0, model, tokenizer, [staged], qa=qa)
        assert NoContextQA(qa)(model, tokenizer, task) == pytest.approx(accuracy)
    assert accuracy > 0.0


@pytest.mark.slow
def test_smollm2_does_not_know_the_world_before_training(world):
    """The knowledge is new: the real default model answers (almost) nothing zero-shot."""
    from sleep_trl.assets import smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    result = evaluate_qa(model, tokenizer, world.sessions[0].eval_qa, batch_size=24, max_new_tokens=24)
    assert result.accuracy < 0.05
    assert sum(len(r["prediction"].split()) >= 3 for r in result.records) > 12  # it did answer, in sentences
