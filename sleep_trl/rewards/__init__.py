"""Rewards: imitation (edit distance, semantic judge) and answer scoring."""

from .edit_distance import edit_similarity
from .qa import contains_match, exact_match, normalize_answer, token_f1
from .semantic import SemanticJudge

__all__ = ["SemanticJudge", "contains_match", "edit_similarity", "exact_match", "normalize_answer", "token_f1"]
