"""The wake/sleep cycle (`SleepCycle`, `SleepConfig`) and the `SleepCallback` for any transformers/TRL Trainer."""

from .callback import SleepCallback
from .config import SleepConfig
from .cycle import SleepCycle, run_sleep

__all__ = ["SleepCallback", "SleepConfig", "SleepCycle", "run_sleep"]
