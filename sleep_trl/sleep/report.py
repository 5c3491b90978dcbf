"""The end of a Sleep run: the saved model (+ memory), `sleep_report.json`, `accuracy_matrix.png`, the model card
(`model_card.py`), the upload (`publish.py`) and a table a person can read at a glance."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from rich.table import Table

from .._version import __version__
from ..eval import AccuracyMatrix, save_accuracy_matrix_plot
from ..generation.distributed import main_decides, wait_for_everyone
from ..io import atomic_write_json, atomic_write_text, publish_dir
from .model_card import build_model_card
from .publish import push_model_folder, repo_name

REPORT_NAME = "sleep_report.json"
PLOT_NAME = "accuracy_matrix.png"
MODEL_DIR = "model"
METHOD_LABELS = {
    "sleep": "sleep",
    "sequential": "sequential fine-tuning (no sleep)",
    "replay": "sequential fine-tuning with pseudo-rehearsal (no sleep)",
    "expert_per_session": "one fresh expert per session (no sleep)",
    "dream_only": "dreams as training data, one fresh expert per session (no sleep)",
}


def _phase_table(ledger) -> list[dict]:
    return [
        {"session": p.session, "phase": p.phase, "seconds": p.seconds, "metrics": p.metrics} for p in ledger.phases
    ]


def _experts(ledger) -> list[dict]:
    """One slow expert is added per consolidation: the lineage of the model's long-term memory."""
    return [
        {"session": p.session, "level": "slow", "slot": i, "after": p.metrics}
        for i, p in enumerate(q for q in ledger.phases if q.phase == "consolidate")
    ]


def consolidation_block(ledger, matrix) -> dict | None:
    """With `eval_awake`: per session, the awake accuracy (after the wake, before the sleep), the diagonal (after the
    sleep) and their ratio, `retention` (what consolidation kept of what the fast memory knew; None where the awake
    model knew nothing)."""
    awake = {p.session: p.metrics["awake_accuracy"] for p in ledger.phases
             if p.phase == "wake" and "awake_accuracy" in p.metrics}
    if not awake:
        return None
    sessions = sorted(awake)
    diagonal = [matrix.R[k][k] for k in sessions]
    return {
        "sessions": sessions,
        "awake_accuracy": [awake[k] for k in sessions],
        "diagonal": diagonal,
        "retention": [None if d is None or not awake[k] else round(d / awake[k], 4)
                      for k, d in zip(sessions, diagonal, strict=True)],
    }


def build_report(cycle, ledger, wall_seconds: float) -> dict:
    cfg = cycle.config
    matrix = cycle.matrix
    seconds_by_phase: dict[str, float] = {}
    for p in ledger.phases:
        seconds_by_phase[p.phase] = round(seconds_by_phase.get(p.phase, 0.0) + p.seconds, 2)
    return {
        "format": "sleep_trl.report/1",
        "sleep_trl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "mode": METHOD_LABELS[cfg.method],
        "method": cfg.method,
        "config": cfg.to_dict(),
        "model": {"base": cfg.model_name_or_path, "path": str(cycle.model_path)},
        "data": cycle.stream.describe(),
        "memory": repr(cycle.memory),
        "experts_added": _experts(ledger),
        "phases": _phase_table(ledger),
        "seconds_by_phase": seconds_by_phase,
        "seconds_total_phases": round(sum(p.seconds for p in ledger.phases), 2),
        "seconds_this_invocation": round(wall_seconds, 2),
        "accuracy_matrix": matrix.to_dict(),
        "summary": matrix.summary(),
        "consolidation": consolidation_block(ledger, matrix),
    }


