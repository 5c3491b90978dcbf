"""sleep-trl: the Sleep paradigm for continual learning of language models, on Hugging Face TRL."""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# Heavy imports (torch, transformers, trl) happen on first attribute access, so `import sleep_trl` and the CLI's
# argument errors stay fast.
_LAZY = {
    "DreamConfig": "sleep_trl.trainers.dream_config",
    "DreamTrainer": "sleep_trl.trainers.dream_trainer",
    "GeneralizedDistillationConfig": "sleep_trl.trainers.generalized_distillation_config",
    "GeneralizedDistillationTrainer": "sleep_trl.trainers.generalized_distillation_trainer",
    "SleepCallback": "sleep_trl.sleep.callback",
    "SleepConfig": "sleep_trl.sleep.config",
    "SleepCycle": "sleep_trl.sleep.cycle",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sleep_trl' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .sleep import SleepCallback, SleepConfig, SleepCycle  # noqa: F401
    from .trainers import (  # noqa: F401
        DreamConfig,
        DreamTrainer,
        GeneralizedDistillationConfig,
        GeneralizedDistillationTrainer,
    )
