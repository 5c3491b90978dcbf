"""Continual-learning metrics and the accuracy matrix, against numbers computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from sleep_trl.eval import (
    AccuracyMatrix,
    QAEvalResult,
    accuracy_matrix_figure,
    average_accuracy,
    average_accuracy_per_session,
    backward_transfer,
    forgetting,
    forward_transfer,
    new_knowledge_accuracy,
    save_accuracy_matrix_plot,
    summarize,
)

# Session 0 peaks after session 1 (0.85), so forgetting (from the best) differs from -BWT (from the diagonal).
R = [
    [0.80, 0.10, 0.00],
    [0.85, 0.90, 0.20],
    [0.40, 0.60, 0.70],
]
BASE = [0.00, 0.05, 0.10]


def test_metrics_match_hand_computed_values():
    # last row: (0.40 + 0.60 + 0.70) / 3
    assert average_accuracy(R) == pytest.approx(1.70 / 3)
    # [0.80, (0.85 + 0.90) / 2, 1.70 / 3]
    assert average_accuracy_per_session(R) == pytest.approx([0.80, 0.875, 1.70 / 3])
    # ((0.40 - 0.80) + (0.60 - 0.90)) / 2
    assert backward_transfer(R) == pytest.approx(-0.35)
    # ((max(0.80, 0.85) - 0.40) + (0.90 - 0.60)) / 2
    assert forgetting(R) == pytest.approx(0.375)
    # (0.80 + 0.90 + 0.70) / 3
    assert new_knowledge_accuracy(R) == pytest.approx(0.80)
    # ((0.10 - 0.05) + (0.20 - 0.10)) / 2
    assert forward_transfer(R, BASE) == pytest.approx(0.075)


def test_forgetting_ignores_zero_shot_unless_asked():
    high_zero_shot = [
        [0.80, 0.95, 0.00],
        [0.85, 0.90, 0.20],
        [0.40, 0.60, 0.70],
    ]
    # default: l in [j, T-2]; session 1 peaks at 0.90 -> ((0.85 - 0.40) + (0.90 - 0.60)) / 2
    assert forgetting(high_zero_shot) == pytest.approx(0.375)
    # literal l in [0, T-2]: session 1's best is the zero-shot 0.95 -> ((0.85 - 0.40) + (0.95 - 0.60)) / 2
    assert forgetting(high_zero_shot, include_zero_shot=True) == pytest.approx(0.40)


def test_single_session_and_unmeasured_upper_triangle():
    assert math.isnan(backward_transfer([[0.5]]))
    assert math.isnan(forgetting([[0.5]]))
    out = summarize([[0.5]])
    assert out["backward_transfer"] is None and out["forgetting"] is None
    json.dumps(out, allow_nan=False)  # valid JSON
    partial = [[0.8, None], [0.6, 0.9]]
    assert backward_transfer(partial) == pytest.approx(-0.2)
    assert math.isnan(forward_transfer(partial, [0.0, 0.0]))


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        average_accuracy([[0.1, 0.2], [None, 0.3]])
    with pytest.raises(ValueError, match=r"R\[0\]\[0\]"):
        average_accuracy([[1.5]])
    with pytest.raises(ValueError, match="empty"):
        average_accuracy([])
    with pytest.raises(ValueError, match="base"):
        forward_transfer(R, [0.0, 0.0])


def _filled_matrix() -> AccuracyMatrix:
    m = AccuracyMatrix(num_sessions=3)
    m.fill_row(None, lambda j: BASE[j])
    for i in range(3):
        records = [{"question": "q", "answer": "a", "prediction": "a", "score": 1.0}]
        m.fill_row(i, lambda j, i=i: QAEvalResult(accuracy=R[i][j], records=records) if j == i else R[i][j])
    return m


def test_accuracy_matrix_fills_incrementally_and_summarises_the_completed_block():
    m = AccuracyMatrix(num_sessions=3)
    assert m.completed == 0 and m.summary() == {"sessions_completed": 0}
    m.fill_row(0, lambda j: R[0][j])
    m.fill_row(1, lambda j: R[1][j], sessions=[0, 1])  # zero-shot on session 2 not measured
    assert m.completed == 2
    assert m.block() == [[0.80, 0.10], [0.85, 0.90]]
    s = m.summary()
    assert s["sessions_completed"] == 2
    assert s["backward_transfer"] == pytest.approx(0.05)  # 0.85 - 0.80
    assert s["average_accuracy"] == pytest.approx(0.875)
    assert "forward_transfer" not in s  # no base row
    full = _filled_matrix().summary()
    assert full["forward_transfer"] == pytest.approx(0.075)
    assert full["forgetting"] == pytest.approx(0.375)


def test_accuracy_matrix_refuses_bad_cells():
    m = AccuracyMatrix(num_sessions=2)
    with pytest.raises(IndexError, match="after=2"):
        m.record(2, 0, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.record(0, 0, 1.2)
    with pytest.raises(ValueError, match="session_names"):
        AccuracyMatrix(num_sessions=2, session_names=["a"])


def test_accuracy_matrix_json_round_trip_and_no_overwrite(tmp_path):
    m = _filled_matrix()
    path = m.save(tmp_path / "accuracy_matrix.json")
    data = json.loads(path.read_text())
    assert data["R"] == R and data["base"] == BASE
    assert data["summary"]["backward_transfer"] == pytest.approx(-0.35)
    assert data["records"]["1,1"][0]["prediction"] == "a"
    again = AccuracyMatrix.load(path)
    assert again.to_dict() == m.to_dict()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        m.save(path)
    m.save(path, overwrite=True)


def test_table_shows_every_measured_cell_and_the_summary():
    from rich.console import Console

    console = Console(record=True, width=160)
    _filled_matrix().print(console)
    text = console.export_text()
    assert "R[i][j]" in text
    for row in R:
        for x in row:
            assert f"{x:.2f}" in text
    assert "BWT -0.350" in text and "forgetting +0.375" in text and "FWT +0.075" in text
    assert "0.57" in text  # average over the sessions seen after session 2: 1.70 / 3


def test_plot_annotates_every_cell_and_writes_a_png(tmp_path):
    m = _filled_matrix()
    fig = accuracy_matrix_figure(m)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == [f"{x:.2f}" for row in [BASE, *R] for x in row]
    path = save_accuracy_matrix_plot(m, tmp_path / "accuracy_matrix.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        save_accuracy_matrix_plot(m, path)
    with pytest.raises(ValueError, match=".png"):
        save_accuracy_matrix_plot(m, tmp_path / "plot.jpg")
