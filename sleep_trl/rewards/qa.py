"""Answer scoring shared by the evaluation, tau and the rewards: one vocabulary of metrics.

SQuAD-style normalisation (lower case, strip punctuation and articles, collapse whitespace), written out here because
it is six lines and the usual packages that carry it (`evaluate`, SQuAD scripts) fetch metric code from the Hub.

`ANSWER_METRICS` names every metric a prediction can be scored with against one reference; a question with several
references scores the best of them (`best_score`). `semantic` (two texts mean the same, by a sentence-embedding
judge) is scored by `sleep_trl.rewards.semantic.SemanticJudge`, not here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def contains_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised answer occurs in the normalised prediction as whole words (verbose answers count)."""
    pred, ans = normalize_answer(prediction), normalize_answer(answer)
    if not ans:
        return float(not pred)
    return float(re.search(rf"(^| ){re.escape(ans)}( |$)", pred) is not None)


def token_f1(prediction: str, answer: str) -> float:
    pred, ans = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not ans:
        return float(pred == ans)
    common = Counter(pred) & Counter(ans)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ans)
    return 2 * precision * recall / (precision + recall)


# The metric names, everywhere in sleep-trl (evaluation, tau, recipes).
ANSWER_METRICS = {"contains": contains_match, "exact_match": exact_match, "f1": token_f1}
METRICS = (*ANSWER_METRICS, "semantic")


def check_metric(metric: str, field: str = "metric") -> str:
    """`metric` if it is one of `METRICS`; a clear error naming the field and the choices otherwise."""
    if metric not in METRICS:
        raise ValueError(f"`{field}`={metric!r} is not supported: use one of {', '.join(METRICS)}.")
    return metric


def as_references(answer) -> list[str]:
    """A reference answer (a string) or several (a list of strings) as a non-empty list."""
    if isinstance(answer, str):
        return [answer]
    refs = [a for a in (answer or [])]
    if not refs or not all(isinstance(a, str) for a in refs):
        raise ValueError(f"A reference answer must be a string or a non-empty list of strings, got {answer!r}.")
    return refs


def best_score(prediction: str, references: Sequence[str], metric: str) -> float:
    """The best `metric` score of `prediction` over its accepted `references` (SQuAD's rule for several answers)."""
    score = ANSWER_METRICS[metric]
    return max(score(prediction, r) for r in references)
