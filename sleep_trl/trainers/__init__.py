"""The trainers of sleep-trl, each beside its config (TRL style)."""

from .dream_config import DreamConfig, DreamScriptArguments
from .dream_trainer import DreamTrainer
from .generalized_distillation_config import GeneralizedDistillationConfig
from .generalized_distillation_trainer import GeneralizedDistillationTrainer
from .shared_prefix_sft import SharedPrefixSFTTrainer

__all__ = [
    "DreamConfig",
    "DreamScriptArguments",
    "DreamTrainer",
    "GeneralizedDistillationConfig",
    "GeneralizedDistillationTrainer",
    "SharedPrefixSFTTrainer",
]
