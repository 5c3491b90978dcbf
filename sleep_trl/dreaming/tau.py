"""tau: the downstream score a dream must improve (paper notes §4).

A task is one dataset row: a context C plus the data tau needs. tau is any callable
`(model, tokenizer, task) -> float`; the dream reward compares tau of a copy fine-tuned on a dream with tau of the
model as it is. Two are shipped:

- `NoContextQA`: questions about the context, asked WITHOUT the context, answered greedily; the score is the mean of
  a per-question metric (`exact_match`, `token_f1`, `contains`, or `semantic` through the offline MiniLM judge).
  Task columns: `questions` (list of str) and `answers` (list; each entry a str or a list of accepted strings).
  This is the knowledge-incorporation protocol of SEAL and of the paper's SQuAD experiment.
- `HeldOutDemoAccuracy`: held-out demonstrations of a few-shot task; the model sees each held-out input (optionally
  after the context) and must produce its output. Task column: `demos` (list of `{"input": ..., "output": ...}`).

A tau may also expose `sft_examples(tokenizer, task) -> list[(prompt, target)]`, the supervised form of its data,
used by the gradient-based importance score (`importance_target="tau_data"`), and `required_columns`, checked on
the dataset before training starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..rewards.qa import contains_match, exact_match, token_f1

TAU_METRICS = ("exact_match", "token_f1", "contains", "semantic")


@runtime_checkable
class Tau(Protocol):
    def __call__(self, model, tokenizer, task: Mapping[str, Any]) -> float: ...


class GenerativeTau:
    """Shared machinery: render each query as a prompt, generate greedily, score against the references.

    Args:
        metric: `exact_match`, `token_f1`, `contains` (the normalised answer appears in the prediction as whole
            words) or `semantic` (the MiniLM judge says prediction and answer mean the same).
        prompt_template: how one query becomes the user message; placeholders are the query's fields.
        use_chat_template: render the prompt with the tokenizer's chat template; `None` = when the tokenizer has one.
        max_new_tokens: generation budget per answer.
        batch_size: queries generated together.
        stop_at_newline: keep only the first non-empty line of the generation (answers are short).
        judge: a callable `(predictions, references) -> list[float]` for `metric="semantic"`; by default a
            `SemanticJudge` over `semantic_model` with `semantic_threshold`, loaded on first use.
    """

    required_columns: tuple[str, ...] = ()
    default_template = "{question}"

    def __init__(
        self,
        metric: str = "exact_match",
        prompt_template: str | None = None,
        use_chat_template: bool | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        stop_at_newline: bool = True,
        judge: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
        semantic_model: str = "all-minilm-l6-v2",
        semantic_threshold: float = 0.8,
    ):
        if metric not in TAU_METRICS:
            raise ValueError(f"tau_metric={metric!r} is not supported: use one of {TAU_METRICS}.")
        if max_new_tokens < 1:
            raise ValueError(f"tau_max_new_tokens must be >= 1, got {max_new_tokens}.")
        self.metric = metric
        self.prompt_template = prompt_template or self.default_template
        self.use_chat_template = use_chat_template
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop_at_newline = stop_at_newline
        self._judge = judge
        self.semantic_model = semantic_model
        self.semantic_threshold = semantic_threshold

    # ---- what a subclass defines -------------------------------------------------------------------------------
    def queries(self, task: Mapping[str, Any]) -> list[tuple[dict[str, str], list[str]]]:
        """(fields for the prompt template, accepted references) for every item of the task."""
        raise NotImplementedError

    # ---- prompts -----------------------------------------------------------------------------------------------
    def _chat(self, tokenizer) -> bool:
        if self.use_chat_template is None:
            return getattr(tokenizer, "chat_template", None) is not None
        return self.use_chat_template

    def render_prompt(self, tokenizer, fields: Mapping[str, str]) -> str:
        text = self.prompt_template.format(**fields)
        if self._chat(tokenizer):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def sft_examples(self, tokenizer, task: Mapping[str, Any]) -> list[tuple[str, str]]:
        """tau's data as (prompt, target) pairs: the rendered query and its first accepted answer.

        Chat prompts end the answer with the EOS token (the end of the assistant turn); plain prompts with a newline,
        where `stop_at_newline` cuts the generation.
        """
        examples = []
        for fields, refs in self.queries(task):
            prompt = self.render_prompt(tokenizer, fields)
            sep = "" if self._chat(tokenizer) or prompt.endswith((" ", "\n")) else " "
            end = "" if self._chat(tokenizer) else "\n"
            examples.append((prompt, f"{sep}{refs[0]}{end}"))
        return examples

    # ---- scoring -----------------------------------------------------------------------------------------------
    @property
    def judge(self):
        if self._judge is None:
            from ..rewards.semantic import SemanticJudge

            self._judge = SemanticJudge(self.semantic_model, threshold=self.semantic_threshold, binary=True)
        return self._judge

    def score(self, predictions: Sequence[str], references: Sequence[list[str]]) -> list[float]:
        """Per-item score: the best match over each item's accepted references."""
        if self.metric == "semantic":
            flat_pred = [p for p, refs in zip(predictions, references, strict=True) for _ in refs]
            flat_ref = [r for refs in references for r in refs]
            flat = self.judge(flat_pred, flat_ref)
            out, i = [], 0
            for refs in references:
                out.append(max(flat[i : i + len(refs)]))
                i += len(refs)
            return out
        fn = {"exact_match": exact_match, "token_f1": token_f1, "contains": contains_match}[self.metric]
        return [max(fn(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]

    @torch.no_grad()
    def predict(self, model, tokenizer, prompts: Sequence[str]) -> list[str]:
        """Greedy answers to `prompts` (left-padded batches; the model's mode is restored afterwards)."""
        from transformers import GenerationConfig

        from .sft_data import eval_mode, pad_token_id

        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        pad_id = pad_token_id(tokenizer)
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        device = next(model.parameters()).device
        outputs: list[str] = []
        try:
            with eval_mode(model):
                for start in range(0, len(prompts), self.batch_size):
                    chunk = list(prompts[start : start + self.batch_size])
                    # Same rule as the SFT examples (`encode_example`): no second BOS when the rendered prompt has one.
                    bos = getattr(tokenizer, "bos_token", None)
                    add_special = not (bos and all(p.startswith(bos) for p in chunk))
                    enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special)
                    enc = {k: v.to(device) for k, v in enc.items()}
                    generated = model.generate(**enc, generation_config=config)
                    new_tokens = generated[:, enc["input_ids"].size(1) :]
                    for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                        if self.stop_at_newline:
                            lines = [line for line in text.strip().splitlines() if line.strip()]
                            text = lines[0] if lines else ""
                        outputs.append(text.strip())
        finally:
            tokenizer.padding_side = padding_side
        return outputs

    def __call__(self, model, tokenizer, task: Mapping[str, Any]) -> float:
        items = self.queries(task)
        if not items:
            raise ValueError("tau got a task with no items to score (an empty question or demo list).")
        prompts = [self.render_prompt(tokenizer, fields) for fields, _ in items]
        predictions = self.predict(model, tokenizer, prompts)
        scores = self.score(predictions, [refs for _, refs in items])
        return float(sum(scores) / len(scores))


def _as_refs(answer) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    refs = [str(a) for a in answer]
    if not refs:
        raise ValueError("An answer entry is an empty list: give at least one accepted answer.")
    return refs


class NoContextQA(GenerativeTau):
    """No-context question answering: the mean per-question score on `task["questions"]` / `task["answers"]`.

    `prompt_template` placeholders: `{question}`.
    """

    required_columns = ("questions", "answers")
    default_template = "{question}"

    def queries(self, task):
        questions, answers = task["questions"], task["answers"]
        if len(questions) != len(answers):
            raise ValueError(f"A task has {len(questions)} questions but {len(answers)} answers.")
        return [({"question": q}, _as_refs(a)) for q, a in zip(questions, answers, strict=True)]


class HeldOutDemoAccuracy(GenerativeTau):
    """Held-out demonstration accuracy: the mean score of the model's output on each held-out `task["demos"]` input.

    `prompt_template` placeholders: `{input}` and `{context}` (the task's demonstrations). The default asks with the
    input alone (the knowledge must come from the weights); `"{context}\\n{input}"` evaluates in context instead.
    """

    required_columns = ("demos",)
    default_template = "{input}"

    def __init__(self, *args, context_column: str = "context", **kwargs):
        super().__init__(*args, **kwargs)
        self.context_column = context_column

    def queries(self, task):
        out = []
        for demo in task["demos"]:
            if not isinstance(demo, Mapping) or "input" not in demo or "output" not in demo:
                raise ValueError("Each entry of `demos` must be a mapping with 'input' and 'output' keys.")
            fields = {"input": demo["input"], "context": task.get(self.context_column, "")}
            out.append((fields, _as_refs(demo["output"])))
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
