"""Continual-learning evaluation: closed-book QA (the one path tau uses too), accuracy matrix, metrics, plots."""

from .accuracy_matrix import AccuracyMatrix
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
from .qa import PLAIN_QA_TEMPLATE, ClosedBookQA, QAEvalResult, evaluate_qa, plain_qa_text

__all__ = [
    "PLAIN_QA_TEMPLATE",
    "AccuracyMatrix",
    "ClosedBookQA",
    "QAEvalResult",
    "accuracy_matrix_figure",
    "average_accuracy",
    "average_accuracy_per_session",
    "backward_transfer",
    "evaluate_qa",
    "forgetting",
    "forward_transfer",
    "new_knowledge_accuracy",
    "plain_qa_text",
    "save_accuracy_matrix_plot",
    "summarize",
]
