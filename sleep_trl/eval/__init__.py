"""Continual-learning evaluation: closed-book QA harness, accuracy matrix, metrics (BWT, forgetting), plots."""

from .accuracy_matrix import AccuracyMatrix
from .harness import METRICS, QAEvalResult, build_prompts, evaluate_qa, generate_greedy, score_predictions
from .metrics import (
    average_accuracy,
    average_accuracy_per_session,
    backward_transfer,
    forgetting,
    forward_transfer,
    new_knowledge_accuracy,
    summarize,
)
from .plots import accuracy_matrix_figure, save_accuracy_matrix_plot

__all__ = [
    "METRICS",
    "AccuracyMatrix",
    "QAEvalResult",
    "accuracy_matrix_figure",
    "average_accuracy",
    "average_accuracy_per_session",
    "backward_transfer",
    "build_prompts",
    "evaluate_qa",
    "forgetting",
    "forward_transfer",
    "generate_greedy",
    "new_knowledge_accuracy",
    "save_accuracy_matrix_plot",
    "score_predictions",
    "summarize",
]
