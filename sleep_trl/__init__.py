"""sleep-trl: the Sleep paradigm for continual learning of language models, on Hugging Face TRL."""

from importlib import import_module
from typing import TYPE_CHECKING

from ._version import __version__

# Heavy imports (torch, transformers, trl) happen on first attribute access, so `import sleep_trl` and the CLI's
# argument errors stay fast.
_LAZY = {
    "ConsolidationResult": "sleep_trl.sleep.consolidation",
    "DreamConfig": "sleep_trl.trainers.dream_config",
    "DreamTrainer": "sleep_trl.trainers.dream_trainer",
    "GeneralizedDistillationConfig": "sleep_trl.trainers.generalized_distillation_config",
    "GeneralizedDistillationTrainer": "sleep_trl.trainers.generalized_distillation_trainer",
    "MemoryCheckpointCallback": "sleep_trl.sleep.callback",
    "SharedPrefixSFTTrainer": "sleep_trl.trainers.shared_prefix_sft",
    "SleepCallback": "sleep_trl.sleep.callback",
    "SleepConfig": "sleep_trl.sleep.config",
    "SleepCycle": "sleep_trl.sleep.cycle",
    "consolidate": "sleep_trl.sleep.consolidation",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sleep_trl' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .sleep import (  # noqa: F401
        ConsolidationResult,
        MemoryCheckpointCallback,
        SleepCallback,
        SleepConfig,
        SleepCycle,
        consolidate,
    )
    from .trainers import (  # noqa: F401
        DreamConfig,
        DreamTrainer,
        GeneralizedDistillationConfig,
        GeneralizedDistillationTrainer,
        SharedPrefixSFTTrainer,
    )