def summary_table(report: dict) -> Table:
    s = report["summary"]
    table = Table(title=f"Sleep run: {report['mode']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(x):
        return "-" if x is None else f"{x:+.3f}" if isinstance(x, float) and x < 0 else f"{x:.3f}"

    labels = {
        "average_accuracy": "average accuracy after the last session",
        "new_knowledge_accuracy": "accuracy on new knowledge (diagonal)",
        "backward_transfer": "backward transfer (BWT)",
        "forgetting": "forgetting",
        "forward_transfer": "forward transfer",
    }
    for key, label in labels.items():
        if key in s:
            table.add_row(label, fmt(s[key]))
    table.add_row("wall time of the phases (s)", f"{report['seconds_total_phases']:.0f}")
    return table


def finalize(cycle, ledger, wall_seconds: float) -> dict:
    """Save the model folder (every process takes part: under ZeRO-3 the weights are gathered), then, on the main
    process only, the report, the plot, the model card, the ledger's end mark, and the upload if asked for."""
    out = cycle.output_dir
    model_dir = out / MODEL_DIR
    if main_decides(lambda: not (model_dir / "config.json").exists()):
        tmp = out / (MODEL_DIR + ".tmp")
        # host + memory.safetensors + memory_config.json + tokenizer
        cycle.memory.save_pretrained(tmp, tokenizer=cycle.tokenizer, is_main_process=cycle.main)
        if cycle.main:
            publish_dir(tmp, model_dir)
    report = build_report(cycle, ledger, wall_seconds)
    if cycle.main:
        _write_outputs(cycle, report)
        ledger.finished = True
        ledger.write()
        show(report, cycle.matrix, cycle.console)
        if cycle.config.push_to_hub:
            report = push(cycle, report)
    wait_for_everyone()
    return report


def _write_outputs(cycle, report: dict) -> None:
    out, model_dir = cycle.output_dir, cycle.output_dir / MODEL_DIR
    title = f"R[i][j] · {report['mode']}"
    save_accuracy_matrix_plot(cycle.matrix, out / PLOT_NAME, title=title, overwrite=True)
    save_accuracy_matrix_plot(cycle.matrix, model_dir / PLOT_NAME, title=title, overwrite=True)
    atomic_write_json(out / REPORT_NAME, report)
    atomic_write_json(model_dir / REPORT_NAME, report)
    repo = repo_name(cycle.config) if cycle.config.push_to_hub else None
    atomic_write_text(model_dir / "README.md", str(build_model_card(report, repo_id=repo)))


def push(cycle, report: dict) -> dict:
    """Upload the model folder of a finished run; the report records where it went."""
    cfg = cycle.config
    message = f"sleep-trl {__version__}: {report['method']}, {len(report['data']['sessions'])} sessions"
    cycle.console.print(f"Uploading {cycle.output_dir / MODEL_DIR} to the Hub ({repo_name(cfg)}) ...")
    hub = push_model_folder(cycle.output_dir / MODEL_DIR, cfg, commit_message=message)
    report = {**report, "hub": hub}
    atomic_write_json(cycle.output_dir / REPORT_NAME, report)
    cycle.console.print(f"Pushed: {hub['commit_url']}")
    return report


def show(report: dict, matrix, console) -> None:
    console.rule("[bold]Sleep run finished")
    matrix.print(console)
    console.print(summary_table(report))
    console.print(f"Report: {Path(report['config']['output_dir']) / REPORT_NAME}")


def load_report(output_dir, console) -> dict:
    report = json.loads((Path(output_dir) / REPORT_NAME).read_text())
    show(report, AccuracyMatrix.from_dict(report["accuracy_matrix"]), console)
    return report


def finished_run(cycle) -> dict:
    """A re-run of a finished run: its report, and the upload when `push_to_hub` asks for one not yet done."""
    report = load_report(cycle.output_dir, cycle.console)
    if cycle.main and cycle.config.push_to_hub and "hub" not in report:
        # the card names the repository in its loading snippet
        atomic_write_text(cycle.output_dir / MODEL_DIR / "README.md",
                          str(build_model_card(report, repo_id=repo_name(cycle.config))))
        report = push(cycle, report)
    wait_for_everyone()
    return report
