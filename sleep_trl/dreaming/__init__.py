"""Dreaming (sleep stage 2): dream prompts, tau, gradient-based selection, the isolated inner loop.

The trainer that ties them together is `sleep_trl.trainers.dream_trainer.DreamTrainer` (config: `DreamConfig`).
"""

from .experts import random_expert_sampling
from .inner_loop import (
    DreamEvaluation,
    InnerLoopConfig,
    IsolatedAdapter,
    compute_reward,
    evaluate_dreams,
    train_adapter,
)
from .passages import DEMO_PASSAGES, demo_tasks
from .selection import dream_importance, resolve_importance_parameters, select_dreams
from .tau import GenerativeTau, HeldOutDemoAccuracy, NoContextQA, Tau, build_tau
from .templates import DREAM_TEMPLATES, build_dream_prompt, split_dream

__all__ = [
    "DEMO_PASSAGES",
    "DREAM_TEMPLATES",
    "DreamEvaluation",
    "GenerativeTau",
    "HeldOutDemoAccuracy",
    "InnerLoopConfig",
    "IsolatedAdapter",
    "NoContextQA",
    "Tau",
    "build_dream_prompt",
    "build_tau",
    "compute_reward",
    "demo_tasks",
    "dream_importance",
    "evaluate_dreams",
    "random_expert_sampling",
    "resolve_importance_parameters",
    "select_dreams",
    "split_dream",
    "train_adapter",
]
