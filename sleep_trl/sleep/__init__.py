"""The wake/sleep cycle (`SleepCycle`, `SleepConfig`) and the `SleepCallback` for any transformers/TRL Trainer."""

from .config import SleepConfig
from .cycle import SleepCycle, run_sleep

__all__ = ["SleepConfig", "SleepCycle", "run_sleep"]
