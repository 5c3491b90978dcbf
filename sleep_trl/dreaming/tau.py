"""tau: the downstream score a dream must improve (paper notes §4).

A task is one dataset row: a context C plus the data tau needs. tau is any callable
`(model, tokenizer, task) -> float`; the dream reward compares tau of a copy fine-tuned on a dream with tau of the
model as it is. Two are shipped, both asking and scoring through `sleep_trl.eval.qa.ClosedBookQA` (the same path as
the accuracy matrix of a continual-learning run):

- `NoContextQA`: questions about the context, asked WITHOUT the context, answered greedily; the score is the mean of
  a per-question metric (`exact_match`, `f1`, `contains`, or `semantic` through the offline MiniLM judge).
  Task columns: `questions` (list of str) and `answers` (list; each entry a str or a list of accepted strings).
  This is the knowledge-incorporation protocol of SEAL and of the paper's SQuAD experiment.
- `HeldOutDemoAccuracy`: held-out demonstrations of a few-shot task; the model sees each held-out input (optionally
  after the context) and must produce its output. Task column: `demos` (list of `{"input": ..., "output": ...}`).

A tau may also expose `sft_examples(tokenizer, task) -> list[(prompt, target)]`, the supervised form of its data,
used by the gradient-based importance score (`importance_target="tau_data"`), and `required_columns`, checked on
the dataset before training starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ..eval.qa import ClosedBookQA
from ..rewards.qa import as_references


@runtime_checkable
class Tau(Protocol):
    def __call__(self, model, tokenizer, task: Mapping[str, Any]) -> float: ...


class GenerativeTau:
    """Shared machinery: each item of a task is asked and scored by a `ClosedBookQA`.

    Args:
        qa: the `ClosedBookQA` that asks and scores (its `prompt_template` placeholders are the item's fields);
            or its fields as keyword arguments (`metric`, `prompt_template`, `use_chat_template`, `max_new_tokens`,
            `batch_size`, `stop_at_newline` (default True here: answers are short), `judge`, `semantic_model`,
            `semantic_threshold`).
    """

    required_columns: tuple[str, ...] = ()
    default_template = "{question}"

    def __init__(self, qa: ClosedBookQA | None = None, **qa_kwargs):
        if qa is not None and qa_kwargs:
            raise ValueError(f"Give either a ClosedBookQA or its fields, not both (got {sorted(qa_kwargs)}).")
        if qa is None:
            qa_kwargs.setdefault("metric", "exact_match")
            qa_kwargs.setdefault("stop_at_newline", True)
            qa_kwargs.setdefault("max_new_tokens", 32)
            qa = ClosedBookQA(default_template=self.default_template, **qa_kwargs)
        self.qa = qa

    @property
    def metric(self) -> str:
        return self.qa.metric

    def queries(self, task: Mapping[str, Any]) -> list[tuple[dict[str, str], list[str]]]:
        """(fields for the prompt template, accepted references) for every item of the task."""
        raise NotImplementedError

    def score(self, predictions, references) -> list[float]:
        return self.qa.score(predictions, references)

    def sft_examples(self, tokenizer, task: Mapping[str, Any]) -> list[tuple[str, str]]:
        """tau's data as (prompt, target) pairs: each item asked as tau asks it, with its first accepted answer."""
        return [self.qa.sft_pair(tokenizer, fields, refs[0]) for fields, refs in self.queries(task)]

    def __call__(self, model, tokenizer, task: Mapping[str, Any]) -> float:
        items = self.queries(task)
        if not items:
            raise ValueError("tau got a task with no items to score (an empty question or demo list).")
        predictions = self.qa.answer(model, tokenizer, self.qa.prompts(tokenizer, (f for f, _ in items)))
        scores = self.qa.score(predictions, [refs for _, refs in items])
        return float(sum(scores) / len(scores))


class NoContextQA(GenerativeTau):
    """No-context question answering: the mean per-question score on `task["questions"]` / `task["answers"]`.

    `prompt_template` placeholders: `{question}`.
    """

    required_columns = ("questions", "answers")
    default_template = None  # ClosedBookQA's own: "{question}" in a chat template, the plain QA layout otherwise

    def queries(self, task):
        questions, answers = task["questions"], task["answers"]
        if len(questions) != len(answers):
            raise ValueError(f"A task has {len(questions)} questions but {len(answers)} answers.")
        return [({"question": q}, as_references(a)) for q, a in zip(questions, answers, strict=True)]


class HeldOutDemoAccuracy(GenerativeTau):
    """Held-out demonstration accuracy: the mean score of the model's output on each held-out `task["demos"]` input.

    `prompt_template` placeholders: `{input}` and `{context}` (the task's demonstrations). The default asks with the
    input alone (the knowledge must come from the weights); `"{context}\\n{input}"` evaluates in context instead.
    """

    required_columns = ("demos",)
    default_template = "{input}"

    def __init__(self, qa: ClosedBookQA | None = None, context_column: str = "context", **qa_kwargs):
        super().__init__(qa, **qa_kwargs)
        self.context_column = context_column

    def queries(self, task):
        out = []
        for demo in task["demos"]:
            if not isinstance(demo, Mapping) or "input" not in demo or "output" not in demo:
                raise ValueError("Each entry of `demos` must be a mapping with 'input' and 'output' keys.")
            fields = {"input": demo["input"], "context": task.get(self.context_column, "")}
            out.append((fields, as_references(demo["output"])))
        return out


TAUS = {"qa": NoContextQA, "demos": HeldOutDemoAccuracy}


def build_tau(args) -> GenerativeTau:
    """The tau a `DreamConfig` describes (`tau`, `tau_metric`, `tau_prompt_template`, ...)."""
    if args.tau not in TAUS:
        raise ValueError(f"tau={args.tau!r} is not supported: use one of {tuple(TAUS)} or pass a `tau` callable.")
    kwargs = {
        "metric": args.tau_metric,
        "prompt_template": args.tau_prompt_template,
        "use_chat_template": args.tau_use_chat_template,
        "max_new_tokens": args.tau_max_new_tokens,
        "batch_size": args.tau_batch_size,
        "stop_at_newline": args.tau_stop_at_newline,
        "semantic_model": args.semantic_model,
        "semantic_threshold": args.semantic_threshold,
    }
    if args.tau == "demos":
        kwargs["context_column"] = args.context_column
    return TAUS[args.tau](**kwargs)
