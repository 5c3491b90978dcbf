"""The end of a Sleep run: the saved model (+ memory), `sleep_report.json`, `accuracy_matrix.png`, a model card that
records the sleep lineage, and a table a person can read at a glance."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from rich.table import Table

from .._version import __version__
from ..eval import AccuracyMatrix, save_accuracy_matrix_plot
from ..io import atomic_write_json, atomic_write_text, publish_dir
from ..paper import SLEEP_PAPER

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


def model_card(report: dict) -> str:
    cfg = report["config"]
    s = report["summary"]
    R = report["accuracy_matrix"]["R"]
    rows = "\n".join(
        f"| after session {i} | " + " | ".join("-" if x is None else f"{x:.2f}" for x in row) + " |"
        for i, row in enumerate(R)
    )
    header = "| | " + " | ".join(f"session {j}" for j in range(len(R))) + " |\n" + "|---" * (len(R) + 1) + "|"
    lineage = "\n".join(
        f"- session {e['session']}: slow expert {e['slot']} unlocked and consolidated ({e['after']})"
        for e in report["experts_added"]
    ) or "- none (sleep off: sequential fine-tuning baseline)"
    return f"""---
library_name: transformers
base_model: {cfg['model_name_or_path']}
tags:
- sleep-trl
- continual-learning
- knowledge-seeding
- trl
---

# {Path(cfg['output_dir']).name}

A continual learner trained with sleep-trl {report['sleep_trl_version']} ({report['mode']}):
{cfg['model_name_or_path']} with a continuum memory learned {len(report['data']['sessions'])} sessions of new knowledge
({report['data']['source']}) one after
another. The host weights are unchanged; what was learned lives in `memory.safetensors` (load it with
`sleep_trl.memory.load_memory(model, this_folder)`).

## Sleep lineage
{lineage}

Memory: `{report['memory']}`

## Accuracy matrix (closed-book QA, metric `{report['accuracy_matrix'].get('metric', 'contains')}`)
{header}
{rows}

- average accuracy after the last session: {s.get('average_accuracy')}
- backward transfer: {s.get('backward_transfer')}
- forgetting: {s.get('forgetting')}

## Citation
```bibtex
{SLEEP_PAPER['citation']}
```
"""


def finalize(cycle, ledger, wall_seconds: float) -> dict:
    out = cycle.output_dir
    model_dir = out / MODEL_DIR
    if not (model_dir / "config.json").exists():
        tmp = out / (MODEL_DIR + ".tmp")
        cycle.memory.save_pretrained(tmp, tokenizer=cycle.tokenizer)  # host + memory.safetensors + memory_config.json
        publish_dir(tmp, model_dir)
    report = build_report(cycle, ledger, wall_seconds)
    atomic_write_text(model_dir / "README.md", model_card(report))
    save_accuracy_matrix_plot(cycle.matrix, out / PLOT_NAME, title=f"R[i][j] · {report['mode']}", overwrite=True)
    atomic_write_json(out / REPORT_NAME, report)
    ledger.finished = True
    ledger.write()
    show(report, cycle.matrix, cycle.console)
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
