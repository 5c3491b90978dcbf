"""The absolute imitation reward r_abs (paper notes §3c), on top of rapidfuzz's Levenshtein distance.

    r_abs(d_hat, d) = 1 - lev(d_hat, d) / max(|d_hat|, |d|)   if lev(d_hat, d) <= z0, else 0

`lev` is rapidfuzz's (maintained, C++) Levenshtein distance. It accepts strings (characters) and sequences of
hashables, so the same function scores token-id sequences: the trainers compare token ids by default, so `z0`
(`max_edit_distance`) is counted in tokens, in the same unit as `max_completion_length`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def edit_similarity(prediction: str | Sequence[int], reference: str | Sequence[int], max_edit_distance=None) -> float:
    """Normalised edit-distance similarity in [0, 1], zeroed when the distance exceeds `max_edit_distance`."""
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 1.0
    distance = Levenshtein.distance(prediction, reference)
    if max_edit_distance is not None and distance > max_edit_distance:
        return 0.0
    return 1.0 - distance / longest
