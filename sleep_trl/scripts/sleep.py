"""Job `sleep`: the whole Sleep cycle on the embedded world (wake, consolidate, dream, evaluate; resumable).

    sleep-trl recipes/sleep.yaml
    accelerate launch -m sleep_trl recipes/sleep.yaml
    sleep-trl recipes/sleep.yaml --sleep false --output_dir outputs/no-sleep    # the baseline, side by side
    sleep-trl recipes/sleep.yaml --consolidation_args.max_steps 60              # one phase trainer's field
"""

from __future__ import annotations

from ..sleep.config import SleepConfig
from ..sleep.cycle import run_sleep

ARGUMENT_CLASSES = (SleepConfig,)


def run(config: SleepConfig):
    return run_sleep(config)
