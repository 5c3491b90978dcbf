"""The accuracy matrix of a continual-learning run, filled one row per session, saved as JSON, shown as a rich table.

Row `i` holds the accuracies on every session after learning session `i` (the upper triangle is zero-shot accuracy
on sessions not seen yet); the optional `base` row holds them before any training. Per-question records can be kept
beside each cell so a report shows what the model answered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..io import atomic_write_text
from . import metrics
from .qa import ClosedBookQA, QAEvalResult

FORMAT = "sleep_trl.accuracy_matrix/1"


def _cell_key(after: int | None, session: int) -> str:
    return f"{'base' if after is None else after},{session}"


@dataclass
class AccuracyMatrix:
    """R[i][j] = accuracy on session j after learning session i; `None` where not measured yet.

    Args:
        num_sessions: T, the number of sessions of the stream.
        metric: name of the score used (recorded for the report).
        session_names: labels for the table and plot (default "0", "1", ...).
    """

    num_sessions: int
    metric: str = "contains"
    session_names: list[str] | None = None
    R: list[list[float | None]] = field(default_factory=list)
    base: list[float | None] | None = None
    records: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.num_sessions, int) or self.num_sessions < 1:
            raise ValueError(f"AccuracyMatrix.num_sessions={self.num_sessions!r}: must be a positive integer.")
        if not self.R:
            self.R = [[None] * self.num_sessions for _ in range(self.num_sessions)]
        if self.session_names is None:
            self.session_names = [str(j) for j in range(self.num_sessions)]
        if len(self.session_names) != self.num_sessions:
            raise ValueError(
                f"session_names has {len(self.session_names)} labels for {self.num_sessions} sessions; "
                "give one per session."
            )

    # -- filling -----------------------------------------------------------------------------------------------------

    def _check_index(self, name: str, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value < self.num_sessions:
            raise IndexError(f"{name}={value!r} is outside the sessions 0..{self.num_sessions - 1}.")

    def record(self, after: int | None, session: int, accuracy: float, records: list[dict] | None = None) -> None:
        """Store the accuracy on `session` after learning session `after` (`None`: before any training)."""
        if after is not None:
            self._check_index("after", after)
        self._check_index("session", session)
        accuracy = float(accuracy)
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy={accuracy} for cell ({after}, {session}) must lie in [0, 1].")
        if after is None:
            if self.base is None:
                self.base = [None] * self.num_sessions
            self.base[session] = accuracy
        else:
            self.R[after][session] = accuracy
        if records is not None:
            self.records[_cell_key(after, session)] = list(records)

    def fill_row(
        self,
        after: int | None,
        evaluate: Callable[[int], float | QAEvalResult],
        sessions: Sequence[int] | None = None,
    ) -> list[float]:
        """Evaluate every session (or `sessions`) with `evaluate(j)` and store row `after`; returns the accuracies."""
        chosen = list(range(self.num_sessions)) if sessions is None else list(sessions)
        row = []
        for j in chosen:
            result = evaluate(j)
            if isinstance(result, QAEvalResult):
                self.record(after, j, result.accuracy, result.records)
                row.append(result.accuracy)
            else:
                self.record(after, j, result)
                row.append(float(result))
        return row

    def evaluate_model(
        self,
        after: int | None,
        model,
        tokenizer,
        session_rows: Sequence,
        sessions: Sequence[int] | None = None,
        qa: ClosedBookQA | None = None,
        distributed: bool = False,
    ) -> list[float]:
        """Fill row `after` by asking each session's rows (`session_rows[j]`, e.g. `world.sessions[j].eval_qa`)
        through `qa` (default: `ClosedBookQA` with this matrix's metric); its metric must be this matrix's. With
        `distributed`, the questions are split across the processes of the run and the answers gathered."""
        if len(session_rows) != self.num_sessions:
            raise ValueError(f"session_rows holds {len(session_rows)} sessions; the matrix has {self.num_sessions}.")
        qa = qa or ClosedBookQA(metric=self.metric)
        if qa.metric != self.metric:
            raise ValueError(f"metric={qa.metric!r} differs from this matrix's metric {self.metric!r}.")
        return self.fill_row(
            after, lambda j: qa.evaluate(model, tokenizer, session_rows[j], distributed=distributed), sessions
        )

    # -- reading -----------------------------------------------------------------------------------------------------

    @property
    def completed(self) -> int:
        """Number of leading rows whose lower triangle (j <= i) is fully measured."""
        done = 0
        for i, row in enumerate(self.R):
            if any(x is None for x in row[: i + 1]):
                break
            done = i + 1
        return done

    def block(self) -> list[list[float | None]]:
        """The completed leading block R[:k][:k] (k = `completed`), the part the metrics are defined on."""
        k = self.completed
        return [row[:k] for row in self.R[:k]]

    def summary(self) -> dict:
        """`metrics.summarize` over the completed block (forward transfer when the base row covers it), plus
        `sessions_completed`."""
        k = self.completed
        if k == 0:
            return {"sessions_completed": 0}
        base = None
        if self.base is not None and all(x is not None for x in self.base[:k]):
            base = self.base[:k]
        return {"sessions_completed": k, **metrics.summarize(self.block(), base)}

    # -- persistence -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "num_sessions": self.num_sessions,
            "metric": self.metric,
            "session_names": self.session_names,
            "R": self.R,
            "base": self.base,
            "summary": self.summary(),
            "records": self.records,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping) -> AccuracyMatrix:
        if data.get("format") != FORMAT:
            raise ValueError(f"Not an accuracy matrix (format={data.get('format')!r}); expected {FORMAT!r}.")
        return cls(
            num_sessions=data["num_sessions"],
            metric=data["metric"],
            session_names=list(data["session_names"]),
            R=[list(row) for row in data["R"]],
            base=None if data.get("base") is None else list(data["base"]),
            records=dict(data.get("records") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> AccuracyMatrix:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the JSON to `path`; refuses to replace an existing file unless `overwrite=True`."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path.")
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> AccuracyMatrix:
        return cls.from_json(Path(path).read_text())

    # -- display -----------------------------------------------------------------------------------------------------

    def table(self, title: str | None = "Accuracy matrix R[i][j]", caption: bool = True):
        """A `rich.table.Table`: one row per training step (and the base row), one column per session, the average
        over sessions seen so far, and (with `caption`) the summary metrics. Zero-shot cells (j > i) are dimmed."""
        summary = self.summary()
        table = Table(
            title=None if title is None else escape(title),
            caption=self.summary_line() if caption else None,
        )
        table.add_column("after", justify="left", style="bold")
        for name in self.session_names:
            table.add_column(f"session {name}", justify="right")
        table.add_column("avg seen", justify="right", style="bold")

        def cell(x: float | None, zero_shot: bool) -> str:
            if x is None:
                return "-"
            return f"[dim]{x:.2f}[/dim]" if zero_shot else f"{x:.2f}"

        if self.base is not None:
            table.add_row("base", *[cell(x, True) for x in self.base], "")
        per_session = summary.get("average_accuracy_per_session", [])
        for i, row in enumerate(self.R):
            if all(x is None for x in row):
                continue
            avg = f"{per_session[i]:.2f}" if i < len(per_session) else ""
            table.add_row(self.session_names[i], *[cell(x, j > i) for j, x in enumerate(row)], avg)
        return table

    def print(self, console=None, title: str | None = "Accuracy matrix R[i][j]") -> None:
        """Print the table and, below it on one line, the summary metrics to `console` (a new rich `Console` by
        default)."""
        console = console or Console()
        console.print(self.table(title=title, caption=False))
        console.print(self.summary_line())

    def summary_line(self) -> str:
        """The summary metrics on one line: metric, average accuracy, new knowledge, BWT, forgetting (and FWT)."""
        return _summary_line(self.summary(), self.metric)


def _summary_line(summary: Mapping, metric: str) -> str:
    if not summary.get("sessions_completed"):
        return f"metric: {metric}"

    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"

    parts = [
        f"metric: {metric}",
        f"average accuracy {summary['average_accuracy']:.3f}",
        f"new knowledge {summary['new_knowledge_accuracy']:.3f}",
        f"BWT {fmt(summary['backward_transfer'])}",
        f"forgetting {fmt(summary['forgetting'])}",
    ]
    if "forward_transfer" in summary:
        parts.append(f"FWT {fmt(summary['forward_transfer'])}")
    return " | ".join(parts)
