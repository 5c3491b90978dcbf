"""The model card of a Sleep run, built with `huggingface_hub.ModelCard` / `ModelCardData`.

Metadata the Hub reads: `base_model` (the Hub repository of the model that slept, when one is known: a packaged model
names the repository it copies), `library_name`, tags, `datasets` (when the sessions came from the Hub), and a
`model-index` with the accuracy on every session after the last one and the run's summary metrics (average accuracy,
accuracy on new knowledge, backward transfer, forgetting). The text: what the folder holds and how to load it, the
accuracy matrix, the sleep lineage (one slow expert per sleep), the recipe, the paper with its BibTeX.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..assets import hub_id
from ..paper import SLEEP_PAPER

TASK = "question-answering"
SUMMARY_METRICS = {
    "average_accuracy": "average accuracy after the last session",
    "new_knowledge_accuracy": "accuracy on new knowledge (diagonal)",
    "backward_transfer": "backward transfer (BWT)",
    "forgetting": "forgetting",
}
TAGS = ["sleep-trl", "trl", "continual-learning", "knowledge-seeding", "continuum-memory"]

TEMPLATE = """\
---
{{ card_data }}
---

# {{ name }}

A continual learner trained with sleep-trl {{ version }}
(**{{ mode }}**): {{ base }} with a continuum memory learned {{ num_sessions }} sessions of new knowledge
({{ source }}), one after another.

## What this folder holds

The host model's weights are the base model's, unchanged (`from_pretrained` of this folder is the base model);
everything learned lives in `memory.safetensors` (described by `memory_config.json`). Load both:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from sleep_trl.memory import load_memory

model = AutoModelForCausalLM.from_pretrained("{{ repo }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}")
memory = load_memory(model, "{{ repo }}")  # attaches the memory; the logits are the trained model's
```

`sleep_report.json` is the full report of the run (configuration, every phase with its time and metrics, the answers
of every evaluation); `accuracy_matrix.png` plots the matrix below.

## Accuracy matrix

R[i][j]: closed-book accuracy (metric `{{ metric }}`) on the held-out questions of session j after learning session i
(the row `base` is the model before any session).

{{ matrix }}

{{ summary }}

## Sleep lineage

Memory: `{{ memory }}`

{{ lineage }}

## Recipe

Method `{{ method }}`, seed {{ seed }}. The configuration as run (rerun it with `sleep-trl RECIPE.yaml`; every field
is in `sleep_report.json`):

```yaml
{{ recipe }}
```

## Citation

```bibtex
{{ citation }}
```
"""


def _dataset(report: dict) -> tuple[str, str, list[str] | None]:
    """(dataset_type, dataset_name, Hub datasets) of the run's sessions, for `model-index` and `datasets`."""
    data, cfg = report["data"], report["config"]
    if data["kind"] == "world":
        return "sleep-trl/world", data["source"], None
    name = cfg.get("dataset_name") or data["source"]
    known = hub_id(name)
    if known:
        return known, known, [known]
    return data["kind"], Path(str(name)).name, None


def _session_names(matrix: dict) -> list[str]:
    names = matrix.get("session_names") or [str(j) for j in range(len(matrix["R"]))]
    return [f"session {n}" if str(n).isdigit() else str(n) for n in names]


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _matrix_table(report: dict) -> str:
    matrix = report["accuracy_matrix"]
    names = _session_names(matrix)
    lines = ["| after | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    if matrix.get("base") is not None:
        lines.append("| base | " + " | ".join(_fmt(x) for x in matrix["base"]) + " |")
    lines += [f"| {names[i]} | " + " | ".join(_fmt(x) for x in row) + " |" for i, row in enumerate(matrix["R"])]
    return "\n".join(lines)


def _eval_results(report: dict) -> list[EvalResult]:
    dataset_type, dataset_name, _ = _dataset(report)
    matrix, summary = report["accuracy_matrix"], report["summary"]
    metric = matrix.get("metric", "contains")
    names = _session_names(matrix)
    results = []
    last = matrix["R"][-1] if matrix["R"] else []
    for j, value in enumerate(last):
        if value is not None:
            results.append(EvalResult(
                task_type=TASK, task_name="closed-book QA after the last session", dataset_type=dataset_type,
                dataset_name=dataset_name, dataset_split=names[j], metric_type=metric, metric_value=float(value),
                metric_name=f"accuracy on {names[j]} after the last session",
            ))
    for key, label in SUMMARY_METRICS.items():
        if summary.get(key) is not None:
            results.append(EvalResult(
                task_type=TASK, task_name="continual learning", dataset_type=dataset_type, dataset_name=dataset_name,
                dataset_split="all sessions", metric_type=key, metric_value=float(summary[key]), metric_name=label,
            ))
    return results


def _lineage(report: dict) -> str:
    experts = report.get("experts_added") or []
    if not experts:
        return f"No sleep: the `{report['method']}` baseline never consolidates."
    lines = []
    for e in experts:
        after = e.get("after") or {}
        shown = ", ".join(f"{k} {v}" for k, v in after.items() if isinstance(v, int | float))
        lines.append(f"- session {e['session']}: slow expert {e['slot']} unlocked and consolidated ({shown})")
    return "\n".join(lines)


def _recipe(report: dict) -> str:
    import yaml

    machine = ("output_dir", "torch_threads", "push_to_hub", "hub_model_id", "hub_private_repo")  # not the recipe
    cfg = {k: v for k, v in report["config"].items() if v not in (None, {}, []) and k not in machine}
    return yaml.safe_dump(cfg, sort_keys=False).strip()


def build_model_card(report: dict, repo_id: str | None = None) -> ModelCard:
    """The card of a finished run's model folder, from its report (`sleep_report.json`); `repo_id` (where it will
    be pushed) is used in the loading snippet."""
    cfg, summary = report["config"], report["summary"]
    base_name = cfg["model_name_or_path"]
    base = hub_id(base_name) or (str(report["model"].get("base") or base_name))
    _, _, datasets = _dataset(report)
    name = repo_id or Path(cfg["output_dir"]).name
    data = ModelCardData(
        model_name=name,
        base_model=hub_id(base_name),
        library_name="transformers",
        tags=[*TAGS, report["method"]],
        datasets=datasets,
        eval_results=_eval_results(report),
    )
    summary_lines = "\n".join(
        f"- {label}: {_fmt(summary.get(key))}" for key, label in SUMMARY_METRICS.items() if key in summary
    )
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        name=name,
        version=report["sleep_trl_version"],
        mode=report["mode"],
        base=f"[{base}](https://huggingface.co/{base})" if hub_id(base_name) else f"`{base}` (a local model)",
        num_sessions=len(report["data"]["sessions"]),
        source=report["data"]["source"],
        repo=repo_id or "path/to/this/folder",
        metric=report["accuracy_matrix"].get("metric", "contains"),
        matrix=_matrix_table(report),
        summary=summary_lines,
        memory=report["memory"],
        lineage=_lineage(report),
        method=report["method"],
        seed=cfg["seed"],
        recipe=_recipe(report),
        citation=SLEEP_PAPER["citation"],
    )
