"""Job `sleep`: the whole Sleep cycle on the embedded world (wake, consolidate, dream, evaluate; resumable).

    sleep-trl recipes/sleep.yaml
    accelerate launch -m sleep_trl recipes/sleep.yaml
    sleep-trl recipes/sleep.yaml --sleep false --output_dir outputs/no-sleep    # the baseline, side by side
"""

from __future__ import annotations

from ..sleep.config import SleepConfig

ARGUMENT_CLASSES = (SleepConfig,)


def run(config: SleepConfig):
    from ..sleep.cycle import run_sleep

    return run_sleep(config)
