"""The run ledger: which phases of the Sleep cycle are finished, so a killed run resumes where it stopped.

`cycle_state.json` in the output directory records the configuration fingerprint and, per finished phase, its
session, name, duration, metrics, checkpoint folder and the SHA-256 of the checkpoint's `memory.safetensors`. It is
rewritten atomically (temporary file + rename) after each phase, so an interruption leaves either the previous
ledger or the new one, never half of one. A phase counts as done only once its checkpoint is fully written and the
ledger names it. A ledger with no finished training phase holds nothing to protect: a run that failed before its first
wake or sleep can be started again with a corrected configuration in the same directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SleepTrlError
from ..io import atomic_write_json, sha256_file

LEDGER_NAME = "cycle_state.json"
FORMAT = "sleep_trl.cycle/1"


class LedgerMismatchError(SleepTrlError):
    """The output directory holds a run with a different configuration."""


@dataclass
class PhaseRecord:
    session: int
    phase: str
    seconds: float
    checkpoint: str | None = None
    metrics: dict = field(default_factory=dict)
    checksum: str | None = None  # SHA-256 of the checkpoint's memory.safetensors


@dataclass
class Ledger:
    path: Path
    fingerprint: dict
    phases: list[PhaseRecord] = field(default_factory=list)
    matrix: dict | None = None
    finished: bool = False
    writer: bool = True  # only the main process of a multi-process run writes the ledger

    @classmethod
    def open(cls, output_dir: str | os.PathLike, fingerprint: dict, defaults: dict | None = None,
             writer: bool = True, normalize: Callable[[dict], dict] | None = None) -> Ledger:
        """Load the ledger of `output_dir`, or start one. Refuses a directory that holds anything else.

        `defaults` maps fields to their default values: a field the stored fingerprint lacks (a run started by an
        older version, before the field existed) matches when the current value is that default. `normalize`
        rewrites the stored fingerprint as the current version writes one (fields it no longer counts)."""
        output_dir = Path(output_dir)
        path = output_dir / LEDGER_NAME
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise LedgerMismatchError(
                    f"{path} is damaged (not valid JSON: {err}). The phase checkpoints under {output_dir}/checkpoints "
                    "are untouched; restore the ledger from a backup, or move the directory away and start again."
                ) from None
            if data.get("format") != FORMAT:
                raise LedgerMismatchError(f"{path} is not a sleep-trl run ledger.")
            if writer and not any(p["phase"] != "base" for p in data.get("phases", [])):
                # Nothing was learned yet (at most the zero-shot evaluation ran): a run that failed early, e.g. on a
                # bad setting, is started afresh with the corrected configuration.
                ledger = cls(path=path, fingerprint=fingerprint)
                ledger.write()
                return ledger
            stored = dict(data["fingerprint"])
            for key, value in (defaults or {}).items():
                if key in fingerprint and key not in stored and fingerprint[key] == value:
                    stored[key] = value
            if normalize is not None:
                stored = normalize(stored)
            if stored != fingerprint:
                diff = sorted(k for k in set(stored) | set(fingerprint)
                              if k not in stored or k not in fingerprint or stored[k] != fingerprint[k])
                raise LedgerMismatchError(
                    f"{output_dir} holds a run with a different configuration (fields differ: {', '.join(diff)}). "
                    "Resume it with its own configuration, or choose a new `output_dir`: finished work is never "
                    "overwritten."
                )
            return cls(
                path=path,
                fingerprint=stored,
                phases=[PhaseRecord(**p) for p in data["phases"]],
                matrix=data.get("matrix"),
                finished=data.get("finished", False),
                writer=writer,
            )
        if not writer:
            raise LedgerMismatchError(f"{path} was not written by the main process: it holds no run.")
        if output_dir.exists() and any(p.name != ".lock" for p in output_dir.iterdir()):
            raise LedgerMismatchError(
                f"{output_dir} exists and is not empty, but holds no sleep-trl run. Choose a new `output_dir`."
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        ledger = cls(path=path, fingerprint=fingerprint)
        ledger.write()
        return ledger

    def done(self, session: int, phase: str) -> bool:
        return any(p.session == session and p.phase == phase for p in self.phases)

    def last_checkpoint(self) -> str | None:
        record = self.last_checkpointed()
        return None if record is None else record.checkpoint

    def last_checkpointed(self) -> PhaseRecord | None:
        """The newest finished phase that wrote a checkpoint (what a resumed run loads)."""
        for record in reversed(self.phases):
            if record.checkpoint is not None:
                return record
        return None

    def verify(self, record: PhaseRecord) -> Path:
        """The checkpoint folder of `record`, after checking its weights against the checksum the ledger keeps."""
        folder = self.path.parent / record.checkpoint
        weights = folder / "memory.safetensors"
        if not weights.is_file():
            raise LedgerMismatchError(
                f"{weights} is missing, but the ledger records phase {record.phase!r} of session {record.session} as "
                "finished. Restore the file, or start a new run in another `output_dir`."
            )
        if record.checksum is not None and sha256_file(weights) != record.checksum:
            raise LedgerMismatchError(
                f"{weights} does not match the checksum the ledger recorded when phase {record.phase!r} of session "
                f"{record.session} finished: the file is damaged. Restore it, or start a new run in another "
                "`output_dir`."
            )
        return folder

    def record(self, record: PhaseRecord, matrix: dict | None = None) -> None:
        self.phases.append(record)
        if matrix is not None:
            self.matrix = matrix
        self.write()

    def write(self) -> None:
        if not self.writer:
            return
        data = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "phases": [vars(p) for p in self.phases],
            "matrix": self.matrix,
            "finished": self.finished,
        }
        atomic_write_json(self.path, data)
