"""Closed-book question answering evaluation of any Hugging Face causal LM (plain, PEFT-wrapped, or with extra
modules such as expert banks).

The model answers each question by greedy decoding, without the document in context; the answer is scored against
the reference with one of the SQuAD-style scores from `sleep_trl.rewards.qa` (all of them normalise case,
punctuation, articles and whitespace first):

- `"contains"` (default): the reference occurs in the prediction as whole words. Instruct models answer in sentences
  ("Varnholt lives in Quinmere."), which exact match would count wrong. Keep `max_new_tokens` short so that a
  model cannot score by listing many candidates.
- `"exact"`: the normalised prediction equals the normalised reference.
- `"f1"`: token-level F1 (a fraction, not 0/1).

Generation is batched with left padding (prompts are sorted by length so batches pad little) and restores the
tokenizer's padding side and the model's train/eval mode afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..rewards.qa import contains_match, exact_match, token_f1

METRICS: dict[str, Callable[[str, str], float]] = {
    "contains": contains_match,
    "exact": exact_match,
    "f1": token_f1,
}
PLAIN_PROMPT = "Question: {question}\nAnswer:"


@dataclass
class QAEvalResult:
    """Mean score over the questions and one record per question (question, answer, prediction, score, and any
    other fields of the input row such as `fact_id`, `session`)."""

    accuracy: float
    records: list[dict] = field(default_factory=list)
    metric: str = "contains"


def _check_metric(metric: str) -> Callable[[str, str], float]:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported: use one of {sorted(METRICS)}.")
    return METRICS[metric]


def resolve_chat_template(tokenizer, use_chat_template: bool | None) -> bool:
    """`None` -> whether the tokenizer has a chat template; `True` without one is an error."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template is None:
        return has_template
    if use_chat_template and not has_template:
        raise ValueError(
            "use_chat_template=True but the tokenizer has no chat template; pass use_chat_template=False."
        )
    return bool(use_chat_template)


def build_prompts(
    tokenizer,
    questions: Sequence[str],
    use_chat_template: bool | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
) -> list[str]:
    """Prompt strings for `questions`.

    Args:
        use_chat_template: wrap each question as a user message with the tokenizer's chat template (generation
            prompt added). `None`: when the tokenizer has a chat template.
        prompt_template: format string with `{question}`; default `"{question}"` inside a chat template and
            `"Question: {question}\\nAnswer:"` without one (the layout of the world's `train_sft_text`).
        system_prompt: optional system message (chat template only).
    """
    use_chat_template = resolve_chat_template(tokenizer, use_chat_template)
    if system_prompt is not None and not use_chat_template:
        raise ValueError("system_prompt needs a chat template; put the instruction in `prompt_template` instead.")
    template = prompt_template or ("{question}" if use_chat_template else PLAIN_PROMPT)
    if "{question}" not in template:
        raise ValueError(f"prompt_template={template!r} must contain '{{question}}'.")
    prompts = []
    for question in questions:
        content = template.format(question=question)
        if use_chat_template:
            messages = [{"role": "user", "content": content}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            content = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(content)
    return prompts


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a model without parameters (never in practice): run on CPU
        return torch.device("cpu")


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 24,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy completions of `prompts` (already formatted), decoded without special tokens and stripped.

    Args:
        add_special_tokens: let the tokenizer add its special tokens (BOS) to each prompt; pass False for prompts
            rendered by a chat template, which already hold them.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = _device(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: the last prompt token sits at the same position
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs


def _rows(rows) -> list[dict]:
    if isinstance(rows, Mapping):  # a dict of columns
        keys = list(rows)
        return [dict(zip(keys, values)) for values in zip(*(rows[k] for k in keys))]
    return [dict(r) for r in rows]


def evaluate_qa(
    model,
    tokenizer,
    rows: Iterable[Mapping] | Mapping[str, Sequence],
    metric: str = "contains",
    batch_size: int = 16,
    max_new_tokens: int = 24,
    use_chat_template: bool | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
) -> QAEvalResult:
    """Answer every row's `question` closed-book and score it against `answer`.

    Args:
        rows: a `datasets.Dataset`, a list of dicts, or a dict of columns, with `question` and `answer` columns
            (e.g. `world.sessions[i].eval_qa`); other columns are copied into the records.
        metric: `"contains"`, `"exact"` or `"f1"` (see the module docstring).
        batch_size, max_new_tokens: generation budget.
        use_chat_template, prompt_template, system_prompt: see `build_prompts`.
    """
    score = _check_metric(metric)
    items = _rows(rows)
    for n, row in enumerate(items):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"Evaluation row {n} needs a string `{key}` column; got {row.get(key)!r}.")
    if not items:
        raise ValueError("No evaluation rows: pass at least one row with `question` and `answer`.")
    chat = resolve_chat_template(tokenizer, use_chat_template)
    prompts = build_prompts(tokenizer, [r["question"] for r in items], chat, prompt_template, system_prompt)
    predictions = generate_greedy(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, add_special_tokens=not chat
    )
    records = []
    for row, prediction in zip(items, predictions):
        records.append({**row, "prediction": prediction, "score": score(prediction, row["answer"])})
    accuracy = sum(r["score"] for r in records) / len(records)
    return QAEvalResult(accuracy=accuracy, records=records, metric=metric)


def score_predictions(predictions: Sequence[str], answers: Sequence[str], metric: str = "contains") -> list[float]:
    """Score already generated `predictions` against `answers` with `metric` (no model involved)."""
    score = _check_metric(metric)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers: pass one prediction per answer.")
    return [score(p, a) for p, a in zip(predictions, answers)]
