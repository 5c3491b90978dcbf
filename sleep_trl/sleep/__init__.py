"""The wake/sleep cycle (`SleepCycle`, `SleepConfig`), its sleep step (`consolidate`), and `SleepCallback` /
`MemoryCheckpointCallback` for any transformers/TRL Trainer."""

from .callback import MemoryCheckpointCallback, SleepCallback
from .config import SleepConfig
from .consolidation import CONSOLIDATION_DEFAULTS, ConsolidationResult, consolidate, consolidation_fields
from .cycle import SleepCycle, run_sleep

__all__ = [
    "CONSOLIDATION_DEFAULTS",
    "ConsolidationResult",
    "MemoryCheckpointCallback",
    "SleepCallback",
    "SleepConfig",
    "SleepCycle",
    "consolidate",
    "consolidation_fields",
    "run_sleep",
]
