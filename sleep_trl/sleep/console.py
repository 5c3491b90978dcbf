"""A console a person can read during a run: progress, phase summaries, the final tables, and nothing else.

The phase trainers show rich progress (TRL's `RichProgressCallback`); transformers' `PrinterCallback`, which would
print every logged metric a second time, is removed from them. The libraries' own progress bars (datasets'
per-map bars, five per wake; transformers' weight-loading bar) and their info messages are switched off for the run,
and the deprecation warnings they raise about arguments we do not pass are silenced.
"""

from __future__ import annotations

import contextlib
import warnings

import datasets
from transformers import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging
from trl import RichProgressCallback

# Deprecations raised inside the libraries, about their own defaults (TRL's configs default `gradient_checkpointing`,
# which transformers 5.2x renamed), not about anything sleep-trl or the user passes.
_LIBRARY_DEPRECATIONS = ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated")


@contextlib.contextmanager
def quiet_libraries():
    """Within the block: no datasets or transformers progress bars, transformers logs at error level only, the
    libraries' own deprecation warnings silenced. Everything is restored afterwards."""
    bars = datasets.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for text in _LIBRARY_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=text, category=FutureWarning)
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def quiet_trainer(trainer):
    """Keep one view of a trainer's logs: with a `RichProgressCallback`, drop transformers' printers."""
    if any(isinstance(cb, RichProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer
