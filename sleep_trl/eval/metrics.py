"""Continual-learning metrics from an accuracy matrix.

`R[i][j]` is the accuracy on session `j` after learning sessions `0..i` (T x T). The lower triangle (j <= i) measures
what was learned and kept; the upper triangle (j > i) is zero-shot accuracy on sessions not yet seen. An optional
`base` row holds the accuracy of the model before any session (needed for forward transfer).

Definitions (T sessions, indices from 0):
- average accuracy after session i: A_i = mean_{j<=i} R[i][j]; "average accuracy" is A_{T-1}.
- backward transfer (Lopez-Paz & Ranzato, GEM, 2017): BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting.
- forgetting (Chaudhry et al., RWalk, 2018): F = mean_{j<T-1} (max_{l in [j, T-2]} R[l][j] - R[T-1][j]): how far each
  earlier session fell from its best accuracy. Chaudhry et al. take the max over every earlier step l < T-1; their
  class-incremental setting has no accuracy on a task before it is learned, so the steps l < j contribute nothing
  there. Here the upper triangle holds real zero-shot scores, which are not something the model learned and could
  forget, so by default they are left out (`include_zero_shot=True` uses l in [0, T-2] literally).
- accuracy on new knowledge (learning accuracy): mean_i R[i][i].
- forward transfer (GEM): FWT = mean_{j>=1} (R[j-1][j] - base[j]): what earlier sessions did for a session not yet
  learned.

Metrics over an empty set (BWT and forgetting with T = 1, FWT with T = 1) are `nan`; `summarize` writes them as
`None` so the result stays valid JSON. The upper triangle may be left as `None` when zero-shot accuracy was not
measured; forward transfer is then nan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _as_matrix(R: Sequence[Sequence[float | None]]) -> list[list[float]]:
    """Validate R; the upper triangle may hold `None` (zero-shot not measured), read as nan."""
    rows = [[math.nan if x is None else float(x) for x in row] for row in R]
    T = len(rows)
    if T == 0:
        raise ValueError("The accuracy matrix R is empty: evaluate at least one session first.")
    for i, row in enumerate(rows):
        if len(row) != T:
            raise ValueError(
                f"The accuracy matrix R must be square (T x T = {T} x {T}); row {i} has {len(row)} values."
            )
        for j, x in enumerate(row):
            if (j <= i or not math.isnan(x)) and not 0.0 <= x <= 1.0:
                raise ValueError(f"R[{i}][{j}] = {x}: accuracies must lie in [0, 1] (and be filled in for j <= i).")
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def average_accuracy_per_session(R: Sequence[Sequence[float]]) -> list[float]:
    """A_i = mean_{j<=i} R[i][j], the average accuracy over the sessions seen so far, after each session i."""
    rows = _as_matrix(R)
    return [_mean(rows[i][: i + 1]) for i in range(len(rows))]


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    """Average accuracy over all sessions after the last one: mean_j R[T-1][j]."""
    return average_accuracy_per_session(R)[-1]


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (GEM). Negative values mean forgetting; nan when T = 1."""
    rows = _as_matrix(R)
    T = len(rows)
    return _mean([rows[T - 1][j] - rows[j][j] for j in range(T - 1)])


def forgetting(R: Sequence[Sequence[float]], include_zero_shot: bool = False) -> float:
    """F = mean_{j<T-1} (max_l R[l][j] - R[T-1][j]) with l in [j, T-2] (Chaudhry et al.); nan when T = 1.

    Args:
        include_zero_shot: also take the max over the steps l < j, before session j was learned (the literal
            formula over l in [0, T-2]).
    """
    rows = _as_matrix(R)
    T = len(rows)
    values = []
    for j in range(T - 1):
        first = 0 if include_zero_shot else j
        best = max(x for x in (rows[l][j] for l in range(first, T - 1)) if not math.isnan(x))
        values.append(best - rows[T - 1][j])
    return _mean(values)


def new_knowledge_accuracy(R: Sequence[Sequence[float]]) -> float:
    """Mean of the diagonal, mean_i R[i][i]: how well each session was learned right after learning it."""
    rows = _as_matrix(R)
    return _mean([rows[i][i] for i in range(len(rows))])


def forward_transfer(R: Sequence[Sequence[float]], base: Sequence[float]) -> float:
    """FWT = mean_{j>=1} (R[j-1][j] - base[j]) (GEM), with `base[j]` the accuracy on session j before any training;
    nan when T = 1."""
    rows = _as_matrix(R)
    T = len(rows)
    if len(base) != T:
        raise ValueError(f"`base` holds {len(base)} accuracies; it needs one per session ({T}).")
    return _mean([rows[j - 1][j] - float(base[j]) for j in range(1, T)])


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(R: Sequence[Sequence[float]], base: Sequence[float] | None = None) -> dict:
    """Every metric above in one JSON-ready dict (`nan` -> `None`); `forward_transfer` only when `base` is given."""
    out = {
        "average_accuracy": average_accuracy(R),
        "average_accuracy_per_session": average_accuracy_per_session(R),
        "backward_transfer": _json_number(backward_transfer(R)),
        "forgetting": _json_number(forgetting(R)),
        "new_knowledge_accuracy": new_knowledge_accuracy(R),
    }
    if base is not None:
        out["forward_transfer"] = _json_number(forward_transfer(R, base))
    return out
