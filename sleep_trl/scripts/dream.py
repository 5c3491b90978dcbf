"""Job `dream`: DreamTrainer on passages (`recipes/dream.yaml`); see `sleep_trl.dreaming.job`."""

from ..dreaming.job import ARGUMENT_CLASSES, run  # noqa: F401
