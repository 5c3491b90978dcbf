"""Answer scoring shared by the dream reward (tau) and the continual-learning evaluation.

SQuAD-style normalisation (lower case, strip punctuation and articles, collapse whitespace), written out here because
it is six lines and the usual packages that carry it (`evaluate`, SQuAD scripts) fetch metric code from the Hub.
"""

from __future__ import annotations

import re
import string
from collections import Counter

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
