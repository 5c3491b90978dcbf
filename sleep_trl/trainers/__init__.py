"""The trainers of sleep-trl, each beside its config (TRL style)."""

from .generalized_distillation_config import GeneralizedDistillationConfig
from .generalized_distillation_trainer import GeneralizedDistillationTrainer

__all__ = ["GeneralizedDistillationConfig", "GeneralizedDistillationTrainer"]
