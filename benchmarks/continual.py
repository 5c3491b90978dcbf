"""Sleep against its baselines (or its ablations) on one stream, several seeds: one table, one figure.

Every arm is the sleep job of one recipe with some flags changed (by default the five `method`s, all with the same
optimizer steps and trainable parameters per session); each (arm, seed) runs in its own process, one after the
other (two trainings at once would slow each other down and spoil the wall times), into its own resumable run
directory, so an interrupted benchmark continues where it stopped. The table gives, per arm, the mean and spread
over seeds of the average accuracy after the last session, backward transfer, forgetting, accuracy on new knowledge
(the diagonal) and the phases' wall time; the figure shows each arm's accuracy matrix (first seed) side by side.

    python benchmarks/continual.py --out outputs/continual-world --seeds 0 1 2
    python benchmarks/continual.py --out outputs/continual-squad --seeds 0 \\
        -- --dataset_name ../shared/data/squad/squad-v1.1-dev.json --num_sessions 3
    python benchmarks/continual.py --out outputs/ablation --seeds 0 \\
        --arm "full sleep" "" --arm "no imitation" "--consolidation_args.alpha 1.0"

Flags after `--` go to every arm. `--arm LABEL FLAGS` (repeatable) replaces the default arms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARMS = [
    ("sleep", "--method sleep"),
    ("sequential", "--method sequential"),
    ("replay", "--method replay"),
    ("expert_per_session", "--method expert_per_session"),
    ("dream_only", "--method dream_only"),
]
METRICS = [
    ("average accuracy", "average_accuracy"),
    ("BWT", "backward_transfer"),
    ("forgetting", "forgetting"),
    ("diagonal", "new_knowledge_accuracy"),
]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def run_arm(recipe: Path, out: Path, label: str, flags: str, seed: int, extra: list[str], log) -> dict:
    """Run (or resume, or read back) one arm with one seed; returns its report."""
    run_dir = out / f"{slug(label)}-seed{seed}"
    report = run_dir / "sleep_report.json"
    if not report.exists():
        cmd = [sys.executable, "-m", "sleep_trl", str(recipe), *shlex.split(flags), *extra,
               "--seed", str(seed), "--output_dir", str(run_dir)]
        print(f"[continual] {label}, seed {seed}: {' '.join(cmd[3:])}", flush=True)
        with open(out / f"{slug(label)}-seed{seed}.log", "a") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{label} (seed {seed}) failed: see {out / (slug(label) + f'-seed{seed}.log')}")
    data = json.loads(report.read_text())
    base = next((p["metrics"]["accuracy"] for p in data["phases"] if p["phase"] == "base"), None)
    log.append({"arm": label, "seed": seed, "summary": data["summary"], "R": data["accuracy_matrix"]["R"],
                "before": sum(base) / len(base) if base else None,
                "seconds": data["seconds_total_phases"], "seconds_by_phase": data["seconds_by_phase"]})
    return data


def mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(results: list[dict], arms: list[str]) -> str:
    seeds = sorted({r["seed"] for r in results})
    head = "| arm | " + " | ".join(name for name, _ in METRICS) + " | before training | wall time of phases (s) |"
    lines = [f"seeds: {', '.join(map(str, seeds))} (mean ± sample std over seeds); before training: the base "
             "model's mean accuracy over all sessions", "", head, "|" + "---|" * (len(METRICS) + 3)]
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        cells = [mean_sd([r["summary"].get(key) for r in rows]) for _, key in METRICS]
        wall = mean_sd([r["seconds"] for r in rows], digits=0)
        before = mean_sd([r.get("before") for r in rows])
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {before} | {wall} |")
    return "\n".join(lines)


def figure(results: list[dict], arms: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = {arm: next(r for r in results if r["arm"] == arm) for arm in arms}
    fig = Figure(figsize=(3.2 * len(arms), 3.4))
    FigureCanvasAgg(fig)
    for i, arm in enumerate(arms):
        ax = fig.add_subplot(1, len(arms), i + 1)
        R = [[math.nan if x is None else x for x in row] for row in first[arm]["R"]]
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for a, row in enumerate(R):
            for b, x in enumerate(row):
                if not math.isnan(x):
                    ax.text(b, a, f"{x:.2f}", ha="center", va="center", color="white" if x < 0.6 else "black",
                            fontsize=7)
        s = first[arm]["summary"]
        ax.set_title(f"{arm}\navg {s['average_accuracy']:.2f}, BWT {s.get('backward_transfer') or 0:+.2f}",
                     fontsize=9)
        ax.set_xticks(range(len(R[0])))
        ax.set_yticks(range(len(R)))
        ax.set_xlabel("session j")
        ax.set_ylabel("after session i")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes/sleep.yaml")
    p.add_argument("--out", type=Path, required=True, help="folder of the runs, the table and the figure")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arm", nargs=2, action="append", metavar=("LABEL", "FLAGS"), help="replace the default arms")
    args = p.parse_args(argv)
    arms = [tuple(a) for a in args.arm] if args.arm else DEFAULT_ARMS
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for seed in args.seeds:  # seed-major: a first full table as early as possible
        for label, flags in arms:
            run_arm(args.recipe, args.out, label, flags, seed, extra, results)
    labels = [label for label, _ in arms]
    text = table(results, labels)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    figure(results, labels, args.out / "matrices.png")
    print(f"figure: {args.out / 'matrices.png'}")


if __name__ == "__main__":
    main()
