"""What keeps a run directory safe: one run at a time in it, no diverged phase recorded as finished.

- `RunLock`: an exclusive `fcntl` lock on `output_dir/.lock` for the whole run; a second run in the same directory
  stops at once with a message naming the holder. The kernel releases it when the process ends, even when killed, so
  a stale lock never blocks a resume.
- `DivergenceGuard`: a Trainer callback that stops a phase the moment a logged loss or gradient norm is not finite,
  naming the phase, the step and the value; and, at the end, a phase whose every logged gradient norm was exactly 0
  (nothing reached the trainable parameters).
- `check_finite`: no checkpoint is written from a memory holding NaN or infinity.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import SleepTrlError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not protected against each other
    fcntl = None

LOCK_NAME = ".lock"


class RunLockedError(SleepTrlError):
    """Another process is running in this output directory."""


class TrainingDivergedError(SleepTrlError):
    """A phase produced a non-finite loss, gradient or weight (or no gradient at all)."""


class RunLock:
    """`with RunLock(output_dir):` holds the directory for one run (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._handle = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RunLockedError(
                    f"{self.path.parent} is in use by another sleep-trl run ({holder}). Wait for it to finish, or "
                    "choose another `output_dir`."
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            if fcntl is not None:
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class DivergenceGuard(TrainerCallback):
    """Stop a phase on a non-finite loss or gradient norm; refuse a phase in which no gradient ever flowed."""

    def __init__(self, phase: str):
        self.phase = phase
        self.grad_norms: list[float] = []
        self._trainable: list[torch.Tensor] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The trainable tensors are small (the experts being learned): checked after every update, so a diverging
        # step is caught at once, with its number, even between logs (transformers hides NaN losses from its logs).
        if model is None:
            return
        if self._trainable is None:
            self._trainable = [getattr(p, "ds_tensor", p) for p in model.parameters() if p.requires_grad]
        if not all(bool(torch.isfinite(t.detach()).all()) for t in self._trainable if t.numel()):
            raise TrainingDivergedError(
                f"{self.phase} diverged at step {state.global_step}: the update left non-finite weights. Nothing "
                "of this phase was recorded; lower its learning rate (e.g. `--wake_args.learning_rate`) and run the "
                "same command again to resume."
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "train_loss", "grad_norm", "distill/loss", "imitation/loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise TrainingDivergedError(
                    f"{self.phase} diverged at step {state.global_step}: {key} = {value}. Nothing of this phase was "
                    "recorded; lower its learning rate (e.g. `--wake_args.learning_rate`) and run the same command "
                    "again to resume."
                )
        if isinstance((logs or {}).get("grad_norm"), (int, float)):
            self.grad_norms.append(float(logs["grad_norm"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self.grad_norms and all(g == 0.0 for g in self.grad_norms) and args.learning_rate > 0:
            raise TrainingDivergedError(
                f"{self.phase} collapsed: every logged gradient norm was 0 over {state.global_step} steps, so nothing "
                "was learned (no gradient reached the trainable parameters). Nothing of this phase was recorded."
            )


def check_finite(memory, phase: str) -> None:
    """Refuse to checkpoint a memory whose weights hold NaN or infinity."""
    bad = []
    for name, p in zip(memory.names(memory.parameters()), memory.parameters(), strict=True):
        local = getattr(p, "ds_tensor", p)  # under ZeRO-3 each process checks its own partition
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    if bad:
        raise TrainingDivergedError(
            f"{phase} left non-finite weights in the memory ({len(bad)} tensors, e.g. {bad[0]}); the phase was not "
            "recorded. Lower its learning rate and run the same command again to resume."
        )
