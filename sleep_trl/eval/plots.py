"""Heatmap of an accuracy matrix (`accuracy_matrix.png`), drawn with matplotlib's Agg canvas.

The figure is built on `matplotlib.figure.Figure` with an Agg canvas rather than `pyplot`, so it never opens a
window, needs no display, and leaves the user's global backend alone.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write
from .accuracy_matrix import AccuracyMatrix


def accuracy_matrix_figure(matrix: AccuracyMatrix, title: str | None = None):
    """A `Figure` with R as a heatmap (rows: after session i, plus `base` when present; columns: session j), each
    measured cell annotated with its value, zero-shot cells (j > i) marked with a hatch, unmeasured cells blank.
    The title carries the summary metrics."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = ([("base", matrix.base, -1)] if matrix.base is not None else []) + [
        (matrix.session_names[i], row, i) for i, row in enumerate(matrix.R)
    ]
    values = np.array([[np.nan if x is None else x for x in row] for _, row, _ in rows], dtype=float)
    T = matrix.num_sessions
    fig = Figure(figsize=(1.2 * T + 2.4, 0.9 * len(rows) + 1.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"accuracy ({matrix.metric})")
    for r, (_, row, i) in enumerate(rows):
        for j, x in enumerate(row):
            if x is None:
                continue
            ax.text(j, r, f"{x:.2f}", ha="center", va="center", color="white" if x < 0.6 else "black", fontsize=10)
            if j > i:  # zero-shot: the session was not learned yet
                ax.add_patch(_hatch(j, r))
    ax.set_xticks(range(T), [f"session {n}" for n in matrix.session_names])
    ax.set_yticks(range(len(rows)), [name if i < 0 else f"after {name}" for name, _, i in rows])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained through")
    summary = matrix.summary()
    subtitle = ""
    if summary.get("sessions_completed"):
        bwt = summary["backward_transfer"]
        subtitle = f"\navg acc {summary['average_accuracy']:.2f}" + (f", BWT {bwt:+.2f}" if bwt is not None else "")
    ax.set_title((title or "Accuracy matrix") + subtitle)
    fig.tight_layout()
    return fig


def _hatch(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="//", edgecolor="grey", linewidth=0)


def save_accuracy_matrix_plot(
    matrix: AccuracyMatrix, path: str | Path, title: str | None = None, overwrite: bool = False
) -> Path:
    """Save `accuracy_matrix_figure(matrix)` as a PNG at `path` (e.g. `output_dir/accuracy_matrix.png`); refuses to
    replace an existing file unless `overwrite=True`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the accuracy matrix plot is a PNG; give a path ending in .png.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path.")
    figure = accuracy_matrix_figure(matrix, title=title)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
