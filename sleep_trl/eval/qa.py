"""Closed-book question answering: how a question is asked, answered and scored. The one path of sleep-trl.

The accuracy matrix of a continual-learning run and the dream reward's tau both go through `ClosedBookQA`, so they
can never disagree on how a question is asked or scored:

- **Asking** (`render`): the question, formatted with `prompt_template` (`"{question}"` inside the tokenizer's chat
  template; `"Question: {question}\\nAnswer:"` without one), optionally after a system message (chat only).
- **Answering** (`answer`): greedy decoding, batched and left padded (`sleep_trl.generation.hf`), at most
  `max_new_tokens` tokens; with `stop_at_newline` only the first non-empty line is kept.
- **Scoring** (`score`): one of `sleep_trl.rewards.qa.METRICS`, after SQuAD normalisation (case, punctuation,
  articles, whitespace): `"contains"` (default: the reference occurs in the reply as whole words; instruct models
  answer in sentences, which exact match would count wrong, so keep `max_new_tokens` short), `"exact_match"`, `"f1"`
  (token F1, a fraction) or `"semantic"` (the offline MiniLM judge says reply and reference mean the same). A
  question with several reference answers scores the best of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..generation.distributed import gather_in_order, gathered_whole, shard, world
from ..generation.hf import encode_prompts, generate_ids, pad_token_id
from ..rewards.qa import as_references, best_score, check_metric
from ..rewards.semantic import SemanticJudge

PLAIN_QA_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class QAEvalResult:
    """Mean score over the questions and one record per question (the row's fields, `prediction`, `score`)."""

    accuracy: float
    records: list[dict] = field(default_factory=list)
    metric: str = "contains"


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def plain_qa_text(question: str, answer: str) -> str:
    """A question and its answer in the plain layout (models without a chat template learn and are asked so)."""
    return f"{PLAIN_QA_TEMPLATE.format(question=question)} {answer}"


@dataclass
class ClosedBookQA:
    """Ask questions without their context, answer greedily, score against references.

    Args:
        metric: `contains`, `exact_match`, `f1` or `semantic` (see the module docstring).
        max_new_tokens: generation budget per answer.
        batch_size: questions answered together.
        use_chat_template: ask through the tokenizer's chat template; `None` = whenever the tokenizer has one.
        prompt_template: how the fields of one item become the user message (`{question}` for QA; other
            placeholders for other tasks, e.g. `{input}`); default: see `default_template`.
        system_prompt: an optional system message (chat template only).
        stop_at_newline: keep only the first non-empty line of each answer.
        semantic_model, semantic_threshold: the judge of the `semantic` metric (loaded on first use).
        judge: a callable `(predictions, references) -> list[float]` replacing that judge.
    """

    metric: str = "contains"
    max_new_tokens: int = 16
    batch_size: int = 16
    use_chat_template: bool | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    stop_at_newline: bool = False
    semantic_model: str = "all-minilm-l6-v2"
    semantic_threshold: float = 0.8
    judge: Callable[[Sequence[str], Sequence[str]], list[float]] | None = field(default=None, repr=False)
    default_template: str | None = field(default=None, repr=False)

    def __post_init__(self):
        check_metric(self.metric)
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must both be >= 1."
            )
        if self.prompt_template is not None and "{" not in self.prompt_template:
            raise ValueError(
                f"prompt_template={self.prompt_template!r} has no placeholder: write e.g. 'Q: {{question}} A:'."
            )

    # ---- asking --------------------------------------------------------------------------------------------------
    def chat(self, tokenizer) -> bool:
        """Whether questions go through the chat template (`True` without a template is an error)."""
        if self.use_chat_template is None:
            return has_chat_template(tokenizer)
        if self.use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template; pass False.")
        return bool(self.use_chat_template)

    def template(self, tokenizer) -> str:
        if self.prompt_template is not None:
            return self.prompt_template
        if self.default_template is not None:
            return self.default_template
        return "{question}" if self.chat(tokenizer) else PLAIN_QA_TEMPLATE

    def render(self, tokenizer, fields: Mapping[str, str]) -> str:
        """The prompt string for one item (`fields` fill the template, e.g. `{"question": ...}`)."""
        chat = self.chat(tokenizer)
        if self.system_prompt is not None and not chat:
            raise ValueError("system_prompt needs a chat template; put the instruction in `prompt_template` instead.")
        try:
            content = self.template(tokenizer).format(**fields)
        except KeyError as err:
            raise ValueError(
                f"prompt_template {self.template(tokenizer)!r} names {err} but the item only has {sorted(fields)}."
            ) from None
        if not chat:
            return content
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompts(self, tokenizer, items: Iterable[Mapping[str, str]]) -> list[str]:
        return [self.render(tokenizer, fields) for fields in items]

    def sft_pair(self, tokenizer, fields: Mapping[str, str], answer: str) -> tuple[str, str]:
        """The item and its answer as a supervised (prompt, target) pair, asked exactly as `answer` asks it.

        Chat prompts end the target with the EOS token (the end of the assistant turn, added by the encoder); plain
        prompts with a newline, where `stop_at_newline` cuts the generation."""
        prompt = self.render(tokenizer, fields)
        if self.chat(tokenizer):
            return prompt, answer
        sep = "" if prompt.endswith((" ", "\n")) else " "
        return prompt, f"{sep}{answer}\n"

    # ---- answering -----------------------------------------------------------------------------------------------
    def answer(self, model, tokenizer, prompts: Sequence[str], distributed: bool = False) -> list[str]:
        """Greedy answers to rendered `prompts`, in order.

        With `distributed` (every process of a multi-process run calls it with the same prompts), each process
        answers an equal share and the answers are gathered; under ZeRO-3 with the whole model, gathered."""
        if not prompts:
            return []
        total = len(prompts)
        real = total
        if distributed and world()[0] > 1:
            prompts, real = shard(prompts)
        # A chat template writes its own special tokens; plain prompts get the tokenizer's (e.g. a BOS token).
        ids = encode_prompts(tokenizer, prompts, add_special_tokens=not self.chat(tokenizer))
        with gathered_whole(model) as whole:  # ZeRO-3: each process answers its share with the whole model
            completions = generate_ids(
                whole, ids, pad_id=pad_token_id(tokenizer), batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            )
        if distributed and world()[0] > 1:
            completions = gather_in_order(completions, real, total)
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
        if self.stop_at_newline:
            texts = [next((line.strip() for line in t.splitlines() if line.strip()), "") for t in texts]
        return texts

    # ---- scoring -------------------------------------------------------------------------------------------------
    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Per-item score: the best match over each item's accepted references."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} items: pass one per item.")
        if self.metric != "semantic":
            return [best_score(p, refs, self.metric) for p, refs in zip(predictions, references, strict=True)]
        if self.judge is None:
            self.judge = SemanticJudge(self.semantic_model, threshold=self.semantic_threshold, binary=True)
        flat_pred = [p for p, refs in zip(predictions, references, strict=True) for _ in refs]
        flat = self.judge(flat_pred, [r for refs in references for r in refs])
        out, i = [], 0
        for refs in references:
            out.append(max(flat[i : i + len(refs)]))
            i += len(refs)
        return out

    # ---- all three ----------------------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, rows, distributed: bool = False) -> QAEvalResult:
        """Answer every row's `question` closed-book and score it against its reference(s).

        `rows`: a `datasets.Dataset`, a list of dicts or a dict of columns, with `question` and `answer` (a string
        or a list of accepted strings; `answers` is accepted as the column name too). Other columns are copied
        into the records. `distributed`: see `answer`."""
        items = _rows(rows)
        if not items:
            raise ValueError("No evaluation rows: pass at least one row with `question` and `answer`.")
        references = []
        for n, row in enumerate(items):
            if not isinstance(row.get("question"), str) or not row["question"].strip():
                raise ValueError(f"Evaluation row {n} needs a non-empty string `question`; got {row.get('question')!r}.")
            try:
                references.append(as_references(row["answer"] if "answer" in row else row.get("answers")))
            except ValueError as err:
                raise ValueError(f"Evaluation row {n} ({row['question']!r}): {err}") from None
        prompts = self.prompts(tokenizer, ({"question": r["question"]} for r in items))
        predictions = self.answer(model, tokenizer, prompts, distributed=distributed)
        scores = self.score(predictions, references)
        records = [{**row, "prediction": p, "score": s} for row, p, s in zip(items, predictions, scores, strict=True)]
        return QAEvalResult(accuracy=sum(scores) / len(scores), records=records, metric=self.metric)


def _rows(rows) -> list[dict]:
    if isinstance(rows, Mapping):  # a dict of columns
        keys = list(rows)
        return [dict(zip(keys, values, strict=True)) for values in zip(*(rows[k] for k in keys), strict=True)]
    return [dict(r) for r in rows]


def evaluate_qa(model, tokenizer, rows, **qa_kwargs) -> QAEvalResult:
    """`ClosedBookQA(**qa_kwargs).evaluate(model, tokenizer, rows)`."""
    return ClosedBookQA(**qa_kwargs).evaluate(model, tokenizer, rows)
